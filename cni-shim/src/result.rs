//! The ADD result, shaped for the requested cniVersion: 0.3.x and 0.4.0 carry a `version`
//! per IP; 1.0.0 drops it; 1.1.0 adds the interface MTU.

use serde_json::{json, Value};
use std::net::IpAddr;
use switchyard_api::{HelloReply, IpNet, PortInfo};

/// Builds the result of a successful ADD.
pub fn build(
    cni_version: &str,
    port: &PortInfo,
    sandbox: &str,
    gw: &HelloReply,
    dns: Option<&Value>,
) -> Value {
    let versioned_ips = !crate::version::at_least(cni_version, "1.0.0");
    let mut interface =
        json!({"name": port.ifname, "mac": port.mac.to_string(), "sandbox": sandbox});
    if crate::version::at_least(cni_version, "1.1.0") {
        interface["mtu"] = json!(port.mtu);
    }
    let ips: Vec<Value> = port
        .ips
        .iter()
        .map(|net: &IpNet| {
            let gateway: IpAddr = if net.addr().is_ipv4() {
                gw.gateway_ipv4.into()
            } else {
                gw.gateway_ipv6.into()
            };
            let mut ip =
                json!({"address": net.to_string(), "gateway": gateway.to_string(), "interface": 0});
            if versioned_ips {
                ip["version"] = json!(if net.addr().is_ipv4() { "4" } else { "6" });
            }
            ip
        })
        .collect();
    let mut routes = Vec::new();
    if port.ips.iter().any(|n| n.addr().is_ipv4()) {
        routes.push(json!({"dst": "0.0.0.0/0", "gw": gw.gateway_ipv4.to_string()}));
    }
    if port.ips.iter().any(|n| n.addr().is_ipv6()) {
        routes.push(json!({"dst": "::/0", "gw": gw.gateway_ipv6.to_string()}));
    }
    let mut result = json!({
        "cniVersion": cni_version,
        "interfaces": [interface],
        "ips": ips,
        "routes": routes,
    });
    if let Some(dns) = dns {
        result["dns"] = dns.clone();
    }
    result
}

/// The addresses (with prefix) a previous result lists.
pub fn addresses(prev: &Value) -> Vec<IpNet> {
    prev.get("ips")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|ip| ip.get("address")?.as_str()?.parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port() -> PortInfo {
        PortInfo {
            id: 1,
            kind: "tap".into(),
            netns: "/run/netns/p".into(),
            ifname: "eth0".into(),
            ifindex: 2,
            mac: "0a:58:0a:f4:00:05".parse().unwrap(),
            mtu: 1450,
            ips: vec![
                "10.244.0.5/24".parse().unwrap(),
                "fd00::5/64".parse().unwrap(),
            ],
            owner: None,
            pod: None,
            queues: 2,
            port_mappings: Vec::new(),
        }
    }

    fn hello() -> HelloReply {
        HelloReply {
            version: 1,
            software: "t".into(),
            workers: 1,
            gateway_mac: "ee:ee:ee:ee:ee:ee".parse().unwrap(),
            gateway_ipv4: "169.254.1.1".parse().unwrap(),
            gateway_ipv6: "fe80::1".parse().unwrap(),
            pod_cidrs: vec![],
        }
    }

    #[test]
    fn shapes_per_version() {
        for v in crate::version::SUPPORTED {
            let r = build(
                v,
                &port(),
                "/run/netns/p",
                &hello(),
                Some(&json!({"nameservers": ["10.96.0.10"]})),
            );
            assert_eq!(r["cniVersion"], *v);
            assert_eq!(r["interfaces"][0]["sandbox"], "/run/netns/p");
            assert_eq!(r["interfaces"][0]["mac"], "0a:58:0a:f4:00:05");
            assert_eq!(r["ips"][0]["address"], "10.244.0.5/24");
            assert_eq!(r["ips"][0]["interface"], 0);
            assert_eq!(r["ips"][1]["gateway"], "fe80::1");
            assert_eq!(r["routes"].as_array().unwrap().len(), 2);
            assert_eq!(r["dns"]["nameservers"][0], "10.96.0.10");
            let old = !crate::version::at_least(v, "1.0.0");
            assert_eq!(r["ips"][0].get("version").is_some(), old, "{v}");
            assert_eq!(
                r["interfaces"][0].get("mtu").is_some(),
                *v == "1.1.0",
                "{v}"
            );
        }
        assert_eq!(
            addresses(&build("1.0.0", &port(), "x", &hello(), None)).len(),
            2
        );
    }
}
