//! `switchyard-control`: the command-line interface to a Switchyard dataplane.

use switchyard_control::table;

use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;
use switchyard_api::{
    AddPort, Client, IpNet, MacAddr, NextHop, PortSelector, Reply, Request, RouteSpec,
};

/// Inspect and drive a Switchyard dataplane.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Path of the dataplane's API socket.
    #[arg(long, global = true, default_value = switchyard_api::DEFAULT_API_PATH)]
    api: PathBuf,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Format::Table)]
    output: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    /// Human-readable tables.
    Table,
    /// Tables with more columns (`get`).
    Wide,
    /// The API's JSON.
    Json,
}

/// What `get` lists.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Resource {
    /// This node and its peers, with their addresses and pod CIDRs.
    Nodes,
    /// The dataplane's routes (pods, static, cluster).
    Routes,
    /// The overlay's peer table (VTEPs).
    Peers,
    /// The pods attached on this node.
    Pods,
    /// Flows masqueraded by this node (filter with --pod, --protocol).
    Conntrack,
    /// Masquerade's port usage and table size on this node.
    Nat,
}

#[derive(Subcommand)]
enum Command {
    /// Show the dataplane's identity.
    Hello,
    /// List pod ports.
    Ports,
    /// List routes.
    Routes,
    /// Show counters: events, drops by reason, per-port traffic.
    Stats {
        /// Also list counters that are zero.
        #[arg(long)]
        all: bool,
    },
    /// Add or delete a pod port.
    #[command(subcommand)]
    Port(PortCommand),
    /// Add or delete a static route.
    #[command(subcommand)]
    Route(RouteCommand),
    /// Show what a node makes of a manifests directory (Nodes, switchyard-config): its pod
    /// CIDRs, address and peers, allocating missing pod CIDRs as the control process will.
    /// Reads only; does not contact the dataplane.
    Plan {
        /// The node's name (metadata.name of its Node object).
        #[arg(long)]
        node: String,
        /// Directory of YAML / JSON manifests.
        #[arg(long)]
        manifests: PathBuf,
    },
    /// List nodes, routes, peers or pods as this node's dataplane has them (`-o wide` for
    /// more columns, `-o json`).
    Get {
        /// What to list.
        #[arg(value_enum)]
        what: Resource,
        /// `get conntrack`: only flows of this pod address.
        #[arg(long)]
        pod: Option<std::net::Ipv4Addr>,
        /// `get conntrack`: only this protocol (tcp, udp, icmp).
        #[arg(long)]
        protocol: Option<String>,
    },
    /// Run a connectivity matrix from inside this node's pods (to every pod known, this
    /// node and every peer node) and print a pass/fail table; exits non-zero on a failure.
    Check {
        /// API sockets of other nodes' dataplanes whose pods to include as targets.
        #[arg(long = "peer-api")]
        peer_apis: Vec<PathBuf>,
    },
    /// Run the node agent: watch the manifests directory and keep the dataplane's node
    /// settings (pod CIDRs, overlay, peers) in line with it, pushing them again whenever
    /// the dataplane restarts.
    Run {
        /// The node's name (metadata.name of its Node object).
        #[arg(long)]
        node: String,
        /// Directory of YAML / JSON manifests (Nodes, the switchyard-config ConfigMap).
        #[arg(long)]
        manifests: PathBuf,
        /// The dataplane's API socket (default: --api).
        #[arg(long)]
        dataplane_api: Option<PathBuf>,
        /// Interface carrying underlay traffic (default: the one holding the node's
        /// InternalIP).
        #[arg(long)]
        uplink: Option<String>,
        /// Milliseconds between reconciliations.
        #[arg(long, default_value_t = 200)]
        interval_ms: u64,
    },
}

#[derive(Subcommand)]
enum PortCommand {
    /// Create a pod port (a TAP device in the pod's namespace).
    Add {
        /// Network namespace path (/run/netns/NAME).
        #[arg(long)]
        netns: String,
        /// Interface name inside the pod.
        #[arg(long, default_value = "eth0")]
        ifname: String,
        /// Address with prefix length; repeat for several.
        #[arg(long = "ip", required = true)]
        ips: Vec<IpNet>,
        /// Interface MTU.
        #[arg(long)]
        mtu: Option<u32>,
        /// Interface MAC.
        #[arg(long)]
        mac: Option<MacAddr>,
    },
    /// Delete a port by id, or by namespace and interface name.
    Del {
        /// Port id.
        id: Option<u32>,
        /// Network namespace path.
        #[arg(long, requires = "ifname", conflicts_with = "id")]
        netns: Option<String>,
        /// Interface name.
        #[arg(long, requires = "netns")]
        ifname: Option<String>,
    },
}

#[derive(Subcommand)]
enum RouteCommand {
    /// Add a route.
    Add {
        /// Destination prefix.
        dst: IpNet,
        /// Send to this port.
        #[arg(long, group = "via")]
        port: Option<u32>,
        /// Drop silently.
        #[arg(long, group = "via")]
        blackhole: bool,
        /// Drop with ICMP unreachable.
        #[arg(long, group = "via")]
        unreachable: bool,
    },
    /// Delete a route.
    Del {
        /// Destination prefix.
        dst: IpNet,
    },
}

fn request_for(command: &Command) -> Result<Request, String> {
    Ok(match command {
        Command::Hello => Request::Hello,
        Command::Ports => Request::ListPorts,
        Command::Routes => Request::ListRoutes,
        Command::Stats { .. } => Request::Stats,
        Command::Port(PortCommand::Add {
            netns,
            ifname,
            ips,
            mtu,
            mac,
        }) => Request::AddPort(AddPort {
            netns: netns.clone(),
            ifname: ifname.clone(),
            ips: ips.clone(),
            mtu: *mtu,
            mac: *mac,
            owner: None,
            port_mappings: Vec::new(),
        }),
        Command::Port(PortCommand::Del { id, netns, ifname }) => {
            Request::DelPort(match (id, netns, ifname) {
                (Some(id), _, _) => PortSelector::Id { id: *id },
                (None, Some(netns), Some(ifname)) => PortSelector::Attachment {
                    netns: netns.clone(),
                    ifname: ifname.clone(),
                },
                _ => return Err("name the port: an id, or --netns and --ifname".into()),
            })
        }
        Command::Route(RouteCommand::Add {
            dst,
            port,
            blackhole,
            unreachable,
        }) => {
            let via = match (port, blackhole, unreachable) {
                (Some(id), false, false) => NextHop::Port(*id),
                (None, true, false) => NextHop::Blackhole,
                (None, false, true) => NextHop::Unreachable,
                _ => {
                    return Err(
                        "say where the route goes: --port ID, --blackhole or --unreachable".into(),
                    )
                }
            };
            Request::AddRoute(RouteSpec { dst: *dst, via })
        }
        Command::Route(RouteCommand::Del { dst }) => Request::DelRoute { dst: *dst },
        Command::Plan { .. }
        | Command::Run { .. }
        | Command::Get { .. }
        | Command::Check { .. } => return Err("this command does not send one request".into()),
    })
}

fn via_text(via: &NextHop) -> String {
    match via {
        NextHop::Port(id) => format!("port {id}"),
        NextHop::Blackhole => "blackhole".into(),
        NextHop::Unreachable => "unreachable".into(),
        NextHop::Host => "host".into(),
        NextHop::Peer(addr) => format!("peer {addr}"),
    }
}

fn render(reply: &Reply, command: &Command) -> String {
    match reply {
        Reply::Hello(h) => format!(
            "{}\nprotocol version {}, {} workers\ngateway {} / {} at {}\n",
            h.software, h.version, h.workers, h.gateway_ipv4, h.gateway_ipv6, h.gateway_mac
        ),
        Reply::Port(p) => format!(
            "port {} created: {} in {} ({})\n",
            p.id, p.ifname, p.netns, p.mac
        ),
        Reply::Ports(ports) => table::render(
            &[
                "ID", "KIND", "NETNS", "IFNAME", "IPS", "MAC", "MTU", "QUEUES",
            ],
            &ports
                .iter()
                .map(|p| {
                    vec![
                        p.id.to_string(),
                        p.kind.clone(),
                        p.netns.clone(),
                        p.ifname.clone(),
                        p.ips
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(","),
                        p.mac.to_string(),
                        p.mtu.to_string(),
                        p.queues.to_string(),
                    ]
                })
                .collect::<Vec<_>>(),
        ),
        Reply::Routes(routes) => table::render(
            &["DESTINATION", "VIA", "ORIGIN"],
            &routes
                .iter()
                .map(|r| {
                    vec![
                        r.dst.to_string(),
                        via_text(&r.via),
                        format!("{:?}", r.origin).to_lowercase(),
                    ]
                })
                .collect::<Vec<_>>(),
        ),
        Reply::Stats(stats) => {
            let all = matches!(command, Command::Stats { all: true });
            let pick = |m: &std::collections::BTreeMap<String, u64>| -> Vec<Vec<String>> {
                m.iter()
                    .filter(|(_, v)| all || **v > 0)
                    .map(|(k, v)| vec![k.clone(), v.to_string()])
                    .collect()
            };
            let mut out = format!("workers: {}\n\n", stats.workers);
            out += &table::render(&["EVENT", "COUNT"], &pick(&stats.counters));
            out += "\n";
            out += &table::render(&["DROP REASON", "COUNT"], &pick(&stats.drops));
            out += "\n";
            out += &table::render(
                &[
                    "PORT",
                    "IFNAME",
                    "RX FRAMES",
                    "RX BYTES",
                    "TX FRAMES",
                    "TX BYTES",
                    "TX ERRORS",
                ],
                &stats
                    .ports
                    .iter()
                    .map(|p| {
                        vec![
                            p.id.to_string(),
                            p.ifname.clone(),
                            p.rx_frames.to_string(),
                            p.rx_bytes.to_string(),
                            p.tx_frames.to_string(),
                            p.tx_bytes.to_string(),
                            p.tx_errors.to_string(),
                        ]
                    })
                    .collect::<Vec<_>>(),
            );
            out
        }
        Reply::Node(n) => match &n.spec {
            None => "no node settings yet (the control process pushes them)\n".into(),
            Some(spec) => format!(
                "node {} at {}  backend {}  uplink {} (MTU {})  pod MTU {}  peers {}\n",
                spec.name,
                spec.underlay,
                spec.backend.kind.name(),
                n.uplink.as_deref().unwrap_or("-"),
                n.uplink_mtu.unwrap_or(0),
                n.pod_mtu.unwrap_or(0),
                spec.peers.len()
            ),
        },
        Reply::Nat(nat) => switchyard_control::views::render_nat(nat.as_ref()),
        Reply::Conntrack(entries) => switchyard_control::views::render_conntrack(entries, false),
        Reply::Done => "done\n".into(),
    }
}

/// JSON output shows the reply's content (`[...]` for `ports`), not the enum wrapper.
fn unwrap_variant(value: serde_json::Value) -> serde_json::Value {
    match value {
        serde_json::Value::Object(map) if map.len() == 1 => map
            .into_iter()
            .next()
            .map_or(serde_json::Value::Null, |(_, v)| v),
        other => other,
    }
}

fn plan_command(node: &str, dir: &std::path::Path, format: Format) -> ExitCode {
    use switchyard_control::{agent, cluster::plan};
    let m = match agent::load(dir) {
        Ok((m, _)) => m,
        Err(errors) => {
            for e in errors {
                eprintln!("switchyard-control: {e}");
            }
            return ExitCode::FAILURE;
        }
    };
    let p = match plan::plan(&m, node) {
        Ok(p) => p,
        Err(message) => {
            eprintln!("switchyard-control: {message}");
            return ExitCode::FAILURE;
        }
    };
    let list = |cidrs: &[switchyard_api::IpNet]| {
        cidrs
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };
    match format {
        Format::Json => match serde_json::to_string_pretty(&p) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                eprintln!("switchyard-control: {e}");
                return ExitCode::FAILURE;
            }
        },
        Format::Table | Format::Wide => {
            println!(
                "node {}  address {}  pod CIDRs {}  backend {} (VNI {}, port {})",
                p.node,
                p.address,
                list(&p.pod_cidrs),
                serde_json::to_value(p.backend.kind)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default(),
                p.backend.vni,
                p.backend.port
            );
            let rows: Vec<Vec<String>> = p
                .peers
                .iter()
                .map(|peer| {
                    vec![
                        peer.node.clone(),
                        peer.address.to_string(),
                        list(&peer.pod_cidrs),
                    ]
                })
                .collect();
            print!(
                "{}",
                table::render(&["PEER", "ADDRESS", "POD CIDRS"], &rows)
            );
        }
    }
    ExitCode::SUCCESS
}

/// Prints `value` as JSON, or `text` for the table formats.
fn emit(format: Format, value: &impl serde::Serialize, text: impl FnOnce() -> String) -> ExitCode {
    if format == Format::Json {
        match serde_json::to_string_pretty(value) {
            Ok(json) => println!("{json}"),
            Err(e) => {
                eprintln!("switchyard-control: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        print!("{}", text());
    }
    ExitCode::SUCCESS
}

fn get_command(
    api: &std::path::Path,
    what: Resource,
    filter: (Option<std::net::Ipv4Addr>, Option<String>),
    format: Format,
) -> Result<ExitCode, String> {
    use switchyard_control::views;
    let mut client = Client::connect(api).map_err(|e| e.to_string())?;
    let status = client.node().map_err(|e| e.to_string())?;
    let wide = format == Format::Wide;
    Ok(match what {
        Resource::Nodes => {
            let rows = views::nodes(&status);
            emit(format, &rows, || views::render_nodes(&rows, wide))
        }
        Resource::Peers => emit(format, &status, || views::render_peers(&status, wide)),
        Resource::Routes => {
            let routes = match client
                .call(Request::ListRoutes)
                .map_err(|e| e.to_string())?
            {
                Reply::Routes(r) => r,
                other => return Err(format!("unexpected answer: {other:?}")),
            };
            emit(format, &routes, || {
                views::render_routes(&routes, &status, wide)
            })
        }
        Resource::Pods => {
            let ports = client.ports().map_err(|e| e.to_string())?;
            let rows = views::pods(&status, &ports);
            emit(format, &rows, || views::render_pods(&rows, wide))
        }
        Resource::Nat => match client.call(Request::GetNat).map_err(|e| e.to_string())? {
            Reply::Nat(nat) => emit(format, &nat, || views::render_nat(nat.as_ref())),
            other => return Err(format!("unexpected answer: {other:?}")),
        },
        Resource::Conntrack => {
            let request = Request::ListConntrack {
                pod: filter.0,
                protocol: filter.1,
            };
            match client.call(request).map_err(|e| e.to_string())? {
                Reply::Conntrack(entries) => {
                    emit(format, &entries, || views::render_conntrack(&entries, wide))
                }
                other => return Err(format!("unexpected answer: {other:?}")),
            }
        }
    })
}

fn check_command(
    api: &std::path::Path,
    peers: &[PathBuf],
    format: Format,
) -> Result<ExitCode, String> {
    use switchyard_control::check;
    let mut client = Client::connect(api).map_err(|e| e.to_string())?;
    let status = client.node().map_err(|e| e.to_string())?;
    let local = client.ports().map_err(|e| e.to_string())?;
    let mut remote = Vec::new();
    for peer in peers {
        let mut c = Client::connect(peer).map_err(|e| e.to_string())?;
        remote.extend(c.ports().map_err(|e| e.to_string())?);
    }
    let outcomes = check::run(check::probes(&status, &local, &remote));
    if outcomes.is_empty() {
        return Err("no pods on this node to check from".into());
    }
    let code = emit(format, &outcomes, || check::render(&outcomes));
    Ok(if outcomes.iter().all(|o| o.ok) {
        code
    } else {
        ExitCode::FAILURE
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = match &cli.command {
        Command::Get {
            what,
            pod,
            protocol,
        } => Some(get_command(
            &cli.api,
            *what,
            (*pod, protocol.clone()),
            cli.output,
        )),
        Command::Check { peer_apis } => Some(check_command(&cli.api, peer_apis, cli.output)),
        _ => None,
    };
    if let Some(outcome) = outcome {
        return outcome.unwrap_or_else(|e| {
            eprintln!("switchyard-control: {e}");
            ExitCode::FAILURE
        });
    }
    match &cli.command {
        Command::Plan { node, manifests } => return plan_command(node, manifests, cli.output),
        Command::Run {
            node,
            manifests,
            dataplane_api,
            uplink,
            interval_ms,
        } => switchyard_control::agent::run(&switchyard_control::agent::AgentOptions {
            node: node.clone(),
            manifests: manifests.clone(),
            api: dataplane_api.clone().unwrap_or_else(|| cli.api.clone()),
            uplink: uplink.clone(),
            interval: std::time::Duration::from_millis((*interval_ms).max(10)),
        }),
        _ => {}
    }
    let request = match request_for(&cli.command) {
        Ok(r) => r,
        Err(message) => {
            eprintln!("switchyard-control: {message}");
            return ExitCode::from(2);
        }
    };
    let reply = Client::connect(&cli.api).and_then(|mut client| client.call(request));
    match reply {
        Ok(reply) => {
            match cli.output {
                Format::Json => match serde_json::to_value(&reply)
                    .map(unwrap_variant)
                    .and_then(|v| serde_json::to_string_pretty(&v))
                {
                    Ok(text) => println!("{text}"),
                    Err(err) => {
                        eprintln!("switchyard-control: {err}");
                        return ExitCode::FAILURE;
                    }
                },
                Format::Table | Format::Wide => print!("{}", render(&reply, &cli.command)),
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("switchyard-control: {err}");
            ExitCode::FAILURE
        }
    }
}
