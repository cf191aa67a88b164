//! `host[:port]` registry names and the key they take in a docker config's `auths` map.

use std::fmt;

/// Docker Hub's historical key in `auths`, which docker, containerd and CRI-O all expect.
pub const DOCKER_HUB_AUTH_KEY: &str = "https://index.docker.io/v1/";

/// Why a registry host is not acceptable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HostError {
    /// Empty string.
    #[error("spec.registry is empty: set it to the registry host, e.g. ghcr.io or registry.example.com:5000")]
    Empty,
    /// Has a URL scheme.
    #[error("spec.registry {0:?} has a scheme: give the bare host[:port], e.g. {1:?}")]
    Scheme(String, String),
    /// Has a path.
    #[error("spec.registry {0:?} has a path: give only host[:port], e.g. {1:?}")]
    Path(String, String),
    /// Host or port is not valid.
    #[error("spec.registry {0:?} is not a valid host[:port]: {1}")]
    Invalid(String, &'static str),
}

/// A validated registry host, normalised to lower case.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RegistryHost {
    host: String,
    port: Option<u16>,
}

impl RegistryHost {
    /// Parses `host[:port]`, refusing schemes, paths, and malformed hosts or ports with a
    /// message that says what to write instead.
    pub fn parse(input: &str) -> Result<Self, HostError> {
        let s = input.trim();
        if s.is_empty() {
            return Err(HostError::Empty);
        }
        if let Some((_, rest)) = s.split_once("://") {
            let bare = rest.split('/').next().unwrap_or(rest).to_owned();
            return Err(HostError::Scheme(input.to_owned(), bare));
        }
        if let Some((bare, _)) = s.split_once('/') {
            return Err(HostError::Path(input.to_owned(), bare.to_owned()));
        }
        let (host, port) = split_port(s).map_err(|why| HostError::Invalid(input.to_owned(), why))?;
        let host = host.to_ascii_lowercase();
        if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            inner
                .parse::<std::net::Ipv6Addr>()
                .map_err(|_| HostError::Invalid(input.to_owned(), "bad IPv6 address"))?;
        } else if !is_dns_name(&host) {
            return Err(HostError::Invalid(
                input.to_owned(),
                "a host is DNS labels of letters, digits and '-' separated by '.'",
            ));
        }
        Ok(Self { host, port })
    }

    /// The host without the port.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// True for Docker Hub under any of its names.
    pub fn is_docker_hub(&self) -> bool {
        self.port.is_none()
            && matches!(
                self.host.as_str(),
                "docker.io" | "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com"
            )
    }

    /// Whether two names denote the same registry (Docker Hub has several).
    pub fn same_registry(&self, other: &RegistryHost) -> bool {
        self == other || (self.is_docker_hub() && other.is_docker_hub())
    }

    /// The key under which this registry's entry goes in a docker config's `auths`:
    /// bare `host[:port]`, except Docker Hub's `https://index.docker.io/v1/`.
    pub fn auth_key(&self) -> String {
        if self.is_docker_hub() {
            DOCKER_HUB_AUTH_KEY.to_owned()
        } else {
            self.to_string()
        }
    }
}

impl fmt::Display for RegistryHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            Some(p) => write!(f, "{}:{p}", self.host),
            None => f.write_str(&self.host),
        }
    }
}

fn split_port(s: &str) -> Result<(&str, Option<u16>), &'static str> {
    let (host, port) = if s.starts_with('[') {
        match s.find(']') {
            Some(end) => match &s[end + 1..] {
                "" => (s, None),
                rest => match rest.strip_prefix(':') {
                    Some(p) => (&s[..=end], Some(p)),
                    None => return Err("unexpected text after the IPv6 address"),
                },
            },
            None => return Err("unclosed '[' in IPv6 address"),
        }
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    let port = match port {
        None => None,
        Some(p) => match p.parse::<u16>() {
            Ok(0) | Err(_) => return Err("the port must be a number from 1 to 65535"),
            Ok(n) => Some(n),
        },
    };
    Ok((host, port))
}

fn is_dns_name(host: &str) -> bool {
    host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_hosts_and_ports_are_their_own_key() {
        for (input, key) in [
            ("ghcr.io", "ghcr.io"),
            ("Registry.Example.com:5000", "registry.example.com:5000"),
            (
                "123456789012.dkr.ecr.us-east-1.amazonaws.com",
                "123456789012.dkr.ecr.us-east-1.amazonaws.com",
            ),
            ("127.0.0.1:5000", "127.0.0.1:5000"),
            ("localhost:5000", "localhost:5000"),
            ("[::1]:5000", "[::1]:5000"),
        ] {
            assert_eq!(RegistryHost::parse(input).expect(input).auth_key(), key);
        }
    }

    #[test]
    fn docker_hub_uses_its_historical_key() {
        for input in ["docker.io", "index.docker.io", "registry-1.docker.io"] {
            assert_eq!(RegistryHost::parse(input).expect(input).auth_key(), DOCKER_HUB_AUTH_KEY);
        }
        // With a port it is some other registry.
        assert_eq!(
            RegistryHost::parse("docker.io:5000").expect("port").auth_key(),
            "docker.io:5000"
        );
    }

    #[test]
    fn schemes_and_paths_are_refused_with_the_fix() {
        let e = RegistryHost::parse("https://ghcr.io/org").expect_err("scheme");
        assert_eq!(e, HostError::Scheme("https://ghcr.io/org".into(), "ghcr.io".into()));
        assert!(e.to_string().contains("\"ghcr.io\""));
        let e = RegistryHost::parse("ghcr.io/org").expect_err("path");
        assert!(e.to_string().contains("only host[:port]"));
    }

    #[test]
    fn malformed_hosts_and_ports_are_refused() {
        for input in [
            "",
            "a..b",
            "-a.io",
            "a.io:0",
            "a.io:99999",
            "a.io:x",
            "[::1",
            "[zz]:1",
            "a b",
        ] {
            assert!(RegistryHost::parse(input).is_err(), "{input:?} should be refused");
        }
    }
}
