//! Spec versions: which ones the plugin speaks and how they compare.

use crate::error::{code, CniError};

/// Versions whose results this plugin can produce.
pub const SUPPORTED: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// The newest version, used for errors about unreadable input.
pub const LATEST: &str = "1.1.0";

/// A version as three numbers, for ordering.
pub fn parse(version: &str) -> Option<(u32, u32, u32)> {
    let mut parts = version.split('.').map(|p| p.parse::<u32>().ok());
    let v = (parts.next()??, parts.next()??, parts.next()??);
    parts.next().is_none().then_some(v)
}

/// Refuses versions this plugin does not speak.
pub fn check_supported(version: &str) -> Result<(), CniError> {
    if SUPPORTED.contains(&version) {
        Ok(())
    } else {
        Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "cniVersion {version:?} is not supported; use one of {}",
                SUPPORTED.join(", ")
            ),
        ))
    }
}

/// The newest of `offered` that is not newer than `wanted`.
pub fn best_common(wanted: &str, offered: &[String]) -> Option<String> {
    let limit = parse(wanted)?;
    offered
        .iter()
        .filter_map(|v| parse(v).map(|p| (p, v)))
        .filter(|(p, _)| *p <= limit)
        .max_by_key(|(p, _)| *p)
        .map(|(_, v)| v.clone())
}

/// True when `version` is at least `floor`.
pub fn at_least(version: &str, floor: &str) -> bool {
    matches!((parse(version), parse(floor)), (Some(a), Some(b)) if a >= b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordering_and_negotiation() {
        assert!(at_least("1.1.0", "0.4.0") && !at_least("0.3.1", "0.4.0"));
        let offered: Vec<String> = ["0.1.0", "0.4.0", "1.0.0"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(best_common("1.1.0", &offered).as_deref(), Some("1.0.0"));
        assert_eq!(best_common("0.3.1", &offered).as_deref(), Some("0.1.0"));
        assert_eq!(parse("1.0"), None);
        assert_eq!(check_supported("0.2.0").unwrap_err().code, 1);
    }
}
