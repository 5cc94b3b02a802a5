//! The `switchyard-control` command line: its commands and options (clap), and the request
//! each dataplane command sends. [`commands`] runs them.

pub mod commands;

use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use switchyard_api::{
    AddPort, IpNet, MacAddr, NextHop, PortSelector, Request, RouteSpec, TraceRequest,
};

/// Inspect and drive a Switchyard dataplane.
#[derive(Parser)]
#[command(version, about)]
pub struct Cli {
    /// Path of the dataplane's API socket.
    #[arg(long, global = true, default_value = switchyard_api::DEFAULT_API_PATH)]
    pub api: PathBuf,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Format::Table)]
    pub output: Format,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// How results are printed.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Human-readable tables.
    Table,
    /// Tables with more columns (`get`).
    Wide,
    /// The API's JSON.
    Json,
}

/// What `get` lists.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Resource {
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
    /// The Services this node serves: cluster IPs, ports, node ports, endpoints.
    Services,
    /// The pods of this node that NetworkPolicies select, and the policies selecting them.
    Policies,
    /// Flows the NetworkPolicies denied last (`--denied`).
    Flows,
}

/// What to do.
#[derive(Subcommand)]
pub enum Command {
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
        /// `get conntrack`: the flows to this Service (`NAMESPACE/NAME`) instead of the
        /// masqueraded ones.
        #[arg(long, value_parser = parse_service_key)]
        service: Option<switchyard_api::ServiceKey>,
        /// `get flows`: the flows the NetworkPolicies denied last.
        #[arg(long)]
        denied: bool,
    },
    /// Run a connectivity matrix from inside this node's pods (to every pod known, this
    /// node and every peer node) and print a pass/fail table; exits non-zero on a failure.
    Check {
        /// API sockets of other nodes' dataplanes whose pods to include as targets.
        #[arg(long = "peer-api")]
        peer_apis: Vec<PathBuf>,
    },
    /// Whether a connection from one pod to another's port is allowed by the
    /// NetworkPolicies of a manifests directory, and which policy and rule decided; from the
    /// manifests alone, before any packet is sent.
    Explain {
        /// Directory of YAML / JSON manifests (Namespaces, Pods, NetworkPolicies).
        #[arg(
            long,
            required_unless_present = "kubeconfig",
            conflicts_with = "kubeconfig"
        )]
        manifests: Option<PathBuf>,
        /// Read them from the API server of this kubeconfig instead.
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        /// The client pod, `NAMESPACE/NAME`.
        #[arg(long)]
        from: String,
        /// The server pod, `NAMESPACE/NAME`.
        #[arg(long)]
        to: String,
        /// The server's port, `PORT/PROTOCOL` (`80/tcp`; TCP when the protocol is left out).
        #[arg(long)]
        port: String,
    },
    /// Trace a packet from one of this node's pods through the dataplane against its live
    /// tables, without sending it or opening any flow: what each stage decides (neighbour,
    /// Service, route, policy, masquerade, next hop, MTU) and the verdict.
    Trace {
        /// The sending pod: `NAMESPACE/NAME` (as `get pods` lists it) or one of its
        /// addresses.
        #[arg(long)]
        from: String,
        /// The destination: `IP:PORT/PROTOCOL` (`10.96.0.10:80/tcp`, `[fd00::1]:53/udp`,
        /// `192.168.2.10/icmp`); TCP when a port is given without a protocol, ICMP echo when
        /// no port is.
        #[arg(long)]
        to: String,
    },
    /// Run the node agent: watch the cluster (the Kubernetes API server, or a manifests
    /// directory) and keep the dataplane's node settings (pod CIDRs, overlay, peers),
    /// Services and NetworkPolicy rules in line with it, pushing them again whenever the
    /// dataplane restarts.
    Run {
        /// The node's name (metadata.name of its Node object; default: $NODE_NAME, as the
        /// downward API sets it).
        #[arg(long, env = "NODE_NAME")]
        node: String,
        /// Read the cluster from a directory of YAML / JSON manifests instead of the API
        /// server.
        #[arg(long, conflicts_with = "kubeconfig")]
        manifests: Option<PathBuf>,
        /// The API server's kubeconfig (default: the in-cluster configuration).
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        /// Namespace of the switchyard-config ConfigMap (API server only).
        #[arg(long, default_value = "kube-system")]
        config_namespace: String,
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

/// `port add|del`.
#[derive(Subcommand)]
pub enum PortCommand {
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

/// `route add|del`.
#[derive(Subcommand)]
pub enum RouteCommand {
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

/// `NAMESPACE/NAME`.
fn parse_service_key(text: &str) -> Result<switchyard_api::ServiceKey, String> {
    match text.split_once('/') {
        Some((namespace, name)) if !namespace.is_empty() && !name.is_empty() => {
            Ok(switchyard_api::ServiceKey {
                namespace: namespace.into(),
                name: name.into(),
            })
        }
        _ => Err(format!("{text:?} is not NAMESPACE/NAME")),
    }
}

/// The one request a dataplane command sends; an error says what is missing, or that the
/// command is not of that kind (`plan`, `run`, `get`, `check`).
pub fn request_for(command: &Command) -> Result<Request, String> {
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
            pod: None,
            port_mappings: Vec::new(),
            kind: None,
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
        Command::Trace { from, to } => {
            let (to, port, protocol) = parse_target(to)?;
            Request::Trace(TraceRequest {
                from: from.clone(),
                to,
                protocol,
                port,
            })
        }
        Command::Plan { .. }
        | Command::Run { .. }
        | Command::Get { .. }
        | Command::Check { .. }
        | Command::Explain { .. } => return Err("this command does not send one request".into()),
    })
}

/// `IP[:PORT][/PROTOCOL]` as `trace --to` takes it: the address, the port, the protocol.
fn parse_target(text: &str) -> Result<(std::net::IpAddr, Option<u16>, String), String> {
    let bad = || {
        format!(
            "--to {text:?}: give IP:PORT/PROTOCOL (10.96.0.10:80/tcp, [fd00::1]:53/udp) or IP/icmp"
        )
    };
    let (target, protocol) = match text.rsplit_once('/') {
        Some((target, protocol)) if protocol.chars().all(|c| c.is_ascii_alphabetic()) => {
            (target, Some(protocol.to_ascii_lowercase()))
        }
        _ => (text, None),
    };
    let (addr, port) = if let Ok(socket) = target.parse::<std::net::SocketAddr>() {
        (socket.ip(), Some(socket.port()))
    } else {
        let bare = target.trim_start_matches('[').trim_end_matches(']');
        (bare.parse().map_err(|_| bad())?, None)
    };
    let protocol = protocol.unwrap_or_else(|| if port.is_some() { "tcp" } else { "icmp" }.into());
    match (protocol.as_str(), port) {
        ("icmp", _) => Ok((addr, None, protocol)),
        ("tcp" | "udp" | "sctp", Some(_)) => Ok((addr, port, protocol)),
        ("tcp" | "udp" | "sctp", None) => Err(format!(
            "--to {text:?}: {protocol} needs a port (IP:PORT/{protocol})"
        )),
        _ => Err(format!(
            "--to {text:?}: the protocol is tcp, udp, sctp or icmp"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_targets_parse_in_both_families() {
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        assert_eq!(
            parse_target("10.96.0.10:80/tcp").unwrap(),
            (ip("10.96.0.10"), Some(80), "tcp".into())
        );
        assert_eq!(
            parse_target("[fd00::1]:53/UDP").unwrap(),
            (ip("fd00::1"), Some(53), "udp".into())
        );
        assert_eq!(
            parse_target("10.96.0.10:443").unwrap(),
            (ip("10.96.0.10"), Some(443), "tcp".into())
        );
        assert_eq!(
            parse_target("192.168.2.10").unwrap(),
            (ip("192.168.2.10"), None, "icmp".into())
        );
        assert_eq!(
            parse_target("[fd00::1]/icmp").unwrap(),
            (ip("fd00::1"), None, "icmp".into())
        );
        assert!(parse_target("10.0.0.1/udp")
            .unwrap_err()
            .contains("needs a port"));
        assert!(parse_target("10.0.0.1:80/gre")
            .unwrap_err()
            .contains("tcp, udp"));
        assert!(parse_target("pod-b:80").unwrap_err().contains("IP:PORT"));
    }

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("switchyard-control").chain(args.iter().copied()))
            .unwrap()
    }

    #[test]
    fn dataplane_commands_map_to_their_request() {
        let cli = parse(&[
            "port",
            "add",
            "--netns",
            "/run/netns/a",
            "--ip",
            "10.0.0.2/24",
        ]);
        let Request::AddPort(add) = request_for(&cli.command).unwrap() else {
            panic!("not an add_port")
        };
        assert_eq!(
            (add.netns.as_str(), add.ifname.as_str()),
            ("/run/netns/a", "eth0")
        );
        assert_eq!(add.ips, vec!["10.0.0.2/24".parse::<IpNet>().unwrap()]);
        let del = parse(&["port", "del", "--netns", "/run/netns/a", "--ifname", "eth0"]);
        assert_eq!(
            request_for(&del.command).unwrap(),
            Request::DelPort(PortSelector::Attachment {
                netns: "/run/netns/a".into(),
                ifname: "eth0".into()
            })
        );
        let route = parse(&["route", "add", "10.1.0.0/16", "--blackhole"]);
        assert_eq!(
            request_for(&route.command).unwrap(),
            Request::AddRoute(RouteSpec {
                dst: "10.1.0.0/16".parse().unwrap(),
                via: NextHop::Blackhole
            })
        );
        assert_eq!(
            request_for(&parse(&["stats", "--all"]).command).unwrap(),
            Request::Stats
        );
    }

    #[test]
    fn incomplete_or_other_commands_are_refused_with_a_reason() {
        let route = parse(&["route", "add", "10.1.0.0/16"]);
        assert!(request_for(&route.command)
            .unwrap_err()
            .contains("--port ID, --blackhole or --unreachable"));
        let get = parse(&["get", "pods"]);
        assert!(request_for(&get.command).is_err());
        let explain = parse(&[
            "explain",
            "--manifests",
            "dir",
            "--from",
            "x/a",
            "--to",
            "y/b",
            "--port",
            "80/tcp",
        ]);
        assert!(
            request_for(&explain.command).is_err(),
            "answered from manifests"
        );
        assert!(
            Cli::try_parse_from(["switchyard-control", "port", "del", "--netns", "x"]).is_err()
        );
    }
}
