//! Structured logs for the long-running processes, shared by the dataplane and the agent:
//! `tracing` events to stderr, one line each with a timestamp, the level and the module.
//! `RUST_LOG` sets the level (`info` unless given; `RUST_LOG=debug`,
//! `RUST_LOG=switchyard_control=debug`, ...).

/// Installs the process's log subscriber (once; later calls do nothing).
pub fn init() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
}
