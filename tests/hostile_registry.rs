//! The registry client against registries that try to hurt it: gigabyte bodies, token
//! realms and redirects that would carry the credential elsewhere, and addresses it must
//! never contact. Its own test binary, so the process's peak memory measures only this.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use pullkeeper::registry::{AddressPolicy, Cidr, Login, PullError, Reference, RegistryClient, TlsOptions};
use secrecy::SecretString;

const GIB: u64 = 1 << 30;
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const PASSWORD: &str = "hunter2-never-leaves";

static CHUNK: [u8; 64 * 1024] = [b' '; 64 * 1024];

/// `len` bytes of spaces, generated while sent: the server holds one static chunk.
fn endless(len: u64) -> Body {
    let chunks = len / CHUNK.len() as u64;
    Body::from_stream(futures::stream::iter(
        (0..chunks).map(|_| Ok::<_, Infallible>(Bytes::from_static(&CHUNK))),
    ))
}

/// What a server saw: one line per request, `METHOD path auth=<yes|no>`.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<String>>>);

impl Seen {
    fn record(&self, req: &Request) {
        let auth = req.headers().contains_key(header::AUTHORIZATION);
        self.0.lock().expect("lock").push(format!(
            "{} {} auth={}",
            req.method(),
            req.uri().path(),
            if auth { "yes" } else { "no" }
        ));
    }
    fn lines(&self) -> Vec<String> {
        self.0.lock().expect("lock").clone()
    }
}

/// Serves `handler` on `ip:0`; returns the bound address and what it saw.
async fn serve<F, Fut>(ip: &str, handler: F) -> (SocketAddr, Seen)
where
    F: Fn(Request, SocketAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind((ip, 0)).await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen = Seen::default();
    let app = Router::new().fallback(move |State(seen): State<Seen>, req: Request| {
        let handler = handler.clone();
        async move {
            seen.record(&req);
            handler(req, addr).await
        }
    });
    let app = app.with_state(seen.clone());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, seen)
}

fn login() -> Login {
    Login {
        username: "puller".into(),
        password: SecretString::from(PASSWORD.to_owned()),
    }
}

fn reference(addr: impl std::fmt::Display, repo: &str) -> Reference {
    Reference::parse(&format!("{addr}/{repo}:v1")).expect("reference")
}

fn client() -> RegistryClient {
    RegistryClient::new(&TlsOptions::default()).expect("client")
}

fn peak_rss_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM");
    kib / 1024
}

/// A manifest answer: 3 GiB streamed, with or without announcing its length.
async fn huge_manifest(req: Request, _: SocketAddr) -> Response {
    let path = req.uri().path().to_owned();
    if path == "/v2/" {
        return StatusCode::OK.into_response();
    }
    let mut h = HeaderMap::new();
    h.insert(header::CONTENT_TYPE, OCI_MANIFEST.parse().expect("type"));
    if req.method() == axum::http::Method::HEAD {
        // No digest: the client must GET the body to compute it.
        return (StatusCode::OK, h).into_response();
    }
    if path.contains("/announced/") {
        h.insert(header::CONTENT_LENGTH, (3 * GIB).to_string().parse().expect("len"));
    }
    (StatusCode::OK, h, endless(3 * GIB)).into_response()
}

#[tokio::test]
async fn a_3_gib_manifest_is_refused_at_4_mib_without_buffering_it() {
    let (addr, _) = serve("127.0.0.1", huge_manifest).await;
    let c = client();
    for repo in ["chunked/app", "announced/app"] {
        let started = Instant::now();
        let err = c
            .resolve(&reference(addr, repo), None, &[])
            .await
            .expect_err("a 3 GiB manifest");
        assert!(matches!(err, PullError::TooLarge { .. }), "{repo}: {err:?}");
        assert!(err.to_string().contains("manifest larger than 4 MiB"), "{err}");
        assert_eq!(err.reason(), "RegistryError");
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "{repo}: refused while streaming"
        );
    }
    let peak = peak_rss_mib();
    eprintln!("peak RSS after two 3 GiB manifests: {peak} MiB");
    assert!(peak < 64, "peak RSS {peak} MiB: the body was buffered");
}

/// A registry whose token endpoint (on its own host) and error bodies are 1 GiB.
async fn huge_token_and_errors(req: Request, addr: SocketAddr) -> Response {
    let path = req.uri().path();
    let authorized = req.headers().contains_key(header::AUTHORIZATION);
    match path {
        "/token" => (StatusCode::OK, endless(GIB)).into_response(),
        _ if path.contains("/bearer/") && !authorized => (
            StatusCode::UNAUTHORIZED,
            [(
                header::WWW_AUTHENTICATE,
                format!("Bearer realm=\"http://{addr}/token\",service=\"hostile\""),
            )],
        )
            .into_response(),
        "/v2/" => StatusCode::OK.into_response(),
        _ if req.method() == axum::http::Method::HEAD => {
            (StatusCode::OK, [(header::CONTENT_TYPE, OCI_MANIFEST)]).into_response()
        }
        _ if path.contains("/huge-error/") => (StatusCode::INTERNAL_SERVER_ERROR, endless(GIB)).into_response(),
        _ => {
            // An error code written to forge log lines and flood status.
            let code = format!(
                "EVIL\n{{\"level\":\"info\",\"msg\":\"forged\"}}\r\n{}",
                "A".repeat(5000)
            );
            let body = serde_json::json!({"errors": [{"code": code, "message": "x"}]});
            (StatusCode::INTERNAL_SERVER_ERROR, axum::Json(body)).into_response()
        }
    }
}

#[tokio::test]
async fn gigabyte_token_and_error_bodies_are_bounded_and_error_text_is_cleaned() {
    let (addr, _) = serve("127.0.0.1", huge_token_and_errors).await;
    let c = client();
    let err = c
        .resolve(&reference(addr, "bearer/app"), Some(&login()), &[])
        .await
        .expect_err("a 1 GiB token answer");
    assert!(err.to_string().contains("token answer larger than 1 MiB"), "{err}");

    let err = c
        .resolve(&reference(addr, "huge-error/app"), None, &[])
        .await
        .expect_err("a 1 GiB error body");
    assert_eq!(err.reason(), "RegistryError", "{err}");
    assert!(err.to_string().len() < 400, "{err}");

    let err = c
        .resolve(&reference(addr, "forged/app"), None, &[])
        .await
        .expect_err("a forged error code");
    let msg = err.to_string();
    assert!(!msg.contains('\n') && !msg.contains('\r'), "{msg:?}");
    assert!(msg.len() < 400, "bounded: {msg}");
    assert!(msg.contains("EVIL"), "{msg}");
    eprintln!("{msg}");
    let peak = peak_rss_mib();
    assert!(peak < 64, "peak RSS {peak} MiB");
}

#[tokio::test]
async fn a_plain_http_realm_on_another_host_never_gets_the_credentials() {
    let (realm, realm_seen) = serve("127.0.0.2", |_, _| async { StatusCode::OK.into_response() }).await;
    let (addr, registry_seen) = serve("127.0.0.1", move |req: Request, _| async move {
        if req.uri().path() == "/v2/" {
            return StatusCode::OK.into_response();
        }
        (
            StatusCode::UNAUTHORIZED,
            [(
                header::WWW_AUTHENTICATE,
                format!("Bearer realm=\"http://{realm}/token\""),
            )],
        )
            .into_response()
    })
    .await;
    let err = client()
        .resolve(&reference(addr, "team/app"), Some(&login()), &[])
        .await
        .expect_err("an insecure realm");
    assert_eq!(err.reason(), "InsecureEndpoint", "{err}");
    eprintln!("{err}");
    assert!(
        err.to_string().contains(&format!("http://{realm}/token")),
        "names the realm: {err}"
    );
    assert!(
        realm_seen.lines().is_empty(),
        "the realm was contacted: {:?}",
        realm_seen.lines()
    );
    assert!(
        registry_seen.lines().iter().all(|l| l.ends_with("auth=no")),
        "{:?}",
        registry_seen.lines()
    );
}

#[tokio::test]
async fn a_redirect_to_another_host_carries_no_credentials() {
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": "sha256:0", "size": 2},
        "layers": []
    })
    .to_string();
    let (other, other_seen) = serve("127.0.0.2", move |_, _| {
        let manifest = manifest.clone();
        async move { (StatusCode::OK, [(header::CONTENT_TYPE, OCI_MANIFEST)], manifest).into_response() }
    })
    .await;
    let (addr, registry_seen) = serve("127.0.0.1", move |req: Request, _| async move {
        let path = req.uri().path().to_owned();
        if path == "/v2/" {
            return StatusCode::OK.into_response();
        }
        if !req.headers().contains_key(header::AUTHORIZATION) {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Basic realm=\"r\"")],
            )
                .into_response();
        }
        if req.method() == axum::http::Method::HEAD {
            return (StatusCode::OK, [(header::CONTENT_TYPE, OCI_MANIFEST)]).into_response();
        }
        let to = if path.contains("/metadata/") {
            "http://169.254.169.254/latest/meta-data/".to_owned()
        } else {
            format!("http://{other}{path}")
        };
        (StatusCode::TEMPORARY_REDIRECT, [(header::LOCATION, to)]).into_response()
    })
    .await;
    let c = client();
    let resolved = c
        .resolve(&reference(addr, "team/app"), Some(&login()), &[])
        .await
        .expect("resolved through the redirect");
    assert!(resolved.digest.starts_with("sha256:"));
    let other_lines = other_seen.lines();
    assert_eq!(other_lines.len(), 1, "{other_lines:?}");
    assert!(
        other_lines[0].ends_with("auth=no"),
        "credentials forwarded: {other_lines:?}"
    );
    assert!(
        registry_seen
            .lines()
            .iter()
            .any(|l| l.starts_with("GET") && l.ends_with("auth=yes")),
        "{:?}",
        registry_seen.lines()
    );

    let err = c
        .resolve(&reference(addr, "metadata/app"), Some(&login()), &[])
        .await
        .expect_err("a redirect to the metadata service");
    assert_eq!(err.reason(), "AddressNotAllowed", "{err}");
}

/// A TCP listener that only counts connections.
async fn counting_listener(ip: &str) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind((ip, 0)).await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((_stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
        }
    });
    (addr, accepted)
}

#[tokio::test]
async fn metadata_and_denied_addresses_are_refused_without_connecting() {
    let c = client();
    for image in [
        "169.254.169.254/latest:v1",
        "169.254.169.254:80/latest:v1",
        "[fe80::1]:5000/app:v1",
        "[fd00:ec2::254]/app:v1",
        "100.100.100.200/app:v1",
        "metadata.google.internal/computemetadata:v1",
        "metadata.google.internal:80/computemetadata:v1",
    ] {
        let started = Instant::now();
        let err = c
            .resolve(&Reference::parse(image).expect(image), Some(&login()), &[])
            .await
            .expect_err(image);
        assert_eq!(err.reason(), "AddressNotAllowed", "{image}: {err}");
        eprintln!("{err}");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{image}: refused before connecting"
        );
        assert!(!err.to_string().contains(PASSWORD));
    }

    let (addr, accepted) = counting_listener("127.0.0.3").await;
    let (local, local_accepted) = counting_listener("127.0.0.1").await;
    let deny: Vec<Cidr> = vec![
        "127.0.0.3/32".parse().expect("cidr"),
        "127.0.0.1/32".parse().expect("cidr"),
        "::1/128".parse().expect("cidr"),
    ];
    let c = RegistryClient::with_policy(&TlsOptions::default(), AddressPolicy::new(deny)).expect("client");
    let err = c
        .resolve(&reference(addr, "app"), Some(&login()), &[])
        .await
        .expect_err("a denied literal address");
    assert_eq!(err.reason(), "AddressNotAllowed", "{err}");
    assert!(err.to_string().contains("--deny-registry-cidrs"), "{err}");
    // A name is checked on the addresses it resolves to.
    let err = c
        .resolve(&reference(format!("localhost:{}", local.port()), "app"), None, &[])
        .await
        .expect_err("a name resolving to a denied address");
    assert_eq!(err.reason(), "AddressNotAllowed", "{err}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(accepted.load(Ordering::SeqCst), 0, "the denied address was contacted");
    assert_eq!(
        local_accepted.load(Ordering::SeqCst),
        0,
        "the denied name was contacted"
    );
}

fn pullkeeper(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pullkeeper"))
        .args(args)
        .envs(env.iter().copied())
        .env_remove("KUBECONFIG")
        .env("KUBERNETES_SERVICE_HOST", "")
        .output()
        .expect("pullkeeper");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn check_takes_denied_ranges_and_the_controller_flag_parses_them() {
    let (addr, accepted) = counting_listener("127.0.0.4").await;
    let image = format!("{addr}/app:v1");
    let (code, out, err) = pullkeeper(
        &[
            "check",
            &image,
            "--deny-cidr",
            "10.0.0.0/8,127.0.0.4/32",
            "--output",
            "json",
        ],
        &[],
    );
    assert_eq!(code, 1, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|_| panic!("{out}{err}"));
    assert_eq!(v[0]["reason"], "AddressNotAllowed", "{out}");
    assert_eq!(accepted.load(Ordering::SeqCst), 0);

    let (code, _, err) = pullkeeper(&["check", &image, "--deny-cidr", "10.0.0/8"], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("10.0.0.0/8"), "says how to write it: {err}");

    let (code, _, err) = pullkeeper(&["controller", "--deny-registry-cidrs", "nope"], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--deny-registry-cidrs"), "{err}");
    let (code, _, err) = pullkeeper(
        &["controller"],
        &[("PULLKEEPER_DENY_REGISTRY_CIDRS", "10.0.0.0/8,nope")],
    );
    assert_eq!(code, 2, "{err}");
    // An empty setting (a chart default) is no range at all, not an error.
    let (_, _, err) = pullkeeper(&["controller"], &[("PULLKEEPER_DENY_REGISTRY_CIDRS", "")]);
    assert!(!err.contains("CIDR"), "{err}");
}

#[tokio::test]
async fn a_realm_on_the_metadata_service_is_refused_before_it_is_asked() {
    for realm in [
        "https://169.254.169.254/latest/api/token",
        "https://metadata.google.internal/computeMetadata/v1/token",
        "https://[fd00:ec2::254]/token",
    ] {
        let (addr, seen) = serve("127.0.0.1", move |req: Request, _| async move {
            if req.uri().path() == "/v2/" {
                return StatusCode::OK.into_response();
            }
            (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, format!("Bearer realm=\"{realm}\""))],
            )
                .into_response()
        })
        .await;
        let started = Instant::now();
        let err = client()
            .resolve(&reference(addr, "team/app"), Some(&login()), &[])
            .await
            .expect_err(realm);
        assert_eq!(err.reason(), "AddressNotAllowed", "{realm}: {err}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{realm}: refused before connecting"
        );
        assert!(
            seen.lines().iter().all(|l| l.ends_with("auth=no")),
            "{:?}",
            seen.lines()
        );
    }
}

/// Docker Hub's `ratelimit-remaining` (`76;w=21600`) is kept per registry as a number; a
/// value that is no number is ignored rather than shown.
#[tokio::test]
async fn the_pulls_a_registry_says_are_left_are_kept_as_a_number() {
    let digest = format!("sha256:{}", "a".repeat(64));
    let (addr, _) = serve("127.0.0.1", move |req: Request, _| {
        let digest = digest.clone();
        async move {
            let left = if req.uri().path().contains("/noisy/") {
                "plenty;w=21600"
            } else {
                "76;w=21600"
            };
            let headers = [
                (header::CONTENT_TYPE.as_str(), OCI_MANIFEST.to_owned()),
                ("docker-content-digest", digest),
                ("ratelimit-limit", "100;w=21600".to_owned()),
                ("ratelimit-remaining", left.to_owned()),
            ];
            let mut h = HeaderMap::new();
            for (k, v) in headers {
                if let (Ok(k), Ok(v)) = (k.parse::<header::HeaderName>(), v.parse()) {
                    h.insert(k, v);
                }
            }
            (StatusCode::OK, h).into_response()
        }
    })
    .await;
    let c = client();
    assert!(c.ratelimit_remaining().is_empty());
    c.inspect(&reference(addr, "library/app"), None, false)
        .await
        .expect("resolves");
    assert_eq!(c.ratelimit_remaining(), vec![(addr.to_string(), 76)]);
    c.inspect(&reference(addr, "noisy/app"), None, false)
        .await
        .expect("resolves");
    assert_eq!(
        c.ratelimit_remaining(),
        vec![(addr.to_string(), 76)],
        "the last number stays"
    );
}

/// A registry at `ip` whose every manifest is one index, digest `sha256:dd…`, holding
/// `linux/<arch>`.
async fn index_registry(ip: &str, arch: &'static str) -> (SocketAddr, Seen) {
    serve(ip, move |_, _| async move {
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{"mediaType": OCI_MANIFEST, "digest": format!("sha256:{}", "c".repeat(64)), "size": 2,
                           "platform": {"os": "linux", "architecture": arch}}]
        });
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            "application/vnd.oci.image.index.v1+json".parse().expect("type"),
        );
        h.insert(
            "docker-content-digest",
            format!("sha256:{}", "d".repeat(64)).parse().expect("digest"),
        );
        (StatusCode::OK, h, index.to_string()).into_response()
    })
    .await
}

/// Docker Hub counts every manifest GET as a pull: an image's platforms are read once per
/// digest and registry; later checks of the same digest send only the HEAD, and another
/// registry's same digest is read from that registry.
#[tokio::test]
async fn platforms_are_read_once_per_digest_and_registry() {
    let (addr, seen) = index_registry("127.0.0.1", "arm64").await;
    let c = client();
    let platforms = |addr| {
        let c = c.clone();
        async move {
            c.inspect(&reference(addr, "library/app"), None, true)
                .await
                .expect("resolves")
                .platforms
        }
    };
    for _ in 0..3 {
        assert_eq!(platforms(addr).await, vec!["linux/arm64".to_owned()]);
    }
    let gets = |seen: &Seen| {
        seen.lines()
            .iter()
            .filter(|l| l.starts_with("GET /v2/library/app/manifests/"))
            .count()
    };
    assert_eq!(gets(&seen), 1, "{:?}", seen.lines());
    let (other, other_seen) = index_registry("127.0.0.2", "amd64").await;
    assert_eq!(platforms(other).await, vec!["linux/amd64".to_owned()]);
    assert_eq!(gets(&other_seen), 1, "{:?}", other_seen.lines());
}
