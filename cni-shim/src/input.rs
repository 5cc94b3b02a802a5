//! What a runtime hands the plugin: `CNI_*` environment variables and the network
//! configuration on stdin.

use crate::error::{code, CniError};
use crate::version;
use serde_json::Value;
use std::collections::HashMap;
use switchyard_api::DEFAULT_API_PATH;

/// The verbs of the spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Attach a container.
    Add,
    /// Detach a container.
    Del,
    /// Verify an attachment.
    Check,
    /// Report the supported versions.
    Version,
    /// Report readiness.
    Status,
    /// Remove what no valid attachment uses.
    Gc,
}

/// The `CNI_*` variables.
#[derive(Debug, Clone, Default)]
pub struct Env {
    /// CNI_CONTAINERID.
    pub container_id: String,
    /// CNI_NETNS (may be empty for DEL).
    pub netns: String,
    /// CNI_IFNAME.
    pub ifname: String,
    /// CNI_ARGS, parsed.
    pub args: Vec<(String, String)>,
    /// CNI_PATH, split.
    pub path: Vec<String>,
}

/// Reads the command from `CNI_COMMAND`.
pub fn command(vars: &HashMap<String, String>) -> Result<Command, CniError> {
    match vars.get("CNI_COMMAND").map(String::as_str) {
        Some("ADD") => Ok(Command::Add),
        Some("DEL") => Ok(Command::Del),
        Some("CHECK") => Ok(Command::Check),
        Some("VERSION") => Ok(Command::Version),
        Some("STATUS") => Ok(Command::Status),
        Some("GC") => Ok(Command::Gc),
        Some(other) => Err(CniError::new(
            code::INVALID_ENVIRONMENT,
            format!(
                "CNI_COMMAND {other:?} is not a CNI verb (ADD, DEL, CHECK, VERSION, STATUS, GC)"
            ),
        )),
        None => Err(CniError::new(
            code::INVALID_ENVIRONMENT,
            "CNI_COMMAND is not set: switchyard-cni is a CNI plugin, run by a container runtime",
        )),
    }
}

/// Reads the variables `command` needs; names every missing one.
pub fn env(vars: &HashMap<String, String>, command: Command) -> Result<Env, CniError> {
    let get = |k: &str| vars.get(k).cloned().unwrap_or_default();
    let required: &[&str] = match command {
        Command::Add | Command::Check => {
            &["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"]
        }
        Command::Del => &["CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH"],
        Command::Gc => &["CNI_PATH"],
        Command::Version | Command::Status => &[],
    };
    let missing: Vec<&str> = required
        .iter()
        .copied()
        .filter(|k| get(k).is_empty())
        .collect();
    if !missing.is_empty() {
        return Err(CniError::new(
            code::INVALID_ENVIRONMENT,
            format!("missing environment variables: {}", missing.join(", ")),
        ));
    }
    let ifname = get("CNI_IFNAME");
    if !ifname.is_empty() && (ifname.len() > 15 || ifname.contains(['/', ':', ' '])) {
        return Err(CniError::new(
            code::INVALID_ENVIRONMENT,
            format!("CNI_IFNAME {ifname:?} is not a valid interface name"),
        ));
    }
    let args = get("CNI_ARGS")
        .split(';')
        .filter(|kv| !kv.is_empty())
        .filter_map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect();
    Ok(Env {
        container_id: get("CNI_CONTAINERID"),
        netns: get("CNI_NETNS"),
        ifname,
        args,
        path: get("CNI_PATH")
            .split(':')
            .filter(|p| !p.is_empty())
            .map(String::from)
            .collect(),
    })
}

/// The network configuration this plugin reads; `raw` keeps the whole object for
/// delegation to the IPAM plugin.
#[derive(Debug, Clone)]
pub struct NetConf {
    /// cniVersion requested.
    pub cni_version: String,
    /// Network name.
    pub name: String,
    /// Path of the dataplane's API socket (`dataplane_api`).
    pub dataplane_api: String,
    /// Pod interface MTU (`mtu`), else the dataplane's default.
    pub mtu: Option<u32>,
    /// The `ipam` section, whose `type` names the IPAM plugin.
    pub ipam: Option<Value>,
    /// `prevResult` (DEL, CHECK).
    pub prev_result: Option<Value>,
    /// `dns` passed through to the result.
    pub dns: Option<Value>,
    /// `podPorts`: what carries the pod's frames (`tap`, `afxdp`), else the dataplane's
    /// `--pod-ports`.
    pub pod_ports: Option<switchyard_api::PodPorts>,
    /// `runtimeConfig.portMappings` (the `portMappings` capability): hostPorts.
    pub port_mappings: Vec<switchyard_api::PortMapping>,
    /// The whole configuration object.
    pub raw: Value,
}

/// Parses `runtimeConfig.portMappings` as the reference `portmap` plugin takes it.
fn port_mappings(v: &Value) -> Result<Vec<switchyard_api::PortMapping>, CniError> {
    let list: Vec<switchyard_api::PortMapping> = serde_json::from_value(v.clone()).map_err(|e| {
        CniError::new(
            code::INVALID_CONFIG,
            "runtimeConfig.portMappings must be a list of {hostPort, containerPort, protocol, hostIP}",
        )
        .with_details(e.to_string())
    })?;
    for m in &list {
        if m.host_port == 0 || m.container_port == 0 {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                format!(
                    "port mapping {}:{} needs two non-zero ports",
                    m.host_port, m.container_port
                ),
            ));
        }
        if !matches!(m.protocol.to_ascii_lowercase().as_str(), "tcp" | "udp") {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                format!("port mapping protocol {:?} is not tcp or udp", m.protocol),
            ));
        }
    }
    Ok(list)
}

/// Parses the configuration on stdin.
pub fn netconf(stdin: &[u8]) -> Result<NetConf, CniError> {
    let raw: Value = serde_json::from_slice(stdin).map_err(|e| {
        CniError::new(
            code::DECODING_FAILURE,
            "the network configuration on stdin is not valid JSON",
        )
        .with_details(e.to_string())
    })?;
    let Some(obj) = raw.as_object() else {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            "the network configuration must be a JSON object",
        ));
    };
    let text = |k: &str| obj.get(k).and_then(Value::as_str).map(String::from);
    let cni_version = text("cniVersion").unwrap_or_else(|| "0.1.0".into());
    version::check_supported(&cni_version)?;
    let name = text("name").filter(|n| !n.is_empty()).ok_or_else(|| {
        CniError::new(
            code::INVALID_CONFIG,
            "the network configuration has no \"name\"",
        )
    })?;
    if let Some(t) = text("type") {
        // Runtimes run the binary named by `type`: installed as `switchyard` (the network
        // type) or under its build name `switchyard-cni`.
        if t != "switchyard" && t != "switchyard-cni" {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                format!("network type {t:?} is not \"switchyard\""),
            ));
        }
    }
    let mtu = match obj.get("mtu") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .filter(|m| (576..=65_521).contains(m))
                .ok_or_else(|| {
                    CniError::new(
                        code::INVALID_CONFIG,
                        format!("\"mtu\" must be an integer from 576 to 65521, not {v}"),
                    )
                })? as u32,
        ),
    };
    let pod_ports = match obj.get("podPorts") {
        None | Some(Value::Null) => None,
        Some(v) => Some(v.as_str().and_then(|k| k.parse().ok()).ok_or_else(|| {
            CniError::new(
                code::INVALID_CONFIG,
                format!("\"podPorts\" must be \"tap\" or \"afxdp\", not {v}"),
            )
        })?),
    };
    let ipam = obj.get("ipam").filter(|v| !v.is_null()).cloned();
    if let Some(ipam) = &ipam {
        if ipam
            .get("type")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                "\"ipam\" needs a \"type\" naming the IPAM plugin (e.g. host-local)",
            ));
        }
    }
    let port_mappings = match obj.get("runtimeConfig").and_then(|r| r.get("portMappings")) {
        None | Some(Value::Null) => Vec::new(),
        Some(v) => port_mappings(v)?,
    };
    Ok(NetConf {
        port_mappings,
        cni_version,
        name,
        dataplane_api: text("dataplane_api").unwrap_or_else(|| DEFAULT_API_PATH.into()),
        mtu,
        pod_ports,
        ipam,
        prev_result: obj.get("prevResult").filter(|v| !v.is_null()).cloned(),
        dns: obj.get("dns").filter(|v| !v.is_null()).cloned(),
        raw,
    })
}

/// The (containerID, ifname) pairs of a GC request.
pub fn valid_attachments(conf: &NetConf) -> Result<Vec<(String, String)>, CniError> {
    let list = conf
        .raw
        .get("cni.dev/valid-attachments")
        .or_else(|| conf.raw.get("cni.dev/attachments"))
        .cloned()
        .unwrap_or(Value::Array(vec![]));
    let Value::Array(items) = list else {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            "\"cni.dev/valid-attachments\" must be a list",
        ));
    };
    items
        .iter()
        .map(|item| {
            let id = item.get("containerID").and_then(Value::as_str);
            let ifname = item.get("ifname").and_then(Value::as_str);
            match (id, ifname) {
                (Some(id), Some(ifname)) => Ok((id.to_string(), ifname.to_string())),
                _ => Err(CniError::new(
                    code::INVALID_CONFIG,
                    format!("valid attachment {item} needs \"containerID\" and \"ifname\""),
                )),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn environment_errors_name_the_variables() {
        assert_eq!(command(&vars(&[])).unwrap_err().code, 4);
        assert_eq!(
            command(&vars(&[("CNI_COMMAND", "FLY")])).unwrap_err().code,
            4
        );
        let err = env(
            &vars(&[("CNI_COMMAND", "ADD"), ("CNI_IFNAME", "eth0")]),
            Command::Add,
        )
        .unwrap_err();
        assert_eq!(err.code, 4);
        assert!(
            err.msg.contains("CNI_CONTAINERID")
                && err.msg.contains("CNI_NETNS")
                && err.msg.contains("CNI_PATH")
        );
        let ok = env(
            &vars(&[
                ("CNI_CONTAINERID", "c1"),
                ("CNI_IFNAME", "eth0"),
                ("CNI_PATH", "/a:/b"),
                ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAME=p"),
            ]),
            Command::Del,
        )
        .unwrap();
        assert_eq!(ok.path, vec!["/a", "/b"]);
        assert_eq!(ok.args[1], ("K8S_POD_NAME".into(), "p".into()));
    }

    #[test]
    fn config_errors() {
        assert_eq!(netconf(b"garbage").unwrap_err().code, 6);
        assert_eq!(netconf(b"[]").unwrap_err().code, 7);
        assert_eq!(
            netconf(br#"{"cniVersion":"9.9.9","name":"n"}"#)
                .unwrap_err()
                .code,
            1
        );
        assert_eq!(netconf(br#"{"cniVersion":"1.0.0"}"#).unwrap_err().code, 7);
        assert_eq!(
            netconf(br#"{"cniVersion":"1.0.0","name":"n","mtu":10}"#)
                .unwrap_err()
                .code,
            7
        );
        assert_eq!(
            netconf(br#"{"cniVersion":"1.0.0","name":"n","type":"bridge"}"#)
                .unwrap_err()
                .code,
            7
        );
        assert_eq!(
            netconf(br#"{"cniVersion":"1.0.0","name":"n","ipam":{}}"#)
                .unwrap_err()
                .code,
            7
        );
        assert_eq!(
            netconf(br#"{"cniVersion":"1.0.0","name":"n","podPorts":"xdp"}"#)
                .unwrap_err()
                .code,
            7
        );
        let c = netconf(br#"{"cniVersion":"1.1.0","name":"n","type":"switchyard","mtu":9000,"ipam":{"type":"host-local"}}"#).unwrap();
        assert_eq!(
            (c.mtu, c.dataplane_api.as_str(), c.pod_ports),
            (Some(9000), DEFAULT_API_PATH, None)
        );
        let c = netconf(br#"{"cniVersion":"1.1.0","name":"n","podPorts":"afxdp"}"#).unwrap();
        assert_eq!(c.pod_ports, Some(switchyard_api::PodPorts::Afxdp));
        let gc = netconf(br#"{"cniVersion":"1.1.0","name":"n","cni.dev/valid-attachments":[{"containerID":"a","ifname":"eth0"}]}"#).unwrap();
        assert_eq!(
            valid_attachments(&gc).unwrap(),
            vec![("a".into(), "eth0".into())]
        );
    }
}
