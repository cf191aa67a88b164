//! The platforms an image must hold for a pod: those of the nodes it can land on.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::{Node, PodSpec};

/// The well-known node label of the operating system.
pub const OS_LABEL: &str = "kubernetes.io/os";
/// The well-known node label of the CPU architecture.
pub const ARCH_LABEL: &str = "kubernetes.io/arch";

/// `(os, arch)` pairs.
pub type Platforms = BTreeSet<(String, String)>;

/// The distinct `(os, arch)` of the nodes, from their `kubernetes.io/os` and
/// `kubernetes.io/arch` labels (nodes without both are left out).
pub fn node_platforms(nodes: &[Node]) -> Platforms {
    nodes
        .iter()
        .filter_map(|n| {
            let labels = n.metadata.labels.as_ref()?;
            Some((labels.get(OS_LABEL)?.clone(), labels.get(ARCH_LABEL)?.clone()))
        })
        .collect()
}

/// What one scheduling alternative allows: `None` where it does not pin the label.
#[derive(Default, Clone)]
struct Pin {
    os: Option<BTreeSet<String>>,
    arch: Option<BTreeSet<String>>,
}

fn narrow(current: &mut Option<BTreeSet<String>>, values: BTreeSet<String>) {
    *current = Some(match current.take() {
        Some(c) => c.intersection(&values).cloned().collect(),
        None => values,
    });
}

impl Pin {
    fn with(mut self, key: &str, values: BTreeSet<String>) -> Self {
        match key {
            OS_LABEL => narrow(&mut self.os, values),
            ARCH_LABEL => narrow(&mut self.arch, values),
            _ => {}
        }
        self
    }

    fn pins(&self) -> bool {
        self.os.is_some() || self.arch.is_some()
    }
}

/// The alternatives of a pod spec: its `nodeSelector` combined with each term of the
/// required node affinity (terms are ORed, expressions within a term ANDed; only `In`
/// pins a label).
fn alternatives(spec: &PodSpec) -> Vec<Pin> {
    let mut base = Pin::default();
    for (k, v) in spec.node_selector.iter().flatten() {
        base = base.with(k, BTreeSet::from([v.clone()]));
    }
    let terms = spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|n| n.required_during_scheduling_ignored_during_execution.as_ref())
        .map(|r| r.node_selector_terms.clone())
        .unwrap_or_default();
    if terms.is_empty() {
        return vec![base];
    }
    terms
        .iter()
        .map(|t| {
            t.match_expressions
                .iter()
                .flatten()
                .filter(|e| e.operator == "In")
                .fold(base.clone(), |pin, e| {
                    pin.with(&e.key, e.values.iter().flatten().cloned().collect())
                })
        })
        .collect()
}

/// The platforms (`os/arch`) an image of this pod must hold. Where the pod pins
/// `kubernetes.io/os` or `kubernetes.io/arch` (node selector or required node affinity),
/// the pinned values: both pinned give every combination; an architecture alone takes the
/// operating systems of the nodes (Linux when there are no nodes); an operating system
/// alone takes the architectures of that system's nodes. Otherwise every platform of the
/// cluster's nodes. Empty: nothing to check (no nodes, nothing pinned).
pub fn required(spec: &PodSpec, nodes: &Platforms) -> Vec<String> {
    let alternatives = alternatives(spec);
    if !alternatives.iter().any(Pin::pins) {
        return nodes.iter().map(|(os, arch)| format!("{os}/{arch}")).collect();
    }
    let mut out = BTreeSet::new();
    for pin in alternatives {
        let pairs: Vec<(String, String)> = match (&pin.os, &pin.arch) {
            (Some(oses), Some(archs)) => oses
                .iter()
                .flat_map(|o| archs.iter().map(move |a| (o.clone(), a.clone())))
                .collect(),
            (None, Some(archs)) => {
                let mut oses: BTreeSet<String> = nodes.iter().map(|(o, _)| o.clone()).collect();
                if oses.is_empty() {
                    oses.insert("linux".to_owned());
                }
                oses.iter()
                    .flat_map(|o| archs.iter().map(move |a| (o.clone(), a.clone())))
                    .collect()
            }
            (Some(oses), None) => nodes.iter().filter(|(o, _)| oses.contains(o)).cloned().collect(),
            (None, None) => nodes.iter().cloned().collect(),
        };
        out.extend(pairs.into_iter().map(|(o, a)| format!("{o}/{a}")));
    }
    out.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(v: serde_json::Value) -> PodSpec {
        let mut v = v;
        v["containers"] = json!([{"name": "c", "image": "i"}]);
        serde_json::from_value(v).expect("spec")
    }

    fn nodes(pairs: &[(&str, &str)]) -> Platforms {
        pairs.iter().map(|(o, a)| ((*o).to_owned(), (*a).to_owned())).collect()
    }

    #[test]
    fn node_labels_give_the_distinct_platforms() {
        let list: Vec<Node> = [
            json!({"metadata": {"name": "a", "labels": {"kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64"}}}),
            json!({"metadata": {"name": "b", "labels": {"kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64"}}}),
            json!({"metadata": {"name": "c", "labels": {"kubernetes.io/os": "linux", "kubernetes.io/arch": "arm64"}}}),
            json!({"metadata": {"name": "d"}}),
        ]
        .into_iter()
        .map(|v| serde_json::from_value(v).expect("node"))
        .collect();
        assert_eq!(node_platforms(&list), nodes(&[("linux", "amd64"), ("linux", "arm64")]));
    }

    #[test]
    fn an_unpinned_pod_needs_every_node_platform() {
        let n = nodes(&[("linux", "amd64"), ("linux", "arm64")]);
        assert_eq!(required(&spec(json!({})), &n), vec!["linux/amd64", "linux/arm64"]);
        assert!(required(&spec(json!({})), &Platforms::new()).is_empty());
        // Other labels do not pin a platform.
        let zone = spec(json!({"nodeSelector": {"topology.kubernetes.io/zone": "a"}}));
        assert_eq!(required(&zone, &n), vec!["linux/amd64", "linux/arm64"]);
    }

    #[test]
    fn a_node_selector_pins_the_platform_even_without_such_nodes() {
        let n = nodes(&[("linux", "amd64")]);
        let s = spec(json!({"nodeSelector": {"kubernetes.io/arch": "s390x"}}));
        assert_eq!(required(&s, &n), vec!["linux/s390x"]);
        assert_eq!(required(&s, &Platforms::new()), vec!["linux/s390x"]);
        let both = spec(json!({"nodeSelector": {"kubernetes.io/os": "windows", "kubernetes.io/arch": "amd64"}}));
        assert_eq!(required(&both, &Platforms::new()), vec!["windows/amd64"]);
        let os_only = spec(json!({"nodeSelector": {"kubernetes.io/os": "linux"}}));
        let mixed = nodes(&[("linux", "amd64"), ("linux", "arm64"), ("windows", "amd64")]);
        assert_eq!(required(&os_only, &mixed), vec!["linux/amd64", "linux/arm64"]);
    }

    #[test]
    fn required_affinity_terms_are_alternatives() {
        let s = spec(json!({
            "nodeSelector": {"kubernetes.io/os": "linux"},
            "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "kubernetes.io/arch", "operator": "In", "values": ["arm64", "ppc64le"]}]},
                {"matchExpressions": [{"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]}]},
                {"matchExpressions": [{"key": "kubernetes.io/arch", "operator": "NotIn", "values": ["amd64"]}]}
            ]}}}
        }));
        let n = nodes(&[("linux", "riscv64")]);
        assert_eq!(
            required(&s, &n),
            vec!["linux/amd64", "linux/arm64", "linux/ppc64le", "linux/riscv64"],
            "a term that pins only the OS takes that OS's nodes"
        );
    }
}
