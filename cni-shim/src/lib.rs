//! `switchyard-cni`: the CNI plugin (spec 1.1) that container runtimes call to attach pods
//! to the Switchyard dataplane. Network type `"switchyard"`; configuration keys
//! `dataplane_api` (the dataplane's socket), `mtu`, and `ipam` (delegated to any IPAM plugin
//! in CNI_PATH, e.g. host-local; `"subnet": "usePodCidr"` takes the node's pod CIDR).
//!
//! Verbs: ADD (IPAM, then a TAP port in CNI_NETNS named CNI_IFNAME; rolled back on any
//! failure), DEL (idempotent), CHECK (dataplane port, interface, addresses, MTU, routes,
//! IPAM), VERSION, STATUS (error 50 when the dataplane does not answer), GC (ports and
//! allocations of no valid attachment). Errors are the spec's JSON object on stdout with a
//! non-zero exit; no input makes it panic.

pub mod commands;
pub mod error;
pub mod input;
pub mod ipam;
pub mod result;
pub mod version;

use error::CniError;
use input::Command;
use std::collections::HashMap;

/// What the process prints and its exit status.
pub struct Outcome {
    /// Text for stdout (a result, a version reply, an error object, or nothing).
    pub stdout: String,
    /// Exit status: 0 on success.
    pub status: i32,
}

/// Runs one invocation: `vars` are the process environment, `stdin` the configuration.
pub fn run(vars: &HashMap<String, String>, stdin: &[u8]) -> Outcome {
    // Errors are reported in the configuration's version when it can be read.
    let requested = serde_json::from_slice::<serde_json::Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str().map(String::from))
        .filter(|v| version::SUPPORTED.contains(&v.as_str()))
        .unwrap_or_else(|| version::LATEST.to_string());
    match dispatch(vars, stdin, &requested) {
        Ok(Some(value)) => Outcome {
            stdout: value.to_string(),
            status: 0,
        },
        Ok(None) => Outcome {
            stdout: String::new(),
            status: 0,
        },
        Err(err) => Outcome {
            stdout: err.to_json(&requested),
            status: 1,
        },
    }
}

fn dispatch(
    vars: &HashMap<String, String>,
    stdin: &[u8],
    requested: &str,
) -> Result<Option<serde_json::Value>, CniError> {
    let command = input::command(vars)?;
    if command == Command::Version {
        return Ok(Some(commands::version_reply(requested)));
    }
    let conf = input::netconf(stdin)?;
    let env = input::env(vars, command)?;
    match command {
        Command::Add => commands::add(&conf, &env).map(Some),
        Command::Del => commands::del(&conf, &env).map(|_| None),
        Command::Check => commands::check(&conf, &env).map(|_| None),
        Command::Status => commands::status(&conf).map(|_| None),
        Command::Gc => commands::gc(&conf, &env).map(|_| None),
        Command::Version => Ok(Some(commands::version_reply(requested))),
    }
}
