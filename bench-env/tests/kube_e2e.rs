//! The network model's scenario in a real Kubernetes cluster on this machine (API server,
//! controller manager, scheduler, two nodes with containerd and a kubelet, Switchyard
//! installed by its DaemonSet, busybox pods): every step of `bench_env::kube_e2e` must
//! hold. Needs root; builds the Kubernetes components and the images the first time.

#[test]
#[cfg_attr(
    not(privileged),
    ignore = "needs root: network, mount and cgroup namespaces for two kubelet nodes"
)]
fn the_network_model_holds_in_a_real_cluster() {
    bench_env::require_root("real-cluster scenario");
    let passed = bench_env::kube_e2e::run().expect("the scenario's testbed");
    assert!(
        passed,
        "a step of the real-cluster scenario failed (its line says which)"
    );
}
