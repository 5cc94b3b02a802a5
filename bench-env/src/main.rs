//! `bench-env`: builds simulated clusters out of network namespaces and measures Switchyard
//! against the kernel's own datapath in the same run.

use bench_env::cluster::{self, Cluster, ClusterOptions, Underlay};
use bench_env::measure::{self, Matrix};
use bench_env::report::{self, Metric};
use bench_env::testbed::{Arm, Attach, Options, Pod, Testbed};
use bench_env::{fail, tools, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use switchyard_api::{BackendKind, Reply, Request};

/// Switchyard's testbed and benchmark driver.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

/// `--attach` values.
#[derive(Clone, Copy, clap::ValueEnum)]
enum AttachArg {
    /// CNI plugins, exactly as a container runtime calls them.
    Cni,
    /// The dataplane API and `ip` commands.
    Direct,
}

#[derive(Subcommand)]
enum Scenario {
    /// The network model in a real Kubernetes cluster: API server, controller manager,
    /// scheduler, two nodes with containerd and kubelet, Switchyard as a DaemonSet,
    /// busybox pods; exits 0 only when every step held.
    KubeE2e,
    /// A real Kubernetes cluster to use by hand: the control plane, two nodes with
    /// containerd and kubelet, Switchyard installed; kept until Ctrl-C, which removes it.
    KubeCluster {
        /// Leave Switchyard out (nodes stay NotReady until a network plugin is applied).
        #[arg(long)]
        bare: bool,
    },
    /// One node, N pods: Switchyard (TAP ports) against veth + Linux bridge.
    SingleNode {
        /// Number of pods (4 or more adds `rtt_p99_us_under_load`: pods 0 and 1 ping while
        /// pods 2 and 3 run a 4-stream iperf3).
        #[arg(long, default_value_t = 4)]
        pods: usize,
        /// Seconds per iperf3 run.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Write the results as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Dataplane worker threads (default: one per core).
        #[arg(long)]
        workers: Option<usize>,
        /// Pod MTU.
        #[arg(long, default_value_t = 1500)]
        mtu: u32,
        /// Pings for the RTT percentiles.
        #[arg(long, default_value_t = 1000)]
        pings: usize,
        /// Rounds per metric, alternating the arms; the median is reported.
        #[arg(long, default_value_t = 3)]
        repeat: usize,
        /// How pods are attached: through CNI plugins as a runtime would (switchyard-cni
        /// against the reference bridge plugin, both with host-local), or directly (the
        /// dataplane API against hand-made veth pairs).
        #[arg(long, value_enum, default_value_t = AttachArg::Cni)]
        attach: AttachArg,
        /// Extra arguments for switchyard-dataplane (e.g. --dataplane-arg=--spin-us=0).
        #[arg(long = "dataplane-arg", allow_hyphen_values = true)]
        dataplane_args: Vec<String>,
        /// Pod port kinds to measure, one Switchyard testbed each, in the same run as the
        /// kernel (`tap`, `afxdp`, or both: `tap,afxdp`). Rows of kinds other than `tap`
        /// carry the kind in their name (`udp_64b_flood_pps_afxdp`).
        #[arg(long, value_delimiter = ',', default_value = "tap")]
        pod_ports: Vec<switchyard_api::PodPorts>,
    },
    /// Several nodes on an underlay, pods attached through CNI on each: Switchyard (one
    /// dataplane and one control process per node, one manifests directory) against the
    /// kernel in flannel's VXLAN layout. Matrix: pods on the same node and across nodes,
    /// nodes to remote pods, IPv4 and IPv6; then cross-node iperf3, short connections per
    /// second and ping, with a null forwarder's figures beside (VXLAN).
    MultiNode {
        /// Number of nodes.
        #[arg(long, default_value_t = 2)]
        nodes: usize,
        /// Pods per node.
        #[arg(long, default_value_t = 2)]
        pods_per_node: usize,
        /// Switchyard's encapsulation (the kernel baseline is always VXLAN).
        #[arg(long, value_enum, default_value_t = BackendArg::Vxlan)]
        backend: BackendArg,
        /// Underlay layout.
        #[arg(long, value_enum, default_value_t = UnderlayArg::Flat)]
        underlay: UnderlayArg,
        /// Seconds per iperf3 run.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Rounds per metric, alternating the arms; the median is reported.
        #[arg(long, default_value_t = 3)]
        repeat: usize,
        /// Pings across nodes for the RTT percentiles, per round (5 ms apart).
        #[arg(long, default_value_t = 1000)]
        pings: usize,
        /// Write the results as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Dataplane worker threads (default: one per core).
        #[arg(long)]
        workers: Option<usize>,
        /// Extra arguments for switchyard-dataplane.
        #[arg(long = "dataplane-arg", allow_hyphen_values = true)]
        dataplane_args: Vec<String>,
        /// Add an external network (a router and an external host the nodes reach
        /// by a static route): pods ping it and iperf3 to it, masqueraded (the kernel arm:
        /// iptables MASQUERADE, as flannel does).
        #[arg(long)]
        external: bool,
        /// Uplink modes to measure across nodes, one Switchyard cluster each, in the same
        /// rounds as the kernel (`sockets`, `afxdp`, or both: `sockets,afxdp`). Rows of
        /// `afxdp` carry it in their name (`cross_node_tcp_1_stream_afxdp`).
        #[arg(long, value_delimiter = ',', default_value = "sockets")]
        uplink_mode: Vec<switchyard_dataplane::io::uplink::UplinkMode>,
    },
    /// Services on two nodes: Switchyard's own load balancing against kube-proxy's iptables
    /// rules on flannel's layout, same run. A Service with three backends spread over both
    /// nodes (new connections per second, 64 clients), and one with ClientIP affinity and
    /// its backends on the other node, reached through its ClusterIP and its node port
    /// (iperf3). Beside them, the null forwarder from a pod to a pod on the other node (no
    /// Service): the ceiling of the path the remote backends sit behind.
    Services {
        /// Seconds per measurement.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Rounds per metric, alternating the arms; the median is reported.
        #[arg(long, default_value_t = 3)]
        repeat: usize,
        /// Write the results as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Extra arguments for switchyard-dataplane.
        #[arg(long = "dataplane-arg", allow_hyphen_values = true)]
        dataplane_args: Vec<String>,
    },
    /// The node agent at cluster scale: 5,000 Nodes and 150,000 Pods fed to it as watch
    /// events, pushing to a live dataplane on a one-node testbed. The initial sync, single
    /// changes (a Node, a Pod on this node, a pod elsewhere that a local pod's policy
    /// admits) from the event to the dataplane's answer, and the agent's state's memory.
    AgentScale {
        /// Single changes timed per kind.
        #[arg(long, default_value_t = 50)]
        changes: usize,
        /// Nodes in the cluster.
        #[arg(long, default_value_t = bench_env::agent_scale::SIZE.nodes)]
        nodes: usize,
        /// Pods per node.
        #[arg(long, default_value_t = bench_env::agent_scale::SIZE.pods_per_node)]
        pods_per_node: usize,
        /// Load the cluster into the testbed's real kube-apiserver instead (its objects
        /// created through the API, which takes minutes) and run the agent as a process.
        #[arg(long)]
        api_server: bool,
        /// Write the results as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

/// `--backend` values.
#[derive(Clone, Copy, clap::ValueEnum)]
enum BackendArg {
    /// VXLAN.
    Vxlan,
    /// IP-in-IP.
    Ipip,
    /// Plain routing (peers on-link).
    Direct,
}

/// `--underlay` values.
#[derive(Clone, Copy, clap::ValueEnum)]
enum UnderlayArg {
    /// One L2 segment.
    Flat,
    /// Two subnets behind a router.
    Routed,
}

fn print_matrix(arm: &str, m: &Matrix) {
    let ok = m.attempted - m.failures.len();
    println!(
        "connectivity {:<10} {ok}/{} pings answered (IPv4 and IPv6, every pod to every other)",
        arm, m.attempted
    );
    for f in &m.failures {
        println!("  FAILED {f}");
    }
}

/// What the single-node scenario was asked to do.
struct SingleNode {
    pods: usize,
    pod_ports: Vec<switchyard_api::PodPorts>,
    seconds: u64,
    json: Option<PathBuf>,
    pings: usize,
    repeat: usize,
    options: Options,
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

fn single_node(run: SingleNode) -> Result<bool> {
    use switchyard_api::PodPorts;
    let SingleNode {
        pods,
        pod_ports,
        seconds,
        json,
        pings,
        repeat,
        options,
    } = run;
    let mtu = options.mtus[0];
    if pods < 2 {
        return Err(fail!("--pods must be at least 2"));
    }
    if pod_ports.is_empty() {
        return Err(fail!("--pod-ports needs at least one kind"));
    }
    if !bench_env::is_root() {
        return Err(fail!(
            "bench-env creates network namespaces and TAP devices: run it as root"
        ));
    }
    tools::ensure_installed()?;
    let kinds: Vec<&str> = pod_ports.iter().map(|k| k.name()).collect();
    println!("building testbeds: {pods} pods, MTU {mtu}, kernel bridge and Switchyard ({} ports), attached {}; {repeat} rounds of {seconds} s per metric, medians", kinds.join(", "), if options.attach == Attach::Cni { "through CNI" } else { "directly" });
    let kernel = Testbed::build(Arm::Kernel, &options)?;
    let mut switchyards = Vec::new();
    for kind in &pod_ports {
        let mut options = options.clone();
        options
            .dataplane_args
            .extend(["--pod-ports".to_string(), kind.name().to_string()]);
        switchyards.push(Testbed::build(Arm::Switchyard, &options)?);
    }
    let mut arms: Vec<(&str, &[Pod])> = kinds
        .iter()
        .zip(&switchyards)
        .map(|(kind, bed)| (*kind, &bed.pods[..]))
        .collect();
    arms.push(("kernel", &kernel.pods[..]));
    // The round trip's ceiling: two pods joined by a null forwarder (bench_env::ceiling),
    // pinged in the same rounds.
    let null = bench_env::ceiling::SameNodeNull::build()?;

    let mut all_connected = true;
    for (name, pods) in &arms {
        let m = measure::connectivity(pods);
        print_matrix(name, &m);
        all_connected &= m.failures.is_empty();
    }

    type Measure<'a> = Box<dyn Fn(&[Pod]) -> Result<Vec<f64>> + 'a>;
    // (name, unit) of each row a measurement gives.
    type Rows = &'static [(&'static str, &'static str)];
    // (rows, how, whether the null forwarder is measured too)
    let runs: Vec<(Rows, Measure, bool)> = vec![
        (
            &[("tcp_1_stream", "Gbit/s")],
            Box::new(|p| Ok(vec![measure::tcp_gbps(&p[0], &p[1], 1, seconds)?])),
            false,
        ),
        (
            &[("tcp_4_streams", "Gbit/s")],
            Box::new(|p| Ok(vec![measure::tcp_gbps(&p[0], &p[1], 4, seconds)?])),
            false,
        ),
        (
            &[("udp_64b_pps", "packets/s")],
            Box::new(|p| Ok(vec![measure::udp_64b_pps(&p[0], &p[1], seconds)?])),
            false,
        ),
        (
            &[("udp_64b_flood_pps", "packets/s")],
            Box::new(|p| {
                let to = std::net::SocketAddrV4::new(p[1].ipv4, bench_env::flood::FLOOD_PORT);
                Ok(vec![bench_env::flood::udp_flood_pps(
                    &p[0].ns, &p[1].ns, to, seconds,
                )?])
            }),
            false,
        ),
        (
            &[("rtt_p50_us", "µs"), ("rtt_p99_us", "µs")],
            Box::new(|p| {
                let (p50, p99) = measure::rtt_us(&p[0], &p[1], pings)?;
                Ok(vec![p50, p99])
            }),
            true,
        ),
    ];
    let mut runs = runs;
    if pods >= 4 {
        runs.push((
            &[("rtt_p99_us_under_load", "µs")],
            Box::new(|p| {
                let (_, p99) = measure::rtt_us_under_load(p, pings)?;
                Ok(vec![p99])
            }),
            false,
        ));
    }
    let mut metrics: Vec<Metric> = Vec::new();
    // (metric, afxdp / tap) when both ran.
    let mut between: Vec<(String, f64, f64)> = Vec::new();
    // (row, Switchyard figure, null figure) for the ratios printed after the table.
    let mut ceilings: Vec<(String, f64, f64)> = Vec::new();
    for (metric_names, run, with_null) in &runs {
        let label = metric_names
            .iter()
            .map(|m| m.0)
            .collect::<Vec<_>>()
            .join(", ");
        let mut these = arms.clone();
        if *with_null {
            these.insert(pod_ports.len(), ("null", &null.pods[..]));
        }
        let medians = rounds_of(&these, repeat, &label, run.as_ref())?;
        for ((name, unit), per_arm) in metric_names.iter().zip(medians) {
            let kernel = per_arm[per_arm.len() - 1];
            let null_figure = with_null.then(|| per_arm[pod_ports.len()]);
            for (kind, value) in pod_ports.iter().zip(&per_arm) {
                let row = match kind {
                    PodPorts::Tap => name.to_string(),
                    other => format!("{name}_{}", other.name()),
                };
                if let Some(null_figure) = null_figure {
                    ceilings.push((row.clone(), *value, null_figure));
                }
                metrics.push(Metric::new(&row, unit, *value, kernel));
            }
            if let Some(null_figure) = null_figure {
                metrics.push(Metric::new(
                    &format!("{name}_null"),
                    unit,
                    null_figure,
                    kernel,
                ));
            }
            let at = |k: PodPorts| pod_ports.iter().position(|p| *p == k).map(|i| per_arm[i]);
            if let (Some(tap), Some(afxdp)) = (at(PodPorts::Tap), at(PodPorts::Afxdp)) {
                between.push((name.to_string(), afxdp, tap));
            }
        }
    }
    println!();
    print!("{}", report::table(&metrics));
    if !ceilings.is_empty() {
        print_ceilings("two TAPs joined, nothing else; rows *_null", &ceilings);
    }
    if !between.is_empty() {
        println!("\nafxdp against tap, same run:");
        for (name, afxdp, tap) in &between {
            let ratio = if *tap > 0.0 { afxdp / tap } else { 0.0 };
            println!("  {name:<24} {afxdp:>12.2} / {tap:>12.2} = {ratio:.2}x");
        }
    }
    for (kind, bed) in kinds.iter().zip(&switchyards) {
        if let Ok(Reply::Stats(stats)) = bed.client().and_then(|mut c| Ok(c.call(Request::Stats)?))
        {
            let drops: Vec<String> = stats
                .drops
                .iter()
                .filter(|(_, v)| **v > 0)
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            println!(
                "\nswitchyard ({kind}) drops: {}",
                if drops.is_empty() {
                    "none".into()
                } else {
                    drops.join(" ")
                }
            );
        }
    }
    if let Some(path) = json {
        std::fs::write(&path, serde_json::to_string_pretty(&metrics)?)?;
        println!("results written to {}", path.display());
    }
    Ok(all_connected)
}

/// Runs `measure` `repeat` times on each arm, alternating; returns the medians per output.
fn rounds<T>(
    arms: [&T; 2],
    repeat: usize,
    label: &str,
    measure: &dyn Fn(&T) -> Result<Vec<f64>>,
) -> Result<Vec<[f64; 2]>> {
    let medians = rounds_of(
        &[("switchyard", arms[0]), ("kernel", arms[1])],
        repeat,
        label,
        measure,
    )?;
    Ok(medians.into_iter().map(|m| [m[0], m[1]]).collect())
}

/// Runs `measure` `repeat` times on each of the named arms, alternating (the last arm
/// first in each round); returns, per output, the medians in the arms' order.
fn rounds_of<T: ?Sized>(
    arms: &[(&str, &T)],
    repeat: usize,
    label: &str,
    measure: &dyn Fn(&T) -> Result<Vec<f64>>,
) -> Result<Vec<Vec<f64>>> {
    use std::io::Write;
    print!("measuring {label} ...");
    let _ = std::io::stdout().flush();
    let mut per_arm: Vec<Vec<Vec<f64>>> = vec![Vec::new(); arms.len()];
    for _ in 0..repeat.max(1) {
        for (i, (_, arm)) in arms.iter().enumerate().rev() {
            per_arm[i].push(measure(arm)?);
        }
        print!(".");
        let _ = std::io::stdout().flush();
    }
    let width = per_arm[0].first().map_or(0, Vec::len);
    // Every round's figures, so that the spread behind a median shows.
    let spread: Vec<String> = (0..width)
        .map(|i| {
            arms.iter()
                .zip(&per_arm)
                .map(|((name, _), rounds)| {
                    let each: Vec<String> = rounds.iter().map(|r| format!("{:.2}", r[i])).collect();
                    format!("{name} {}", each.join(" "))
                })
                .collect::<Vec<_>>()
                .join(", ")
        })
        .collect();
    println!(" done ({})", spread.join("; "));
    Ok((0..width)
        .map(|i| {
            per_arm
                .iter()
                .map(|rounds| median(rounds.iter().map(|r| r[i]).collect()))
                .collect()
        })
        .collect())
}

/// What the multi-node scenario was asked to do.
struct MultiNode {
    seconds: u64,
    repeat: usize,
    pings: usize,
    json: Option<PathBuf>,
    uplink_modes: Vec<switchyard_dataplane::io::uplink::UplinkMode>,
    options: ClusterOptions,
}

/// The port of the request servers behind `cross_node_conn_rate`.
const CONN_RATE_PORT: u16 = 9090;

fn multi_node(run: MultiNode) -> Result<bool> {
    use switchyard_dataplane::io::uplink::UplinkMode;
    let MultiNode {
        seconds,
        repeat,
        pings,
        json,
        uplink_modes,
        options,
    } = run;
    if options.nodes < 2 {
        return Err(fail!("--nodes must be at least 2"));
    }
    if !bench_env::is_root() {
        return Err(fail!(
            "bench-env creates network namespaces and TAP devices: run it as root"
        ));
    }
    if uplink_modes.is_empty() {
        return Err(fail!("--uplink-mode needs sockets, afxdp or both"));
    }
    tools::ensure_installed()?;
    let modes: Vec<&str> = uplink_modes.iter().map(|m| m.name()).collect();
    println!(
        "building clusters: {} nodes ({:?} underlay), {} pods per node attached through CNI; Switchyard with {} (uplink: {}) against the kernel's VXLAN (flannel layout)",
        options.nodes, options.underlay, options.pods_per_node, options.backend.name(), modes.join(", ")
    );
    let kernel = Cluster::build(Arm::Kernel, &options)?;
    // One Switchyard cluster per uplink mode; rows of modes other than sockets carry the
    // mode in their name.
    let mut switchyards = Vec::new();
    for mode in &uplink_modes {
        let mut options = options.clone();
        options
            .dataplane_args
            .extend(["--uplink-mode".to_string(), mode.name().to_string()]);
        let suffix = match mode {
            UplinkMode::Sockets => String::new(),
            other => format!("_{}", other.name()),
        };
        switchyards.push((suffix, Cluster::build(Arm::Switchyard, &options)?));
    }
    let mut all_connected = true;
    for c in std::iter::once(&kernel).chain(switchyards.iter().map(|(_, c)| c)) {
        let m = cluster::connectivity(c);
        let ok = m.attempted - m.failures.len();
        println!(
            "connectivity {:<10} {ok}/{} pings answered (pod<->pod same node and across, node->remote pod, pod->remote node; IPv4 and IPv6)",
            c.arm.name(),
            m.attempted
        );
        for f in &m.failures {
            println!("  FAILED {f}");
        }
        all_connected &= m.failures.is_empty();
    }
    let mut metrics = Vec::new();
    // The ceiling of any user-space forwarder on this path, VXLAN over one link: measured
    // in the same rounds (bench_env::ceiling).
    let null = match options.backend {
        switchyard_api::BackendKind::Vxlan => Some(bench_env::ceiling::CrossNodeNull::build()?),
        _ => None,
    };
    // (row suffix, Switchyard figure, null figure) for the ratios printed after the table.
    let mut ceilings = Vec::new();
    // A pod on each of the first two nodes, per arm: every Switchyard cluster, the null,
    // then the kernel (last).
    let mut arms = Vec::new();
    for (suffix, c) in &switchyards {
        arms.push((format!("switchyard{suffix}"), cross(c)?));
    }
    let sy = switchyards.len();
    if let Some(null) = &null {
        arms.push(("null".to_string(), (&null.pods[0], &null.pods[1])));
    }
    arms.push(("kernel".to_string(), cross(&kernel)?));
    let arm_refs: Vec<(&str, &(&Pod, &Pod))> = arms.iter().map(|(n, p)| (n.as_str(), p)).collect();
    // Rows of metric `name` (its rounds `r`, one value per arm), and the ceilings.
    let mut record = |name: &str, unit: &str, r: &[f64], ceilings: &mut Vec<(String, f64, f64)>| {
        let kernel_figure = r[r.len() - 1];
        for (i, (suffix, _)) in switchyards.iter().enumerate() {
            metrics.push(Metric::new(
                &format!("{name}{suffix}"),
                unit,
                r[i],
                kernel_figure,
            ));
            if null.is_some() {
                ceilings.push((format!("{name}{suffix}"), r[i], r[sy]));
            }
        }
        if null.is_some() {
            metrics.push(Metric::new(
                &format!("{name}_null"),
                unit,
                r[sy],
                kernel_figure,
            ));
        }
    };
    for streams in [1, 4] {
        let name = format!(
            "cross_node_tcp_{streams}_stream{}",
            if streams > 1 { "s" } else { "" }
        );
        let r = rounds_of(&arm_refs, repeat, &name, &|(a, b)| {
            Ok(vec![measure::tcp_gbps(a, b, streams, seconds)?])
        })?;
        record(&name, "Gbit/s", &r[0], &mut ceilings);
    }
    // Short connections across nodes (64 clients on the first pod, servers on the
    // second): what each packet's trip through the forwarder costs, at small packets.
    let _servers = arms
        .iter()
        .map(|(_, (_, b))| bench_env::connections::RequestServers::start(&[b], CONN_RATE_PORT))
        .collect::<Result<Vec<_>>>()?;
    let r = rounds_of(&arm_refs, repeat, "cross_node_conn_rate", &|(a, b)| {
        let target = std::net::SocketAddr::from((b.ipv4, CONN_RATE_PORT));
        Ok(vec![bench_env::connections::conn_rate(
            &a.ns, target, 64, seconds,
        )?])
    })?;
    record("cross_node_conn_rate", "conn/s", &r[0], &mut ceilings);
    let r = rounds_of(&arm_refs, repeat, "cross-node rtt", &|(a, b)| {
        let (p50, p99) = measure::rtt_us(a, b, pings)?;
        Ok(vec![p50, p99])
    })?;
    for (i, name) in ["cross_node_rtt_p50_us", "cross_node_rtt_p99_us"]
        .iter()
        .enumerate()
    {
        record(name, "µs", &r[i], &mut ceilings);
    }
    if options.external {
        // The egress ceiling: a pod's TAP joined to a host TAP, no translation, the same
        // router in between (bench_env::ceiling). Every Switchyard cluster: masquerade
        // leaves through the node's stack with the sockets uplink, through the AF_XDP
        // sockets with the AF_XDP uplink.
        let null = bench_env::ceiling::EgressNull::build()?;
        fn external(c: &Cluster) -> Result<(&Pod, &Pod)> {
            let ext = c
                .external
                .as_ref()
                .ok_or_else(|| fail!("no external host"))?;
            Ok((&c.nodes[0].pods[0], ext))
        }
        let mut arms = Vec::new();
        for (suffix, c) in &switchyards {
            arms.push((format!("switchyard{suffix}"), external(c)?));
        }
        arms.push(("null".to_string(), (&null.pod, &null.external)));
        arms.push(("kernel".to_string(), external(&kernel)?));
        let arm_refs: Vec<(&str, &(&Pod, &Pod))> =
            arms.iter().map(|(n, p)| (n.as_str(), p)).collect();
        let r = rounds_of(&arm_refs, repeat, "egress_tcp_1_stream", &|(a, b)| {
            Ok(vec![measure::tcp_gbps(a, b, 1, seconds)?])
        })?;
        let name = "egress_tcp_1_stream";
        let (null_figure, kernel_figure) = (r[0][sy], r[0][sy + 1]);
        for (i, (suffix, _)) in switchyards.iter().enumerate() {
            let row = format!("{name}{suffix}");
            metrics.push(Metric::new(&row, "Gbit/s", r[0][i], kernel_figure));
            ceilings.push((row, r[0][i], null_figure));
        }
        metrics.push(Metric::new(
            &format!("{name}_null"),
            "Gbit/s",
            null_figure,
            kernel_figure,
        ));
    }
    println!();
    print!("{}", report::table(&metrics));
    if !ceilings.is_empty() {
        print_ceilings("the ceiling; rows *_null", &ceilings);
    }
    if let Some(path) = json {
        std::fs::write(&path, serde_json::to_string_pretty(&metrics)?)?;
        println!("results written to {}", path.display());
    }
    Ok(all_connected)
}

/// The agent-at-scale scenario: see `Scenario::AgentScale`.
fn agent_scale(
    size: bench_env::agent_scale::Size,
    changes: usize,
    api_server: bool,
    json: Option<PathBuf>,
) -> Result<bool> {
    if !bench_env::is_root() {
        return Err(fail!(
            "bench-env creates network namespaces and TAP devices: run it as root"
        ));
    }
    tools::ensure_installed()?;
    println!(
        "agent at scale: {} nodes, {} pods, {} namespaces with a NetworkPolicy each, {}; \
         a live dataplane on a one-node testbed",
        size.nodes,
        size.nodes * size.pods_per_node,
        size.namespaces,
        if api_server {
            "created in the testbed's kube-apiserver, read by an agent process"
        } else {
            "fed to the agent as watch events"
        }
    );
    let rows = if api_server {
        bench_env::agent_scale::run_api(size, changes)?
    } else {
        bench_env::agent_scale::run(size, changes)?
    };
    println!("{:<46} {:>10} {:>10}  unit", "metric", "p50", "p99");
    for r in &rows {
        println!("{:<46} {:>10.2} {:>10.2}  {}", r.name, r.p50, r.p99, r.unit);
    }
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(&rows).map_err(|e| fail!("JSON: {e}"))?;
        std::fs::write(&path, text).map_err(|e| fail!("{}: {e}", path.display()))?;
    }
    Ok(true)
}

/// The Services scenario: see `Scenario::Services`.
fn services(
    seconds: u64,
    repeat: usize,
    json: Option<PathBuf>,
    dataplane_args: Vec<String>,
) -> Result<bool> {
    use bench_env::services::{self as svc, BenchService};
    if !bench_env::is_root() {
        return Err(fail!(
            "bench-env creates network namespaces and TAP devices: run it as root"
        ));
    }
    tools::ensure_installed()?;
    let options = ClusterOptions {
        pods_per_node: 2,
        external: true,
        dataplane_args,
        ..ClusterOptions::default()
    };
    println!("building clusters: 2 nodes, 2 pods each, an external host; Switchyard's Services against kube-proxy's iptables rules on flannel's VXLAN layout");
    let kernel = Cluster::build(Arm::Kernel, &options)?;
    let switchyard = Cluster::build(Arm::Switchyard, &options)?;
    let spread = BenchService {
        name: "spread".into(),
        cluster_ip: std::net::Ipv4Addr::new(10, 96, 0, 20),
        port: 80,
        target_port: 8080,
        node_port: None,
        affinity: false,
    };
    let stream = BenchService {
        name: "stream".into(),
        cluster_ip: std::net::Ipv4Addr::new(10, 96, 0, 21),
        port: 5201,
        target_port: 5201,
        node_port: Some(30201),
        affinity: true,
    };
    let mut servers = Vec::new();
    for c in [&kernel, &switchyard] {
        svc::install(c, &spread, &[(0, 1), (1, 0), (1, 1)])?;
        svc::install(c, &stream, &[(1, 0), (1, 1)])?;
        let pods = [
            &c.nodes[0].pods[1],
            &c.nodes[1].pods[0],
            &c.nodes[1].pods[1],
        ];
        servers.push(bench_env::connections::RequestServers::start(
            &pods,
            spread.target_port,
        )?);
    }
    // The ceiling of the path the Services' remote backends sit behind: the null forwarder
    // (frames moved between TAPs and VXLAN sockets, nothing else) from a pod to a pod on
    // the other node, no Service, in the same rounds.
    let null = bench_env::ceiling::CrossNodeNull::build()?;
    servers.push(bench_env::connections::RequestServers::start(
        &[&null.pods[1]],
        spread.target_port,
    )?);
    let arms = [
        ("switchyard", ServiceArm::Cluster(&switchyard)),
        ("null", ServiceArm::Null(&null.pods[0], &null.pods[1])),
        ("kernel", ServiceArm::Cluster(&kernel)),
    ];
    let arms: Vec<(&str, &ServiceArm)> = arms.iter().map(|(n, a)| (*n, a)).collect();
    let mut metrics = Vec::new();
    let mut ceilings = Vec::new();
    let mut record = |name: &str, unit: &str, r: &[f64]| {
        metrics.push(Metric::new(name, unit, r[0], r[2]));
        metrics.push(Metric::new(&format!("{name}_null"), unit, r[1], r[2]));
        ceilings.push((name.to_string(), r[0], r[1]));
    };
    let r = rounds_of(&arms, repeat, "service_tcp_1_stream", &|arm| {
        Ok(vec![match arm {
            ServiceArm::Cluster(c) => {
                let target = std::net::SocketAddr::from((stream.cluster_ip, stream.port));
                let backends = [&c.nodes[1].pods[0], &c.nodes[1].pods[1]];
                measure::tcp_gbps_via(&c.nodes[0].pods[0].ns, &backends, target, 1, seconds)?
            }
            ServiceArm::Null(a, b) => measure::tcp_gbps(a, b, 1, seconds)?,
        }])
    })?;
    record("service_tcp_1_stream", "Gbit/s", &r[0]);
    let r = rounds_of(&arms, repeat, "service_conn_rate", &|arm| {
        let (client, target) = match arm {
            ServiceArm::Cluster(c) => (
                &c.nodes[0].pods[0].ns,
                std::net::SocketAddr::from((spread.cluster_ip, spread.port)),
            ),
            ServiceArm::Null(a, b) => (
                &a.ns,
                std::net::SocketAddr::from((b.ipv4, spread.target_port)),
            ),
        };
        Ok(vec![bench_env::connections::conn_rate(
            client, target, 64, seconds,
        )?])
    })?;
    record("service_conn_rate", "conn/s", &r[0]);
    let r = rounds(
        [&switchyard, &kernel],
        repeat,
        "nodeport_tcp_1_stream",
        &|c| {
            let ext = c
                .external
                .as_ref()
                .ok_or_else(|| fail!("no external host"))?;
            let target = std::net::SocketAddr::from((c.nodes[0].ipv4, 30201));
            let backends = [&c.nodes[1].pods[0], &c.nodes[1].pods[1]];
            Ok(vec![measure::tcp_gbps_via(
                &ext.ns, &backends, target, 1, seconds,
            )?])
        },
    )?;
    metrics.push(Metric::new(
        "nodeport_tcp_1_stream",
        "Gbit/s",
        r[0][0],
        r[0][1],
    ));
    drop(servers);
    println!();
    print!("{}", report::table(&metrics));
    print_ceilings(
        "pod to pod across nodes, no Service; rows *_null",
        &ceilings,
    );
    if let Some(path) = json {
        std::fs::write(&path, serde_json::to_string_pretty(&metrics)?)?;
        println!("results written to {}", path.display());
    }
    Ok(true)
}

/// Prints Switchyard's figures against the null forwarder's, `(row, ours, null)` each,
/// under a title that says what the null measured (`what`).
fn print_ceilings(what: &str, ceilings: &[(String, f64, f64)]) {
    println!("\nswitchyard against the null forwarder ({what}), same run:");
    for (name, ours, ceiling) in ceilings {
        let ratio = if *ceiling > 0.0 { ours / ceiling } else { 0.0 };
        println!("  {name:<34} {ours:>8.2} / {ceiling:>8.2} = {ratio:.2}x");
    }
}

/// An arm of `bench-env services`: a cluster reached through its Services, or the null
/// forwarder's two pods (client, server) on two nodes, reached directly.
enum ServiceArm<'a> {
    Cluster(&'a Cluster),
    Null(&'a Pod, &'a Pod),
}

/// The first pod of node 0 and of node 1.
fn cross(c: &Cluster) -> Result<(&Pod, &Pod)> {
    Ok((
        c.nodes[0]
            .pods
            .first()
            .ok_or_else(|| fail!("no pod on node0"))?,
        c.nodes[1]
            .pods
            .first()
            .ok_or_else(|| fail!("no pod on node1"))?,
    ))
}

fn main() -> ExitCode {
    bench_env::cleanup::install_signal_handler();
    let cli = Cli::parse();
    // The Kubernetes scenario's own last line says what failed.
    let quiet_failure = matches!(
        cli.scenario,
        Scenario::KubeE2e | Scenario::KubeCluster { .. }
    );
    let outcome = match cli.scenario {
        Scenario::KubeE2e => bench_env::kube_e2e::run(),
        Scenario::KubeCluster { bare } => bench_env::kube_e2e::serve(bare),
        Scenario::SingleNode {
            pods,
            seconds,
            json,
            workers,
            mtu,
            pings,
            repeat,
            attach,
            dataplane_args,
            pod_ports,
        } => single_node(SingleNode {
            pods,
            pod_ports,
            seconds,
            json,
            pings,
            repeat,
            options: Options {
                pods,
                mtus: vec![mtu],
                workers,
                dataplane_args,
                attach: match attach {
                    AttachArg::Cni => Attach::Cni,
                    AttachArg::Direct => Attach::Direct,
                },
            },
        }),
        Scenario::MultiNode {
            nodes,
            pods_per_node,
            backend,
            underlay,
            seconds,
            repeat,
            pings,
            json,
            workers,
            dataplane_args,
            external,
            uplink_mode,
        } => multi_node(MultiNode {
            seconds,
            repeat,
            pings,
            json,
            uplink_modes: uplink_mode,
            options: ClusterOptions {
                nodes,
                pods_per_node,
                backend: match backend {
                    BackendArg::Vxlan => BackendKind::Vxlan,
                    BackendArg::Ipip => BackendKind::Ipip,
                    BackendArg::Direct => BackendKind::Direct,
                },
                underlay: match underlay {
                    UnderlayArg::Flat => Underlay::Flat,
                    UnderlayArg::Routed => Underlay::Routed,
                },
                pod_mtu: None,
                workers,
                dataplane_args,
                external,
                conntrack_max: None,
                routes: Vec::new(),
                api_server: false,
            },
        }),
        Scenario::Services {
            seconds,
            repeat,
            json,
            dataplane_args,
        } => services(seconds, repeat, json, dataplane_args),
        Scenario::AgentScale {
            changes,
            nodes,
            pods_per_node,
            api_server,
            json,
        } => agent_scale(
            bench_env::agent_scale::Size {
                nodes,
                pods_per_node,
                namespaces: bench_env::agent_scale::SIZE.namespaces.min(nodes.max(1)),
            },
            changes,
            api_server,
            json,
        ),
    };
    bench_env::cleanup::release_all();
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            if !quiet_failure {
                eprintln!("bench-env: the connectivity matrix had failures");
            }
            ExitCode::FAILURE
        }
        Err(err) => {
            eprintln!("bench-env: {err}");
            ExitCode::FAILURE
        }
    }
}
