//! Child processes that are killed when their guard drops.

use crate::cleanup::{self, Resource};
use crate::{fail, Result};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// True once `pid` has exited. A child of ours is reaped here (a zombie would otherwise
/// still answer `kill(pid, 0)`); for any other process, signal 0 tells.
fn exited(pid: Pid) -> bool {
    match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
        Ok(WaitStatus::StillAlive) => false,
        Ok(_) => true,
        // Not our child (or already reaped): ask whether it still exists.
        Err(_) => kill(pid, None).is_err(),
    }
}

/// Sends SIGTERM, waits up to two seconds, then SIGKILL.
pub fn terminate(pid: u32) {
    let pid = Pid::from_raw(pid as i32);
    // At worst it fails with ESRCH: the process is gone already.
    let _ = kill(pid, Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        if exited(pid) {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = kill(pid, Signal::SIGKILL);
    let _ = exited(pid);
}

/// A running child, killed on drop.
pub struct Process {
    child: Child,
    key: u64,
    name: String,
}

impl Process {
    /// Starts `argv` with stdout and stderr sent to `log` (or discarded).
    pub fn spawn(argv: &[String], log: Option<&std::path::Path>) -> Result<Self> {
        let (out, err) = match log {
            Some(path) => {
                let f = std::fs::File::create(path)?;
                (Stdio::from(f.try_clone()?), Stdio::from(f))
            }
            None => (Stdio::null(), Stdio::null()),
        };
        let child = Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| fail!("cannot start {}: {e}", argv.join(" ")))?;
        let key = cleanup::register(Resource::Process(child.id()));
        Ok(Self {
            child,
            key,
            name: argv.join(" "),
        })
    }

    /// Process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits up to `timeout` for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                return Err(fail!("{} did not exit within {timeout:?}", self.name));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        cleanup::release(self.key);
        let _ = self.child.wait();
    }
}

/// Runs `argv` to completion; its stdout on success, an error with stderr otherwise.
/// The process is registered while it runs, so that Ctrl-C kills it too.
pub fn run(argv: &[&str]) -> Result<String> {
    let child = Command::new(argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail!("cannot run {}: {e}", argv.join(" ")))?;
    let key = cleanup::register(Resource::Process(child.id()));
    let output = child.wait_with_output();
    cleanup::forget(key);
    let Output {
        status,
        stdout,
        stderr,
    } = output.map_err(|e| fail!("{}: {e}", argv.join(" ")))?;
    if !status.success() {
        return Err(fail!(
            "`{}` failed ({status}): {}",
            argv.join(" "),
            String::from_utf8_lossy(&stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&stdout).into_owned())
}
