//! Results: one line per metric with both arms and their ratio, as a table and as JSON.

use serde::Serialize;

/// One measured quantity on both arms.
#[derive(Debug, Clone, Serialize)]
pub struct Metric {
    /// Stable name (`tcp_1_stream`, `udp_64b_pps`, ...).
    pub name: String,
    /// Unit of the values.
    pub unit: String,
    /// Value through Switchyard.
    pub switchyard: f64,
    /// Value through the kernel baseline.
    pub kernel: f64,
    /// switchyard / kernel. Above 1 is better for throughput, below 1 for latency.
    pub ratio: f64,
}

impl Metric {
    /// A metric with its ratio computed.
    pub fn new(name: &str, unit: &str, switchyard: f64, kernel: f64) -> Self {
        Self {
            name: name.into(),
            unit: unit.into(),
            switchyard,
            kernel,
            ratio: if kernel > 0.0 {
                switchyard / kernel
            } else {
                0.0
            },
        }
    }
}

/// Renders the metrics as an aligned table.
pub fn table(metrics: &[Metric]) -> String {
    let w = metrics
        .iter()
        .map(|m| m.name.len())
        .max()
        .unwrap_or(0)
        .max(16);
    let mut out = format!(
        "{:<w$} {:>12} {:>12} {:>8}  {}\n",
        "metric", "switchyard", "kernel", "ratio", "unit"
    );
    for m in metrics {
        out += &format!(
            "{:<w$} {:>12.2} {:>12.2} {:>7.2}x  {}\n",
            m.name, m.switchyard, m.kernel, m.ratio, m.unit
        );
    }
    out
}
