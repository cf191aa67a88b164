//! Test support: the shared control plane, the in-process operator, captured logs, and
//! helpers for unique names and waiting.

#![allow(dead_code)]

use std::ffi::OsStr;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use tokio_util::sync::CancellationToken;

#[path = "../common/registry.rs"]
pub mod registry;

use registry::sha256_hex;

/// Label that gives a credential to an operator process started by a test.
pub const SHARD_LABEL: &str = "pullkeeper.io/test-shard";

/// The shared environment of this test binary.
pub struct Env {
    /// Kubeconfig of the admin user.
    pub kubeconfig: PathBuf,
    /// Everything the operator logged, at every level.
    pub logs: Arc<Mutex<Vec<u8>>>,
    /// Address of the operator's health and metrics endpoint.
    pub metrics_addr: std::net::SocketAddr,
}

static ENV: OnceLock<Env> = OnceLock::new();

fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Starts (or reuses) the control plane, installs the CRDs, and starts the operator once.
pub fn env() -> &'static Env {
    ENV.get_or_init(|| {
        pullkeeper::install_crypto_provider();
        let kubeconfig = match std::env::var_os("PULLKEEPER_TEST_KUBECONFIG") {
            Some(p) => PathBuf::from(p),
            None => start_control_plane(),
        };
        let logs = Arc::new(Mutex::new(Vec::new()));
        install_log_capture(logs.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        let kc = kubeconfig.clone();
        std::thread::Builder::new()
            .name("operator".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("operator runtime");
                rt.block_on(async move {
                    let metrics = std::sync::Arc::new(pullkeeper::metrics::Metrics::default());
                    let client = pullkeeper::operator::client(config_for(&kc).await, &metrics).expect("client");
                    install_crds(&client).await;
                    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
                    let addr = listener.local_addr().expect("addr");
                    tx.send(addr).expect("report address");
                    let settings = pullkeeper::controller::Settings {
                        instance: Some("e2e".into()),
                        concurrency: 8,
                        write_concurrency: 32,
                        // Credentials labelled for a test shard belong to operator
                        // processes that a test starts itself.
                        credential_selector: Some(format!("!{SHARD_LABEL}")),
                        leader: None,
                        pod_admission: true,
                        pod_admission_webhook: false,
                        source_secret_namespace: None,
                        deny_registry_cidrs: vec![],
                        // The defaults: a RegistryCredential may not use the operator's
                        // own cloud identity.
                        namespaced_ambient_credentials: false,
                        endpoints: pullkeeper::provider::Endpoints::default(),
                        workload_checks: None,
                    };
                    // Runs for the life of the test binary.
                    let _ =
                        pullkeeper::operator::run(client, metrics, listener, settings, CancellationToken::new()).await;
                });
            })
            .expect("operator thread");
        let metrics_addr = rx.recv_timeout(Duration::from_secs(120)).expect("operator started");
        Env {
            kubeconfig,
            logs,
            metrics_addr,
        }
    })
}

fn start_control_plane() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("control-plane");
    let out = Command::new("bash")
        .arg(repo_root().join("hack/control-plane.sh"))
        .arg("start")
        .arg(&dir)
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("running hack/control-plane.sh");
    assert!(
        out.status.success(),
        "hack/control-plane.sh start failed (see its output above)"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    PathBuf::from(stdout.lines().last().expect("kubeconfig path").trim())
}

struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn install_log_capture(buf: Arc<Mutex<Vec<u8>>>) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let capture = tracing_subscriber::fmt::layer()
        .with_ansi(false)
        .with_writer(move || Capture(buf.clone()));
    // Everything at trace, with the operator's own caps on wire-logging libraries, so the
    // tests that search these logs for secrets see what `PULLKEEPER_LOG=trace` would show.
    let filter = pullkeeper::telemetry::filter("trace");
    let _ = tracing_subscriber::registry().with(filter).with(capture).try_init();
}

/// Everything logged so far.
pub fn logs() -> String {
    String::from_utf8_lossy(&env().logs.lock().unwrap_or_else(std::sync::PoisonError::into_inner)).into_owned()
}

/// A client for the admin user, bound to the calling test's runtime.
pub async fn client() -> Client {
    client_for(&env().kubeconfig).await
}

/// A client for the user of `kubeconfig`, bound to the calling test's runtime.
pub async fn client_for(kubeconfig: &Path) -> Client {
    Client::try_from(config_for(kubeconfig).await).expect("client")
}

async fn config_for(kubeconfig: &Path) -> Config {
    let kc = Kubeconfig::read_from(kubeconfig).expect("read kubeconfig");
    Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig is usable")
}

/// Installs (server-side applies) both CRDs and waits until they are established.
pub async fn install_crds(client: &Client) {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in pullkeeper::crd::crds() {
        let name = crd.metadata.name.clone().expect("named");
        api.patch(
            &name,
            &PatchParams::apply("pullkeeper-tests").force(),
            &Patch::Apply(&crd),
        )
        .await
        .expect("CRD applies");
    }
    for crd in pullkeeper::crd::crds() {
        let name = crd.metadata.name.clone().expect("named");
        eventually(Duration::from_secs(30), || {
            let api = api.clone();
            let name = name.clone();
            async move {
                let c = api.get(&name).await.ok()?;
                c.status?
                    .conditions?
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
                    .then_some(())
            }
        })
        .await
        .unwrap_or_else(|| panic!("CRD {name} never became Established"));
    }
}

/// A unique DNS-label name with the given prefix.
pub fn unique(prefix: &str) -> String {
    let n: u32 = rand::random();
    format!("{prefix}-{n:08x}")
}

/// Creates a namespace with a unique name and the given labels.
pub async fn namespace(client: &Client, prefix: &str, labels: &[(&str, &str)]) -> String {
    let name = unique(prefix);
    let mut ns = Namespace::default();
    ns.metadata.name = Some(name.clone());
    if !labels.is_empty() {
        ns.metadata.labels = Some(labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect());
    }
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .expect("namespace created");
    name
}

/// Deletes a namespace, ignoring errors (the control plane is throwaway).
pub async fn delete_namespace(client: &Client, name: &str) {
    let _ = Api::<Namespace>::all(client.clone())
        .delete(name, &DeleteParams::default())
        .await;
}

/// Polls `f` every 100 ms until it returns `Some`, or `None` after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A real OCI registry with htpasswd auth, started once per test binary.
pub struct Registry {
    /// `127.0.0.1:PORT`.
    pub addr: String,
    /// User.
    pub user: String,
    /// Password.
    pub password: String,
}

static REGISTRY: OnceLock<Registry> = OnceLock::new();
static TLS_REGISTRY: OnceLock<(Registry, PathBuf)> = OnceLock::new();
static TOKEN_REGISTRY: OnceLock<String> = OnceLock::new();

/// A registry with Bearer-token auth; tokens come from an issuer in this test binary that
/// lets `admin`/`admin-pw` do anything and `puller`/`puller-pw` pull `demo` only. Holds
/// `demo:v1` and `private:v1`. Returns its address.
pub fn token_registry() -> &'static str {
    TOKEN_REGISTRY.get_or_init(|| {
        let fakes = crate::fakes::fakes();
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("registry-token");
        std::fs::create_dir_all(&dir).expect("dir");
        let key = dir.join("issuer.key");
        let cert = dir.join("issuer.crt");
        let der = dir.join("issuer.der");
        let ok = Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "30",
                "-subj",
                "/CN=pullkeeper-test-issuer",
                "-keyout",
            ])
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stderr(std::process::Stdio::null())
            .status()
            .expect("openssl")
            .success()
            && Command::new("openssl")
                .args(["x509", "-outform", "der", "-in"])
                .arg(&cert)
                .arg("-out")
                .arg(&der)
                .status()
                .expect("openssl")
                .success();
        assert!(ok, "openssl could not make the issuer certificate");
        use base64::Engine as _;
        let _ = crate::fakes::ISSUER.set(crate::fakes::Issuer {
            key_pem: std::fs::read_to_string(&key).expect("key"),
            cert_der_b64: base64::engine::general_purpose::STANDARD.encode(std::fs::read(&der).expect("der")),
            users: vec![
                ("admin".into(), "admin-pw".into(), vec!["*".into()]),
                ("puller".into(), "puller-pw".into(), vec!["demo".into()]),
            ],
        });
        let realm = format!("{}/token", fakes.base);
        let addr = registry::start(
            &dir,
            "-",
            "-",
            &[OsStr::new("token"), OsStr::new(&realm), cert.as_os_str()],
        );
        push_demo_image(&addr, "admin", "admin-pw");
        push_image_as(&addr, "admin", "admin-pw", "private");
        addr
    })
}

/// Starts (or reuses) the test registry and pushes `demo:v1` into it.
pub fn registry() -> &'static Registry {
    REGISTRY.get_or_init(|| start_registry("registry", false))
}

/// A second registry serving HTTPS with a certificate from a private CA; the CA's PEM path.
pub fn tls_registry() -> &'static (Registry, PathBuf) {
    TLS_REGISTRY.get_or_init(|| {
        let r = start_registry("registry-tls", true);
        let ca = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("registry-tls/ca.crt");
        (r, ca)
    })
}

fn start_registry(name: &str, tls: bool) -> Registry {
    {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
        let user = "puller".to_owned();
        let password = format!("reg-{}", unique("pw"));
        let extra: &[&str] = if tls { &["tls"] } else { &[] };
        let addr = registry::start(&dir, &user, &password, extra);
        push_demo_image(&addr, &user, &password);
        Registry { addr, user, password }
    }
}

/// Writes a one-layer OCI image layout by hand and pushes it with skopeo.
fn push_demo_image(addr: &str, user: &str, password: &str) {
    push_image_as(addr, user, password, "demo");
}

fn push_image_as(addr: &str, user: &str, password: &str, repo: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let content = root.join("content");
    std::fs::create_dir_all(&content).expect("mkdir");
    std::fs::write(content.join("hello.txt"), "hello from pullkeeper tests\n").expect("write");
    let run = |cmd: &mut Command| {
        let st = cmd.status().expect("spawn");
        assert!(st.success(), "{cmd:?} failed");
    };
    run(Command::new("tar")
        .arg("-cf")
        .arg(root.join("layer.tar"))
        .arg("-C")
        .arg(&content)
        .arg("hello.txt"));
    let tar = std::fs::read(root.join("layer.tar")).expect("tar");
    run(Command::new("gzip").arg("-n").arg("-k").arg(root.join("layer.tar")));
    let layer = std::fs::read(root.join("layer.tar.gz")).expect("gz");
    let layout = root.join("layout");
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).expect("blobs");
    let put = |bytes: &[u8]| -> String {
        let hex = sha256_hex(bytes);
        std::fs::write(blobs.join(&hex), bytes).expect("blob");
        format!("sha256:{hex}")
    };
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux", "config": {},
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{}", sha256_hex(&tar))]}
    }))
    .expect("config");
    let config_digest = put(&config);
    let layer_digest = put(&layer);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_digest, "size": layer.len()}]
    }))
    .expect("manifest");
    let manifest_digest = put(&manifest);
    std::fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest, "size": manifest.len(),
                "annotations": {"org.opencontainers.image.ref.name": "v1"}
            }]
        }))
        .expect("index"),
    )
    .expect("index.json");
    std::fs::write(layout.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).expect("oci-layout");
    run(Command::new("skopeo")
        .args(["copy", "--quiet", "--dest-tls-verify=false", "--dest-creds"])
        .arg(format!("{user}:{password}"))
        .arg(format!("oci:{}:v1", layout.display()))
        .arg(format!("docker://{addr}/{repo}:v1")));
}

/// Runs `skopeo inspect` with `authfile`; Ok(stdout) or Err(stderr).
pub fn skopeo_inspect(authfile: &Path, image: &str) -> Result<String, String> {
    let out = Command::new("skopeo")
        .args(["inspect", "--tls-verify=false", "--authfile"])
        .arg(authfile)
        .arg(format!("docker://{image}"))
        .output()
        .expect("skopeo");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

static MOTO: OnceLock<String> = OnceLock::new();
static MOTO_AUTH: OnceLock<String> = OnceLock::new();

/// moto's AWS API server (ECR, STS), started once per test binary; its URL.
pub fn moto() -> &'static str {
    MOTO.get_or_init(|| start_moto("moto", &[]))
}

/// A second moto that checks credentials like AWS does (unknown keys are refused).
pub fn moto_with_auth() -> &'static str {
    MOTO_AUTH.get_or_init(|| start_moto("moto-auth", &["INITIAL_NO_AUTH_ACTION_COUNT=0"]))
}

fn start_moto(name: &str, env: &[&str]) -> String {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let mut args = vec!["start".to_owned(), dir.to_string_lossy().into_owned()];
    args.extend(env.iter().map(|e| (*e).to_owned()));
    hack("moto.sh", &args)
}

/// Runs `hack/<script> args...` (its stderr shown), panics if it fails, and returns the
/// last line of its stdout.
pub fn hack(script: &str, args: &[String]) -> String {
    let out = Command::new("bash")
        .arg(repo_root().join("hack").join(script))
        .args(args)
        .stderr(std::process::Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("running hack/{script}: {e}"));
    assert!(
        out.status.success(),
        "hack/{script} {args:?} failed (see its output above)"
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// The message of a status's Ready condition.
pub fn ready_message(status: &pullkeeper::crd::RegistryCredentialStatus) -> &str {
    &status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .expect("a Ready condition")
        .message
}

/// Pushes a two-platform image index (`linux/amd64`, `linux/arm64`) as `repo:tag` over the
/// Distribution API with Basic auth.
pub async fn push_index(addr: &str, user: &str, password: &str, repo: &str, tag: &str) {
    let pusher = registry::Pusher::basic(addr, user, password);
    let layer = b"layer".to_vec();
    let layer_d = pusher.blob(repo, &layer).await;
    let mut entries = Vec::new();
    for arch in ["amd64", "arm64"] {
        let config = serde_json::to_vec(
            &serde_json::json!({"architecture": arch, "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}),
        )
        .expect("config");
        let config_d = pusher.blob(repo, &config).await;
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_d, "size": config.len()},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_d, "size": layer.len()}]
        }))
        .expect("manifest");
        let md = registry::digest(&manifest);
        pusher
            .manifest(repo, &md, "application/vnd.oci.image.manifest.v1+json", &manifest)
            .await;
        entries.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": manifest.len(),
            "platform": {"os": "linux", "architecture": arch}
        }));
    }
    let index = serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": entries})).expect("index");
    pusher
        .manifest(repo, tag, "application/vnd.oci.image.index.v1+json", &index)
        .await;
}

/// The `.dockerconfigjson` pullkeeper writes for a basic credential, byte for byte.
pub fn expected_config(registry: &str, user: &str, password: &str) -> Vec<u8> {
    let host = pullkeeper::registry::RegistryHost::parse(registry).expect("host");
    pullkeeper::controller::secret::docker_config_json(
        &host,
        &pullkeeper::provider::Credential {
            username: user.to_owned(),
            password: secrecy::SecretString::from(password.to_owned()),
            expires_at: None,
        },
    )
}

/// Server-side applies (forcing) a ClusterRegistryCredential with these labels and spec,
/// as a user would with `kubectl apply --server-side`.
pub async fn apply_credential(client: &Client, name: &str, labels: serde_json::Value, spec: serde_json::Value) {
    Api::<pullkeeper::crd::ClusterRegistryCredential>::all(client.clone())
        .patch(
            name,
            &PatchParams::apply("e2e-user").force(),
            &Patch::Apply(serde_json::json!({
                "apiVersion": "pullkeeper.io/v1alpha1", "kind": "ClusterRegistryCredential",
                "metadata": {"name": name, "labels": labels},
                "spec": spec,
            })),
        )
        .await
        .expect("credential applied");
}

/// Server-side applies (forcing) an Opaque Secret with these `stringData` entries.
pub async fn put_secret(client: &Client, namespace: &str, name: &str, string_data: serde_json::Value) {
    Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), namespace)
        .patch(
            name,
            &PatchParams::apply("e2e-user").force(),
            &Patch::Apply(serde_json::json!({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": name, "namespace": namespace},
                "stringData": string_data,
            })),
        )
        .await
        .expect("secret applied");
}

/// The status of a ClusterRegistryCredential, if it exists and has one.
pub async fn credential_status(client: &Client, name: &str) -> Option<pullkeeper::crd::RegistryCredentialStatus> {
    Api::<pullkeeper::crd::ClusterRegistryCredential>::all(client.clone())
        .get_opt(name)
        .await
        .ok()??
        .status
}

/// Waits (30 s) until the credential's Ready condition has this status and reason;
/// panics with the last status seen otherwise.
pub async fn wait_ready(
    client: &Client,
    name: &str,
    status: &str,
    reason: &str,
) -> pullkeeper::crd::RegistryCredentialStatus {
    wait_for_ready(name, || credential_status(client, name), status, reason, String::new).await
}

/// Waits (30 s) until `fetch` gives a status whose Ready condition has this status and
/// reason; panics naming `what`, with the last status seen and `log()`, otherwise.
async fn wait_for_ready<F, Fut>(
    what: &str,
    fetch: F,
    status: &str,
    reason: &str,
    log: impl Fn() -> String,
) -> pullkeeper::crd::RegistryCredentialStatus
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Option<pullkeeper::crd::RegistryCredentialStatus>>,
{
    let got = eventually(Duration::from_secs(30), || async {
        let s = fetch().await?;
        let c = s.conditions.iter().find(|c| c.type_ == "Ready")?;
        (c.status == status && c.reason == reason).then_some(s.clone())
    })
    .await;
    match got {
        Some(s) => s,
        None => panic!(
            "{what} never reached Ready={status}/{reason}; last status: {:?}\nlog: {}",
            fetch().await,
            log()
        ),
    }
}

/// Deletes a ClusterRegistryCredential, ignoring errors.
pub async fn delete_credential(client: &Client, name: &str) {
    let _ = Api::<pullkeeper::crd::ClusterRegistryCredential>::all(client.clone())
        .delete(name, &DeleteParams::default())
        .await;
}

/// The directory holding the pinned helm and kubectl (from `hack/tools.sh`).
pub fn tools() -> PathBuf {
    let out = Command::new("bash")
        .arg(repo_root().join("hack/tools.sh"))
        .output()
        .expect("hack/tools.sh");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    PathBuf::from(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .expect("tools dir")
            .trim(),
    )
}

/// Names of the chart's admission policies for `release` (their bindings have the same).
pub fn chart_policies(release: &str) -> [String; 3] {
    ["secrets", "serviceaccounts", "token-requests"].map(|p| format!("{release}-pullkeeper-{p}"))
}

/// Renders the chart's ServiceAccount, RBAC and admission policies for `release` in
/// `namespace` with the helm `--set` values `sets`, applies them as the admin, waits
/// until the policies are enforced, and returns a kubeconfig that authenticates as that
/// ServiceAccount.
pub async fn chart_identity(admin: &Path, release: &str, namespace: &str, dir: &Path, sets: &[&str]) -> PathBuf {
    let tools = tools();
    let mut helm = Command::new(tools.join("helm"));
    helm.args(["template", release])
        .arg(repo_root().join("charts/pullkeeper"))
        .args(["--namespace", namespace])
        // `helm template` asks no cluster which APIs it serves; this one does.
        .args([
            "--api-versions",
            "admissionregistration.k8s.io/v1/ValidatingAdmissionPolicy",
        ]);
    for t in ["serviceaccount", "clusterrole", "role", "admissionpolicy"] {
        helm.args(["--show-only", &format!("templates/{t}.yaml")]);
    }
    for s in sets {
        helm.args(["--set", s]);
    }
    let rendered = helm.output().expect("helm template");
    assert!(
        rendered.status.success(),
        "{}",
        String::from_utf8_lossy(&rendered.stderr)
    );
    let manifests = dir.join(format!("chart-{release}.yaml"));
    std::fs::write(&manifests, &rendered.stdout).expect("write");
    let applied = Command::new(tools.join("kubectl"))
        .env("KUBECONFIG", admin)
        .args(["apply", "-f"])
        .arg(&manifests)
        .output()
        .expect("kubectl apply");
    assert!(applied.status.success(), "{}", String::from_utf8_lossy(&applied.stderr));
    let sa = format!("{release}-pullkeeper");
    let token = Command::new(tools.join("kubectl"))
        .env("KUBECONFIG", admin)
        .args(["create", "token", &sa, "-n", namespace, "--duration=1h"])
        .output()
        .expect("kubectl create token");
    assert!(token.status.success(), "{}", String::from_utf8_lossy(&token.stderr));
    let token = String::from_utf8_lossy(&token.stdout).trim().to_owned();
    let mut kc: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(admin).expect("admin kubeconfig")).expect("yaml");
    for user in kc["users"].as_sequence_mut().expect("users") {
        user["user"] = serde_yaml::to_value(serde_json::json!({ "token": token })).expect("value");
    }
    let path = dir.join(format!("chart-{release}.kubeconfig"));
    std::fs::write(&path, serde_yaml::to_string(&kc).expect("yaml")).expect("write kubeconfig");
    wait_until_enforced(&client_for(&path).await, release, namespace).await;
    path
}

/// Whether `result` is a refusal by the chart's admission policy `policy`.
pub fn denied_by_policy<T: std::fmt::Debug>(result: &Result<T, kube::Error>, policy: &str) -> bool {
    match result {
        Err(kube::Error::Api(e)) => {
            e.code == 403 && e.message.contains(&format!("ValidatingAdmissionPolicy '{policy}'"))
        }
        _ => false,
    }
}

/// Policies are enforced a moment after they are created: retries a request each policy
/// refuses (as `operator`, the chart's ServiceAccount; dry runs where the API has them)
/// until all three refuse it.
async fn wait_until_enforced(operator: &Client, release: &str, namespace: &str) {
    use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
    use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
    let [secrets, service_accounts, tokens] = chart_policies(release);
    let dry = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let sa_name = format!("{release}-pullkeeper");
    let enforced = eventually(Duration::from_secs(30), || async {
        let mut opaque = Secret::default();
        opaque.metadata.name = Some("policy-probe".into());
        let r = Api::<Secret>::namespaced(operator.clone(), namespace)
            .create(&dry, &opaque)
            .await;
        if !denied_by_policy(&r, &secrets) {
            return None;
        }
        let label = serde_json::json!({"metadata": {"labels": {"policy-probe": "x"}}});
        let r = Api::<ServiceAccount>::namespaced(operator.clone(), namespace)
            .patch(
                &sa_name,
                &PatchParams {
                    dry_run: true,
                    ..Default::default()
                },
                &Patch::Merge(&label),
            )
            .await;
        if !denied_by_policy(&r, &service_accounts) {
            return None;
        }
        // The apiserver's own audience (an empty list defaults to it).
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: vec![],
                ..Default::default()
            },
            ..Default::default()
        };
        let r = Api::<ServiceAccount>::namespaced(operator.clone(), namespace)
            .create_token_request(&sa_name, &PostParams::default(), &request)
            .await;
        denied_by_policy(&r, &tokens).then_some(())
    })
    .await;
    assert!(
        enforced.is_some(),
        "the chart's admission policies were not enforced within 30 s"
    );
}

/// The sum of the samples of metric `name` (all label sets) served at `addr`'s `/metrics`.
pub async fn metric(addr: &str, name: &str) -> Option<f64> {
    metric_with(addr, name, "").await
}

/// The sum of the samples of metric `name` whose labels contain `labels` (e.g.
/// `provider="gcp"`) served at `addr`'s `/metrics`.
pub async fn metric_with(addr: &str, name: &str, labels: &str) -> Option<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").await.ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.ok()?;
    let total: f64 = buf
        .lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#') && l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    Some(total)
}

/// An operator process started by a test; killed when dropped.
pub struct Operator {
    child: Child,
    /// Address of its health and metrics endpoint.
    pub addr: String,
    /// Its log file.
    pub log: PathBuf,
}

impl Operator {
    /// Everything it logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free loopback address for an operator's health and metrics endpoint.
pub fn free_addr() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    format!("127.0.0.1:{port}")
}

/// Starts `pullkeeper controller` as its own process with the admin kubeconfig, reconciling
/// only credentials labelled `SHARD_LABEL=shard`, with `extra` environment on top. Cloud
/// credentials of whoever runs the tests are not passed on.
pub fn start(kubeconfig: &Path, shard: &str, extra: &[(&str, &str)], dir: &Path, name: &str) -> Operator {
    let addr = free_addr();
    let log = dir.join(format!("{name}.log"));
    let file = std::fs::File::create(&log).expect("log file");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pullkeeper"));
    cmd.arg("controller")
        .env("KUBECONFIG", kubeconfig)
        .env("PULLKEEPER_METRICS_ADDR", &addr)
        .env("PULLKEEPER_LOG", "info,pullkeeper=debug")
        .env("PULLKEEPER_CREDENTIAL_SELECTOR", format!("{SHARD_LABEL}={shard}"))
        .env("POD_NAME", name)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        // Logs go to stdout; keep them with anything printed to stderr.
        .stdout(file.try_clone().expect("log file"))
        .stderr(file);
    for k in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_ROLE_ARN",
        "GOOGLE_APPLICATION_CREDENTIALS",
    ] {
        cmd.env_remove(k);
    }
    for (k, v) in extra {
        cmd.env(k, v);
    }
    Operator {
        child: cmd.spawn().expect("operator process"),
        addr,
        log,
    }
}

/// Server-side applies (forcing) a RegistryCredential in `namespace`.
pub async fn apply_namespaced(
    client: &Client,
    namespace: &str,
    name: &str,
    labels: serde_json::Value,
    spec: serde_json::Value,
) -> Result<(), kube::Error> {
    Api::<pullkeeper::crd::RegistryCredential>::namespaced(client.clone(), namespace)
        .patch(
            name,
            &PatchParams::apply("e2e-user").force(),
            &Patch::Apply(serde_json::json!({
                "apiVersion": "pullkeeper.io/v1alpha1", "kind": "RegistryCredential",
                "metadata": {"name": name, "namespace": namespace, "labels": labels},
                "spec": spec,
            })),
        )
        .await
        .map(|_| ())
}

/// The status of a RegistryCredential, if it exists and has one.
pub async fn namespaced_status(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Option<pullkeeper::crd::RegistryCredentialStatus> {
    Api::<pullkeeper::crd::RegistryCredential>::namespaced(client.clone(), namespace)
        .get_opt(name)
        .await
        .ok()??
        .status
}

/// Waits (30 s) until a RegistryCredential's Ready condition has this status and reason;
/// panics with the last status seen (and `log`) otherwise.
pub async fn wait_namespaced_ready(
    client: &Client,
    namespace: &str,
    name: &str,
    status: &str,
    reason: &str,
    log: impl Fn() -> String,
) -> pullkeeper::crd::RegistryCredentialStatus {
    let what = format!("{namespace}/{name}");
    wait_for_ready(
        &what,
        || namespaced_status(client, namespace, name),
        status,
        reason,
        log,
    )
    .await
}

/// The real node of this test binary: a kubelet with containerd and runc registered against
/// the test control plane (`hack/node.sh`), started once, stopped when the binary exits.
pub struct Node {
    /// The node's state directory (`hack/node.sh start DIR`).
    pub dir: PathBuf,
    /// The node's name (`localhost`): pods set `spec.nodeName` to it, as the control plane
    /// has no scheduler.
    pub name: String,
}

static NODE: OnceLock<Node> = OnceLock::new();

/// Starts the node once (needs root); panics with the harness's output, never skips, when
/// it cannot start. A watcher stops it (`hack/node.sh stop`) once this process is gone.
pub fn node() -> &'static Node {
    NODE.get_or_init(|| {
        let kubeconfig = env().kubeconfig.clone();
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("node");
        let script = repo_root().join("hack/node.sh");
        let owner = std::process::id().to_string();
        let out = Command::new("bash")
            .arg(&script)
            .arg("start")
            .arg(&dir)
            .arg(&kubeconfig)
            .env("PULLKEEPER_NODE_OWNER", &owner)
            .stderr(std::process::Stdio::inherit())
            .output()
            .expect("running hack/node.sh");
        assert!(
            out.status.success(),
            "hack/node.sh start failed (see its output above): the node tests need root, \
             cgroups and overlayfs"
        );
        let name = String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .expect("node name")
            .trim()
            .to_owned();
        // The test harness runs no destructors for statics; a detached shell waits for this
        // process to end and then stops the node, unless a later test process took it over.
        let _ = Command::new("setsid")
            .args([
                "bash",
                "-c",
                r#"while kill -0 "$1" 2>/dev/null; do sleep 1; done; exec bash "$2" stop "$3" "$1""#,
                "node-watch",
            ])
            .arg(&owner)
            .arg(&script)
            .arg(&dir)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        Node { dir, name }
    })
}

/// Tells the node's containerd how to reach a registry: plain HTTP, or HTTPS verified with
/// the CA in `ca`.
pub fn trust_registry(addr: &str, ca: Option<&Path>) {
    let node = node();
    let st = Command::new("bash")
        .arg(repo_root().join("hack/node.sh"))
        .arg("trust")
        .arg(&node.dir)
        .arg(addr)
        .args(ca)
        .status()
        .expect("hack/node.sh trust");
    assert!(st.success(), "hack/node.sh trust {addr} failed");
}

/// Pushes the node's runnable image (busybox whose entrypoint sleeps) to `addr/repo`
/// (`repo` may carry a `:tag`) and lets the node pull from `addr`; returns the reference.
pub fn push_runnable_image(addr: &str, user: &str, password: &str, repo: &str, ca: Option<&Path>) -> String {
    let node = node();
    let image = format!("{addr}/{repo}");
    let st = Command::new("skopeo")
        .args(["copy", "--quiet", "--dest-tls-verify=false", "--dest-creds"])
        .arg(format!("{user}:{password}"))
        .arg(format!("oci:{}:app", node.dir.join("images/oci").display()))
        .arg(format!("docker://{image}"))
        .status()
        .expect("skopeo");
    assert!(st.success(), "pushing the runnable image to {image} failed");
    trust_registry(addr, ca);
    image
}

/// Creates a one-replica Deployment `name` of `image` on the node, as a user would write it:
/// no `imagePullSecrets`, the namespace's `default` ServiceAccount. Its pods carry the label
/// `app=<name>`.
pub async fn deploy(client: &Client, namespace: &str, name: &str, image: &str, pull_policy: &str) {
    deploy_with(client, namespace, name, image, pull_policy, serde_json::json!({})).await;
}

/// [`deploy`] with the fields of `extra` added to the pod spec (e.g. `serviceAccountName`).
pub async fn deploy_with(
    client: &Client,
    namespace: &str,
    name: &str,
    image: &str,
    pull_policy: &str,
    extra: serde_json::Value,
) {
    let mut deployment = serde_json::json!({
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "nodeName": node().name,
                    "terminationGracePeriodSeconds": 0,
                    "automountServiceAccountToken": false,
                    "containers": [{"name": "app", "image": image, "imagePullPolicy": pull_policy}]
                }
            }
        }
    });
    if let (Some(spec), Some(extra)) = (
        deployment["spec"]["template"]["spec"].as_object_mut(),
        extra.as_object(),
    ) {
        spec.extend(extra.clone());
    }
    let deployment: k8s_openapi::api::apps::v1::Deployment = serde_json::from_value(deployment).expect("deployment");
    Api::<k8s_openapi::api::apps::v1::Deployment>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &deployment)
        .await
        .expect("deployment created");
}

/// How a pod's image pull ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodOutcome {
    /// The container runs.
    Running {
        /// The pod.
        pod: String,
    },
    /// The kubelet could not pull: `ErrImagePull`/`ImagePullBackOff`, with the kubelet's
    /// message (it names the registry's answer, e.g. `401 Unauthorized`).
    PullFailed {
        /// The pod.
        pod: String,
        /// The waiting reason.
        reason: String,
        /// The kubelet's message.
        message: String,
    },
}

/// Waits (90 s) until a pod labelled `app=<app>` runs or fails to pull; panics otherwise,
/// with the pods' states.
pub async fn wait_pod(client: &Client, namespace: &str, app: &str) -> PodOutcome {
    wait_pod_until(client, namespace, app, Duration::from_secs(90), |_| true).await
}

/// Waits (up to `timeout`) until a pod labelled `app=<app>` runs, through any number of
/// pull failures (the kubelet retries with back-off); panics with the last state otherwise.
/// Returns the pod's name.
pub async fn wait_running(client: &Client, namespace: &str, app: &str, timeout: Duration) -> String {
    match wait_pod_until(client, namespace, app, timeout, |o| {
        matches!(o, PodOutcome::Running { .. })
    })
    .await
    {
        PodOutcome::Running { pod } => pod,
        other => panic!("{namespace}/{app}: {other:?}"),
    }
}

/// The outcome of the first pod of `app` that has one yet (running, or failing to pull).
pub async fn current_outcome(client: &Client, namespace: &str, app: &str) -> Option<PodOutcome> {
    let pods = Api::<k8s_openapi::api::core::v1::Pod>::namespaced(client.clone(), namespace);
    pod_outcome(&pods, &kube::api::ListParams::default().labels(&format!("app={app}"))).await
}

async fn pod_outcome(pods: &Api<k8s_openapi::api::core::v1::Pod>, lp: &kube::api::ListParams) -> Option<PodOutcome> {
    let list = pods.list(lp).await.ok()?;
    list.items.iter().find_map(|p| {
        let pod = p.metadata.name.clone()?;
        let state = p
            .status
            .as_ref()?
            .container_statuses
            .as_ref()?
            .first()?
            .state
            .as_ref()?;
        if state.running.is_some() {
            return Some(PodOutcome::Running { pod });
        }
        let waiting = state.waiting.as_ref()?;
        let reason = waiting.reason.clone()?;
        matches!(reason.as_str(), "ErrImagePull" | "ImagePullBackOff").then(|| PodOutcome::PullFailed {
            pod,
            reason,
            message: waiting.message.clone().unwrap_or_default(),
        })
    })
}

async fn wait_pod_until(
    client: &Client,
    namespace: &str,
    app: &str,
    timeout: Duration,
    done: impl Fn(&PodOutcome) -> bool,
) -> PodOutcome {
    let pods = Api::<k8s_openapi::api::core::v1::Pod>::namespaced(client.clone(), namespace);
    let lp = kube::api::ListParams::default().labels(&format!("app={app}"));
    let got = eventually(timeout, || async { pod_outcome(&pods, &lp).await.filter(|o| done(o)) }).await;
    match got {
        Some(o) => o,
        None => panic!(
            "no pod of {namespace}/{app} reached the awaited state in {timeout:?}; last: {:?}; pods: {:?}",
            pod_outcome(&pods, &lp).await,
            pods.list(&lp)
                .await
                .map(|l| l.items.into_iter().map(|p| p.status).collect::<Vec<_>>())
        ),
    }
}

/// The `auths` entry for `registry` in the pull Secret `namespace/secret`, once written.
pub async fn written_entry(
    client: &Client,
    namespace: &str,
    secret: &str,
    registry: &str,
) -> Option<serde_json::Value> {
    Some(entry_and_uid(client, namespace, secret, registry).await?.0)
}

/// The `auths` entry for `registry` in the pull Secret `namespace/secret`, and its UID.
async fn entry_and_uid(
    client: &Client,
    namespace: &str,
    secret: &str,
    registry: &str,
) -> Option<(serde_json::Value, String)> {
    let s = Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), namespace)
        .get_opt(secret)
        .await
        .ok()??;
    let v: serde_json::Value = serde_json::from_slice(&s.data?.get(".dockerconfigjson")?.0).ok()?;
    let entry = v["auths"][registry].clone();
    entry.is_object().then_some((entry, s.metadata.uid?))
}

/// The apiserver's ServiceAccount token signing keys (`/openid/v1/jwks`).
pub async fn apiserver_jwks(client: &Client) -> serde_json::Value {
    let req = http::Request::get("/openid/v1/jwks").body(Vec::new()).expect("request");
    let text = client.request_text(req).await.expect("JWKS");
    serde_json::from_str(&text).expect("JWKS is JSON")
}

/// Creates a ServiceAccount.
pub async fn service_account(client: &Client, namespace: &str, name: &str) {
    let mut sa = k8s_openapi::api::core::v1::ServiceAccount::default();
    sa.metadata.name = Some(name.to_owned());
    Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &sa)
        .await
        .expect("ServiceAccount created");
}

/// The Events about a pod, as `reason: message` lines.
pub async fn pod_events(client: &Client, namespace: &str, pod: &str) -> Vec<String> {
    Api::<k8s_openapi::api::core::v1::Event>::namespaced(client.clone(), namespace)
        .list(&kube::api::ListParams::default().fields(&format!("involvedObject.name={pod}")))
        .await
        .map(|l| {
            l.items
                .into_iter()
                .map(|e| format!("{}: {}", e.reason.unwrap_or_default(), e.message.unwrap_or_default()))
                .collect()
        })
        .unwrap_or_default()
}

/// Waits (30 s) until the `default` ServiceAccount of `namespace` lists `secret` in its
/// `imagePullSecrets`: pods created from then on get it at admission.
pub async fn wait_service_account_has(client: &Client, namespace: &str, secret: &str) {
    let sas = Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(client.clone(), namespace);
    let ok = eventually(Duration::from_secs(30), || async {
        let sa = sas.get_opt("default").await.ok()??;
        sa.image_pull_secrets?.iter().any(|r| r.name == secret).then_some(())
    })
    .await;
    assert!(
        ok.is_some(),
        "{namespace}/default never listed {secret} in imagePullSecrets"
    );
}

/// The password for `registry` in the pull Secret `namespace/name`, and the Secret's UID.
pub async fn written(client: &Client, namespace: &str, name: &str, registry: &str) -> Option<(String, String)> {
    let (entry, uid) = entry_and_uid(client, namespace, name, registry).await?;
    Some((entry["password"].as_str()?.to_owned(), uid))
}
