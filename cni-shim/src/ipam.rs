//! Delegation to an IPAM plugin (host-local, ...) found in CNI_PATH, per the spec: the same
//! environment, the network configuration on stdin. The version is negotiated first (the
//! IPAM plugin's VERSION), so a 1.1.0 network can use an IPAM plugin that stops at 1.0.0.

use crate::error::{code, CniError};
use crate::input::{Env, NetConf};
use crate::version;
use serde_json::Value;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use switchyard_api::IpNet;

/// An IPAM plugin ready to be called.
pub struct Ipam {
    plugin: PathBuf,
    kind: String,
    version: String,
    supported: Vec<String>,
    conf: Value,
    path: String,
}

/// What IPAM ADD allocated.
#[derive(Debug, Clone, Default)]
pub struct Allocation {
    /// Addresses with prefix length.
    pub ips: Vec<IpNet>,
    /// DNS settings, if the IPAM plugin gave any.
    pub dns: Option<Value>,
}

impl Ipam {
    /// The IPAM plugin of `conf`, or `None` when the configuration has no `ipam` section.
    pub fn from_conf(conf: &NetConf, env: &Env) -> Result<Option<Self>, CniError> {
        let Some(ipam) = &conf.ipam else {
            return Ok(None);
        };
        let kind = ipam
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        if kind.contains('/') {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                format!("IPAM type {kind:?} must be a plugin name, not a path"),
            ));
        }
        let plugin = env
            .path
            .iter()
            .map(|dir| PathBuf::from(dir).join(&kind))
            .find(|p| p.is_file())
            .ok_or_else(|| {
                CniError::new(
                    code::INVALID_CONFIG,
                    format!("IPAM plugin {kind:?} not found in CNI_PATH ({}); install it (e.g. containernetworking-plugins) or fix \"ipam.type\"", env.path.join(":")),
                )
            })?;
        let mut this = Self {
            plugin,
            kind,
            version: conf.cni_version.clone(),
            supported: Vec::new(),
            conf: conf.raw.clone(),
            path: env.path.join(":"),
        };
        let out = this.run(
            "VERSION",
            &Env::default(),
            &serde_json::json!({"cniVersion": conf.cni_version}),
        )?;
        this.supported = out
            .get("supportedVersions")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default();
        this.version =
            version::best_common(&conf.cni_version, &this.supported).ok_or_else(|| {
                CniError::new(
                    code::INCOMPATIBLE_VERSION,
                    format!(
                        "IPAM plugin {} supports none of the versions up to {} ({:?})",
                        this.kind, conf.cni_version, this.supported
                    ),
                )
            })?;
        this.conf["cniVersion"] = Value::String(this.version.clone());
        Ok(Some(this))
    }

    /// True when the plugin speaks `v`.
    pub fn supports(&self, v: &str) -> bool {
        self.supported.iter().any(|s| s == v)
    }

    /// The configuration passed to the plugin (with the negotiated version), mutable, e.g.
    /// to fill in `usePodCidr`.
    pub fn conf_mut(&mut self) -> &mut Value {
        &mut self.conf
    }

    fn run(&self, command: &str, env: &Env, stdin: &Value) -> Result<Value, CniError> {
        let mut child = Command::new(&self.plugin)
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &env.container_id)
            .env("CNI_NETNS", &env.netns)
            .env("CNI_IFNAME", &env.ifname)
            .env(
                "CNI_ARGS",
                env.args
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(";"),
            )
            .env("CNI_PATH", &self.path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                CniError::new(
                    code::IO_FAILURE,
                    format!("cannot run IPAM plugin {}: {e}", self.plugin.display()),
                )
            })?;
        if let Some(mut input) = child.stdin.take() {
            let _ = input.write_all(stdin.to_string().as_bytes());
        }
        let out = child.wait_with_output().map_err(|e| {
            CniError::new(code::IO_FAILURE, format!("IPAM plugin {}: {e}", self.kind))
        })?;
        let parsed: Option<Value> = serde_json::from_slice(&out.stdout).ok();
        if !out.status.success() {
            let (code, msg) = parsed
                .as_ref()
                .map(|v| {
                    (
                        v.get("code")
                            .and_then(Value::as_u64)
                            .unwrap_or(u64::from(code::IO_FAILURE)) as u32,
                        v.get("msg")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_string(),
                    )
                })
                .unwrap_or((
                    code::IO_FAILURE,
                    String::from_utf8_lossy(&out.stderr).trim().to_string(),
                ));
            return Err(CniError::new(
                code,
                format!("IPAM plugin {} {command} failed: {msg}", self.kind),
            ));
        }
        Ok(parsed.unwrap_or(Value::Null))
    }

    /// Allocates addresses for the attachment in `env`.
    pub fn add(&self, env: &Env) -> Result<Allocation, CniError> {
        let out = self.run("ADD", env, &self.conf)?;
        let mut ips = Vec::new();
        for ip in out
            .get("ips")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let text = ip
                .get("address")
                .and_then(Value::as_str)
                .unwrap_or_default();
            ips.push(text.parse::<IpNet>().map_err(|_| {
                CniError::new(
                    code::DECODING_FAILURE,
                    format!("IPAM plugin {} returned address {text:?}", self.kind),
                )
            })?);
        }
        if ips.is_empty() {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                format!("IPAM plugin {} allocated no address", self.kind),
            ));
        }
        Ok(Allocation {
            ips,
            dns: out
                .get("dns")
                .filter(|d| d.as_object().is_some_and(|o| !o.is_empty()))
                .cloned(),
        })
    }

    /// Releases the attachment in `env`'s addresses.
    pub fn del(&self, env: &Env) -> Result<(), CniError> {
        self.run("DEL", env, &self.conf).map(|_| ())
    }

    /// Asks the plugin to verify the attachment's allocation against `prev_result`.
    pub fn check(&self, env: &Env, prev_result: &Value) -> Result<(), CniError> {
        if !version::at_least(&self.version, "0.4.0") {
            return Ok(()); // the plugin has no CHECK at this version
        }
        let mut conf = self.conf.clone();
        conf["prevResult"] = prev_result.clone();
        self.run("CHECK", env, &conf).map(|_| ())
    }

    /// Forwards GC, when the plugin knows it (spec 1.1.0).
    pub fn gc(&self, env: &Env) -> Result<bool, CniError> {
        if !self.supports("1.1.0") {
            return Ok(false);
        }
        let mut conf = self.conf.clone();
        conf["cniVersion"] = Value::String("1.1.0".into());
        self.run("GC", env, &conf).map(|_| true)
    }

    /// The plugin's type name.
    pub fn kind(&self) -> &str {
        &self.kind
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A directory holding a fake IPAM plugin `fake`: a shell script that answers VERSION
    /// with `versions`, logs every call's command and stdin, and answers ADD with `add`
    /// (printed, with `add_status` as exit status). Removed on drop.
    struct FakePlugin {
        dir: PathBuf,
        _serial: std::sync::MutexGuard<'static, ()>,
    }

    /// One fake plugin at a time: a script written while another test thread forks would be
    /// held open for writing in that child, and executing it would fail with ETXTBSY.
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

    impl FakePlugin {
        fn new(versions: &str, add: &str, add_status: u8) -> Self {
            let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
            static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!("sy-ipam-test-{}-{n}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let script = format!(
                "#!/bin/sh\nread -r input\necho \"$CNI_COMMAND $input\" >> '{log}'\ncase \"$CNI_COMMAND\" in\n  VERSION) echo '{{\"cniVersion\":\"1.0.0\",\"supportedVersions\":{versions}}}' ;;\n  ADD) echo '{add}'; exit {add_status} ;;\n  *) ;;\nesac\n",
                log = dir.join("log").display(),
            );
            let plugin = dir.join("fake");
            std::fs::write(&plugin, script).unwrap();
            std::fs::set_permissions(&plugin, std::fs::Permissions::from_mode(0o755)).unwrap();
            Self {
                dir,
                _serial: serial,
            }
        }

        fn env(&self) -> Env {
            Env {
                container_id: "c1".into(),
                netns: "/run/netns/x".into(),
                ifname: "eth0".into(),
                args: Vec::new(),
                path: vec!["/nonexistent".into(), self.dir.display().to_string()],
            }
        }

        fn calls(&self) -> Vec<String> {
            std::fs::read_to_string(self.dir.join("log"))
                .unwrap_or_default()
                .lines()
                .map(String::from)
                .collect()
        }
    }

    impl Drop for FakePlugin {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn conf(version: &str, ipam_type: &str) -> NetConf {
        crate::input::netconf(
            serde_json::json!({
                "cniVersion": version,
                "name": "net",
                "type": "switchyard",
                "ipam": {"type": ipam_type, "subnet": "10.88.0.0/24"},
            })
            .to_string()
            .as_bytes(),
        )
        .unwrap()
    }

    #[test]
    fn the_version_is_negotiated_and_add_returns_the_addresses() {
        let fake = FakePlugin::new(
            r#"["0.4.0","1.0.0"]"#,
            r#"{"cniVersion":"1.0.0","ips":[{"address":"10.88.0.5/24"}],"dns":{}}"#,
            0,
        );
        let ipam = Ipam::from_conf(&conf("1.1.0", "fake"), &fake.env())
            .unwrap()
            .unwrap();
        assert_eq!(ipam.kind(), "fake");
        assert!(ipam.supports("1.0.0") && !ipam.supports("1.1.0"));
        let got = ipam.add(&fake.env()).unwrap();
        assert_eq!(got.ips, vec!["10.88.0.5/24".parse::<IpNet>().unwrap()]);
        assert!(got.dns.is_none(), "an empty dns object is no DNS");
        let calls = fake.calls();
        assert!(calls[1].starts_with("ADD ") && calls[1].contains(r#""cniVersion":"1.0.0""#));
        assert!(!ipam.gc(&fake.env()).unwrap(), "no GC below 1.1.0");
    }

    #[test]
    fn plugin_errors_keep_their_code_and_message() {
        let fake = FakePlugin::new(
            r#"["1.0.0"]"#,
            r#"{"cniVersion":"1.0.0","code":11,"msg":"no addresses left in 10.88.0.0/24"}"#,
            1,
        );
        let ipam = Ipam::from_conf(&conf("1.0.0", "fake"), &fake.env())
            .unwrap()
            .unwrap();
        let err = ipam.add(&fake.env()).unwrap_err();
        assert_eq!(err.code, 11);
        assert!(err.msg.contains("no addresses left"), "{}", err.msg);
        drop(fake);
        let none = FakePlugin::new(r#"["1.0.0"]"#, r#"{"cniVersion":"1.0.0","ips":[]}"#, 0);
        let ipam = Ipam::from_conf(&conf("1.0.0", "fake"), &none.env())
            .unwrap()
            .unwrap();
        assert!(ipam
            .add(&none.env())
            .unwrap_err()
            .msg
            .contains("allocated no address"));
    }

    #[test]
    fn a_missing_plugin_a_path_or_no_common_version_is_refused() {
        let fake = FakePlugin::new(r#"["1.0.0"]"#, "{}", 0);
        let missing = Ipam::from_conf(&conf("1.0.0", "absent"), &fake.env())
            .err()
            .unwrap();
        assert_eq!(missing.code, code::INVALID_CONFIG);
        assert!(
            missing.msg.contains("not found in CNI_PATH"),
            "{}",
            missing.msg
        );
        let path = Ipam::from_conf(&conf("1.0.0", "/bin/fake"), &fake.env())
            .err()
            .unwrap();
        assert!(path.msg.contains("must be a plugin name"), "{}", path.msg);
        let older = Ipam::from_conf(&conf("0.4.0", "fake"), &fake.env())
            .err()
            .unwrap();
        assert_eq!(older.code, code::INCOMPATIBLE_VERSION);
    }
}
