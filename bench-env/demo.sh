#!/usr/bin/env bash
# The main job: build Switchyard, build simulated clusters out of network namespaces, check
# connectivity and measure Switchyard against the kernel in the same run: one node (veth +
# bridge baseline), two nodes (flannel's VXLAN baseline), then Services (kube-proxy's
# iptables rules on flannel's layout). Arguments go to both
# scenarios (e.g. --seconds 10 --repeat 5).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
    echo "the demo creates network namespaces and TAP devices: run it as root" >&2
    exit 1
fi
missing=()
command -v ip >/dev/null || missing+=(iproute2)
command -v ping >/dev/null || missing+=(iputils-ping)
command -v iperf3 >/dev/null || missing+=(iperf3)
command -v iptables >/dev/null || missing+=(iptables)
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
cargo build --release --workspace --bins --locked
target/release/bench-env single-node --json bench-results.json "$@"
echo
target/release/bench-env multi-node --external --json bench-results-multinode.json "$@"
echo
target/release/bench-env services --json bench-results-services.json "$@"
