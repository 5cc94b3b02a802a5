//! bench-env interrupted with Ctrl-C mid-run removes every namespace, process and file it
//! made. Needs root; under `CI=true` it always runs.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn netns_with(prefix: &str) -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(prefix))
        .map(String::from)
        .collect()
}

#[test]
#[cfg_attr(
    not(privileged),
    ignore = "needs root: network namespaces and TAP devices"
)]
fn ctrl_c_leaves_nothing_behind() {
    bench_env::require_root("interrupt test");
    bench_env::tools::ensure_installed().unwrap();
    bench_env::tools::ensure_cni_plugins().unwrap();
    let binary = bench_env::tools::find_binary("bench-env").unwrap();
    let mut child = Command::new(binary)
        .args(["single-node", "--seconds", "20", "--repeat", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let prefix = format!("sy{}t", child.id());
    let deadline = Instant::now() + Duration::from_secs(60);
    while netns_with(&prefix).len() < 6 {
        assert!(
            Instant::now() < deadline,
            "bench-env did not build its testbeds"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Let it get into a measurement, then interrupt.
    std::thread::sleep(Duration::from_secs(2));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("SIGINT to the child we started");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "bench-env did not exit after SIGINT"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(130), "exit status after Ctrl-C");
    assert!(
        netns_with(&prefix).is_empty(),
        "namespaces left: {:?}",
        netns_with(&prefix)
    );
    let procs = Command::new("pgrep")
        .args(["-f", &prefix])
        .output()
        .unwrap();
    assert!(
        procs.stdout.is_empty(),
        "processes left: {}",
        String::from_utf8_lossy(&procs.stdout)
    );
    let files: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .collect();
    assert!(files.is_empty(), "files left: {files:?}");
}
