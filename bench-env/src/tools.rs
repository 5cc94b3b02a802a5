//! The external tools the harness drives, installed from Debian's packages when missing.

use crate::process::run;
use crate::{fail, Result};
use std::process::Command;

/// Command -> Debian package providing it.
const TOOLS: &[(&str, &str)] = &[
    ("iperf3", "iperf3"),
    ("ping", "iputils-ping"),
    ("ip", "iproute2"),
];

fn have(command: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {command}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Installs whatever of iperf3, ping and ip is missing (apt-get, needs root).
pub fn ensure_installed() -> Result<()> {
    let missing: Vec<&str> = TOOLS
        .iter()
        .filter(|(c, _)| !have(c))
        .map(|(_, p)| *p)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("bench-env: installing {}", missing.join(" "));
    run(&["apt-get", "update", "-qq"])?;
    let mut argv = vec!["apt-get", "install", "-y", "-qq", "--no-install-recommends"];
    argv.extend(&missing);
    let status = Command::new(argv[0])
        .args(&argv[1..])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()?;
    if !status.success() {
        return Err(fail!("installing {} failed", missing.join(" ")));
    }
    Ok(())
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

/// Installs Debian's reference CNI plugins (host-local, bridge, ...) into /usr/lib/cni when
/// host-local is missing.
pub fn ensure_cni_plugins() -> Result<()> {
    if std::path::Path::new("/usr/lib/cni/host-local").is_file() {
        return Ok(());
    }
    eprintln!("bench-env: installing containernetworking-plugins");
    run(&["apt-get", "update", "-qq"])?;
    let status = Command::new("apt-get")
        .args([
            "install",
            "-y",
            "-qq",
            "--no-install-recommends",
            "containernetworking-plugins",
        ])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()?;
    if !status.success() {
        return Err(fail!("installing containernetworking-plugins failed"));
    }
    Ok(())
}

/// Installs podman (with its CNI backend), runc and busybox-static when podman is missing.
pub fn ensure_podman() -> Result<()> {
    let missing: Vec<&str> = [
        ("podman", "podman"),
        ("runc", "runc"),
        ("busybox", "busybox-static"),
        ("nsenter", "util-linux"),
    ]
    .iter()
    .filter(|(c, _)| !have(c))
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
