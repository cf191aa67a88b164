//! Property tests for the image reference and `WWW-Authenticate` parsers: no input makes
//! them panic, and every valid reference survives a print/parse round trip.

use proptest::prelude::*;
use pullkeeper::registry::{Reference, challenge};

fn component() -> impl Strategy<Value = String> {
    "[a-z0-9]{1,8}([._-][a-z0-9]{1,8}){0,2}"
}

/// Without a registry in front, a first component with a '.' would be read as a registry
/// host (Docker's rule), so it has none.
fn first_component() -> impl Strategy<Value = String> {
    "[a-z0-9]{1,8}([_-][a-z0-9]{1,8}){0,2}"
}

fn reference() -> impl Strategy<Value = String> {
    let registry = prop_oneof![
        Just(String::new()),
        Just("ghcr.io/".to_owned()),
        Just("localhost:5000/".to_owned()),
        Just("registry.example.com:443/".to_owned()),
        Just("123456789012.dkr.ecr.us-east-1.amazonaws.com/".to_owned()),
    ];
    let path = (first_component(), prop::collection::vec(component(), 0..3))
        .prop_map(|(first, rest)| std::iter::once(first).chain(rest).collect::<Vec<_>>().join("/"));
    let tag = prop_oneof![
        Just(String::new()),
        "[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}".prop_map(|t| format!(":{t}"))
    ];
    let digest = prop_oneof![Just(String::new()), "[0-9a-f]{64}".prop_map(|h| format!("@sha256:{h}"))];
    (registry, path, tag, digest).prop_map(|(r, p, t, d)| format!("{r}{p}{t}{d}"))
}

proptest! {
    #[test]
    fn reference_parser_never_panics(s in "\\PC{0,80}") {
        let _ = Reference::parse(&s);
    }

    #[test]
    fn valid_references_round_trip(s in reference()) {
        let parsed = Reference::parse(&s).map_err(|e| TestCaseError::fail(format!("{s}: {e}")))?;
        let again = Reference::parse(&parsed.to_string()).map_err(|e| TestCaseError::fail(format!("{parsed}: {e}")))?;
        prop_assert_eq!(parsed, again);
    }

    #[test]
    fn challenge_parser_never_panics(s in "\\PC{0,120}") {
        let _ = challenge::parse(&s);
    }

    #[test]
    fn bearer_parameters_round_trip(realm in "https://[a-z]{1,10}\\.io/[a-z]{0,8}", service in "[a-z.:0-9]{1,20}", scope in "repository:[a-z/]{1,12}:pull") {
        let header = format!(r#"Bearer realm="{realm}",service="{service}",scope="{scope}""#);
        let c = challenge::parse(&header);
        prop_assert_eq!(c.len(), 1);
        prop_assert_eq!(c[0].param("realm"), Some(realm.as_str()));
        prop_assert_eq!(c[0].param("service"), Some(service.as_str()));
        prop_assert_eq!(c[0].param("scope"), Some(scope.as_str()));
    }
}
