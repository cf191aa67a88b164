//! A credential's namespace selector, matched against any namespace's labels.

use kube::core::{Expression, Selector};

/// A credential's namespace selector, with its expressions at hand for matching any
/// namespace (kube's `Selector` matches only a `BTreeMap` of labels).
#[derive(Clone, Debug, PartialEq)]
pub struct NamespaceSelector {
    selector: Selector,
    expressions: Vec<Expression>,
}

impl From<Selector> for NamespaceSelector {
    fn from(selector: Selector) -> Self {
        let expressions = selector.clone().into_iter().collect();
        Self { selector, expressions }
    }
}

impl NamespaceSelector {
    /// As kube's `Selector`.
    pub fn selector(&self) -> &Selector {
        &self.selector
    }

    /// Whether a namespace whose labels `label` looks up is selected: every expression
    /// holds, as `SelectorExt::matches` decides it.
    pub fn matches<'a>(&self, label: impl Fn(&str) -> Option<&'a str>) -> bool {
        self.expressions.iter().all(|e| match e {
            Expression::In(key, values) => label(key).is_some_and(|v| values.contains(v)),
            Expression::NotIn(key, values) => label(key).is_none_or(|v| !values.contains(v)),
            Expression::Exists(key) => label(key).is_some(),
            Expression::DoesNotExist(key) => label(key).is_none(),
            Expression::Equal(key, value) => label(key) == Some(value.as_str()),
            Expression::NotEqual(key, value) => label(key) != Some(value.as_str()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
    use kube::core::SelectorExt;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn requirement() -> impl Strategy<Value = LabelSelectorRequirement> {
        let key = prop::sample::select(vec!["team", "tier", "env"]);
        let values = prop::collection::vec(prop::sample::select(vec!["a", "b", "c"]), 1..3);
        let operator = prop::sample::select(vec!["In", "NotIn", "Exists", "DoesNotExist"]);
        (key, values, operator).prop_map(|(key, values, operator)| LabelSelectorRequirement {
            key: key.into(),
            values: matches!(operator, "In" | "NotIn").then(|| values.iter().map(|v| (*v).into()).collect()),
            operator: operator.into(),
        })
    }

    proptest! {
        #[test]
        fn matches_exactly_as_kube_does(
            match_labels in prop::collection::btree_map(prop::sample::select(vec!["team", "tier"]), prop::sample::select(vec!["a", "b"]), 0..2),
            expressions in prop::collection::vec(requirement(), 0..3),
            labels in prop::collection::btree_map(prop::sample::select(vec!["team", "tier", "env", "x"]), prop::sample::select(vec!["a", "b", "c"]), 0..4),
        ) {
            let selector: Selector = LabelSelector {
                match_labels: Some(match_labels.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect()),
                match_expressions: Some(expressions),
            }
            .try_into()
            .expect("valid");
            let labels: BTreeMap<String, String> = labels.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect();
            let ours = NamespaceSelector::from(selector.clone());
            prop_assert_eq!(ours.matches(|k| labels.get(k).map(String::as_str)), selector.matches(&labels));
        }
    }
}
