//! The ceiling of any read/write TAP forwarder on this machine, measured in one run.
//!
//! Three arms carry iperf3 TCP between two pods, in alternating rounds:
//! - `kernel`: veth pairs on a Linux bridge (bench-env's baseline);
//! - `null`: the pods' TAPs, created exactly as the dataplane creates them (vnet header,
//!   TSO, two queues), joined by a forwarder that does nothing but `read` a frame from one
//!   TAP queue and `write` it, virtio-net header and all, to the other: two threads, one per
//!   queue, as the dataplane's workers. No parsing, no tables, no pipeline;
//! - `switchyard`: the real dataplane (bench-env's Switchyard arm).
//!
//! `null` bounds what any dataplane built on TAP read/write can reach here: whatever the
//! pipeline costs, it cannot beat two copies per byte plus the system calls.
//!
//! Run as root: `cargo run --release -p bench-env --example tap_ceiling -- [SECONDS] [ROUNDS]`.
// Unsafe code here: the null forwarder's poll/read/write: the same system calls the dataplane
// makes, so that the ceiling is measured with them.
#![allow(unsafe_code)]

use bench_env::measure;
use bench_env::netns::Netns;
use bench_env::testbed::{pod_ipv4, pod_ipv6, unique_prefix, Attach, Options, Pod, Testbed};
use bench_env::{fail, Result};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use switchyard_api::MacAddr;
use switchyard_dataplane::io::interface::PodInterface;
use switchyard_dataplane::io::tap::TapDevice;
use switchyard_dataplane::tables::Gateway;

const QUEUES: usize = 2;

/// Two pods whose TAPs a null forwarder joins; everything goes when it drops.
struct NullBed {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    devices: Vec<TapDevice>,
    pods: Vec<Pod>,
}

impl NullBed {
    fn build() -> Result<Self> {
        let prefix = unique_prefix();
        let mut pods = Vec::new();
        let mut devices = Vec::new();
        for i in 0..2 {
            let ns = Netns::create(&format!("{prefix}-null{i}"))?;
            let config = PodInterface {
                ifname: "eth0".into(),
                mac: MacAddr([0x02, 0x5e, 0, 0, 0, i as u8 + 1]),
                mtu: 1500,
                ips: vec![
                    format!("{}/24", pod_ipv4(i))
                        .parse()
                        .map_err(|e| fail!("{e}"))?,
                    format!("{}/64", pod_ipv6(i))
                        .parse()
                        .map_err(|e| fail!("{e}"))?,
                ],
                gateway: Gateway::default(),
                steering: Default::default(),
                gso_max_size: None,
            };
            let (device, _) = TapDevice::create(&ns.path(), &config, QUEUES)?;
            device.set_persist(false)?;
            devices.push(device);
            pods.push(Pod {
                ns,
                ipv4: pod_ipv4(i),
                ipv6: pod_ipv6(i),
                port: None,
            });
        }
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..QUEUES)
            .map(|q| {
                let fds = [devices[0].raw_fd(q), devices[1].raw_fd(q)];
                let stop = stop.clone();
                std::thread::spawn(move || forward(fds, &stop))
            })
            .collect();
        Ok(Self {
            stop,
            threads,
            devices,
            pods,
        })
    }
}

impl Drop for NullBed {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.devices.clear();
    }
}

/// Moves every frame that arrives on one fd to the other, unchanged, until `stop`.
fn forward(fds: [RawFd; 2], stop: &AtomicBool) {
    let mut buf = vec![0u8; 65_536 + 256];
    let mut pfds = fds.map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: pfds is a valid array of two pollfd for the duration of the call.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), 2, 100) };
        if n <= 0 {
            continue;
        }
        for side in 0..2 {
            if pfds[side].revents & libc::POLLIN == 0 {
                continue;
            }
            loop {
                // SAFETY: buf is valid for buf.len() bytes; fds stay open until the
                // threads are joined.
                let len = unsafe { libc::read(fds[side], buf.as_mut_ptr().cast(), buf.len()) };
                if len <= 0 {
                    break;
                }
                // SAFETY: the first len bytes of buf were just written by read.
                unsafe { libc::write(fds[1 - side], buf.as_ptr().cast(), len as usize) };
            }
        }
    }
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let seconds: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(5);
    let rounds: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(3);
    if !bench_env::is_root() {
        return Err(fail!("run as root: it creates network namespaces and TAPs"));
    }
    bench_env::cleanup::install_signal_handler();
    let options = Options {
        pods: 2,
        attach: Attach::Direct,
        ..Options::default()
    };
    let kernel = Testbed::kernel(&options)?;
    let null = NullBed::build()?;
    let switchyard = Testbed::switchyard(&options)?;
    let arms: [(&str, &[Pod]); 3] = [
        ("kernel", &kernel.pods),
        ("null", &null.pods),
        ("switchyard", &switchyard.pods),
    ];
    for (name, pods) in arms {
        if !measure::ping(&pods[0].ns, pods[1].ipv4.into()) {
            return Err(fail!("{name}: pod0 cannot reach pod1"));
        }
    }
    for streams in [1, 4] {
        let mut results: Vec<Vec<f64>> = vec![Vec::new(); arms.len()];
        for _ in 0..rounds {
            for (i, (_, pods)) in arms.iter().enumerate() {
                results[i].push(measure::tcp_gbps(&pods[0], &pods[1], streams, seconds)?);
            }
        }
        let medians: Vec<f64> = results
            .iter_mut()
            .map(|r| {
                r.sort_by(f64::total_cmp);
                r[r.len() / 2]
            })
            .collect();
        println!("TCP, {streams} stream(s), {rounds} rounds of {seconds} s, medians (Gbit/s):");
        for ((name, _), (m, all)) in arms.iter().zip(medians.iter().zip(&results)) {
            println!(
                "  {name:<10} {m:6.2}  ratio to kernel {:.2}x  (rounds: {})",
                m / medians[0],
                all.iter()
                    .map(|v| format!("{v:.2}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    Ok(())
}
