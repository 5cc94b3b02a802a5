//! XDP programs on a device: loaded by the dataplane itself, with no external loader, and
//! gone from the device once their owner is.

use bench_env::netns::Netns;
use switchyard_dataplane::io::netns::{link_index, run_in};
use switchyard_dataplane::io::xdp::XdpRedirect;

#[test]
#[cfg_attr(
    not(privileged),
    ignore = "needs root: network namespaces and XDP programs"
)]
fn the_redirect_program_attaches_to_a_veth_and_goes_with_its_owner() {
    bench_env::require_root("XDP test");
    let ns = Netns::create(&format!("sy-xdp-{}", std::process::id())).unwrap();
    ns.exec(&[
        "ip", "link", "add", "syxdp0", "type", "veth", "peer", "name", "syxdp1",
    ])
    .unwrap();
    for dev in ["syxdp0", "syxdp1"] {
        ns.exec(&["ip", "link", "set", dev, "up"]).unwrap();
    }
    let shown = || ns.exec(&["ip", "-d", "link", "show", "syxdp0"]).unwrap();
    assert!(!shown().contains("prog/xdp"), "nothing before: {}", shown());
    let redirect = run_in(&ns.path(), || {
        let index = link_index("syxdp0").expect("the veth");
        XdpRedirect::attach(index, 2)
    })
    .unwrap_or_else(|e| panic!("the kernel refused the program or the link: {e}"));
    let attached = shown();
    assert!(
        attached.contains("prog/xdp") && attached.contains("sy_xsk_redirect"),
        "{attached}"
    );
    drop(redirect);
    let after = shown();
    assert!(
        !after.contains("prog/xdp"),
        "detached with its owner: {after}"
    );
}
