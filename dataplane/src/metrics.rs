//! The dataplane's counters in Prometheus' text format (version 0.0.4), and the small
//! HTTP server that answers scrapes (`--metrics ADDR:PORT`). Rendering is sans-IO: it
//! reads a snapshot the switch assembles ([`Snapshot`]).
//!
//! Names follow Prometheus' conventions: the `switchyard_` prefix, `_total` for counters,
//! seconds and bytes as units.

use crate::switch::Switch;
use crate::worker::{WorkTimes, HISTOGRAM_BUCKETS};
use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

/// One port's counters with the labels that name it.
#[derive(Debug, Clone, Default)]
pub struct PortSample {
    /// Port id.
    pub id: u32,
    /// Interface name.
    pub ifname: String,
    /// The Kubernetes pod (`namespace/name`), or the owner (`node` for the node's own).
    pub pod: String,
    /// Frames and bytes read from the port, written to it, failed writes.
    pub rx_frames: u64,
    /// Bytes read.
    pub rx_bytes: u64,
    /// Frames written.
    pub tx_frames: u64,
    /// Bytes written.
    pub tx_bytes: u64,
    /// Failed writes.
    pub tx_errors: u64,
}

/// One worker's measurements.
#[derive(Debug, Clone, Default)]
pub struct WorkerSample {
    /// Frames the worker read (the batch-size histogram's sum).
    pub rx_frames: u64,
    /// Its batch and busy times.
    pub times: WorkTimes,
}

/// A connection-tracking table's fill.
#[derive(Debug, Clone, Copy, Default)]
pub struct TableSample {
    /// Flows held.
    pub entries: u64,
    /// The most it holds.
    pub capacity: u64,
    /// Flows not established, dropped to make room for new ones while full.
    pub early_drops: u64,
}

/// Everything a scrape shows, read from the switch at once.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Pipeline events by name, summed over workers.
    pub events: Vec<(String, u64)>,
    /// Drops by reason, summed over workers.
    pub drops: Vec<(String, u64)>,
    /// Every port.
    pub ports: Vec<PortSample>,
    /// Per worker, by index.
    pub workers: Vec<WorkerSample>,
    /// Masquerade's connection-tracking table, once the node settings enabled it.
    pub conntrack: Option<TableSample>,
    /// The Service flow table.
    pub service_flows: TableSample,
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A flow table's entries, capacity and early drops, named `PREFIX_entries`, ...
fn render_table(out: &mut String, prefix: &str, what: &str, table: &TableSample) {
    let rows = [
        ("entries", "gauge", "tracked", table.entries),
        (
            "capacity",
            "gauge",
            "the table holds at most",
            table.capacity,
        ),
        (
            "early_drops_total",
            "counter",
            "not established, dropped to make room for new ones",
            table.early_drops,
        ),
    ];
    for (suffix, kind, help, value) in rows {
        let name = format!("{prefix}_{suffix}");
        header(out, &name, kind, &format!("{what} {help}."));
        let _ = writeln!(out, "{name} {value}");
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// A counter with one sample per `(label value, count)`.
fn labelled_counters(
    out: &mut String,
    name: &str,
    help: &str,
    label: &str,
    values: &[(String, u64)],
) {
    header(out, name, "counter", help);
    for (value, n) in values {
        let _ = writeln!(out, "{name}{{{label}=\"{}\"}} {n}", escape(value));
    }
}

/// A histogram with buckets `bounds` (the last is `+Inf`), from bucket counts.
fn histogram(
    out: &mut String,
    name: &str,
    labels: &str,
    bounds: &[String],
    counts: &[u64],
    sum: f64,
) {
    let mut cumulative = 0;
    for (bound, count) in bounds.iter().zip(counts) {
        cumulative += count;
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {cumulative}");
    }
    let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
    let _ = writeln!(out, "{name}_count{{{labels}}} {cumulative}");
}

/// A per-port counter: its name, its help text, and where its value comes from.
type PortMetric = (&'static str, &'static str, fn(&PortSample) -> u64);

/// The scrape's text.
pub fn render(s: &Snapshot) -> String {
    let mut out = String::new();
    let port_metrics: [PortMetric; 5] = [
        (
            "switchyard_port_receive_packets_total",
            "Frames read from the port (a GSO super-frame counts once).",
            |p| p.rx_frames,
        ),
        (
            "switchyard_port_receive_bytes_total",
            "Bytes read from the port.",
            |p| p.rx_bytes,
        ),
        (
            "switchyard_port_transmit_packets_total",
            "Frames written to the port.",
            |p| p.tx_frames,
        ),
        (
            "switchyard_port_transmit_bytes_total",
            "Bytes written to the port.",
            |p| p.tx_bytes,
        ),
        (
            "switchyard_port_transmit_errors_total",
            "Writes to the port that failed (the frame was dropped).",
            |p| p.tx_errors,
        ),
    ];
    for (name, help, value) in port_metrics {
        header(&mut out, name, "counter", help);
        for p in &s.ports {
            let _ = writeln!(
                out,
                "{name}{{port=\"{}\",ifname=\"{}\",pod=\"{}\"}} {}",
                p.id,
                escape(&p.ifname),
                escape(&p.pod),
                value(p)
            );
        }
    }
    labelled_counters(
        &mut out,
        "switchyard_drops_total",
        "Frames dropped, by reason.",
        "reason",
        &s.drops,
    );
    labelled_counters(
        &mut out,
        "switchyard_events_total",
        "Pipeline events, by name.",
        "event",
        &s.events,
    );
    if let Some(table) = s.conntrack {
        render_table(
            &mut out,
            "switchyard_conntrack",
            "Masqueraded flows",
            &table,
        );
    }
    render_table(
        &mut out,
        "switchyard_service_flows",
        "Flows to Services",
        &s.service_flows,
    );
    header(&mut out, "switchyard_workers", "gauge", "Worker threads.");
    let _ = writeln!(out, "switchyard_workers {}", s.workers.len());
    header(
        &mut out,
        "switchyard_worker_busy_seconds_total",
        "counter",
        "Time a worker spent forwarding (from a round's first read to its last write).",
    );
    for (i, w) in s.workers.iter().enumerate() {
        let _ = writeln!(
            out,
            "switchyard_worker_busy_seconds_total{{worker=\"{i}\"}} {}",
            w.times.busy_ns as f64 / 1e9
        );
    }
    let mut size_bounds: Vec<String> = (0..HISTOGRAM_BUCKETS - 1)
        .map(|i| (1u64 << i).to_string())
        .collect();
    size_bounds.push("+Inf".into());
    header(
        &mut out,
        "switchyard_batch_frames",
        "histogram",
        "Frames per batch read from a port.",
    );
    for (i, w) in s.workers.iter().enumerate() {
        histogram(
            &mut out,
            "switchyard_batch_frames",
            &format!("worker=\"{i}\""),
            &size_bounds,
            &w.times.batch_sizes,
            w.rx_frames as f64,
        );
    }
    let mut time_bounds: Vec<String> = (0..HISTOGRAM_BUCKETS - 1)
        .map(|i| format!("{:e}", (1u64 << (i + 10)) as f64 / 1e9))
        .collect();
    time_bounds.push("+Inf".into());
    header(
        &mut out,
        "switchyard_batch_duration_seconds",
        "histogram",
        "Time from reading a batch to writing its last frame.",
    );
    for (i, w) in s.workers.iter().enumerate() {
        histogram(
            &mut out,
            "switchyard_batch_duration_seconds",
            &format!("worker=\"{i}\""),
            &time_bounds,
            &w.times.batch_ns,
            w.times.batch_ns_sum as f64 / 1e9,
        );
    }
    out
}

/// Serves `GET /metrics` on `addr` from a thread of its own, one connection at a time;
/// returns the address it listens on.
pub fn serve(addr: SocketAddr, switch: Arc<Switch>) -> io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let local = listener.local_addr()?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                if let Err(e) = answer(stream, &switch) {
                    tracing::warn!("a metrics scrape failed: {e}");
                }
            }
        })?;
    Ok(local)
}

fn answer(mut stream: TcpStream, switch: &Switch) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut request = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 8192 {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        request.extend_from_slice(&chunk[..n]);
    }
    let line = request.split(|&b| b == b'\r').next().unwrap_or_default();
    let (status, body) = match line.split(|&b| b == b' ').collect::<Vec<_>>()[..] {
        [b"GET", path, ..] if path == b"/metrics" || path == b"/" => {
            ("200 OK", render(&switch.metrics()))
        }
        [b"GET", ..] => ("404 Not Found", "only /metrics is served\n".to_string()),
        _ => ("405 Method Not Allowed", "GET /metrics\n".to_string()),
    };
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every line is a comment or `name{labels} value` with a number for the value.
    fn well_formed(text: &str) -> bool {
        text.lines().all(|l| {
            l.starts_with("# HELP ") || l.starts_with("# TYPE ") || {
                let (series, value) = l.rsplit_once(' ').unwrap_or(("", "x"));
                let name_ok = series.split('{').next().is_some_and(|n| {
                    n.starts_with("switchyard_")
                        && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                });
                name_ok
                    && value.parse::<f64>().is_ok()
                    && (!series.contains('{') || series.ends_with('}'))
            }
        })
    }

    #[test]
    fn a_snapshot_renders_as_prometheus_text_with_cumulative_buckets() {
        let mut times = WorkTimes {
            busy_ns: 1_500_000_000,
            ..WorkTimes::default()
        };
        times.batch_sizes[0] = 3;
        times.batch_sizes[5] = 2;
        times.batch_ns[1] = 5;
        times.batch_ns_sum = 9_000;
        let s = Snapshot {
            events: vec![("forwarded_ipv4".into(), 7)],
            drops: vec![("no_route".into(), 2)],
            ports: vec![PortSample {
                id: 3,
                ifname: "eth0".into(),
                pod: "default/a\"b".into(),
                rx_frames: 10,
                ..PortSample::default()
            }],
            workers: vec![WorkerSample {
                rx_frames: 67,
                times,
            }],
            conntrack: Some(TableSample {
                entries: 4,
                capacity: 65536,
                early_drops: 9,
            }),
            service_flows: TableSample::default(),
        };
        let text = render(&s);
        assert!(well_formed(&text), "{text}");
        assert!(text.contains("switchyard_port_receive_packets_total{port=\"3\",ifname=\"eth0\",pod=\"default/a\\\"b\"} 10"));
        assert!(text.contains("switchyard_drops_total{reason=\"no_route\"} 2"));
        assert!(text.contains("switchyard_conntrack_capacity 65536"));
        assert!(text.contains("switchyard_conntrack_early_drops_total 9"));
        assert!(text.contains("# TYPE switchyard_service_flows_entries gauge"));
        assert!(text.contains("switchyard_worker_busy_seconds_total{worker=\"0\"} 1.5"));
        assert!(text.contains("switchyard_batch_frames_bucket{worker=\"0\",le=\"1\"} 3"));
        assert!(text.contains("switchyard_batch_frames_bucket{worker=\"0\",le=\"16\"} 3"));
        assert!(text.contains("switchyard_batch_frames_bucket{worker=\"0\",le=\"32\"} 5"));
        assert!(text.contains("switchyard_batch_frames_bucket{worker=\"0\",le=\"+Inf\"} 5"));
        assert!(text.contains("switchyard_batch_frames_count{worker=\"0\"} 5"));
        assert!(text.contains("switchyard_batch_frames_sum{worker=\"0\"} 67"));
        assert!(text
            .contains("switchyard_batch_duration_seconds_bucket{worker=\"0\",le=\"2.048e-6\"} 5"));
    }
}
