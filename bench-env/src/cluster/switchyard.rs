//! The Switchyard arm: the manifests directory every agent reads (the cluster
//! configuration and one Node per node), each node's dataplane and `switchyard-control
//! run` agent, their restarts, and waiting for the overlay to form.

use super::*;

impl Cluster {
    /// Rewrites the cluster configuration with these extra routes (the agents apply them).
    pub fn set_routes(&mut self, routes: Vec<(String, String)>) -> Result<()> {
        self.options.routes = routes;
        self.write_config()
    }

    /// Rewrites the cluster configuration with another backend (the agents apply it).
    pub fn set_backend(&mut self, backend: BackendKind) -> Result<()> {
        self.options.backend = backend;
        self.write_config()
    }

    /// Gives dataplanes started from now on these extra arguments instead of the
    /// cluster's (a restart takes them: nodes may then differ).
    pub fn set_dataplane_args(&mut self, args: Vec<String>) {
        self.options.dataplane_args = args;
    }

    pub(super) fn write_config(&self) -> Result<()> {
        let backend = match self.options.backend {
            BackendKind::Vxlan => "vxlan",
            BackendKind::Ipip => "ipip",
            BackendKind::Direct => "direct",
        };
        let mut text = format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: switchyard-config\n  namespace: kube-system\ndata:\n  config.yaml: |\n    clusterCIDR: {CLUSTER_CIDR}\n    clusterCIDRv6: {CLUSTER_CIDR_V6}\n    serviceCIDR: [10.96.0.0/12, \"fd00:96::/112\"]\n    nodeCIDRMaskSizeV6: 64\n    backend:\n      type: {backend}\n"
        );
        if let Some(max) = self.options.conntrack_max {
            text += &format!("    masquerade:\n      conntrackMax: {max}\n");
        }
        if !self.options.routes.is_empty() {
            text += "    routes:\n";
            for (dst, via) in &self.options.routes {
                text += &format!("    - {{dst: {dst}, via: {via}}}\n");
            }
        }
        match &self.api {
            Some(api) => {
                api.apply(&self.hub, &text)?;
            }
            None => std::fs::write(self.manifests.join("switchyard-config.yaml"), text)?,
        }
        Ok(())
    }

    /// Writes node `i`'s Node manifest (name and InternalIPs; no podCIDR, so the control
    /// processes allocate one), or with the API server creates the Node with its pod CIDRs
    /// in `spec.podCIDRs`, as kube-controller-manager allocates them.
    pub fn write_node_manifest(&self, i: usize) -> Result<()> {
        let node = &self.nodes[self.at(i)?];
        let addresses = format!(
            "status:\n  addresses:\n  - type: InternalIP\n    address: {}\n  - type: InternalIP\n    address: \"{}\"\n  - type: Hostname\n    address: {}\n",
            node.ipv4, node.ipv6, node.name
        );
        if let Some(api) = &self.api {
            let (v4, v6) = pod_cidrs(i);
            let text = format!(
                "apiVersion: v1\nkind: Node\nmetadata:\n  name: {}\nspec:\n  podCIDR: {v4}\n  podCIDRs: [\"{v4}\", \"{v6}\"]\n{addresses}",
                node.name
            );
            api.apply(&self.hub, &text)?;
            return Ok(());
        }
        let text = format!(
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: {}\n{addresses}",
            node.name
        );
        let tmp = self.manifests.join(format!(".{}.tmp", node.name));
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, self.manifests.join(format!("{}.yaml", node.name)))?;
        Ok(())
    }

    pub(super) fn spawn_dataplane(&self, node: &SimNode) -> Result<Process> {
        let binary = find_binary("switchyard-dataplane")?
            .to_string_lossy()
            .into_owned();
        let api = node.api.to_string_lossy().into_owned();
        let mut argv = vec![binary, "--api".into(), api];
        if let Some(w) = self.options.workers {
            argv.extend(["--workers".into(), w.to_string()]);
        }
        argv.extend(self.options.dataplane_args.iter().cloned());
        let refs: Vec<&str> = argv.iter().map(String::as_str).collect();
        node.ns.spawn(&refs, Some(&node.dataplane_log))
    }

    pub(super) fn spawn_control(&self, node: &SimNode) -> Result<Process> {
        let binary = find_binary("switchyard-control")?
            .to_string_lossy()
            .into_owned();
        let (source, path) = match &self.api {
            Some(api) => (
                "--kubeconfig",
                self.agent_kubeconfig
                    .as_ref()
                    .unwrap_or(&api.kubeconfig)
                    .to_string_lossy()
                    .into_owned(),
            ),
            None => ("--manifests", self.manifests.to_string_lossy().into_owned()),
        };
        let api = node.api.to_string_lossy().into_owned();
        node.ns.spawn(
            &[
                &binary,
                "run",
                "--node",
                &node.name,
                source,
                &path,
                "--dataplane-api",
                &api,
            ],
            Some(&node.control_log),
        )
    }

    /// Where node `i` is in `nodes`.
    pub(super) fn at(&self, i: usize) -> Result<usize> {
        self.nodes
            .iter()
            .position(|n| n.index == i)
            .ok_or_else(|| fail!("no node {i}"))
    }

    /// Makes the agents started from now on use `kubeconfig` (with the API server).
    pub fn set_agent_kubeconfig(&mut self, kubeconfig: PathBuf) {
        self.agent_kubeconfig = Some(kubeconfig);
    }

    /// Kills node `i`'s dataplane and starts a new one.
    pub fn restart_dataplane(&mut self, i: usize) -> Result<()> {
        let at = self.at(i)?;
        self.nodes[at].dataplane.take();
        let process = self.spawn_dataplane(&self.nodes[at])?;
        self.nodes[at].dataplane = Some(process);
        Ok(())
    }

    /// Stops node `i`'s dataplane with `signal` (SIGKILL: a crash, SIGTERM: a planned
    /// stop) and waits for it to exit.
    pub fn stop_dataplane(&mut self, i: usize, signal: nix::sys::signal::Signal) -> Result<()> {
        let at = self.at(i)?;
        if let Some(mut old) = self.nodes[at].dataplane.take() {
            let pid = nix::unistd::Pid::from_raw(old.id() as i32);
            nix::sys::signal::kill(pid, signal).map_err(|e| fail!("kill -{signal} {pid}: {e}"))?;
            old.wait_exit(Duration::from_secs(5))?;
        }
        Ok(())
    }

    /// Stops node `i`'s dataplane with `signal`, runs `meanwhile` with the stopped
    /// dataplane's API socket path, and starts a new one.
    pub fn stop_and_start_dataplane(
        &mut self,
        i: usize,
        signal: nix::sys::signal::Signal,
        meanwhile: impl FnOnce(&std::path::Path),
    ) -> Result<()> {
        self.stop_dataplane(i, signal)?;
        let at = self.at(i)?;
        meanwhile(&self.nodes[at].api);
        let process = self.spawn_dataplane(&self.nodes[at])?;
        self.nodes[at].dataplane = Some(process);
        Ok(())
    }

    /// Kills node `i`'s control process (its dataplane keeps what it was given).
    pub fn stop_control(&mut self, i: usize) -> Result<()> {
        let at = self.at(i)?;
        self.nodes[at].control.take();
        Ok(())
    }

    /// Kills node `i`'s control process and starts a new one.
    pub fn restart_control(&mut self, i: usize) -> Result<()> {
        let at = self.at(i)?;
        self.nodes[at].control.take();
        let process = self.spawn_control(&self.nodes[at])?;
        self.nodes[at].control = Some(process);
        Ok(())
    }

    /// Waits until node `i`'s dataplane has node settings with `peers` peers.
    pub fn wait_for_peers(&self, i: usize, peers: usize, timeout: Duration) -> Result<Duration> {
        let node = &self.nodes[self.at(i)?];
        let start = Instant::now();
        loop {
            let have = node
                .client()
                .and_then(|mut c| Ok(c.node()?))
                .ok()
                .and_then(|s| s.spec)
                .map(|s| s.peers.len());
            if have == Some(peers) {
                return Ok(start.elapsed());
            }
            if start.elapsed() > timeout {
                return Err(fail!(
                    "node {} did not get settings with {peers} peers within {timeout:?} (has {have:?})\n{}",
                    node.name,
                    node.logs()
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

pub(super) fn wait_for_api(node: &SimNode, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if node.client().and_then(|mut c| Ok(c.hello()?)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Err(fail!(
        "the dataplane of {} did not answer within {timeout:?}\n{}",
        node.name,
        node.logs()
    ))
}
