//! Kubernetes label selectors: `matchLabels` and `matchExpressions` (`In`, `NotIn`,
//! `Exists`, `DoesNotExist`), all of which must hold; an empty selector selects everything.

use crate::cluster::pods::LabelSet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// True when `labels` satisfy `selector`.
pub fn matches(selector: &LabelSelector, labels: &impl LabelSet) -> bool {
    let labels_ok = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.label(k) == Some(v.as_str()));
    let expressions_ok = selector.match_expressions.iter().flatten().all(|e| {
        let values = e.values.as_deref().unwrap_or_default();
        let value = labels.label(&e.key);
        match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.iter().any(|x| x == v)),
            "NotIn" => value.is_none_or(|v| !values.iter().any(|x| x == v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false, // the API server refuses other operators; select nothing
        }
    });
    labels_ok && expressions_ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;
    use std::collections::BTreeMap;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: Some(values.iter().map(|v| v.to_string()).collect()),
        }
    }

    #[test]
    fn labels_and_expressions_all_hold() {
        let pod = labels(&[("pod", "a"), ("tier", "web")]);
        assert!(
            matches(&LabelSelector::default(), &pod),
            "empty selects all"
        );
        let by_label = LabelSelector {
            match_labels: Some(labels(&[("pod", "a")])),
            ..Default::default()
        };
        assert!(matches(&by_label, &pod));
        assert!(!matches(&by_label, &labels(&[("pod", "b")])));
        let both = LabelSelector {
            match_labels: Some(labels(&[("pod", "a")])),
            match_expressions: Some(vec![expr("tier", "NotIn", &["db"])]),
        };
        assert!(matches(&both, &pod));
        for (e, want) in [
            (expr("tier", "In", &["web", "api"]), true),
            (expr("tier", "In", &["db"]), false),
            (expr("tier", "Exists", &[]), true),
            (expr("zone", "DoesNotExist", &[]), true),
            (expr("zone", "NotIn", &["x"]), true),
            (expr("tier", "Gt", &["1"]), false),
        ] {
            let s = LabelSelector {
                match_expressions: Some(vec![e.clone()]),
                ..Default::default()
            };
            assert_eq!(matches(&s, &pod), want, "{e:?}");
        }
    }
}
