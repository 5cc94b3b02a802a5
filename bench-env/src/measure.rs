//! Measurements on a testbed: connectivity matrix, iperf3 TCP and UDP, ping RTT.

use crate::netns::Netns;
use crate::testbed::Pod;
use crate::{fail, Result};
use hdrhistogram::Histogram;
use std::net::IpAddr;
use std::time::Duration;

/// Port the iperf3 servers listen on (inside pod namespaces, so never clashes).
const IPERF_PORT: u16 = 5201;

/// Outcome of a connectivity matrix.
#[derive(Debug, Default)]
pub struct Matrix {
    /// Pings attempted.
    pub attempted: usize,
    /// What failed, as "podA -> address".
    pub failures: Vec<String>,
}

impl Matrix {
    /// Pings `target` from `from` and records the outcome under `label`.
    pub fn ping(&mut self, from: &Netns, label: &str, target: IpAddr) {
        self.attempted += 1;
        if !ping(from, target) {
            self.failures.push(format!("{label} -> {target}"));
        }
    }

    /// Adds another matrix's outcomes.
    pub fn extend(&mut self, other: Matrix) {
        self.attempted += other.attempted;
        self.failures.extend(other.failures);
    }
}

/// True when `target` answers a ping from `from`. Up to three tries, one second each:
/// the first packet toward a new neighbour may be lost while it is resolved.
pub fn ping(from: &Netns, target: IpAddr) -> bool {
    let target = target.to_string();
    (0..3).any(|_| {
        from.exec(&["ping", "-c", "1", "-W", "1", "-q", &target])
            .is_ok()
    })
}

/// Every pod pings every other pod, over IPv4 and IPv6.
pub fn connectivity(pods: &[Pod]) -> Matrix {
    let mut m = Matrix::default();
    for (i, from) in pods.iter().enumerate() {
        for (j, to) in pods.iter().enumerate() {
            if i != j {
                for addr in [IpAddr::V4(to.ipv4), IpAddr::V6(to.ipv6)] {
                    m.ping(&from.ns, &format!("pod{i}"), addr);
                }
            }
        }
    }
    m
}

/// Runs an iperf3 client in pod `client` against a one-shot server in pod `server`;
/// returns the client's JSON report.
fn iperf(client: &Pod, srv: &Pod, extra: &[&str]) -> Result<serde_json::Value> {
    let target = std::net::SocketAddr::from((srv.ipv4, IPERF_PORT));
    iperf_via(&client.ns, &[srv], target, extra)
}

/// Runs an iperf3 client in `client` against `target` (a pod, or a Service's address that
/// leads to one of `servers`, each running a one-off iperf3 server on port 5201).
fn iperf_via(
    client: &Netns,
    servers: &[&Pod],
    target: std::net::SocketAddr,
    extra: &[&str],
) -> Result<serde_json::Value> {
    let port = IPERF_PORT.to_string();
    let _servers = servers
        .iter()
        .map(|srv| srv.ns.spawn(&["iperf3", "-s", "-1", "-p", &port], None))
        .collect::<Result<Vec<_>>>()?;
    let (addr, target_port) = (target.ip().to_string(), target.port().to_string());
    let mut argv = vec![
        "iperf3",
        "-c",
        addr.as_str(),
        "-p",
        target_port.as_str(),
        "-J",
    ];
    argv.extend(extra);
    let mut last = None;
    for _ in 0..20 {
        let outcome = client.exec(&argv).and_then(|out| {
            let report: serde_json::Value = serde_json::from_str(&out)?;
            match report.get("error").and_then(|e| e.as_str()) {
                Some(error) => Err(fail!("iperf3: {error}")),
                None => Ok(report),
            }
        });
        match outcome {
            Ok(report) => return Ok(report),
            Err(e) => {
                // The server may not listen yet: iperf3 says "Connection refused" then.
                last = Some(e);
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    Err(last.unwrap_or_else(|| fail!("iperf3 did not run")))
}

/// iperf3 TCP throughput, Gbit/s, from `client` to `target`, which leads to one of
/// `servers` (through a Service, say).
pub fn tcp_gbps_via(
    client: &Netns,
    servers: &[&Pod],
    target: std::net::SocketAddr,
    streams: usize,
    seconds: u64,
) -> Result<f64> {
    let (p, t) = (streams.to_string(), seconds.to_string());
    let report = iperf_via(client, servers, target, &["-P", &p, "-t", &t])?;
    number(&report, &["end", "sum_received", "bits_per_second"])
        .map(|bps| bps / 1e9)
        .ok_or_else(|| fail!("iperf3 TCP report without end.sum_received: {report}"))
}

fn number(v: &serde_json::Value, path: &[&str]) -> Option<f64> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_f64()
}

/// iperf3 TCP throughput from `client` to `server` with `streams` parallel streams, Gbit/s.
pub fn tcp_gbps(client: &Pod, server: &Pod, streams: usize, seconds: u64) -> Result<f64> {
    let target = std::net::SocketAddr::from((server.ipv4, IPERF_PORT));
    tcp_gbps_via(&client.ns, &[server], target, streams, seconds)
}

/// iperf3 UDP with 64-byte payloads at full speed: packets per second the receiver got.
pub fn udp_64b_pps(client: &Pod, server: &Pod, seconds: u64) -> Result<f64> {
    let t = seconds.to_string();
    let report = iperf(client, server, &["-u", "-l", "64", "-b", "0", "-t", &t])?;
    let sum = |k: &str| number(&report, &["end", "sum", k]);
    match (sum("packets"), sum("lost_packets"), sum("seconds")) {
        (Some(sent), Some(lost), Some(secs)) if secs > 0.0 => Ok((sent - lost) / secs),
        _ => Err(fail!("iperf3 UDP report without end.sum packets: {report}")),
    }
}

/// Round-trip times of `count` pings 5 ms apart from `client` to `server`: (p50, p99) in µs.
pub fn rtt_us(client: &Pod, server: &Pod, count: usize) -> Result<(f64, f64)> {
    let target = server.ipv4.to_string();
    let c = count.to_string();
    let out = client
        .ns
        .exec(&["ping", "-c", &c, "-i", "0.005", "-W", "1", &target])?;
    let mut hist = Histogram::<u64>::new(3).map_err(|e| fail!("{e}"))?;
    for line in out.lines() {
        if let Some(ms) = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("time="))
            .and_then(|v| v.parse::<f64>().ok())
        {
            hist.record((ms * 1000.0).round().max(1.0) as u64)
                .map_err(|e| fail!("{e}"))?;
        }
    }
    if hist.is_empty() {
        return Err(fail!("no ping replies from {target}: {out}"));
    }
    Ok((
        hist.value_at_quantile(0.5) as f64,
        hist.value_at_quantile(0.99) as f64,
    ))
}

/// [`rtt_us`] from `pods[0]` to `pods[1]` while `pods[2]` sends a 4-stream iperf3 to
/// `pods[3]` on the same node for the whole time: (p50, p99) in µs.
pub fn rtt_us_under_load(pods: &[Pod], count: usize) -> Result<(f64, f64)> {
    let [a, b, c, d, ..] = pods else {
        return Err(fail!("the RTT under load needs four pods"));
    };
    // The pings take count × 5 ms; the load starts a second before and outlasts them.
    let seconds = (count as u64 * 5).div_ceil(1000) + 3;
    std::thread::scope(|scope| {
        let load = scope.spawn(|| tcp_gbps(c, d, 4, seconds));
        std::thread::sleep(Duration::from_secs(1));
        let rtt = rtt_us(a, b, count);
        let load = load.join().map_err(|_| fail!("the iperf3 load panicked"))?;
        load?;
        rtt
    })
}
