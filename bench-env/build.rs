//! Sets `cfg(privileged)` when the tests are built as root or under `CI=true`: the
//! integration tests that need network namespaces and TAP devices are ignored otherwise, so
//! that they report as ignored, never as passed, where they cannot run.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(privileged)");
    println!("cargo::rerun-if-env-changed=CI");
    println!("cargo::rerun-if-env-changed=USER");
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    let root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false);
    if ci || root {
        println!("cargo::rustc-cfg=privileged");
    }
}
