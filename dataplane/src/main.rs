//! `switchyard-dataplane`: runs the switch in the current (node's) network namespace and
//! serves its API socket.

use clap::Parser;
use std::path::PathBuf;
use std::sync::Arc;
use switchyard_dataplane::switch::Steering;
use switchyard_dataplane::{server, Switch, SwitchConfig};

/// Switchyard's userspace dataplane.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Path of the API socket.
    #[arg(long, default_value = switchyard_api::DEFAULT_API_PATH)]
    api: PathBuf,
    /// Number of worker threads (default: one per core).
    #[arg(long)]
    workers: Option<usize>,
    /// MTU of pod interfaces whose request names none.
    #[arg(long, default_value_t = 1500)]
    mtu: u32,
    /// Microseconds a worker keeps polling after activity before sleeping (0: never spin).
    /// Spinning lowers latency when cores are spare, and costs throughput when they are not.
    #[arg(long, default_value_t = 0)]
    spin_us: u64,
    /// This node's pod CIDR (repeat for IPv4 and IPv6); CNI configurations with
    /// `"subnet": "usePodCidr"` allocate from it.
    #[arg(long = "pod-cidr")]
    pod_cidrs: Vec<switchyard_api::IpNet>,
    /// How a TAP (a pod's, the host port) spreads frames over the workers' queues:
    /// `adaptive` forwards a small frame after a quiet spell (a ping, a request) on the
    /// CPU that sent it and spreads the rest by flow hash (eBPF steering, pinned workers);
    /// `hash` spreads every flow by hash (workers float: the most 4-stream bulk throughput
    /// on busy CPUs); `cpu` forwards every frame on the CPU that sent it (pinned workers).
    #[arg(long, value_enum, default_value_t = SteeringArg::Adaptive)]
    steering: SteeringArg,
    /// What carries a pod's frames when its CNI configuration does not say (`podPorts`):
    /// `tap` (a TAP device: TSO super-frames cross whole, the most bulk TCP) or `afxdp`
    /// (a veth pair read through AF_XDP sockets: one system call per batch, the most
    /// small packets per second; MTU up to 3506).
    #[arg(long, default_value = "tap")]
    pod_ports: switchyard_api::PodPorts,
    /// How the uplink carries pods' traffic between nodes: `sockets` (the node's UDP
    /// sockets; the kernel segments and merges: the most bulk TCP) or `afxdp` (AF_XDP
    /// sockets on the underlay device behind an XDP program that takes only VXLAN to this
    /// node, or under direct routing only packets to its pod CIDR; whole
    /// frames built by the dataplane, next hops from the kernel's neighbour table; the
    /// path to zero copy on NICs that have it). VXLAN and direct routing (its IPv4); node
    /// settings with IP-in-IP are refused under `afxdp`.
    #[arg(long, default_value = "sockets")]
    uplink_mode: switchyard_dataplane::io::uplink::UplinkMode,
    /// Under `--uplink-mode afxdp`, how packets that leave the node with its address
    /// (masqueraded flows, answers from ports published to pods and Service node ports)
    /// travel: `afxdp` (both halves through the AF_XDP sockets, next hops from the
    /// kernel's main table; the node's stack forwards none of them) or `kernel` (through
    /// the node's stack both ways, where its netfilter rules apply; the faster on veth
    /// underlays, where AF_XDP runs in copy mode).
    #[arg(long, default_value = "afxdp")]
    node_exit: switchyard_dataplane::io::uplink::NodeExit,
    /// Name of the node-side interface through which the node's own stack reaches pods
    /// (created when the control process pushes the node settings).
    #[arg(long, default_value = "sy0")]
    host_ifname: String,
    /// Where pod ports are recorded so that a restarted dataplane re-attaches them
    /// (default: beside the API socket, `<api stem>.ports.json`).
    #[arg(long)]
    state_file: Option<PathBuf>,
    /// Uninstall: put the node's kernel back as it was before any dataplane ran (steering
    /// rules, the local table's rule, the sysctls recorded beside the API socket), remove
    /// the recorded ports and the CNI plugin's files (`--cni-conf-dir`, `--cni-bin-dir`),
    /// and exit. Run it on each node once the DaemonSet is deleted.
    #[arg(long)]
    cleanup: bool,
    /// The CNI configuration directory the cleanup removes `10-switchyard.conflist` from.
    #[arg(long, default_value = "/etc/cni/net.d")]
    cni_conf_dir: PathBuf,
    /// Nice value of the worker threads. Negative values put forwarding ahead of the pods'
    /// own processes on a busy node: at -10 the ping p99 under a 4-stream load fell tenfold
    /// and short connections through a Service rose by a quarter, but 64-byte UDP from one
    /// sender lost half and more (docs/benchmarks.md, "Who waits for a CPU").
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    worker_nice: i32,
    /// Nice value the workers take while all of them are nearly idle (none busy over 5 %
    /// of a 20 ms window in the last 40 ms), back to `--worker-nice` as soon as one is
    /// busy: a woken worker then runs before the thread that sent it the frame sleeps, so
    /// the answer finds that thread still on its CPU (cross-node ping p50 about a third).
    /// The same value as `--worker-nice` turns it off.
    #[arg(long, default_value_t = switchyard_dataplane::switch::QUIET_WORKER_NICE, allow_hyphen_values = true)]
    worker_quiet_nice: i32,
    /// Serve Prometheus metrics on this address (`127.0.0.1:9964`, `[::]:9964`): per-port
    /// packets and bytes, drops by reason, connection tracking, worker busy time, batch
    /// sizes and times. Off unless given.
    #[arg(long, value_name = "ADDR:PORT")]
    metrics: Option<std::net::SocketAddr>,
    /// The CNI plugin directory the cleanup removes `switchyard` from.
    #[arg(long, default_value = "/opt/cni/bin")]
    cni_bin_dir: PathBuf,
    /// Internal: be the holder of a stopping dataplane's descriptors, waiting at this
    /// socket for its successor (spawned by the dataplane itself on a planned stop).
    #[arg(long, hide = true, value_name = "PATH")]
    hold_descriptors: Option<PathBuf>,
}

/// `--steering` values.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum SteeringArg {
    /// Queue of the sending CPU; workers pinned.
    Cpu,
    /// Kernel's flow hash; workers float.
    Hash,
    /// Small frames after a quiet spell on the sending CPU, the rest by hash; workers
    /// pinned.
    Adaptive,
}

fn main() {
    let args = Args::parse();
    let mut files = switchyard_dataplane::StateFiles::beside(&args.api);
    if let Some(ports) = &args.state_file {
        files.ports = ports.clone();
    }
    if args.cleanup {
        std::process::exit(cleanup(&args, &files));
    }
    switchyard_api::logging::init();
    if let Some(path) = &args.hold_descriptors {
        use switchyard_dataplane::io::handover;
        match handover::serve_held(path, handover::HOLD_FOR) {
            Ok(true) => tracing::info!("handed the kept descriptors to the new dataplane"),
            Ok(false) => tracing::warn!(
                "no dataplane came for the kept descriptors within {:?}; closing them",
                handover::HOLD_FOR
            ),
            Err(e) => tracing::error!("cannot keep the descriptors at {}: {e}", path.display()),
        }
        return;
    }
    let mut config = SwitchConfig::default();
    if let Some(workers) = args.workers {
        config.workers = workers.max(1);
    }
    config.default_mtu = args.mtu;
    config.spin = std::time::Duration::from_micros(args.spin_us);
    config.pod_cidrs = args.pod_cidrs;
    config.steering = match args.steering {
        SteeringArg::Cpu => Steering::Cpu,
        SteeringArg::Hash => Steering::Hash,
        SteeringArg::Adaptive => Steering::Adaptive,
    };
    config.host_ifname = args.host_ifname;
    config.worker_nice = args.worker_nice;
    config.worker_quiet_nice = args.worker_quiet_nice;
    config.pod_ports = args.pod_ports;
    config.uplink_mode = args.uplink_mode;
    config.node_exit = args.node_exit;
    config.state_file = Some(files.ports.clone());
    config.node_file = Some(files.node.clone());
    config.sysctl_file = Some(files.sysctls.clone());
    config.conntrack_file = Some(files.conntrack.clone());
    let listener = match server::bind(&args.api) {
        Ok(l) => l,
        Err(err) => {
            tracing::error!("cannot listen on {}: {err}", args.api.display());
            std::process::exit(1);
        }
    };
    let switch = match Switch::start(config) {
        Ok(s) => Arc::new(s),
        Err(err) => {
            tracing::error!("cannot start workers: {err}");
            std::process::exit(1);
        }
    };
    let kept = switchyard_dataplane::io::handover::take(&files.handover);
    if !kept.is_empty() {
        tracing::info!(
            "took over {} ports' descriptors from the previous dataplane",
            kept.len()
        );
    }
    let (_, restored) = switch.restore(kept);
    if restored > 0 {
        tracing::info!("re-attached {restored} pod ports");
    }
    if let Some(addr) = args.metrics {
        match switchyard_dataplane::metrics::serve(addr, switch.clone()) {
            Ok(local) => tracing::info!("metrics on http://{local}/metrics"),
            Err(err) => {
                tracing::error!("cannot serve metrics on {addr}: {err}");
                std::process::exit(1);
            }
        }
    }
    let socket = args.api.clone();
    let stopping = switch.clone();
    if let Err(err) = ctrlc::set_handler(move || {
        // A stop is a pause, as a crash is: the pod interfaces and the host port are
        // persistent, the node's routes and steering rules stay, the flows are in the
        // journal, and the next dataplane takes all of it over, so established
        // connections carry on across a restart or an upgrade. `--cleanup` is the
        // uninstall. Unlike a crash, the ports' queues and sockets are kept open for the
        // next dataplane, so nothing sent meanwhile is lost.
        let _ = std::fs::remove_file(&socket);
        match stopping.hand_over(&files.handover) {
            Ok(n) => tracing::info!("kept {n} ports' descriptors for the next dataplane"),
            Err(e) => tracing::warn!(
                "cannot keep the ports' descriptors for the next dataplane ({e}): frames sent until it starts are lost"
            ),
        }
        std::process::exit(0);
    }) {
        tracing::warn!("cannot install signal handler: {err}");
    }
    tracing::info!(
        "{} workers, API on {}",
        switch.stats().workers,
        args.api.display()
    );
    server::serve(listener, switch);
}

/// `--cleanup`: the uninstall step on one node; returns the exit status.
fn cleanup(args: &Args, files: &switchyard_dataplane::StateFiles) -> i32 {
    if switchyard_api::Client::connect(&args.api).is_ok() {
        eprintln!(
            "switchyard-dataplane: a dataplane still answers on {}: stop it (delete the DaemonSet) before the cleanup",
            args.api.display()
        );
        return 1;
    }
    // A holder keeping a stopped dataplane's queues open would keep its devices alive.
    let kept = switchyard_dataplane::io::handover::take(&files.handover);
    if !kept.is_empty() {
        println!(
            "closed the descriptors of {} ports a stopped dataplane kept",
            kept.len()
        );
    }
    drop(kept);
    let mut status = 0;
    match switchyard_dataplane::switch::restore::cleanup(&files.sysctls, &args.host_ifname) {
        Ok(done) => {
            for line in done {
                println!("{line}");
            }
        }
        Err(e) => {
            eprintln!("switchyard-dataplane: cannot restore the node's kernel settings: {e}");
            status = 1;
        }
    }
    let others = [
        args.cni_conf_dir.join("10-switchyard.conflist"),
        args.cni_bin_dir.join("switchyard"),
    ];
    let state = [&files.ports, &files.conntrack, &files.node].map(|f| f.to_path_buf());
    for file in state.into_iter().chain(others) {
        match std::fs::remove_file(&file) {
            Ok(()) => println!("removed {}", file.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                eprintln!(
                    "switchyard-dataplane: cannot remove {}: {e}",
                    file.display()
                );
                status = 1;
            }
        }
    }
    status
}
