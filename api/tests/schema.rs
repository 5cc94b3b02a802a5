//! The wire format is pinned per protocol version: a sample of every request and reply, with
//! every field filled, serialises to exactly what `tests/schema/v{API_VERSION}.json`
//! records. A change to a message without a new [`API_VERSION`] fails here; bump the
//! version, then record the new file with `UPDATE_API_SCHEMA=1 cargo test -p switchyard-api`.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use switchyard_api::*;

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn node_spec() -> NodeSpec {
    NodeSpec {
        name: "node-a".into(),
        underlay: Ipv4Addr::new(192, 168, 1, 10),
        addresses: vec![IpAddr::from([192, 168, 1, 10])],
        uplink: Some("eth0".into()),
        pod_cidrs: vec![net("10.244.0.0/24"), net("fd00:244::/80")],
        cluster_cidrs: vec![net("10.244.0.0/16")],
        backend: Backend {
            kind: BackendKind::Vxlan,
            vni: 1,
            port: 4789,
        },
        mtu: Some(1450),
        peers: vec![Peer {
            name: "node-b".into(),
            underlay: Ipv4Addr::new(192, 168, 1, 11),
            addresses: vec![IpAddr::from([192, 168, 1, 11])],
            pod_cidrs: vec![net("10.244.1.0/24")],
        }],
        masquerade: Masquerade {
            non_masquerade_cidrs: vec![net("10.0.0.0/8")],
            masq_link_local: true,
            port_range: PortRange {
                first: 32768,
                last: 60999,
            },
            conntrack_max: 1000,
        },
        routes: vec![ExtraRoute {
            dst: net("192.168.2.0/24"),
            via: IpAddr::from([192, 168, 1, 1]),
        }],
        service_cidrs: vec![net("10.96.0.0/12")],
    }
}

fn port_info() -> PortInfo {
    PortInfo {
        id: 3,
        kind: "tap".into(),
        netns: "/run/netns/pod-a".into(),
        ifname: "eth0".into(),
        ifindex: 2,
        mac: MacAddr([0x0a, 0x58, 10, 244, 0, 5]),
        mtu: 1450,
        ips: vec![net("10.244.0.5/24")],
        owner: Some("container-id".into()),
        pod: Some("default/busybox-1".into()),
        queues: 2,
        port_mappings: vec![PortMapping {
            host_port: 8080,
            container_port: 80,
            protocol: "tcp".into(),
            host_ip: "".into(),
        }],
    }
}

fn service() -> ServiceSpec {
    ServiceSpec {
        namespace: "default".into(),
        name: "web".into(),
        kind: "NodePort".into(),
        cluster_ips: vec![
            IpAddr::from([10, 96, 0, 10]),
            "fd00:96::10".parse().unwrap(),
        ],
        external_ips: vec![IpAddr::from([192, 168, 1, 200])],
        ports: vec![ServicePort {
            name: "http".into(),
            protocol: "tcp".into(),
            port: 80,
            node_port: Some(30080),
            endpoints: vec![Endpoint {
                address: IpAddr::from([10, 244, 1, 5]),
                port: 8080,
                local: true,
            }],
        }],
        affinity_timeout_s: Some(10800),
        external_local: true,
        internal_local: false,
    }
}

/// One of every request. The match makes a new variant a compile error until it has a
/// sample here.
fn policy_set() -> PolicySet {
    PolicySet {
        rules: vec![PolicyRule {
            origin: "x/allow-b ingress rule 0".into(),
            peers: vec![PolicyPeer {
                cidr: net("10.244.0.0/16"),
                except: vec![net("10.244.2.0/24")],
            }],
            ports: vec![PolicyPort {
                protocol: 6,
                port: 80,
                end_port: Some(81),
            }],
        }],
        pods: vec![PodPolicy {
            namespace: "x".into(),
            name: "a".into(),
            addresses: vec!["10.244.0.5".parse().unwrap()],
            ingress: Some(PolicyDirection {
                policies: vec!["x/allow-b".into()],
                rules: vec![0],
            }),
            egress: Some(PolicyDirection::default()),
        }],
    }
}

fn requests() -> Vec<Request> {
    let all = vec![
        Request::Hello,
        Request::AddPort(AddPort {
            netns: "/run/netns/pod-a".into(),
            ifname: "eth0".into(),
            ips: vec![net("10.244.0.5/24"), net("fd00:244::5/80")],
            mtu: Some(1450),
            mac: Some(MacAddr([0x0a, 0x58, 10, 244, 0, 5])),
            owner: Some("container-id".into()),
            pod: Some("default/busybox-1".into()),
            port_mappings: port_info().port_mappings,
            kind: None,
        }),
        Request::DelPort(PortSelector::Id { id: 3 }),
        Request::DelPort(PortSelector::Attachment {
            netns: "/run/netns/pod-a".into(),
            ifname: "eth0".into(),
        }),
        Request::ListPorts,
        Request::AddRoute(RouteSpec {
            dst: net("10.1.0.0/16"),
            via: NextHop::Peer(Ipv4Addr::new(192, 168, 1, 11)),
        }),
        Request::DelRoute {
            dst: net("10.1.0.0/16"),
        },
        Request::ListRoutes,
        Request::Stats,
        Request::SetNode(node_spec()),
        Request::GetNode,
        Request::GetNodeDigest,
        Request::GetNat,
        Request::ListConntrack {
            pod: Some(Ipv4Addr::new(10, 244, 0, 5)),
            protocol: Some("tcp".into()),
        },
        Request::ApplyServices {
            upsert: vec![service()],
            remove: vec![ServiceKey {
                namespace: "default".into(),
                name: "old".into(),
            }],
            replace: false,
            maglev_table_size: Some(16381),
        },
        Request::ListServices,
        Request::ListServiceFlows {
            service: Some(ServiceKey {
                namespace: "default".into(),
                name: "web".into(),
            }),
        },
        Request::ApplyPolicies(policy_set()),
        Request::ListPolicies,
        Request::ListDeniedFlows,
        Request::Trace(TraceRequest {
            from: "default/web-0".into(),
            to: "10.96.0.10".parse().unwrap(),
            protocol: "tcp".into(),
            port: Some(80),
        }),
    ];
    for request in &all {
        match request {
            Request::Hello
            | Request::AddPort(_)
            | Request::DelPort(_)
            | Request::ListPorts
            | Request::AddRoute(_)
            | Request::DelRoute { .. }
            | Request::ListRoutes
            | Request::Stats
            | Request::SetNode(_)
            | Request::GetNode
            | Request::GetNodeDigest
            | Request::GetNat
            | Request::ListConntrack { .. }
            | Request::ApplyServices { .. }
            | Request::ListServices
            | Request::ListServiceFlows { .. }
            | Request::ApplyPolicies(_)
            | Request::ListPolicies
            | Request::ListDeniedFlows
            | Request::Trace(_) => {}
        }
    }
    all
}

/// One of every reply, likewise.
fn replies() -> Vec<Reply> {
    let all = vec![
        Reply::Hello(HelloReply {
            version: API_VERSION,
            software: "0.1.0".into(),
            workers: 2,
            gateway_mac: MacAddr([0xee; 6]),
            gateway_ipv4: Ipv4Addr::new(169, 254, 1, 1),
            gateway_ipv6: "fe80::1".parse().unwrap(),
            pod_cidrs: vec![net("10.244.0.0/24")],
        }),
        Reply::Port(port_info()),
        Reply::Ports(vec![port_info()]),
        Reply::Routes(vec![RouteInfo {
            dst: net("10.244.0.5/32"),
            via: NextHop::Port(3),
            origin: RouteOrigin::Pod,
        }]),
        Reply::Stats(Stats {
            workers: 2,
            counters: BTreeMap::from([("forwarded_ipv4".into(), 7)]),
            drops: BTreeMap::from([("no_route".into(), 1)]),
            ports: vec![PortCounters {
                id: 3,
                ifname: "eth0".into(),
                rx_frames: 1,
                rx_bytes: 2,
                tx_frames: 3,
                tx_bytes: 4,
                tx_errors: 5,
            }],
        }),
        Reply::Node(Box::new(NodeStatus {
            spec: Some(node_spec()),
            uplink: Some("eth0".into()),
            uplink_mtu: Some(1500),
            pod_mtu: Some(1450),
            host_ifname: Some("sy-host".into()),
        })),
        Reply::Nat(Some(NatStatus {
            node: Ipv4Addr::new(192, 168, 1, 10),
            port_range: PortRange::default(),
            flows: 1,
            limit: 2,
            tcp: 1,
            udp: 0,
            icmp: 0,
            early_drops: 3,
        })),
        Reply::Conntrack(vec![ConntrackEntry {
            protocol: "tcp".into(),
            kind: "masquerade".into(),
            pod: Ipv4Addr::new(10, 244, 0, 5),
            pod_port: 40000,
            remote: Ipv4Addr::new(192, 168, 2, 10),
            remote_port: 80,
            node_port: 33000,
            state: "established".into(),
            idle_s: 1,
        }]),
        Reply::Services(vec![ServiceStatus {
            spec: service(),
            maglev_table_sizes: vec![251],
        }]),
        Reply::ServiceFlows(vec![ServiceFlowEntry {
            service: Some(service().key()),
            protocol: "tcp".into(),
            client: "10.244.0.5:40000".into(),
            frontend: "10.96.0.10:80".into(),
            backend: "10.244.1.5:8080".into(),
            state: "established".into(),
            idle_s: 3,
        }]),
        Reply::Policies(PolicyStatus {
            generation: 2,
            flows: 5,
            pods: vec![PodPolicyStatus {
                namespace: "x".into(),
                name: "a".into(),
                addresses: vec!["10.244.0.5".parse().unwrap()],
                ingress: Some(vec!["x/allow-b".into()]),
                egress: None,
                ingress_rules: vec!["x/allow-b ingress rule 0".into()],
                egress_rules: vec![],
            }],
        }),
        Reply::DeniedFlows(vec![DeniedFlow {
            time_ms: 1_790_000_000_000,
            protocol: "tcp".into(),
            src: "10.244.1.7".parse().unwrap(),
            src_port: 40000,
            dst: "10.244.0.5".parse().unwrap(),
            dst_port: 80,
            direction: "ingress".into(),
            pod: "x/a".into(),
            policies: vec!["x/allow-b".into()],
        }]),
        Reply::Trace(TraceReport {
            packet: "tcp 10.244.0.5:40000 -> 10.96.0.10:80".into(),
            steps: vec![TraceStep {
                stage: "service".into(),
                decision: "default/web port 80 -> backend 10.244.1.7:8080".into(),
            }],
            verdict: "forwarded".into(),
        }),
        Reply::NodeDigest(Some(0x0123_4567_89ab_cdef)),
        Reply::NodeDigest(None),
        Reply::Done,
    ];
    for reply in &all {
        match reply {
            Reply::Hello(_)
            | Reply::Port(_)
            | Reply::Ports(_)
            | Reply::Routes(_)
            | Reply::Stats(_)
            | Reply::Node(_)
            | Reply::NodeDigest(_)
            | Reply::Nat(_)
            | Reply::Conntrack(_)
            | Reply::Services(_)
            | Reply::ServiceFlows(_)
            | Reply::Policies(_)
            | Reply::DeniedFlows(_)
            | Reply::Trace(_)
            | Reply::Done => {}
        }
    }
    all
}

fn recorded_path() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/schema")
        .join(format!("v{API_VERSION}.json"))
}

#[test]
fn messages_match_the_schema_recorded_for_this_version() {
    let now = serde_json::to_string_pretty(&serde_json::json!({
        "version": API_VERSION,
        "requests": requests(),
        "replies": replies(),
    }))
    .unwrap()
        + "\n";
    let path = recorded_path();
    if std::env::var_os("UPDATE_API_SCHEMA").is_some() {
        std::fs::write(&path, &now).unwrap();
    }
    let recorded = std::fs::read_to_string(&path).unwrap_or_else(|_| {
        panic!(
            "no schema recorded for API version {API_VERSION} at {}: record it with \
             UPDATE_API_SCHEMA=1",
            path.display()
        )
    });
    assert!(
        recorded == now,
        "the messages changed but API_VERSION is still {API_VERSION}: bump it in \
         api/src/lib.rs and record tests/schema/v{{new}}.json with UPDATE_API_SCHEMA=1"
    );
}

#[test]
fn every_request_and_reply_round_trips_through_its_line() {
    for request in requests() {
        let line = serde_json::to_vec(&RequestEnvelope {
            version: API_VERSION,
            request: request.clone(),
        })
        .unwrap();
        assert_eq!(parse_request(&line).unwrap(), request);
    }
    for reply in replies() {
        let envelope: ResponseEnvelope = Ok(reply.clone()).into();
        let line = serde_json::to_string(&envelope).unwrap();
        let back: ResponseEnvelope = serde_json::from_str(&line).unwrap();
        assert_eq!(back.outcome, Outcome::Ok(reply));
    }
}

#[test]
fn requests_of_every_older_version_are_still_understood() {
    let oldest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join(format!("tests/schema/v{OLDEST_API_VERSION}.json")),
        )
        .unwrap(),
    )
    .unwrap();
    for request in oldest["requests"].as_array().unwrap() {
        let line = serde_json::json!({"version": OLDEST_API_VERSION, "request": request});
        parse_request(line.to_string().as_bytes())
            .unwrap_or_else(|e| panic!("a version {OLDEST_API_VERSION} request is refused: {e}"));
    }
}
