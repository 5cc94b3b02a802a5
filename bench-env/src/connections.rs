//! New TCP connections per second: servers that answer one byte and close, and clients
//! that connect, send a byte, read the answer and close, again and again (what a Service's
//! or a pod's short request/response traffic costs a forwarder).

use crate::listen::accept_within;
use crate::netns::Netns;
use crate::testbed::Pod;
use crate::{fail, Result};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use switchyard_dataplane::io::netns::run_in;

/// How long a server thread waits in the kernel before it looks at its stop flag.
const WAIT: Duration = Duration::from_millis(100);

/// Servers for [`conn_rate`]: on port `port` of each pod, answer one byte with one byte
/// and close. Stop on drop.
pub struct RequestServers {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl RequestServers {
    /// Starts two acceptor threads per pod.
    pub fn start(pods: &[&Pod], port: u16) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for pod in pods {
            let listener = run_in(&pod.ns.path(), || {
                let l = TcpListener::bind(SocketAddr::from((pod.ipv4, port)))?;
                l.set_nonblocking(true)?;
                Ok(l)
            })
            .map_err(|e| fail!("request server: {e}"))?;
            for _ in 0..2 {
                let (listener, stop) = (listener.try_clone()?, stop.clone());
                threads.push(std::thread::spawn(move || {
                    let mut byte = [0u8; 1];
                    while !stop.load(Ordering::Relaxed) {
                        if let Some((mut s, _)) = accept_within(&listener, WAIT) {
                            let _ = s.set_nonblocking(false);
                            let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
                            if s.read_exact(&mut byte).is_ok() {
                                let _ = s.write_all(&byte);
                            }
                        }
                    }
                }));
            }
        }
        Ok(Self { stop, threads })
    }
}

impl Drop for RequestServers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// New TCP connections per second from `client` to `target` over `seconds`, with
/// `concurrency` clients each opening a connection, sending a byte, reading the answer
/// and closing, again and again. Failed connections do not count.
pub fn conn_rate(
    client: &Netns,
    target: SocketAddr,
    concurrency: usize,
    seconds: u64,
) -> Result<f64> {
    // Every connection leaves a TIME_WAIT socket for a minute; without these, the client's
    // 28,000 ephemeral ports run out after a few seconds at this rate and later rounds
    // measure connect()'s search for a free port (in either arm).
    client.exec(&[
        "sysctl",
        "-q",
        "-w",
        "net.ipv4.tcp_tw_reuse=1",
        "net.ipv4.ip_local_port_range=1024 65535",
    ])?;
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let path = client.path();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (done, failed, stop, path) =
                (done.clone(), failed.clone(), stop.clone(), path.clone());
            std::thread::spawn(move || {
                let _ = run_in(&path, || {
                    let mut byte = [b'x'];
                    while !stop.load(Ordering::Relaxed) {
                        let Ok(mut s) = TcpStream::connect_timeout(&target, Duration::from_secs(1))
                        else {
                            failed.fetch_add(1, Ordering::Relaxed);
                            continue;
                        };
                        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
                        if s.write_all(&byte).is_ok() && s.read_exact(&mut byte).is_ok() {
                            done.fetch_add(1, Ordering::Relaxed);
                        } else {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Ok(())
                });
            })
        })
        .collect();
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(seconds));
    let count = done.load(Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.join();
    }
    if count == 0 {
        return Err(fail!("no connection to {target} completed"));
    }
    let failed = failed.load(Ordering::Relaxed);
    if failed > 0 {
        eprintln!("({failed} connections to {target} failed or timed out)");
    }
    Ok(count as f64 / elapsed)
}
