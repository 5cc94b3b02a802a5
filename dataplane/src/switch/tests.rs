//! The control side over in-memory ports: requests change the published tables or are
//! refused without changing anything.

use super::*;
use switchyard_api::{NextHop as ApiNextHop, RouteSpec};

fn switch() -> Switch {
    Switch::start(SwitchConfig {
        workers: 1,
        pod_cidrs: vec!["10.244.0.0/24".parse().unwrap()],
        ..SwitchConfig::default()
    })
    .unwrap()
}

fn pod(name: &str, ip: &str) -> AddPort {
    AddPort {
        netns: format!("/test/{name}"),
        ifname: "eth0".into(),
        ips: vec![ip.parse().unwrap()],
        mtu: None,
        mac: None,
        owner: Some(format!("owner-{name}")),
        pod: None,
        port_mappings: Vec::new(),
        kind: None,
    }
}

#[test]
fn hello_tells_the_version_gateway_and_pod_cidrs() {
    let s = switch();
    let Ok(Reply::Hello(h)) = s.handle(Request::Hello) else {
        panic!("no hello")
    };
    assert_eq!(h.version, api::API_VERSION);
    assert_eq!(h.workers, 1);
    assert_eq!(h.gateway_ipv4, Gateway::default().ipv4);
    assert_eq!(h.pod_cidrs, vec!["10.244.0.0/24".parse::<IpNet>().unwrap()]);
}

#[test]
fn a_refused_request_changes_nothing() {
    let s = switch();
    let (a, _peer) = s
        .add_memory_port(&pod("a", "10.244.0.5/24"), false)
        .unwrap();
    let before = s.tables().generation;
    let same_address = s.add_memory_port(&pod("b", "10.244.0.5/24"), false);
    assert_eq!(
        same_address.err().map(|e| e.code),
        Some(ErrorCode::Conflict)
    );
    let bad_route = s.handle(Request::AddRoute(RouteSpec {
        dst: "10.1.0.0/16".parse().unwrap(),
        via: ApiNextHop::Port(a.id + 100),
    }));
    assert_eq!(bad_route.unwrap_err().code, ErrorCode::NotFound);
    assert_eq!(s.tables().generation, before, "no snapshot was published");
    assert_eq!(s.tables().ports.len(), 1);
}

#[test]
fn a_deleted_port_leaves_the_tables_with_its_routes() {
    let s = switch();
    let (a, _pa) = s
        .add_memory_port(&pod("a", "10.244.0.5/24"), false)
        .unwrap();
    let (b, _pb) = s
        .add_memory_port(&pod("b", "10.244.0.6/24"), false)
        .unwrap();
    s.handle(Request::AddRoute(RouteSpec {
        dst: "10.1.0.0/16".parse().unwrap(),
        via: ApiNextHop::Port(a.id),
    }))
    .unwrap();
    let gone = s
        .del_port(&PortSelector::Attachment {
            netns: "/test/a".into(),
            ifname: "eth0".into(),
        })
        .unwrap();
    assert_eq!(gone.id, a.id);
    let t = s.tables();
    assert!(!t.ports.contains_key(&a.id) && t.ports.contains_key(&b.id));
    let lookup = |addr: [u8; 4]| t.routes_v4.lookup(u32::from_be_bytes(addr));
    assert_eq!(
        lookup([10, 1, 2, 3]),
        0,
        "the static route through it is gone"
    );
    assert_eq!(lookup([10, 244, 0, 5]), 0, "so is its host route");
    assert_ne!(lookup([10, 244, 0, 6]), 0);
    let again = s.del_port(&PortSelector::Id { id: a.id });
    assert_eq!(again.unwrap_err().code, ErrorCode::NotFound);
}

#[test]
fn stats_name_every_drop_reason_and_the_uplink_drops() {
    let s = switch();
    let stats = s.stats();
    for reason in DropReason::ALL {
        assert!(stats.drops.contains_key(reason.name()), "{}", reason.name());
    }
    for name in [
        "uplink_not_a_peer",
        "uplink_not_ours",
        "uplink_malformed",
        "uplink_no_buffer",
    ] {
        assert_eq!(stats.drops.get(name), Some(&0), "{name}");
    }
    assert_eq!(stats.workers, 1);
}
