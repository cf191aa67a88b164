//! The committed `crds/` must be exactly what the Rust types generate.

use std::path::Path;

#[test]
fn committed_crds_match_the_rust_types() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("crds");
    let mut expected_files = Vec::new();
    for crd in pullkeeper::crd::crds() {
        let name = pullkeeper::crd::crd_file_name(&crd);
        let generated = format!("---\n{}", serde_yaml::to_string(&crd).expect("CRD serialises"));
        let committed = std::fs::read_to_string(dir.join(&name)).unwrap_or_default();
        assert!(
            committed == generated,
            "crds/{name} is out of date with src/crd: regenerate it with `cargo run -- crds --dir crds` and commit the result"
        );
        expected_files.push(name);
    }
    let mut present: Vec<String> = std::fs::read_dir(&dir)
        .expect("crds/ exists")
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    present.sort();
    expected_files.sort();
    assert_eq!(
        present, expected_files,
        "crds/ holds files that no Rust type generates: remove them"
    );
}

#[test]
fn crds_have_status_subresource_printer_columns_and_descriptions() {
    for crd in pullkeeper::crd::crds() {
        let v = &crd.spec.versions[0];
        assert!(v.subresources.as_ref().and_then(|s| s.status.as_ref()).is_some());
        let columns: Vec<_> = v
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| c.name.as_str())
            .collect();
        for c in ["Registry", "Ready", "Expires", "Namespaces", "Age"] {
            assert!(
                columns.contains(&c),
                "{} lacks column {c}",
                crd.metadata.name.as_deref().unwrap_or("")
            );
        }
        assert!(crd.spec.names.short_names.as_ref().is_some_and(|s| !s.is_empty()));
        let schema = serde_json::to_value(&v.schema).expect("schema serialises");
        assert_every_property_described(&schema, "");
    }
}

fn assert_every_property_described(v: &serde_json::Value, path: &str) {
    if let Some(props) = v.get("properties").and_then(|p| p.as_object()) {
        for (name, sub) in props {
            let here = format!("{path}.{name}");
            // apiVersion/kind/metadata are Kubernetes' own.
            if !matches!(name.as_str(), "apiVersion" | "kind" | "metadata") {
                assert!(sub.get("description").is_some(), "{here} has no description");
            }
            assert_every_property_described(sub, &here);
        }
    }
    for key in ["items", "openAPIV3Schema", "additionalProperties"] {
        if let Some(sub) = v.get(key) {
            assert_every_property_described(sub, path);
        }
    }
}

#[test]
fn the_namespaced_kind_cannot_name_another_namespace() {
    let crd = pullkeeper::crd::crds()
        .into_iter()
        .find(|c| c.spec.names.kind == "RegistryCredential")
        .expect("namespaced kind");
    let schema = serde_json::to_value(&crd.spec.versions[0].schema).expect("serialises");
    let text = schema["openAPIV3Schema"]["properties"]["spec"].to_string();
    assert!(text.len() > 100, "spec schema found");
    for field in [
        "\"namespace\"",
        "namespaceSelector",
        "excludeNamespaces",
        "\"namespaces\"",
    ] {
        assert!(!text.contains(field), "RegistryCredential schema has {field}");
    }
}

fn validations(v: &serde_json::Value) -> Vec<(String, String)> {
    v.get("x-kubernetes-validations")
        .and_then(|r| r.as_array())
        .into_iter()
        .flatten()
        .map(|r| {
            (
                r["rule"].as_str().unwrap_or_default().to_owned(),
                r["message"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

fn spec_schema(kind: &str) -> serde_json::Value {
    let crd = pullkeeper::crd::crds()
        .into_iter()
        .find(|c| c.spec.names.kind == kind)
        .expect("kind");
    let schema = serde_json::to_value(&crd.spec.versions[0].schema).expect("serialises");
    schema["openAPIV3Schema"]["properties"]["spec"].clone()
}

#[test]
fn the_namespaced_kind_refuses_endpoint_overrides_and_chained_roles_by_cel() {
    let rules = validations(&spec_schema("RegistryCredential"));
    for (provider, field) in [
        ("ecr", "endpoint"),
        ("gcp", "tokenUrl"),
        ("gcp", "metadataUrl"),
        ("acr", "authorityHost"),
        ("acr", "exchangeUrl"),
        ("ecr", "roleArn"),
    ] {
        let path = format!("spec.provider.{provider}.{field}");
        let found = rules.iter().find(|(rule, message)| {
            rule.contains(&format!("self.provider.{provider}.{field}")) && message.starts_with(&path)
        });
        assert!(found.is_some(), "no CEL rule refusing {path}; rules: {rules:?}");
    }
    // The cluster kind is written by administrators and keeps the overrides.
    assert!(validations(&spec_schema("ClusterRegistryCredential")).is_empty());
}

#[test]
fn federation_fields_need_their_companions_on_both_kinds() {
    for kind in ["RegistryCredential", "ClusterRegistryCredential"] {
        let provider = &spec_schema(kind)["properties"]["provider"]["properties"];
        for (name, needs) in [
            ("ecr", "roleArn"),
            ("gcp", "workloadIdentityProvider"),
            ("acr", "clientId"),
        ] {
            let rules = validations(&provider[name]);
            assert!(
                rules
                    .iter()
                    .any(|(rule, _)| rule.contains("serviceAccountRef") && rule.contains(needs)),
                "{kind} {name}: no rule tying serviceAccountRef to {needs}: {rules:?}"
            );
            assert!(
                provider[name]["properties"]["serviceAccountRef"].is_object(),
                "{kind} {name} lacks serviceAccountRef"
            );
        }
    }
}

#[test]
fn the_charts_admission_policies_match_the_operators() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/pullkeeper/files/mutatingadmissionpolicies.yaml");
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    let generated = pullkeeper::controller::admission::policies_yaml().expect("policies serialise");
    assert!(
        committed == generated,
        "charts/pullkeeper/files/mutatingadmissionpolicies.yaml is out of date: regenerate it with `cargo run -- admission-policies > charts/pullkeeper/files/mutatingadmissionpolicies.yaml`"
    );
}
