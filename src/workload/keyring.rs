//! The credentials the kubelet would use for an image, chosen the way the kubelet chooses
//! them from a pod's pull Secrets.
//!
//! Upstream (k8s.io/kubernetes, `pkg/credentialprovider/secrets/secrets.go` and
//! `pkg/credentialprovider/keyring.go`, `BasicDockerKeyring`):
//! - A Secret counts only when its type and key agree: `kubernetes.io/dockerconfigjson`
//!   with `.dockerconfigjson` (whose `auths` map is read), or the legacy
//!   `kubernetes.io/dockercfg` with `.dockercfg` (the map itself). Other Secrets are
//!   ignored; one whose JSON does not parse makes every pull of the pod fail.
//! - An entry's `auth` (base64 of `user:password`), when present, wins over its
//!   `username`/`password`.
//! - Each `auths` key is normalised: a missing `http(s)://` is assumed, the scheme is then
//!   dropped, a path of `/v1/...` or `/v2/...` loses its version (so
//!   `https://index.docker.io/v1/` becomes `index.docker.io`), and a remaining path other
//!   than `/` is kept (`registry.example.com/team`).
//! - Keys from all the pod's Secrets form one index, sorted in reverse byte order so that
//!   a longer, more specific key (`quay.io/coreos`) comes before a shorter one (`quay.io`).
//! - An image matches a key (`URLsMatchStr`) when the ports are equal, the hosts have as
//!   many dot-separated labels, each host label matches the key's label as a
//!   `filepath.Match` glob (`*.example.com` matches `a.example.com`, not
//!   `a.b.example.com` nor `example.com`), and the key's path is a string prefix of the
//!   image's path.
//! - The credentials of every matching key are returned in index order; only if none
//!   matched, a Docker Hub image (`nginx`, `docker.io/...`, `index.docker.io/...`) gets
//!   the credentials of the `index.docker.io` key.
//! - The kubelet (`pkg/kubelet/kuberuntime/kuberuntime_image.go`, `PullImage`) then tries
//!   each credential in that order until one pulls; it pulls anonymously only when no
//!   credential matched at all, never after credentials failed.

use std::collections::BTreeMap;

use base64::Engine as _;
use k8s_openapi::ByteString;
use secrecy::SecretString;
use serde::Deserialize;

use super::WorkloadError;
use crate::provider::{DOCKER_CONFIG_JSON_KEY, DOCKER_CONFIG_JSON_TYPE};
use crate::registry::{Login, Reference};

/// The legacy pull Secret type.
pub const DOCKER_CFG_TYPE: &str = "kubernetes.io/dockercfg";
/// Its data key.
pub const DOCKER_CFG_KEY: &str = ".dockercfg";

/// Docker Hub's key after normalisation, used only when no key matched.
const DEFAULT_REGISTRY_KEY: &str = "index.docker.io";

/// A credential the kubelet would try. Prints where it comes from, never its values.
#[derive(Clone)]
pub struct Candidate {
    /// The Secret, `namespace/name`.
    pub secret: String,
    /// The `auths` key as written.
    pub key: String,
    /// User and password.
    pub login: Login,
}

impl Candidate {
    /// Where it comes from, for people: `Secret ns/name (key)`.
    pub fn source(&self) -> String {
        format!("Secret {} ({})", self.secret, self.key)
    }
}

impl std::fmt::Debug for Candidate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.source())
    }
}

#[derive(Deserialize)]
struct ConfigJson {
    #[serde(default)]
    auths: BTreeMap<String, Entry>,
}

#[derive(Deserialize)]
struct Entry {
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    auth: String,
}

/// The `auths` entries of a pull Secret as `(key, login)`, or `None` for a Secret the
/// kubelet ignores (another type, or the type's key missing or empty).
pub fn read_pull_secret(
    namespace: &str,
    name: &str,
    type_: Option<&str>,
    data: Option<&BTreeMap<String, ByteString>>,
) -> Result<Option<Vec<(String, Login)>>, WorkloadError> {
    let get = |key: &str| data.and_then(|d| d.get(key)).filter(|v| !v.0.is_empty());
    let malformed = |detail: String| WorkloadError::MalformedPullSecret {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        detail,
    };
    let auths: BTreeMap<String, Entry> = match type_ {
        Some(DOCKER_CONFIG_JSON_TYPE) => match get(DOCKER_CONFIG_JSON_KEY) {
            Some(raw) => {
                serde_json::from_slice::<ConfigJson>(&raw.0)
                    .map_err(|e| malformed(json_error(DOCKER_CONFIG_JSON_KEY, &e)))?
                    .auths
            }
            None => return Ok(None),
        },
        Some(DOCKER_CFG_TYPE) => match get(DOCKER_CFG_KEY) {
            Some(raw) => serde_json::from_slice(&raw.0).map_err(|e| malformed(json_error(DOCKER_CFG_KEY, &e)))?,
            None => return Ok(None),
        },
        _ => return Ok(None),
    };
    let mut out = Vec::new();
    for (key, e) in auths {
        let (username, password) = if e.auth.is_empty() {
            (e.username, e.password)
        } else {
            decode_auth(&e.auth)
                .ok_or_else(|| malformed(format!("the auth of entry {key:?} is not base64 of user:password")))?
        };
        out.push((
            key,
            Login {
                username,
                password: SecretString::from(password),
            },
        ));
    }
    Ok(Some(out))
}

/// serde_json messages can quote values: only the position and category are kept.
fn json_error(key: &str, e: &serde_json::Error) -> String {
    format!(
        "{key} is not valid docker config JSON ({:?} error at line {}, column {})",
        e.classify(),
        e.line(),
        e.column()
    )
}

fn decode_auth(auth: &str) -> Option<(String, String)> {
    let raw = base64::engine::general_purpose::STANDARD.decode(auth).ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (u, p) = text.split_once(':')?;
    Some((u.to_owned(), p.to_owned()))
}

/// An `auths` key as the kubelet indexes it: `host[:port][/path]`, or `None` for a key
/// that does not parse as a URL (the kubelet logs and skips it).
pub fn index_key(key: &str) -> Option<String> {
    let rest = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let (host, path) = split_url(rest)?;
    let path = match path {
        p if p.starts_with("/v1/") || p.starts_with("/v2/") => &p[3..],
        p => p,
    };
    Some(if path.is_empty() || path == "/" {
        host.to_owned()
    } else {
        format!("{host}{path}")
    })
}

/// `host[:port]` and path (with its leading `/`, query and fragment dropped) of a URL
/// without scheme; `None` where Go's URL parser refuses (a port that is not a number).
fn split_url(s: &str) -> Option<(&str, &str)> {
    let s = s.split(['?', '#']).next().unwrap_or(s);
    let (authority, path) = match s.find('/') {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, ""),
    };
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let (_, port) = split_port(host);
    if !port.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    Some((host, path))
}

/// `(host, port)` as Go's `net.SplitHostPort` does, or the whole as host and no port.
fn split_port(host: &str) -> (&str, &str) {
    if let Some(rest) = host.strip_prefix('[') {
        return match rest.split_once("]:") {
            Some((h, p)) => (h, p),
            None => (host, ""),
        };
    }
    match host.split_once(':') {
        Some((h, p)) if !p.contains(':') => (h, p),
        _ => (host, ""),
    }
}

/// Whether `target` (an image name without tag, `host[:port]/path`) matches `glob` (an
/// index key), as upstream's `URLsMatchStr`.
pub fn urls_match(glob: &str, target: &str) -> bool {
    let (Some((glob_host, glob_path)), Some((target_host, target_path))) = (split_url(glob), split_url(target)) else {
        return false;
    };
    let (glob_host, glob_port) = split_port(glob_host);
    let (target_host, target_port) = split_port(target_host);
    if glob_port != target_port || !target_path.starts_with(glob_path) {
        return false;
    }
    let glob_labels: Vec<&str> = glob_host.split('.').collect();
    let target_labels: Vec<&str> = target_host.split('.').collect();
    glob_labels.len() == target_labels.len()
        && glob_labels
            .iter()
            .zip(&target_labels)
            .all(|(g, t)| glob_match(g.as_bytes(), t.as_bytes()) == Some(true))
}

/// Go's `filepath.Match` on one host label: `*` any run, `?` one character (unreachable
/// from a key, where `?` starts a URL query), `[...]`
/// classes with ranges and `^` negation, `\` escapes. `None` for a malformed pattern
/// (which upstream treats as no match).
fn glob_match(p: &[u8], t: &[u8]) -> Option<bool> {
    match p.split_first() {
        None => Some(t.is_empty()),
        Some((b'*', rest)) => {
            for i in 0..=t.len() {
                if glob_match(rest, &t[i..])? {
                    return Some(true);
                }
            }
            Some(false)
        }
        Some((b'?', rest)) => match t.split_first() {
            Some((_, t_rest)) => glob_match(rest, t_rest),
            None => Some(false),
        },
        Some((b'[', rest)) => {
            let (negate, rest) = match rest.split_first() {
                Some((b'^', r)) => (true, r),
                _ => (false, rest),
            };
            let end = rest.iter().position(|&c| c == b']').filter(|&e| e > 0)?;
            let class = &rest[..end];
            let Some((&c, t_rest)) = t.split_first() else {
                return Some(false);
            };
            let mut hit = false;
            let mut i = 0;
            while i < class.len() {
                if i + 2 < class.len() && class[i + 1] == b'-' {
                    hit |= class[i] <= c && c <= class[i + 2];
                    i += 3;
                } else {
                    hit |= class[i] == c;
                    i += 1;
                }
            }
            if hit == negate {
                return Some(false);
            }
            glob_match(&rest[end + 1..], t_rest)
        }
        Some((b'\\', rest)) => {
            let (&want, rest) = rest.split_first()?;
            match t.split_first() {
                Some((&c, t_rest)) if c == want => glob_match(rest, t_rest),
                _ => Some(false),
            }
        }
        Some((&want, rest)) => match t.split_first() {
            Some((&c, t_rest)) if c == want => glob_match(rest, t_rest),
            _ => Some(false),
        },
    }
}

/// Whether the kubelet takes `image` (a name without tag) to be on Docker Hub.
pub fn is_default_registry_match(image: &str) -> bool {
    match image.split_once('/') {
        _ if image.is_empty() || image.starts_with('/') => false,
        None => true,
        Some(("docker.io" | "index.docker.io", _)) => true,
        Some((first, _)) => !first.contains(['.', ':']),
    }
}

/// The name the kubelet looks credentials up by: the normalised repository without tag
/// or digest (`nginx` is `docker.io/library/nginx`). The registry is kept as written
/// except `index.docker.io`, which docker's reference parser folds into `docker.io`.
pub fn lookup_name(written: &str, reference: &Reference) -> String {
    let domain = match written.trim().split_once('/') {
        Some(("index.docker.io", _)) => "docker.io",
        Some((first, _)) if first.contains(['.', ':']) || first == "localhost" => first,
        _ => "docker.io",
    };
    format!("{domain}/{}", reference.repository)
}

/// The pod's pull Secrets merged into one index, as the kubelet builds it.
#[derive(Default)]
pub struct Keyring {
    index: Vec<String>,
    creds: BTreeMap<String, Vec<Candidate>>,
}

impl Keyring {
    /// Adds the entries of Secret `secret` (`namespace/name`).
    pub fn add(&mut self, secret: &str, entries: &[(String, Login)]) {
        for (key, login) in entries {
            let Some(k) = index_key(key) else { continue };
            self.creds.entry(k.clone()).or_default().push(Candidate {
                secret: secret.to_owned(),
                key: key.clone(),
                login: login.clone(),
            });
            if !self.index.contains(&k) {
                self.index.push(k);
            }
        }
        self.index.sort_unstable_by(|a, b| b.cmp(a));
    }

    /// The credentials to try for `image` (a name from [`lookup_name`]), most specific
    /// key first; empty means an anonymous pull.
    pub fn lookup(&self, image: &str) -> Vec<Candidate> {
        let found: Vec<Candidate> = self
            .index
            .iter()
            .filter(|k| urls_match(k, image))
            .flat_map(|k| self.creds[k.as_str()].iter().cloned())
            .collect();
        if !found.is_empty() || !is_default_registry_match(image) {
            return found;
        }
        self.creds.get(DEFAULT_REGISTRY_KEY).cloned().unwrap_or_default()
    }

    /// Whether no Secret gave any entry.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    fn login(user: &str) -> Login {
        Login {
            username: user.to_owned(),
            password: SecretString::from(format!("{user}-pw")),
        }
    }

    fn keyring(keys: &[(&str, &str)]) -> Keyring {
        let mut k = Keyring::default();
        for (secret, key) in keys {
            k.add(secret, &[((*key).to_owned(), login(&format!("{secret}:{key}")))]);
        }
        k
    }

    fn users(k: &Keyring, image: &str) -> Vec<String> {
        k.lookup(image).into_iter().map(|c| c.login.username).collect()
    }

    #[test]
    fn keys_are_normalised_like_the_kubelet() {
        for (key, want) in [
            ("registry.example.com", Some("registry.example.com")),
            ("https://registry.example.com", Some("registry.example.com")),
            ("http://registry.example.com:5000/", Some("registry.example.com:5000")),
            ("https://index.docker.io/v1/", Some("index.docker.io")),
            (
                "https://registry.example.com/v2/team",
                Some("registry.example.com/team"),
            ),
            ("registry.example.com/team/app", Some("registry.example.com/team/app")),
            ("*.example.com", Some("*.example.com")),
            ("registry.example.com:port", None),
        ] {
            assert_eq!(index_key(key).as_deref(), want, "{key}");
        }
    }

    #[test]
    fn hosts_match_label_by_label_with_globs() {
        assert!(urls_match("*.example.com", "a.example.com/app"));
        assert!(!urls_match("*.example.com", "a.b.example.com/app"), "one label per *");
        assert!(!urls_match("*.example.com", "example.com/app"));
        assert!(urls_match("*.*.example.com", "a.b.example.com/app"));
        // Upstream parses keys as URLs, where `?` starts the query: it never globs a host.
        assert!(!urls_match("reg-?.example.com", "reg-1.example.com/app"));
        assert!(urls_match("reg-[0-9].example.com", "reg-7.example.com/app"));
        assert!(!urls_match("reg-[^0-9].example.com", "reg-7.example.com/app"));
        assert!(
            !urls_match("reg-[.example.com", "reg-[.example.com/app"),
            "a bad pattern"
        );
        assert!(
            !urls_match("registry.example.com", "registry.example.com:5000/app"),
            "ports must agree"
        );
        assert!(urls_match("registry.example.com:5000", "registry.example.com:5000/app"));
        assert!(urls_match("127.0.0.1:5000", "127.0.0.1:5000/app"));
    }

    #[test]
    fn paths_are_prefixes_and_the_most_specific_key_comes_first() {
        let k = keyring(&[
            ("ns/host", "registry.example.com"),
            ("ns/team", "https://registry.example.com/team"),
            ("ns/app", "registry.example.com/team/app"),
            ("ns/other", "registry.example.com/other"),
        ]);
        assert_eq!(
            users(&k, "registry.example.com/team/app"),
            vec![
                "ns/app:registry.example.com/team/app",
                "ns/team:https://registry.example.com/team",
                "ns/host:registry.example.com",
            ]
        );
        assert_eq!(
            users(&k, "registry.example.com/teamwork/x"),
            vec![
                "ns/team:https://registry.example.com/team",
                "ns/host:registry.example.com"
            ],
            "the path is a string prefix, as upstream"
        );
        assert_eq!(
            users(&k, "registry.example.com/web"),
            vec!["ns/host:registry.example.com"]
        );
        assert!(users(&k, "other.example.com/web").is_empty());
    }

    #[test]
    fn every_secret_with_the_same_key_is_tried_in_order() {
        let k = keyring(&[
            ("ns/first", "reg.example.com"),
            ("ns/second", "https://reg.example.com"),
        ]);
        assert_eq!(
            users(&k, "reg.example.com/app"),
            vec!["ns/first:reg.example.com", "ns/second:https://reg.example.com"]
        );
    }

    #[test]
    fn docker_hub_aliases() {
        let hub = keyring(&[("ns/hub", "https://index.docker.io/v1/")]);
        assert_eq!(
            users(&hub, "docker.io/library/nginx"),
            vec!["ns/hub:https://index.docker.io/v1/"]
        );
        assert!(users(&hub, "quay.io/library/nginx").is_empty());
        let bare = keyring(&[("ns/bare", "docker.io")]);
        assert_eq!(users(&bare, "docker.io/library/nginx"), vec!["ns/bare:docker.io"]);
        let index = keyring(&[("ns/index", "index.docker.io")]);
        assert_eq!(users(&index, "docker.io/acme/app"), vec!["ns/index:index.docker.io"]);
        // A direct match wins: the default-registry key is only a fallback.
        let both = keyring(&[("ns/hub", "https://index.docker.io/v1/"), ("ns/bare", "docker.io")]);
        assert_eq!(users(&both, "docker.io/library/nginx"), vec!["ns/bare:docker.io"]);
        // registry-1.docker.io is not an alias the kubelet knows.
        let api = keyring(&[("ns/api", "registry-1.docker.io")]);
        assert!(users(&api, "docker.io/library/nginx").is_empty());
        assert!(is_default_registry_match("library/nginx"));
        assert!(is_default_registry_match("index.docker.io/library/nginx"));
        assert!(!is_default_registry_match("localhost:5000/app"));
        assert!(!is_default_registry_match("registry-1.docker.io/library/nginx"));
    }

    #[test]
    fn lookup_names_follow_docker_normalisation() {
        let name = |s: &str| lookup_name(s, &Reference::parse(s).expect("reference"));
        assert_eq!(name("nginx"), "docker.io/library/nginx");
        assert_eq!(name("acme/app:v1"), "docker.io/acme/app");
        assert_eq!(name("index.docker.io/library/nginx:1"), "docker.io/library/nginx");
        assert_eq!(
            name("registry-1.docker.io/library/nginx"),
            "registry-1.docker.io/library/nginx"
        );
        let pinned = format!("reg.example.com:5000/team/app@sha256:{}", "a".repeat(64));
        assert_eq!(name(&pinned), "reg.example.com:5000/team/app");
        assert_eq!(name("localhost/app"), "localhost/app");
    }

    #[test]
    fn pull_secrets_are_read_as_the_kubelet_reads_them() {
        let data = |key: &str, v: serde_json::Value| {
            Some(BTreeMap::from([(
                key.to_owned(),
                ByteString(v.to_string().into_bytes()),
            )]))
        };
        let auth = base64::engine::general_purpose::STANDARD.encode("u1:p:1");
        let json = data(
            ".dockerconfigjson",
            serde_json::json!({"auths": {"a.example.com": {"auth": auth, "username": "ignored", "password": "x"},
                                         "b.example.com": {"username": "u2", "password": "p2"}}}),
        );
        let got = read_pull_secret("ns", "s", Some(DOCKER_CONFIG_JSON_TYPE), json.as_ref())
            .expect("parses")
            .expect("a pull secret");
        let flat: Vec<(String, String, String)> = got
            .into_iter()
            .map(|(k, l)| (k, l.username, l.password.expose_secret().to_owned()))
            .collect();
        assert_eq!(
            flat,
            vec![
                ("a.example.com".into(), "u1".into(), "p:1".into()),
                ("b.example.com".into(), "u2".into(), "p2".into())
            ]
        );
        let legacy = data(
            ".dockercfg",
            serde_json::json!({"c.example.com": {"username": "u3", "password": "p3"}}),
        );
        let got = read_pull_secret("ns", "s", Some(DOCKER_CFG_TYPE), legacy.as_ref()).expect("parses");
        assert_eq!(got.map(|v| v[0].0.clone()).as_deref(), Some("c.example.com"));
        // Type and key must agree; anything else is ignored, not an error.
        assert!(matches!(
            read_pull_secret("ns", "s", Some("Opaque"), json.as_ref()),
            Ok(None)
        ));
        assert!(matches!(
            read_pull_secret("ns", "s", Some(DOCKER_CFG_TYPE), json.as_ref()),
            Ok(None)
        ));
        let bad = Some(BTreeMap::from([(
            ".dockerconfigjson".to_owned(),
            ByteString(br#"{"auths": {"a": {"password": "hunter2"}"#.to_vec()),
        )]));
        let Err(e) = read_pull_secret("ns", "s", Some(DOCKER_CONFIG_JSON_TYPE), bad.as_ref()) else {
            panic!("malformed JSON was accepted");
        };
        assert!(!e.to_string().contains("hunter2"), "{e}");
        assert!(e.to_string().contains("ns/s"), "{e}");
        let bad_auth = data(
            ".dockerconfigjson",
            serde_json::json!({"auths": {"a": {"auth": "bm9jb2xvbg=="}}}),
        );
        assert!(read_pull_secret("ns", "s", Some(DOCKER_CONFIG_JSON_TYPE), bad_auth.as_ref()).is_err());
    }

    #[test]
    fn candidates_never_print_the_password() {
        let k = keyring(&[("ns/s", "reg.example.com")]);
        let c = &k.lookup("reg.example.com/app")[0];
        let shown = format!("{c:?} {}", c.source());
        assert!(!shown.contains("-pw"), "{shown}");
        assert!(shown.contains("ns/s") && shown.contains("reg.example.com"), "{shown}");
    }
}
