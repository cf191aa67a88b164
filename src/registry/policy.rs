//! Where the registry client may connect and where it may send credentials.
//!
//! A registry name comes from a spec that a namespace's team writes, so it must not reach
//! the node's cloud metadata service (the operator's cloud identity lives there) nor a
//! range an administrator denied. Addresses are checked three times: the name itself
//! (`metadata.google.internal`), a literal IP in a URL (hyper connects to those without
//! resolving), and every address a name resolves to, in the client's DNS resolver, so a
//! name pointing at 169.254.169.254 is refused before any packet goes to it.
//!
//! Loopback and private ranges stay allowed: registries live there.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;

use reqwest::Url;

/// Link-local and cloud metadata addresses, never contacted whatever the settings.
const BUILT_IN: [(&str, &str); 8] = [
    // IPv4 link-local: the metadata service of AWS, GCP, Azure, OCI, DigitalOcean, ...
    ("169.254.0.0/16", "link-local"),
    // Connecting to 0.0.0.0 or :: reaches the local host, past any loopback range denied.
    ("0.0.0.0/8", "an unspecified address"),
    ("::/128", "an unspecified address"),
    ("fe80::/10", "link-local"),
    ("fd00:ec2::254/128", "the AWS metadata service"),
    ("fd20:ce::254/128", "the Google Cloud metadata service"),
    ("100.100.100.200/32", "the Alibaba Cloud metadata service"),
    ("168.63.129.16/32", "the Azure platform endpoint"),
];

/// Names of metadata services, refused before they are resolved.
const METADATA_NAMES: [&str; 8] = [
    "metadata",
    "metadata.google.internal",
    "metadata.goog",
    "metadata.azure.com",
    "metadata.azure.internal",
    "instance-data",
    "instance-data.ec2.internal",
    "metadata.tencentyun.com",
];

/// An IP network, `10.0.0.0/8` or `fd00::/8`; a bare address is a network of one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

/// Why a CIDR does not parse.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum CidrError {
    /// The address part is not an IP address.
    #[error("{0:?} is not a CIDR: write it like 10.0.0.0/8 or fd00::/8")]
    Address(String),
    /// The prefix length is not a number within the address family's bits.
    #[error("{0:?} has a bad prefix length: 0-32 for IPv4, 0-128 for IPv6")]
    Prefix(String),
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(input: &str) -> Result<Self, CidrError> {
        let s = input.trim();
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| CidrError::Address(input.to_owned()))?;
        let bits = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => bits,
            Some(p) => match p.parse::<u8>() {
                Ok(n) if n <= bits => n,
                _ => return Err(CidrError::Prefix(input.to_owned())),
            },
        };
        Ok(Cidr {
            addr: mask(addr, prefix),
            prefix,
        })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Cidr {
    /// Whether `ip` is in this network (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => mask(IpAddr::V4(ip), self.prefix) == IpAddr::V4(net),
            (IpAddr::V6(net), IpAddr::V6(ip)) => mask(IpAddr::V6(ip), self.prefix) == IpAddr::V6(net),
            _ => false,
        }
    }
}

/// Parses a comma-separated list of CIDRs; empty items are skipped.
pub fn parse_cidrs(list: &str) -> Result<Vec<Cidr>, CidrError> {
    list.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(str::parse)
        .collect()
}

/// A comma-separated list of CIDRs as one setting; an empty setting is an empty list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CidrList(pub Vec<Cidr>);

impl FromStr for CidrList {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, CidrError> {
        parse_cidrs(s).map(CidrList)
    }
}

fn mask(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let m = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(a) & m))
        }
        IpAddr::V6(a) => {
            let m = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(a) & m))
        }
    }
}

/// A refused destination. `Display` names the host as written (never an address a name
/// resolved to) and the rule, so a refusal teaches nothing about internal DNS.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{host} is {rule}")]
pub struct AddressRefused {
    /// The host as written in the URL.
    pub host: String,
    /// What it is, e.g. "link-local" or "in a range denied by --deny-registry-cidrs".
    pub rule: String,
}

/// The addresses the client refuses: the built-in metadata and link-local set plus the
/// ranges an administrator added.
#[derive(Clone, Debug)]
pub struct AddressPolicy {
    built_in: Arc<Vec<(Cidr, &'static str)>>,
    denied: Arc<Vec<Cidr>>,
}

impl Default for AddressPolicy {
    fn default() -> Self {
        Self::new(Vec::new())
    }
}

impl AddressPolicy {
    /// The built-in refusals plus `denied`.
    pub fn new(denied: Vec<Cidr>) -> Self {
        let built_in = BUILT_IN
            .iter()
            .filter_map(|(c, why)| c.parse().ok().map(|c| (c, *why)))
            .collect();
        Self {
            built_in: Arc::new(built_in),
            denied: Arc::new(denied),
        }
    }

    /// Refuses `ip` (as reached through `host`) if it is in a refused range.
    pub fn check_ip(&self, host: &str, ip: IpAddr) -> Result<(), AddressRefused> {
        let refuse = |rule: String| AddressRefused {
            host: host.to_owned(),
            rule,
        };
        // NAT64 (64:ff9b::/96) carries an IPv4 address in its last 32 bits.
        let embedded = match ip {
            IpAddr::V6(v6) if v6.segments()[..6] == [0x64, 0xff9b, 0, 0, 0, 0] => {
                Some(IpAddr::V4(Ipv4Addr::from(u128::from(v6) as u32)))
            }
            _ => None,
        };
        for candidate in std::iter::once(ip).chain(embedded) {
            if let Some((_, why)) = self.built_in.iter().find(|(c, _)| c.contains(candidate)) {
                return Err(refuse((*why).to_owned()));
            }
            if self.denied.iter().any(|c| c.contains(candidate)) {
                return Err(refuse("in a range denied by --deny-registry-cidrs".to_owned()));
            }
        }
        Ok(())
    }

    /// Refuses the names of metadata services (with or without a trailing dot).
    pub fn check_name(&self, name: &str) -> Result<(), AddressRefused> {
        let n = name.trim_end_matches('.').to_ascii_lowercase();
        if METADATA_NAMES.contains(&n.as_str()) {
            return Err(AddressRefused {
                host: name.to_owned(),
                rule: "a cloud metadata service".to_owned(),
            });
        }
        Ok(())
    }

    /// Refuses a URL whose host is a refused name or a literal IP in a refused range.
    pub fn check_url(&self, url: &Url) -> Result<(), AddressRefused> {
        match url.host() {
            Some(url::Host::Ipv4(ip)) => self.check_ip(&ip.to_string(), IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => self.check_ip(&format!("[{ip}]"), IpAddr::V6(ip)),
            Some(url::Host::Domain(d)) => self.check_name(d),
            None => Err(AddressRefused {
                host: String::new(),
                rule: "a URL without a host".to_owned(),
            }),
        }
    }

    /// Keeps the resolved addresses of `host` that are allowed; refuses if none is.
    pub fn filter(&self, host: &str, addrs: Vec<SocketAddr>) -> Result<Vec<SocketAddr>, AddressRefused> {
        let mut first_refusal = None;
        let allowed: Vec<SocketAddr> = addrs
            .into_iter()
            .filter(|a| match self.check_ip(host, a.ip()) {
                Ok(()) => true,
                Err(e) => {
                    first_refusal.get_or_insert(e);
                    false
                }
            })
            .collect();
        match first_refusal {
            Some(e) if allowed.is_empty() => Err(AddressRefused {
                rule: format!("a name that resolves only to refused addresses ({})", e.rule),
                ..e
            }),
            _ => Ok(allowed),
        }
    }
}

/// The client's DNS resolver: the system's, with refused names and addresses removed.
pub(crate) struct PolicyResolver(pub(crate) AddressPolicy);

impl reqwest::dns::Resolve for PolicyResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.0.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            policy.check_name(&host)?;
            let addrs = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed = policy.filter(&host, addrs)?;
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// Why credentials will not follow the registry to a URL.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum Insecure {
    /// A token realm that is plain HTTP on another host than a loopback registry's own.
    #[error("its token realm {realm} is plain HTTP on another host, where the credentials would travel in cleartext")]
    Realm {
        /// The realm (sanitized).
        realm: String,
    },
    /// A realm that is not an http(s) URL.
    #[error("its token realm {realm:?} is not an http(s) URL")]
    NotHttp {
        /// The realm (sanitized).
        realm: String,
    },
    /// A redirect from HTTPS to plain HTTP.
    #[error("it redirected from HTTPS to plain HTTP ({to})")]
    Downgrade {
        /// The redirect target (sanitized).
        to: String,
    },
}

/// Whether the Bearer realm `realm` may receive the login, for a registry reached at
/// `base`: an HTTPS realm anywhere, or a plain-HTTP realm on the very host of a plain-HTTP
/// (hence loopback) registry, whose traffic never leaves the machine.
pub fn check_realm(base: &Url, realm: &str) -> Result<Url, Insecure> {
    let shown = || super::untrusted::sanitize(realm);
    let url = Url::parse(realm).map_err(|_| Insecure::NotHttp { realm: shown() })?;
    match url.scheme() {
        "https" => Ok(url),
        "http" if base.scheme() == "http" && url.host_str() == base.host_str() && is_loopback(&url) => Ok(url),
        "http" => Err(Insecure::Realm { realm: shown() }),
        _ => Err(Insecure::NotHttp { realm: shown() }),
    }
}

/// Whether a redirect from `previous` to `next` may be followed. Credentials never go
/// along to another host: reqwest drops the Authorization header on any change of
/// scheme, host or port, as docker does for blob redirects.
pub fn check_redirect(policy: &AddressPolicy, previous: &Url, next: &Url) -> Result<(), RedirectRefused> {
    if previous.scheme() == "https" && next.scheme() != "https" {
        return Err(RedirectRefused::Insecure(Insecure::Downgrade {
            to: super::untrusted::sanitize(next.as_str()),
        }));
    }
    if !matches!(next.scheme(), "http" | "https") {
        return Err(RedirectRefused::Insecure(Insecure::Downgrade {
            to: super::untrusted::sanitize(next.as_str()),
        }));
    }
    policy.check_url(next).map_err(RedirectRefused::Address)
}

/// A redirect not followed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum RedirectRefused {
    /// To plain HTTP.
    #[error(transparent)]
    Insecure(Insecure),
    /// To a refused address.
    #[error(transparent)]
    Address(AddressRefused),
}

/// How many redirects one request follows.
pub const MAX_REDIRECTS: usize = 5;

/// The redirect policy of the registry client's HTTP clients.
pub(crate) fn redirect_policy(policy: AddressPolicy) -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(move |attempt| {
        if attempt.previous().len() > MAX_REDIRECTS {
            return attempt.error(format!("more than {MAX_REDIRECTS} redirects"));
        }
        let verdict = match attempt.previous().last() {
            Some(prev) => check_redirect(&policy, prev, attempt.url()),
            None => policy.check_url(attempt.url()).map_err(RedirectRefused::Address),
        };
        match verdict {
            Ok(()) => attempt.follow(),
            Err(e) => attempt.error(e),
        }
    })
}

/// `localhost`, 127.0.0.0/8 and ::1.
pub fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn url(s: &str) -> Url {
        Url::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn cidrs_parse_normalise_and_match() {
        assert_eq!(cidr("10.1.2.3/8").to_string(), "10.0.0.0/8");
        assert_eq!(cidr(" 192.168.1.7 ").to_string(), "192.168.1.7/32");
        assert_eq!(cidr("fd00::1/8").to_string(), "fd00::/8");
        assert_eq!(cidr("0.0.0.0/0").to_string(), "0.0.0.0/0");
        assert!(cidr("10.0.0.0/8").contains(ip("10.255.0.1")));
        assert!(!cidr("10.0.0.0/8").contains(ip("11.0.0.1")));
        assert!(cidr("0.0.0.0/0").contains(ip("8.8.8.8")));
        assert!(!cidr("0.0.0.0/0").contains(ip("::1")), "families do not mix");
        assert!(cidr("10.0.0.0/8").contains(ip("::ffff:10.0.0.1")), "IPv4-mapped");
        assert!(cidr("fd00::/8").contains(ip("fd12::1")));
    }

    #[test]
    fn bad_cidrs_say_how_to_write_them() {
        for (bad, fix) in [
            ("10.0.0/8", "10.0.0.0/8"),
            ("example.com/8", "10.0.0.0/8"),
            ("10.0.0.0/33", "0-32"),
            ("::/129", "0-128"),
            ("10.0.0.0/x", "0-32"),
            ("10.0.0.0/", "0-32"),
        ] {
            let e = bad.parse::<Cidr>().expect_err(bad);
            assert!(e.to_string().contains(fix), "{bad}: {e}");
        }
    }

    #[test]
    fn cidr_lists_are_comma_separated() {
        let l = parse_cidrs("10.0.0.0/8, 192.168.0.0/16,,").expect("list");
        assert_eq!(l, vec![cidr("10.0.0.0/8"), cidr("192.168.0.0/16")]);
        assert!(parse_cidrs("").expect("empty").is_empty());
        assert!(parse_cidrs("10.0.0.0/8,nope").is_err());
        assert_eq!("".parse::<CidrList>(), Ok(CidrList::default()), "an empty setting");
    }

    #[test]
    fn metadata_and_link_local_addresses_are_refused_by_default() {
        let p = AddressPolicy::default();
        for bad in [
            "169.254.169.254",
            "169.254.170.2",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "fe80::1",
            "fd00:ec2::254",
            "fd20:ce::254",
            "100.100.100.200",
            "168.63.129.16",
            "0.0.0.0",
            "::",
        ] {
            assert!(p.check_ip("h", ip(bad)).is_err(), "{bad} should be refused");
        }
        for good in [
            "127.0.0.1",
            "::1",
            "10.0.0.5",
            "172.16.0.1",
            "192.168.1.1",
            "fd12::1",
            "100.100.100.201",
            "140.82.112.34",
        ] {
            assert!(p.check_ip("h", ip(good)).is_ok(), "{good} should be allowed");
        }
    }

    #[test]
    fn administrator_ranges_are_refused_with_the_flag_named() {
        let p = AddressPolicy::new(vec![cidr("10.0.0.0/8")]);
        let e = p.check_ip("10.1.1.1:5000", ip("10.1.1.1")).expect_err("denied");
        assert_eq!(
            e.to_string(),
            "10.1.1.1:5000 is in a range denied by --deny-registry-cidrs"
        );
        assert!(p.check_ip("h", ip("192.168.0.1")).is_ok());
    }

    #[test]
    fn metadata_names_are_refused_before_resolving() {
        let p = AddressPolicy::default();
        for bad in [
            "metadata.google.internal",
            "METADATA.google.internal.",
            "metadata",
            "metadata.azure.com",
        ] {
            assert!(p.check_name(bad).is_err(), "{bad}");
        }
        assert!(p.check_name("ghcr.io").is_ok());
        assert!(p.check_name("metadata.example.com").is_ok());
    }

    #[test]
    fn urls_are_checked_by_name_and_by_literal_address_in_any_spelling() {
        let p = AddressPolicy::default();
        for bad in [
            "http://169.254.169.254/v2/",
            // The URL parser reads decimal and hex IPv4 as addresses, as hyper then connects.
            "http://2852039166/v2/",
            "http://0xa9.0xfe.0xa9.0xfe/v2/",
            "http://[fe80::1]:5000/v2/",
            "http://[::ffff:a9fe:a9fe]/",
            "https://metadata.google.internal/computeMetadata/v1/",
        ] {
            assert!(p.check_url(&url(bad)).is_err(), "{bad}");
        }
        assert!(p.check_url(&url("http://127.0.0.1:5000/v2/")).is_ok());
        assert!(p.check_url(&url("https://ghcr.io/v2/")).is_ok());
    }

    #[test]
    fn resolved_addresses_are_filtered_and_refused_when_none_is_left() {
        let p = AddressPolicy::default();
        let a = |s: &str| SocketAddr::new(ip(s), 0);
        let kept = p
            .filter("mixed.example", vec![a("169.254.169.254"), a("10.0.0.1")])
            .expect("one allowed");
        assert_eq!(kept, vec![a("10.0.0.1")]);
        let e = p
            .filter("evil.example", vec![a("169.254.169.254")])
            .expect_err("none allowed");
        assert!(
            e.to_string()
                .starts_with("evil.example is a name that resolves only to refused addresses"),
            "{e}"
        );
        assert!(
            !e.to_string().contains("169.254"),
            "the resolved address is not shown: {e}"
        );
    }

    #[test]
    fn realms_get_credentials_only_over_https_or_on_the_loopback_registrys_own_host() {
        let plain_loopback = url("http://127.0.0.1:5000");
        let tls = url("https://registry.example.com");
        assert!(check_realm(&tls, "https://auth.example.com/token").is_ok());
        assert!(check_realm(&plain_loopback, "https://auth.example.com/token").is_ok());
        assert!(check_realm(&plain_loopback, "http://127.0.0.1:9999/token").is_ok());
        let e = check_realm(&plain_loopback, "http://127.0.0.2:9999/token").expect_err("other host");
        assert!(
            e.to_string().contains("http://127.0.0.2:9999/token"),
            "names the realm: {e}"
        );
        assert!(matches!(
            check_realm(&tls, "http://registry.example.com/token"),
            Err(Insecure::Realm { .. })
        ));
        assert!(matches!(
            check_realm(&plain_loopback, "ftp://127.0.0.1/t"),
            Err(Insecure::NotHttp { .. })
        ));
        assert!(matches!(
            check_realm(&plain_loopback, "not a url\nX-Injected: 1"),
            Err(Insecure::NotHttp { realm }) if !realm.contains('\n')
        ));
    }

    #[test]
    fn redirects_never_downgrade_nor_reach_refused_addresses() {
        let p = AddressPolicy::default();
        let from = url("https://registry.example.com/v2/a/manifests/1");
        assert!(check_redirect(&p, &from, &url("https://blobs.example.net/x")).is_ok());
        assert!(matches!(
            check_redirect(&p, &from, &url("http://registry.example.com/x")),
            Err(RedirectRefused::Insecure(Insecure::Downgrade { .. }))
        ));
        assert!(matches!(
            check_redirect(&p, &from, &url("https://169.254.169.254/latest/meta-data/")),
            Err(RedirectRefused::Address(_))
        ));
        let plain = url("http://127.0.0.1:5000/v2/");
        assert!(check_redirect(&p, &plain, &url("http://127.0.0.1:6000/v2/")).is_ok());
    }
}
