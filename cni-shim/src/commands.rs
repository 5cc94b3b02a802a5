//! The six verbs. Each returns what to print on success (ADD and VERSION print a result;
//! DEL, CHECK, STATUS and GC print nothing).

use crate::error::{code, CniError};
use crate::input::{self, Env, NetConf};
use crate::ipam::Ipam;
use crate::result;
use crate::version;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::path::Path;
use switchyard_api::{
    AddPort, ApiError, Client, ClientError, ErrorCode, HelloReply, IpNet, PortInfo, PortSelector,
    Reply, Request,
};

/// The owner key the plugin gives ports: network name and container ID, so that GC only
/// touches this network's ports.
pub fn owner(network: &str, container_id: &str) -> String {
    format!("cni/{network}/{container_id}")
}

fn connect(conf: &NetConf) -> Result<Client, CniError> {
    Client::connect(&conf.dataplane_api).map_err(|e| {
        CniError::new(
            code::TRY_AGAIN_LATER,
            format!("the Switchyard dataplane is not reachable at {}: start switchyard-dataplane, or fix \"dataplane_api\"", conf.dataplane_api),
        )
        .with_details(e.to_string())
    })
}

fn dataplane_error(e: ClientError) -> CniError {
    match e {
        ClientError::Api(ApiError { code: c, message }) => CniError::new(
            match c {
                ErrorCode::NotFound => code::UNKNOWN_CONTAINER,
                ErrorCode::InvalidRequest => code::INVALID_CONFIG,
                ErrorCode::UnsupportedVersion => code::INCOMPATIBLE_VERSION,
                _ => code::DATAPLANE_REFUSED,
            },
            format!("the dataplane refused: {message}"),
        ),
        other => CniError::new(
            code::TRY_AGAIN_LATER,
            format!("talking to the dataplane failed: {other}"),
        ),
    }
}

fn hello(client: &mut Client) -> Result<HelloReply, CniError> {
    client.hello().map_err(dataplane_error)
}

fn ports(client: &mut Client) -> Result<Vec<PortInfo>, CniError> {
    client.ports().map_err(dataplane_error)
}

fn find_port(client: &mut Client, owner: &str, ifname: &str) -> Result<Option<PortInfo>, CniError> {
    Ok(ports(client)?
        .into_iter()
        .find(|p| p.owner.as_deref() == Some(owner) && p.ifname == ifname))
}

/// Replaces `"subnet": "usePodCidr"` / `"usePodCidrIPv6"` in host-local style ranges with
/// the node's pod CIDRs. With `release_only` (DEL, GC: host-local releases by container,
/// whatever the subnet, but still parses it), an unknown CIDR becomes a documentation
/// range instead of an error, so that addresses are released even while the dataplane is
/// down.
fn fill_pod_cidr(
    ipam_conf: &mut Value,
    pod_cidrs: &[IpNet],
    release_only: bool,
) -> Result<(), CniError> {
    let Some(ipam) = ipam_conf.get_mut("ipam") else {
        return Ok(());
    };
    let Some(ipam) = ipam.as_object_mut() else {
        return Ok(());
    };
    let mut slots: Vec<&mut Value> = Vec::new();
    for (key, value) in ipam.iter_mut() {
        match (key.as_str(), value) {
            ("subnet", v) => slots.push(v),
            ("ranges", Value::Array(sets)) => {
                for set in sets.iter_mut() {
                    if let Value::Array(ranges) = set {
                        slots.extend(ranges.iter_mut().filter_map(|r| r.get_mut("subnet")));
                    }
                }
            }
            _ => {}
        }
    }
    for slot in slots {
        let want_v6 = match slot.as_str() {
            Some("usePodCidr") => false,
            Some("usePodCidrIPv6") => true,
            _ => continue,
        };
        let found = pod_cidrs.iter().find(|c| c.addr().is_ipv6() == want_v6);
        let cidr = match (found, release_only) {
            (Some(cidr), _) => cidr.to_string(),
            (None, true) => if want_v6 { "2001:db8::/64" } else { "192.0.2.0/24" }.to_string(),
            (None, false) => {
                return Err(CniError::new(
                    code::TRY_AGAIN_LATER,
                    format!("the configuration asks for {} but the dataplane does not know this node's {} pod CIDR yet", slot, if want_v6 { "IPv6" } else { "IPv4" }),
                ))
            }
        };
        *slot = Value::String(cidr);
    }
    Ok(())
}

/// The Kubernetes pod a runtime names in CNI_ARGS (`K8S_POD_NAMESPACE`, `K8S_POD_NAME`),
/// as `namespace/name`.
fn kubernetes_pod(env: &Env) -> Option<String> {
    let arg = |key: &str| {
        env.args
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    };
    Some(format!(
        "{}/{}",
        arg("K8S_POD_NAMESPACE")?,
        arg("K8S_POD_NAME")?
    ))
}

/// ADD: allocate addresses, create the port, print the result. Rolls back on failure.
pub fn add(conf: &NetConf, env: &Env) -> Result<Value, CniError> {
    let mut client = connect(conf)?;
    let gateway = hello(&mut client)?;
    let mut ipam = Ipam::from_conf(conf, env)?
        .ok_or_else(|| CniError::new(code::INVALID_CONFIG, "the network configuration needs an \"ipam\" section (e.g. {\"type\": \"host-local\", ...})"))?;
    fill_pod_cidr(ipam.conf_mut(), &gateway.pod_cidrs, false)?;
    let allocation = ipam.add(env)?;
    let spec = AddPort {
        netns: env.netns.clone(),
        ifname: env.ifname.clone(),
        ips: allocation.ips,
        mtu: conf.mtu,
        mac: None,
        owner: Some(owner(&conf.name, &env.container_id)),
        pod: kubernetes_pod(env),
        port_mappings: conf.port_mappings.clone(),
        kind: conf.pod_ports,
    };
    let port = match client.call(Request::AddPort(spec)) {
        Ok(Reply::Port(port)) => port,
        outcome => {
            // Roll back: nothing may stay allocated for a failed ADD.
            let _ = ipam.del(env);
            return Err(match outcome {
                Err(e) => dataplane_error(e),
                Ok(other) => CniError::new(
                    code::IO_FAILURE,
                    format!("unexpected answer to add_port: {other:?}"),
                ),
            });
        }
    };
    let dns = allocation.dns.as_ref().or(conf.dns.as_ref());
    Ok(result::build(
        &conf.cni_version,
        &port,
        &env.netns,
        &gateway,
        dns,
    ))
}

/// The IPAM plugin for a release (DEL, GC), with the pod CIDRs filled in as far as the
/// dataplane (if it answers) knows them.
fn ipam_for_release(conf: &NetConf, env: &Env) -> Result<Option<Ipam>, CniError> {
    let Some(mut ipam) = Ipam::from_conf(conf, env)? else {
        return Ok(None);
    };
    let cidrs = connect(conf)
        .and_then(|mut c| hello(&mut c))
        .map(|h| h.pod_cidrs)
        .unwrap_or_default();
    fill_pod_cidr(ipam.conf_mut(), &cidrs, true)?;
    Ok(Some(ipam))
}

/// DEL: remove the port and release the addresses; succeeds when either is already gone.
/// A dataplane that is down keeps its ports (pod TAPs persist), which a later DEL or GC
/// removes; the addresses are released now.
pub fn del(conf: &NetConf, env: &Env) -> Result<(), CniError> {
    if let Ok(mut client) = connect(conf) {
        if let Some(port) = find_port(
            &mut client,
            &owner(&conf.name, &env.container_id),
            &env.ifname,
        )? {
            match client.call(Request::DelPort(PortSelector::Id { id: port.id })) {
                Ok(_)
                | Err(ClientError::Api(ApiError {
                    code: ErrorCode::NotFound,
                    ..
                })) => {}
                Err(e) => return Err(dataplane_error(e)),
            }
        }
    }
    if let Some(ipam) = ipam_for_release(conf, env)? {
        ipam.del(env)?;
    }
    Ok(())
}

fn check_failed(msg: String) -> CniError {
    CniError::new(code::CHECK_FAILED, msg)
}

/// CHECK: the port exists in the dataplane with the addresses of the previous result; the
/// interface exists in the namespace with those addresses, the MTU and the default routes;
/// IPAM still holds the addresses.
pub fn check(conf: &NetConf, env: &Env) -> Result<(), CniError> {
    if !version::at_least(&conf.cni_version, "0.4.0") {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            "CHECK needs cniVersion 0.4.0 or later",
        ));
    }
    let prev = conf.prev_result.as_ref().ok_or_else(|| {
        CniError::new(
            code::INVALID_CONFIG,
            "CHECK needs the previous result in \"prevResult\"",
        )
    })?;
    let want: HashSet<IpNet> = result::addresses(prev).into_iter().collect();
    let mut client = connect(conf)?;
    let gateway = hello(&mut client)?;
    let port = find_port(
        &mut client,
        &owner(&conf.name, &env.container_id),
        &env.ifname,
    )?
    .ok_or_else(|| {
        check_failed(format!(
            "the dataplane has no port for container {} interface {}",
            env.container_id, env.ifname
        ))
    })?;
    let have: HashSet<IpNet> = port.ips.iter().copied().collect();
    if have != want {
        return Err(check_failed(format!(
            "the dataplane's port {} has addresses {:?}, the previous result {:?}",
            port.id, port.ips, want
        )));
    }
    if port.netns != env.netns {
        return Err(check_failed(format!(
            "the port is in {}, not in {}",
            port.netns, env.netns
        )));
    }
    check_interface(env, &port, &gateway)?;
    if let Some(mut ipam) = Ipam::from_conf(conf, env)? {
        fill_pod_cidr(ipam.conf_mut(), &gateway.pod_cidrs, false)?;
        ipam.check(env, prev)?;
    }
    Ok(())
}

fn ip_json(netns: &str, args: &[&str]) -> Result<Value, CniError> {
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net={netns}"))
        .args(["ip", "-j"])
        .args(args)
        .output()
        .map_err(|e| {
            CniError::new(
                code::IO_FAILURE,
                format!("cannot run nsenter/ip to inspect {netns}: {e}"),
            )
        })?;
    if !out.status.success() {
        return Err(check_failed(format!(
            "inspecting {netns} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    serde_json::from_slice(&out.stdout)
        .map_err(|e| CniError::new(code::DECODING_FAILURE, format!("ip -j output: {e}")))
}

/// Looks at the pod's side: interface, MTU, addresses, default routes.
fn check_interface(env: &Env, port: &PortInfo, gateway: &HelloReply) -> Result<(), CniError> {
    if !Path::new(&env.netns).exists() {
        return Err(check_failed(format!(
            "network namespace {} does not exist",
            env.netns
        )));
    }
    let links = ip_json(&env.netns, &["addr", "show"])?;
    let link = links
        .as_array()
        .into_iter()
        .flatten()
        .find(|l| l.get("ifname").and_then(Value::as_str) == Some(env.ifname.as_str()))
        .ok_or_else(|| {
            check_failed(format!(
                "interface {} is missing from {}",
                env.ifname, env.netns
            ))
        })?;
    let mtu = link.get("mtu").and_then(Value::as_u64).unwrap_or(0);
    if mtu != u64::from(port.mtu) {
        return Err(check_failed(format!(
            "interface {} has MTU {mtu}, expected {}",
            env.ifname, port.mtu
        )));
    }
    let addrs: HashSet<String> = link
        .get("addr_info")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|a| {
            Some(format!(
                "{}/{}",
                a.get("local")?.as_str()?,
                a.get("prefixlen")?.as_u64()?
            ))
        })
        .collect();
    for ip in &port.ips {
        if !addrs.contains(&ip.to_string()) {
            return Err(check_failed(format!(
                "interface {} lacks address {ip}",
                env.ifname
            )));
        }
    }
    for (family, needed, gw) in [
        (
            "-4",
            port.ips.iter().any(|n| n.addr().is_ipv4()),
            gateway.gateway_ipv4.to_string(),
        ),
        (
            "-6",
            port.ips.iter().any(|n| n.addr().is_ipv6()),
            gateway.gateway_ipv6.to_string(),
        ),
    ] {
        if !needed {
            continue;
        }
        let routes = ip_json(&env.netns, &[family, "route", "show", "default"])?;
        let ok = routes.as_array().into_iter().flatten().any(|r| {
            r.get("gateway").and_then(Value::as_str) == Some(gw.as_str())
                && r.get("dev").and_then(Value::as_str) == Some(env.ifname.as_str())
        });
        if !ok {
            return Err(check_failed(format!(
                "no default route via {gw} dev {} in {}",
                env.ifname, env.netns
            )));
        }
    }
    Ok(())
}

/// STATUS: ready when the dataplane answers.
pub fn status(conf: &NetConf) -> Result<(), CniError> {
    let mut client = Client::connect(&conf.dataplane_api).map_err(|e| {
        CniError::new(
            code::NOT_AVAILABLE,
            format!(
                "plugin not available: the Switchyard dataplane does not answer at {}",
                conf.dataplane_api
            ),
        )
        .with_details(e.to_string())
    })?;
    hello(&mut client).map_err(|e| {
        CniError::new(
            code::NOT_AVAILABLE,
            format!("plugin not available: {}", e.msg),
        )
    })?;
    Ok(())
}

/// GC: remove this network's ports and address allocations that belong to no valid
/// attachment. Carries on past individual failures and reports them together.
pub fn gc(conf: &NetConf, env: &Env) -> Result<(), CniError> {
    let valid: HashSet<(String, String)> = input::valid_attachments(conf)?.into_iter().collect();
    let ipam = ipam_for_release(conf, env)?;
    let prefix = owner(&conf.name, "");
    let mut failures = Vec::new();
    let release = |id: &str, ifname: &str, failures: &mut Vec<String>| {
        if let Some(ipam) = &ipam {
            let env = Env {
                container_id: id.to_string(),
                ifname: ifname.to_string(),
                ..env.clone()
            };
            if let Err(e) = ipam.del(&env) {
                failures.push(format!("releasing {id}/{ifname}: {}", e.msg));
            }
        }
    };
    if let Ok(mut client) = connect(conf) {
        for port in ports(&mut client)? {
            let Some(id) = port.owner.as_deref().and_then(|o| o.strip_prefix(&prefix)) else {
                continue;
            };
            if valid.contains(&(id.to_string(), port.ifname.clone())) {
                continue;
            }
            if let Err(e) = client.call(Request::DelPort(PortSelector::Id { id: port.id })) {
                failures.push(format!("port {}: {e}", port.id));
            }
            release(id, &port.ifname, &mut failures);
        }
    }
    if let Some(ipam) = &ipam {
        let forwarded = ipam.gc(env).unwrap_or_else(|e| {
            failures.push(e.msg);
            true
        });
        if !forwarded && ipam.kind() == "host-local" {
            // host-local before 1.1 has no GC: read its reservations (one file per address,
            // "containerID\r\nifname") and release those of no valid attachment.
            let dir = conf
                .ipam
                .as_ref()
                .and_then(|i| i.get("dataDir"))
                .and_then(Value::as_str)
                .unwrap_or("/var/lib/cni/networks");
            for (id, ifname) in host_local_reservations(&Path::new(dir).join(&conf.name)) {
                if !valid.contains(&(id.clone(), ifname.clone())) {
                    release(&id, &ifname, &mut failures);
                }
            }
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(CniError::new(
            code::IO_FAILURE,
            format!(
                "GC could not remove everything ({} failures)",
                failures.len()
            ),
        )
        .with_details(failures.join("; ")))
    }
}

/// (containerID, ifname) of each address host-local has reserved in `dir`.
fn host_local_reservations(dir: &Path) -> Vec<(String, String)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.parse::<std::net::IpAddr>().is_ok())
        })
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter_map(|text| {
            let mut lines = text.lines().map(str::trim);
            let id = lines.next().filter(|s| !s.is_empty())?.to_string();
            Some((id, lines.next().unwrap_or("").to_string()))
        })
        .collect()
}

/// VERSION: the versions this plugin speaks.
pub fn version_reply(requested: &str) -> Value {
    json!({"cniVersion": requested, "supportedVersions": version::SUPPORTED})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_cidr_is_filled_in() {
        let mut conf = json!({"ipam": {"type": "host-local", "ranges": [[{"subnet": "usePodCidr"}], [{"subnet": "usePodCidrIPv6"}]]}});
        let cidrs: Vec<IpNet> = vec![
            "10.244.3.0/24".parse().unwrap(),
            "fd00:3::/64".parse().unwrap(),
        ];
        fill_pod_cidr(&mut conf, &cidrs, false).unwrap();
        assert_eq!(conf["ipam"]["ranges"][0][0]["subnet"], "10.244.3.0/24");
        assert_eq!(conf["ipam"]["ranges"][1][0]["subnet"], "fd00:3::/64");
        let mut unknown = json!({"ipam": {"type": "host-local", "subnet": "usePodCidr"}});
        assert_eq!(
            fill_pod_cidr(&mut unknown, &[], false).unwrap_err().code,
            code::TRY_AGAIN_LATER
        );
    }

    #[test]
    fn the_kubernetes_pod_comes_from_cni_args_when_both_names_are_there() {
        let env_with = |args: &str| {
            let vars: std::collections::HashMap<String, String> = [
                ("CNI_CONTAINERID", "c1"),
                ("CNI_IFNAME", "eth0"),
                ("CNI_PATH", "/opt/cni/bin"),
                ("CNI_ARGS", args),
            ]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
            crate::input::env(&vars, crate::input::Command::Del).unwrap()
        };
        let both = env_with("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=busybox-1");
        assert_eq!(kubernetes_pod(&both).as_deref(), Some("default/busybox-1"));
        assert_eq!(kubernetes_pod(&env_with("K8S_POD_NAME=busybox-1")), None);
        assert_eq!(
            kubernetes_pod(&env_with("K8S_POD_NAMESPACE=;K8S_POD_NAME=b")),
            None
        );
    }

    #[test]
    fn reads_host_local_reservations() {
        let dir = std::env::temp_dir().join(format!("sy-cni-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("10.244.0.5"), "abc\r\neth0").unwrap();
        std::fs::write(dir.join("last_reserved_ip.0"), "10.244.0.5").unwrap();
        std::fs::write(dir.join("lock"), "").unwrap();
        assert_eq!(
            host_local_reservations(&dir),
            vec![("abc".to_string(), "eth0".to_string())]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
