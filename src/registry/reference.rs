//! Image references with Docker's defaulting rules: `nginx` is
//! `docker.io/library/nginx:latest`, the first path component is a registry only if it
//! has a `.` or a `:` or is `localhost`, and a reference may carry a tag, a digest, or both.

use std::fmt;

/// Docker Hub's canonical name in references.
pub const DOCKER_HUB: &str = "docker.io";
/// The host that actually serves Docker Hub's registry API.
pub const DOCKER_HUB_API: &str = "registry-1.docker.io";

/// A parsed image reference.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Reference {
    /// Registry `host[:port]` (`docker.io` for Docker Hub).
    pub registry: String,
    /// Repository path, e.g. `library/nginx`.
    pub repository: String,
    /// Tag, if given (`latest` is filled in when neither tag nor digest is given).
    pub tag: Option<String>,
    /// Digest `algorithm:hex`, if given.
    pub digest: Option<String>,
}

/// Why a reference does not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReferenceError {
    /// Empty.
    #[error("the image reference is empty")]
    Empty,
    /// Upper-case letters in the repository.
    #[error("{0:?}: repository names must be lower case")]
    UpperCase(String),
    /// A path component is not valid.
    #[error(
        "{0:?}: invalid repository name (path components are lower-case letters, digits and single separators . _ __ -)"
    )]
    Repository(String),
    /// The tag is not valid.
    #[error("{0:?}: invalid tag (up to 128 of letters, digits, _ . -, not starting with . or -)")]
    Tag(String),
    /// The digest is not valid.
    #[error("{0:?}: invalid digest (expected sha256: and 64 hex digits)")]
    Digest(String),
    /// The registry part is not a valid `host[:port]`.
    #[error("{0:?}: the registry part is not a valid host[:port]")]
    Registry(String),
    /// Too long.
    #[error("{0:?}: the repository name is longer than 255 characters")]
    TooLong(String),
}

impl Reference {
    /// Parses a reference, applying Docker's defaults.
    pub fn parse(input: &str) -> Result<Self, ReferenceError> {
        let s = input.trim();
        if s.is_empty() {
            return Err(ReferenceError::Empty);
        }
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => {
                validate_digest(d).map_err(|()| ReferenceError::Digest(input.to_owned()))?;
                (r, Some(d.to_owned()))
            }
            None => (s, None),
        };
        // A tag follows the last ':' after the last '/'.
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => {
                let t = &rest[last_slash + i + 1..];
                if !valid_tag(t) {
                    return Err(ReferenceError::Tag(input.to_owned()));
                }
                (&rest[..last_slash + i], Some(t.to_owned()))
            }
            None => (rest, None),
        };
        let (registry, path) = match name.split_once('/') {
            Some((first, path)) if first.contains(['.', ':']) || first == "localhost" => {
                (first.to_owned(), path.to_owned())
            }
            Some(_) => (DOCKER_HUB.to_owned(), name.to_owned()),
            None => (DOCKER_HUB.to_owned(), name.to_owned()),
        };
        let registry = match registry.as_str() {
            "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => DOCKER_HUB.to_owned(),
            _ => registry,
        };
        if registry != DOCKER_HUB && super::RegistryHost::parse(&registry).is_err() {
            return Err(ReferenceError::Registry(input.to_owned()));
        }
        if path.chars().any(|c| c.is_ascii_uppercase()) {
            return Err(ReferenceError::UpperCase(input.to_owned()));
        }
        if path.is_empty() || !path.split('/').all(valid_component) {
            return Err(ReferenceError::Repository(input.to_owned()));
        }
        let repository = if registry == DOCKER_HUB && !path.contains('/') {
            format!("library/{path}")
        } else {
            path
        };
        if registry.len() + 1 + repository.len() > 255 {
            return Err(ReferenceError::TooLong(input.to_owned()));
        }
        let tag = if tag.is_none() && digest.is_none() {
            Some("latest".to_owned())
        } else {
            tag
        };
        Ok(Self {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// The host serving the registry API (`registry-1.docker.io` for Docker Hub).
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_API
        } else {
            &self.registry
        }
    }

    /// What to put after `/manifests/`: the digest if given (it pins the content), else the tag.
    pub fn manifest_reference(&self) -> &str {
        self.digest.as_deref().or(self.tag.as_deref()).unwrap_or("latest")
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

fn valid_component(c: &str) -> bool {
    // [a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*
    let bytes = c.as_bytes();
    if bytes.is_empty() || !bytes[0].is_ascii_alphanumeric() || !bytes[bytes.len() - 1].is_ascii_alphanumeric() {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b.is_ascii_lowercase() || b.is_ascii_digit() {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && matches!(bytes[i], b'.' | b'_' | b'-') {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok || i == start {
            return false;
        }
    }
    true
}

fn valid_tag(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 128
        && t.chars().next().is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        && t.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// Whether `d` is a digest this client accepts (`sha256:` or `sha512:` and lower-case hex).
pub(crate) fn valid_digest(d: &str) -> bool {
    validate_digest(d).is_ok()
}

fn validate_digest(d: &str) -> Result<(), ()> {
    let (alg, hex) = d.split_once(':').ok_or(())?;
    let hex_ok = |n: usize| hex.len() == n && hex.chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase());
    match alg {
        "sha256" if hex_ok(64) => Ok(()),
        "sha512" if hex_ok(128) => Ok(()),
        _ => Err(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Reference {
        Reference::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn docker_defaults() {
        assert_eq!(p("nginx").to_string(), "docker.io/library/nginx:latest");
        assert_eq!(p("bitnami/redis:7").to_string(), "docker.io/bitnami/redis:7");
        assert_eq!(
            p("index.docker.io/library/alpine").to_string(),
            "docker.io/library/alpine:latest"
        );
        assert_eq!(p("nginx").api_host(), "registry-1.docker.io");
    }

    #[test]
    fn registries_ports_tags_and_digests() {
        let r = p("localhost:5000/team/app:v1.2");
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()),
            ("localhost:5000", "team/app", Some("v1.2"))
        );
        let r = p(&format!("ghcr.io/acme/api@{D}"));
        assert_eq!((r.tag.as_deref(), r.digest.as_deref()), (None, Some(D)));
        assert_eq!(r.manifest_reference(), D);
        let r = p(&format!("123456789012.dkr.ecr.us-east-1.amazonaws.com/api:v2.1.0@{D}"));
        assert_eq!(r.tag.as_deref(), Some("v2.1.0"));
        assert_eq!(r.manifest_reference(), D, "the digest wins over the tag");
        assert_eq!(p("localhost/app").registry, "localhost");
        assert_eq!(p("[::1]:5000/app:x").registry, "[::1]:5000");
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "Nginx",
            "ghcr.io/Acme/app",
            "app:",
            "app:-x",
            "app@sha256:abc",
            "a//b",
            "app/",
            "-app",
            "a..b/c",
        ] {
            assert!(Reference::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }
}
