//! Runs a parsed command line: one function per kind of command, one dispatch.

use super::{request_for, Cli, Command, Format, Resource};
use crate::source::api::{ApiOptions, ApiSource};
use crate::source::dir::DirSource;
use crate::source::Source;
use crate::{agent, check, cluster::plan, policy, views};
use serde::Serialize;
use std::path::Path;
use std::process::ExitCode;
use switchyard_api::{Client, Reply, Request};

/// Runs `cli`'s command; errors are printed, and the exit code says how it went (2 for a
/// command line that names no complete request).
pub fn run(cli: Cli) -> ExitCode {
    let outcome = match &cli.command {
        Command::Plan { node, manifests } => plan_command(node, manifests, cli.output),
        Command::Get {
            what,
            pod,
            protocol,
            service,
            denied,
        } => get_command(
            &cli.api,
            *what,
            Filter {
                pod: *pod,
                protocol: protocol.clone(),
                service: service.clone(),
                denied: *denied,
            },
            cli.output,
        ),
        Command::Check { peer_apis } => check_command(&cli.api, peer_apis, cli.output),
        Command::Explain {
            manifests,
            kubeconfig,
            from,
            to,
            port,
        } => explain_command(
            manifests.as_deref(),
            kubeconfig.as_deref(),
            from,
            to,
            port,
            cli.output,
        ),
        Command::Run {
            node,
            manifests,
            kubeconfig,
            config_namespace,
            dataplane_api,
            uplink,
            interval_ms,
        } => run_command(
            manifests.as_deref(),
            kubeconfig.clone(),
            config_namespace,
            &agent::AgentOptions {
                node: node.clone(),
                api: dataplane_api.clone().unwrap_or_else(|| cli.api.clone()),
                uplink: uplink.clone(),
                interval: std::time::Duration::from_millis((*interval_ms).max(10)),
            },
        ),
        _ => match request_for(&cli.command) {
            Ok(request) => dataplane_command(&cli, request),
            Err(message) => {
                eprintln!("switchyard-control: {message}");
                return ExitCode::from(2);
            }
        },
    };
    outcome.unwrap_or_else(|e| {
        eprintln!("switchyard-control: {e}");
        ExitCode::FAILURE
    })
}

/// Sends one request to the dataplane and prints its reply.
fn dataplane_command(cli: &Cli, request: Request) -> Result<ExitCode, String> {
    let reply = Client::connect(&cli.api)
        .and_then(|mut client| client.call(request))
        .map_err(|e| e.to_string())?;
    let all = matches!(cli.command, Command::Stats { all: true });
    // JSON shows the reply's content (`[...]` for `ports`), not the enum wrapper.
    let content = unwrap_variant(serde_json::to_value(&reply).map_err(|e| e.to_string())?);
    Ok(emit(cli.output, &content, || {
        views::render_reply(&reply, all)
    }))
}

/// The value inside a one-key object (`{"ports": [...]}` gives `[...]`).
fn unwrap_variant(value: serde_json::Value) -> serde_json::Value {
    match value {
        serde_json::Value::Object(map) if map.len() == 1 => map
            .into_iter()
            .next()
            .map_or(serde_json::Value::Null, |(_, v)| v),
        other => other,
    }
}

/// Prints `value` as JSON, or `text` for the table formats.
fn emit(format: Format, value: &impl Serialize, text: impl FnOnce() -> String) -> ExitCode {
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

/// Manifest errors as one message, a line each.
fn one_message(errors: &[crate::cluster::manifests::ManifestError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\nswitchyard-control: ")
}

fn plan_command(node: &str, dir: &Path, format: Format) -> Result<ExitCode, String> {
    let manifests = agent::load(dir)
        .map(|(m, _)| m)
        .map_err(|errors| one_message(&errors))?;
    let p = plan::plan(&manifests, node)?;
    Ok(emit(format, &p, || views::render_plan(&p)))
}

/// What `get conntrack` lists.
struct Filter {
    pod: Option<std::net::Ipv4Addr>,
    protocol: Option<String>,
    service: Option<switchyard_api::ServiceKey>,
    /// `get flows`: the denied ones.
    denied: bool,
}

fn get_command(
    api: &Path,
    what: Resource,
    filter: Filter,
    format: Format,
) -> Result<ExitCode, String> {
    if what == Resource::Flows && !filter.denied {
        return Err(
            "get flows lists the flows NetworkPolicies denied: say `get flows --denied` \
             (flows to Services: `get conntrack --service NAMESPACE/NAME`)"
                .into(),
        );
    }
    let mut client = Client::connect(api).map_err(|e| e.to_string())?;
    let status = client.node().map_err(|e| e.to_string())?;
    let wide = format == Format::Wide;
    let mut call = |request| client.call(request).map_err(|e| e.to_string());
    Ok(match what {
        Resource::Nodes => {
            let rows = views::nodes(&status);
            emit(format, &rows, || views::render_nodes(&rows, wide))
        }
        Resource::Peers => emit(format, &status, || views::render_peers(&status, wide)),
        Resource::Routes => match call(Request::ListRoutes)? {
            Reply::Routes(routes) => emit(format, &routes, || {
                views::render_routes(&routes, Some(&status), wide)
            }),
            other => return Err(format!("unexpected answer: {other:?}")),
        },
        Resource::Pods => match call(Request::ListPorts)? {
            Reply::Ports(ports) => {
                let rows = views::pods(&status, &ports);
                emit(format, &rows, || views::render_pods(&rows, wide))
            }
            other => return Err(format!("unexpected answer: {other:?}")),
        },
        Resource::Services => match call(Request::ListServices)? {
            Reply::Services(list) => emit(format, &list, || views::render_services(&list, wide)),
            other => return Err(format!("unexpected answer: {other:?}")),
        },
        Resource::Policies => match call(Request::ListPolicies)? {
            Reply::Policies(list) => emit(format, &list, || views::render_policies(&list, wide)),
            other => return Err(format!("unexpected answer: {other:?}")),
        },
        Resource::Flows => match call(Request::ListDeniedFlows)? {
            Reply::DeniedFlows(flows) => {
                emit(format, &flows, || views::render_denied_flows(&flows))
            }
            other => return Err(format!("unexpected answer: {other:?}")),
        },
        Resource::Nat => match call(Request::GetNat)? {
            Reply::Nat(nat) => emit(format, &nat, || views::render_nat(nat.as_ref())),
            other => return Err(format!("unexpected answer: {other:?}")),
        },
        Resource::Conntrack if filter.service.is_some() => match call(Request::ListServiceFlows {
            service: filter.service,
        })? {
            Reply::ServiceFlows(flows) => {
                emit(format, &flows, || views::render_service_flows(&flows, wide))
            }
            other => return Err(format!("unexpected answer: {other:?}")),
        },
        Resource::Conntrack => match call(Request::ListConntrack {
            pod: filter.pod,
            protocol: filter.protocol,
        })? {
            Reply::Conntrack(entries) => {
                emit(format, &entries, || views::render_conntrack(&entries, wide))
            }
            other => return Err(format!("unexpected answer: {other:?}")),
        },
    })
}

fn check_command(
    api: &Path,
    peers: &[std::path::PathBuf],
    format: Format,
) -> Result<ExitCode, String> {
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

/// Runs the agent on the manifests directory, or else on the API server.
fn run_command(
    dir: Option<&Path>,
    kubeconfig: Option<std::path::PathBuf>,
    config_namespace: &str,
    opts: &agent::AgentOptions,
) -> Result<ExitCode, String> {
    // The agent holds nothing the next one cannot rebuild from the cluster: on SIGTERM
    // (a pod's stop, where it runs as PID 1 and the default action would be ignored) or
    // Ctrl-C it leaves at once.
    switchyard_api::logging::init();
    ctrlc::set_handler(|| std::process::exit(0))
        .map_err(|e| format!("cannot install the signal handler: {e}"))?;
    let mut source: Box<dyn Source> = match dir {
        Some(dir) => Box::new(DirSource::new(dir)),
        None => Box::new(ApiSource::connect(&ApiOptions {
            kubeconfig,
            config_namespace: config_namespace.into(),
        })?),
    };
    agent::run(source.as_mut(), opts)
}

fn explain_command(
    dir: Option<&Path>,
    kubeconfig: Option<&Path>,
    from: &str,
    to: &str,
    port: &str,
    format: Format,
) -> Result<ExitCode, String> {
    let (manifests, origin) = match (dir, kubeconfig) {
        (Some(dir), _) => (
            crate::cluster::manifests::load_dir(dir).map_err(|errors| one_message(&errors))?,
            dir.display().to_string(),
        ),
        (None, kubeconfig) => {
            let mut api = ApiSource::connect(&ApiOptions {
                kubeconfig: kubeconfig.map(Path::to_path_buf),
                config_namespace: "kube-system".into(),
            })?;
            let describe = api.describe();
            let m = api
                .snapshot(std::time::Duration::from_secs(10))
                .map_err(|e| e.join("\nswitchyard-control: "))?;
            (m, describe)
        }
    };
    let (number, protocol) = port.split_once('/').unwrap_or((port, "tcp"));
    let number: u16 = number
        .parse()
        .map_err(|_| format!("--port {port:?} is not PORT/PROTOCOL (80/tcp)"))?;
    let protocol = protocol.to_ascii_uppercase();
    if !matches!(protocol.as_str(), "TCP" | "UDP" | "SCTP") {
        return Err(format!("--port {port:?}: the protocol is tcp, udp or sctp"));
    }
    let find = |name: &str| {
        let (ns, pod) = name
            .split_once('/')
            .ok_or_else(|| format!("{name:?} is not NAMESPACE/NAME"))?;
        manifests
            .pods
            .get(&(ns.to_string(), pod.to_string()))
            .ok_or_else(|| format!("no Pod {name} in {origin}"))
    };
    let verdict = policy::explain(&manifests, find(from)?, find(to)?, number, &protocol);
    Ok(emit(format, &verdict, || {
        format!(
            "{}: {}\n",
            if verdict.allowed { "allowed" } else { "denied" },
            verdict.reason
        )
    }))
}
