//! The external tools the harness drives, installed from Debian's packages when missing.

use crate::process::run;
use crate::{fail, Result};
use std::process::Command;

fn have(what: &str) -> bool {
    if what.starts_with('/') {
        return std::path::Path::new(what).exists();
    }
    Command::new("sh")
        .args(["-c", &format!("command -v {what}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Installs, with apt-get (needs root), the Debian package of each `(command or absolute
/// path, package)` pair whose command or file is missing.
fn ensure(needs: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = needs
        .iter()
        .filter(|(what, _)| !have(what))
        .map(|(_, p)| *p)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("bench-env: installing {}", missing.join(" "));
    run(&["apt-get", "update", "-qq"])?;
    let status = Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()?;
    if !status.success() {
        return Err(fail!("installing {} failed", missing.join(" ")));
    }
    Ok(())
}

/// Installs whatever of iperf3, ping, ip, iptables (the kernel arm's masquerade) and
/// hping3 (floods) is missing.
pub fn ensure_installed() -> Result<()> {
    ensure(&[
        ("iperf3", "iperf3"),
        ("ping", "iputils-ping"),
        ("ip", "iproute2"),
        ("iptables", "iptables"),
        ("hping3", "hping3"),
    ])
}

/// Installs Debian's reference CNI plugins (host-local, bridge, ...) into /usr/lib/cni.
pub fn ensure_cni_plugins() -> Result<()> {
    ensure(&[("/usr/lib/cni/host-local", "containernetworking-plugins")])
}

/// Installs podman (with its CNI backend), runc, busybox-static and nsenter.
pub fn ensure_podman() -> Result<()> {
    ensure(&[
        ("podman", "podman"),
        ("runc", "runc"),
        ("busybox", "busybox-static"),
        ("nsenter", "util-linux"),
    ])
}

/// Finds a Switchyard binary: `$SWITCHYARD_BIN_DIR/NAME`, or beside (or one level above)
/// the running executable, which covers `target/*/NAME` and `target/*/deps/TEST`.
pub fn find_binary(name: &str) -> Result<std::path::PathBuf> {
    let mut dirs = Vec::new();
    if let Ok(dir) = std::env::var("SWITCHYARD_BIN_DIR") {
        dirs.push(std::path::PathBuf::from(dir));
    }
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            dirs.push(dir.to_path_buf());
            if let Some(up) = dir.parent() {
                dirs.push(up.to_path_buf());
            }
        }
    }
    dirs.iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| fail!("cannot find the {name} binary near the running program; build it with `cargo build --release --workspace` or set SWITCHYARD_BIN_DIR"))
}
