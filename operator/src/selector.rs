//! Kubernetes label selectors (`metav1.LabelSelector`), compiled once and matched many times.
//! Invalid selectors are the user's error and are reported with what is wrong.

use std::collections::BTreeMap;

use stratum_api::common::LabelSelector;

/// Labels of a pod, namespace or node.
pub type Labels = BTreeMap<String, String>;

/// A compiled label selector: every requirement must hold. No requirement selects everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Requirement {
    Equals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

/// Why a selector cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("label selector expression on key {key:?}: {problem}")]
pub struct SelectorError {
    /// The key of the faulty expression.
    pub key: String,
    /// What is wrong with it.
    pub problem: String,
}

impl Selector {
    /// Compiles a selector, refusing unknown operators and value lists that contradict the
    /// operator, as the API server does for NetworkPolicy.
    pub fn compile(selector: &LabelSelector) -> Result<Self, SelectorError> {
        let mut requirements = Vec::new();
        for (k, v) in selector.match_labels.iter().flatten() {
            requirements.push(Requirement::Equals(k.clone(), v.clone()));
        }
        for expr in selector.match_expressions.iter().flatten() {
            let values = expr.values.clone().unwrap_or_default();
            let err = |problem: &str| SelectorError {
                key: expr.key.clone(),
                problem: problem.to_owned(),
            };
            let requirement = match expr.operator.as_str() {
                "In" | "NotIn" if values.is_empty() => {
                    return Err(err("operators In and NotIn need at least one value"));
                }
                "In" => Requirement::In(expr.key.clone(), values),
                "NotIn" => Requirement::NotIn(expr.key.clone(), values),
                "Exists" | "DoesNotExist" if !values.is_empty() => {
                    return Err(err("operators Exists and DoesNotExist take no values"));
                }
                "Exists" => Requirement::Exists(expr.key.clone()),
                "DoesNotExist" => Requirement::DoesNotExist(expr.key.clone()),
                other => return Err(err(&format!("unknown operator {other:?}"))),
            };
            requirements.push(requirement);
        }
        Ok(Self { requirements })
    }

    /// A selector matching exactly these labels (a DaemonSet-style equality selector).
    pub fn from_labels(labels: &Labels) -> Self {
        Self {
            requirements: labels
                .iter()
                .map(|(k, v)| Requirement::Equals(k.clone(), v.clone()))
                .collect(),
        }
    }

    /// Whether the selector selects everything.
    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    /// Whether `labels` satisfy every requirement.
    pub fn matches(&self, labels: &Labels) -> bool {
        self.requirements.iter().all(|r| match r {
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::DoesNotExist(k) => !labels.contains_key(k),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: (!values.is_empty()).then(|| values.iter().map(|v| v.to_string()).collect()),
        }
    }

    #[test]
    fn empty_selector_selects_everything() {
        let s = Selector::compile(&LabelSelector::default()).unwrap();
        assert!(s.matches(&labels(&[])));
        assert!(s.matches(&labels(&[("a", "b")])));
    }

    #[test]
    fn not_in_and_does_not_exist_select_objects_without_the_key() {
        let s = Selector::compile(&LabelSelector {
            match_expressions: Some(vec![
                expr("tier", "NotIn", &["db"]),
                expr("legacy", "DoesNotExist", &[]),
            ]),
            ..Default::default()
        })
        .unwrap();
        assert!(s.matches(&labels(&[])));
        assert!(s.matches(&labels(&[("tier", "web")])));
        assert!(!s.matches(&labels(&[("tier", "db")])));
        assert!(!s.matches(&labels(&[("legacy", "")])));
    }

    #[test]
    fn match_labels_and_expressions_must_all_hold() {
        let s = Selector::compile(&LabelSelector {
            match_labels: Some([("app".to_string(), "vm".to_string())].into()),
            match_expressions: Some(vec![
                expr("zone", "In", &["a", "b"]),
                expr("gpu", "Exists", &[]),
            ]),
        })
        .unwrap();
        assert!(s.matches(&labels(&[("app", "vm"), ("zone", "b"), ("gpu", "1")])));
        assert!(!s.matches(&labels(&[("app", "vm"), ("zone", "c"), ("gpu", "1")])));
        assert!(!s.matches(&labels(&[("app", "vm"), ("zone", "a")])));
    }

    #[test]
    fn contradictory_or_unknown_operators_are_refused() {
        for e in [
            expr("k", "In", &[]),
            expr("k", "Exists", &["v"]),
            expr("k", "Like", &["v"]),
        ] {
            let selector = LabelSelector {
                match_expressions: Some(vec![e]),
                ..Default::default()
            };
            assert!(Selector::compile(&selector).is_err(), "{selector:?}");
        }
    }
}
