//! Pods, attached on a node through a CNI plugin (Switchyard's, or the reference `bridge`
//! plugin for the kernel arm) with `host-local` IPAM, and deleted the same way.

use super::*;

impl Cluster {
    pub(super) fn ipam_dir(&self, node: &str) -> PathBuf {
        std::env::temp_dir().join(format!("{}-{node}-ipam", self.prefix))
    }

    /// The CNI configuration of node `i`: switchyard-cni with host-local over the node's
    /// pod CIDRs (`usePodCidr`), or the reference bridge plugin over the same ranges.
    pub(super) fn cni_conf(&self, node: &SimNode) -> Result<(PathBuf, serde_json::Value)> {
        let data_dir = self.ipam_dir(&node.name);
        let (plugin, mut conf, ranges) = match self.arm {
            Arm::Switchyard => (
                find_binary("switchyard-cni")?,
                serde_json::json!({"type": "switchyard", "dataplane_api": node.api}),
                serde_json::json!([[{"subnet": "usePodCidr"}], [{"subnet": "usePodCidrIPv6"}]]),
            ),
            Arm::Kernel => {
                let (v4, v6) = pod_cidrs(node.index);
                (
                    PathBuf::from(CNI_BIN_DIR).join("bridge"),
                    serde_json::json!({"type": "bridge", "bridge": "cni0", "isGateway": true, "isDefaultGateway": true, "mtu": 1450}),
                    serde_json::json!([[{"subnet": v4}], [{"subnet": v6}]]),
                )
            }
        };
        conf["cniVersion"] = serde_json::json!("1.0.0");
        conf["name"] = serde_json::json!(format!("{}-{}", self.prefix, node.name));
        conf["ipam"] =
            serde_json::json!({"type": "host-local", "dataDir": data_dir, "ranges": ranges});
        if let Some(mtu) = self.options.pod_mtu {
            conf["mtu"] = serde_json::json!(mtu);
        }
        Ok((plugin, conf))
    }

    /// Attaches pod `p` of node `i` through the node's CNI plugin.
    pub fn add_pod(&mut self, i: usize, p: usize) -> Result<()> {
        self.add_pod_with(i, p, None)
    }

    /// Attaches pod `p` of node `i` with `runtimeConfig` (e.g. `portMappings`) in the CNI
    /// configuration, as a runtime passes capabilities.
    pub fn add_pod_with(
        &mut self,
        i: usize,
        p: usize,
        runtime_config: Option<serde_json::Value>,
    ) -> Result<()> {
        let at = self.at(i)?;
        let node = &self.nodes[at];
        let ns = Netns::create(&format!("{}-n{i}p{p}", self.prefix))?;
        let (plugin, mut conf) = self.cni_conf(node)?;
        if let Some(rc) = runtime_config {
            conf["runtimeConfig"] = rc;
        }
        let result = cni_call(
            &node.ns,
            &plugin,
            "ADD",
            &format!("{}-n{i}c{p}", self.prefix),
            &ns,
            &conf,
        )
        .map_err(|e| fail!("{e}\n{}", node.logs()))?;
        let (ipv4, ipv6) = result_addresses(&result)?;
        self.nodes[at].pods.push(Pod {
            ns,
            ipv4,
            ipv6,
            port: None,
        });
        Ok(())
    }

    /// Detaches pod `p` of node `i` (CNI DEL) and removes its namespace.
    pub fn del_pod(&mut self, i: usize, p: usize) -> Result<()> {
        let at = self.at(i)?;
        let node = &self.nodes[at];
        let (plugin, conf) = self.cni_conf(node)?;
        let pod = node
            .pods
            .get(p)
            .ok_or_else(|| fail!("no pod {p} on node {i}"))?;
        cni_call(
            &node.ns,
            &plugin,
            "DEL",
            &format!("{}-n{i}c{p}", self.prefix),
            &pod.ns,
            &conf,
        )?;
        self.nodes[at].pods.remove(p);
        Ok(())
    }

    /// Attaches a new pod on node `i` that publishes its TCP port 80 as the node's port
    /// `host_port` (CNI `portMappings`), and has the external host (with
    /// `ClusterOptions::external`) send a message to the node's address and that port: the
    /// pod must receive it whole.
    pub fn check_host_port_from_outside(&mut self, i: usize, host_port: u16) -> Result<()> {
        let mappings = serde_json::json!({"portMappings": [
            {"hostPort": host_port, "containerPort": 80, "protocol": "tcp"}
        ]});
        let at = self.at(i)?;
        let p = self.nodes[at].pods.len();
        self.add_pod_with(i, p, Some(mappings))?;
        let node = std::net::SocketAddr::from((self.nodes[at].ipv4, host_port));
        let pod = self.nodes[at].pods[p].ns.path();
        let ext = self
            .external
            .as_ref()
            .ok_or_else(|| fail!("no external host in this cluster"))?
            .ns
            .path();
        let listening = switchyard_dataplane::io::netns::run_in(&pod, || {
            std::net::TcpListener::bind("0.0.0.0:80")
        })?;
        let server = std::thread::spawn(move || -> std::io::Result<Vec<u8>> {
            let (mut s, _) = listening.accept()?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            let mut buf = Vec::new();
            std::io::Read::read_to_end(&mut s, &mut buf)?;
            Ok(buf)
        });
        const MESSAGE: &[u8] = b"through the node's port";
        switchyard_dataplane::io::netns::run_in(&ext, move || {
            let mut s = std::net::TcpStream::connect_timeout(&node, Duration::from_secs(5))?;
            std::io::Write::write_all(&mut s, MESSAGE)
        })
        .map_err(|e| {
            fail!(
                "the external host cannot reach {node}: {e}\n{}",
                self.logs()
            )
        })?;
        let received = server
            .join()
            .map_err(|_| fail!("the pod's server panicked"))??;
        if received != MESSAGE {
            return Err(fail!("the pod behind {node} received {received:?}"));
        }
        Ok(())
    }

    /// Every pod, with the index of its node.
    pub fn pods(&self) -> impl Iterator<Item = (usize, &Pod)> {
        self.nodes
            .iter()
            .flat_map(|n| n.pods.iter().map(move |p| (n.index, p)))
    }
}
