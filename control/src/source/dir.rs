//! The manifests directory as a source: read again whenever its listing (names, sizes,
//! modification times) changes; pod CIDRs missing from Nodes are allocated here and
//! recorded in `DIR/.switchyard-allocations.json` (so every node's agent agrees), cluster
//! IPs and node ports of Services in `DIR/.switchyard-service-allocations.json`.

use super::{Change, Source};
use crate::cluster::allocate::{self, Record};
use crate::cluster::manifests::{self, Kinds, ManifestError, Manifests};
use crate::cluster::services::ServiceAllocations;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Where allocations of pod CIDRs are recorded inside a manifests directory.
pub const ALLOCATIONS_FILE: &str = ".switchyard-allocations.json";
/// Where cluster IPs and node ports given to Services are recorded.
pub const SERVICE_ALLOCATIONS_FILE: &str = ".switchyard-service-allocations.json";

/// A manifests directory.
pub struct DirSource {
    dir: PathBuf,
    seen: Option<Vec<(String, u64, Option<SystemTime>)>>,
    state: Manifests,
}

impl DirSource {
    /// Reads `dir`.
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            seen: None,
            state: Manifests::default(),
        }
    }
}

impl Source for DirSource {
    /// Reads the whole directory again when its listing changed: every kind may have.
    fn changed(&mut self) -> Option<Change> {
        let now = fingerprint(&self.dir);
        if self.seen.as_ref() == Some(&now) {
            return None;
        }
        self.seen = Some(now);
        let strings = |errors: Vec<ManifestError>| -> Vec<String> {
            errors.iter().map(ToString::to_string).collect()
        };
        let loaded = load(&self.dir).map_err(strings).and_then(|(m, record)| {
            write_record(&self.dir, ALLOCATIONS_FILE, &record)
                .map(|()| m)
                .map_err(|e| {
                    vec![format!(
                        "cannot record allocations in {}: {e}",
                        self.dir.display()
                    )]
                })
        });
        let errors = match loaded {
            Ok(m) => {
                self.state = m;
                Vec::new()
            }
            Err(errors) => errors,
        };
        Some(Change {
            kinds: Kinds::ALL,
            errors,
        })
    }

    fn state(&self) -> Box<dyn Deref<Target = Manifests> + '_> {
        Box::new(&self.state)
    }

    fn service_allocations(&self) -> ServiceAllocations {
        std::fs::read(self.dir.join(SERVICE_ALLOCATIONS_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn record_service_allocations(&self, record: &ServiceAllocations) -> Result<(), String> {
        write_record(&self.dir, SERVICE_ALLOCATIONS_FILE, record)
            .map_err(|e| format!("cannot record allocations in {}: {e}", self.dir.display()))
    }

    fn describe(&self) -> String {
        format!("manifests in {}", self.dir.display())
    }
}

/// Reads the directory and fills in pod CIDRs, with the recorded allocations kept first;
/// returns the manifests and the allocations to record.
pub fn load(dir: &Path) -> Result<(Manifests, Record), Vec<ManifestError>> {
    let mut m = manifests::load_dir(dir)?;
    let recorded: Record = std::fs::read(dir.join(ALLOCATIONS_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let record = allocate::allocate(&mut m, &recorded)?;
    Ok((m, record))
}

/// Writes `record` as `dir/name` when it changed (atomically: temporary file, rename).
fn write_record(dir: &Path, name: &str, record: &impl serde::Serialize) -> std::io::Result<()> {
    let path = dir.join(name);
    let text = serde_json::to_vec_pretty(record).map_err(std::io::Error::other)?;
    if std::fs::read(&path).ok().as_deref() == Some(&text[..]) {
        return Ok(());
    }
    let tmp = dir.join(format!("{name}.{}", std::process::id()));
    std::fs::write(&tmp, &text)?;
    std::fs::rename(&tmp, &path)
}

/// What the directory looks like: names, sizes and modification times of its files.
fn fingerprint(dir: &Path) -> Vec<(String, u64, Option<SystemTime>)> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| {
            let meta = e.metadata().ok()?;
            Some((
                e.file_name().to_string_lossy().into_owned(),
                meta.len(),
                meta.modified().ok(),
            ))
        })
        .collect();
    out.sort();
    out
}
