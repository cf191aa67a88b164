//! The benchmarks' surroundings (shared by `benches/*`, included with `#[path]`): a fresh
//! control plane per run, the operator as a separate process and what it reports on
//! `/metrics`, namespaces and their default ServiceAccounts.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};

/// Label on the namespaces the benchmark creates; its value says who should serve them.
pub const LABEL: &str = "bench-target";
/// Requests in flight for the benchmark's own bulk work and for the floor client.
pub const CONCURRENCY: usize = 32;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `cmd`, fails the benchmark if it fails; the last line of its stdout.
pub fn sh(cmd: &mut Command) -> String {
    let out = cmd.stderr(Stdio::inherit()).output().expect("spawn");
    assert!(out.status.success(), "{cmd:?} failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or("")
        .trim()
        .to_owned()
}

/// A control plane of its own under `target/bench`, stopped (and its data removed) on drop.
pub struct ControlPlane {
    dir: String,
    pub kubeconfig: PathBuf,
}

impl ControlPlane {
    pub fn fresh() -> Self {
        let dir = root().join("target/bench/control-plane").to_string_lossy().into_owned();
        control_plane(&["stop", &dir]);
        let kubeconfig = PathBuf::from(control_plane(&["start", &dir]));
        ControlPlane { dir, kubeconfig }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        control_plane(&["stop", &self.dir]);
    }
}

fn control_plane(args: &[&str]) -> String {
    sh(Command::new("bash")
        .arg(root().join("hack/control-plane.sh"))
        .args(args))
}

pub async fn client(kubeconfig: &Path) -> Client {
    let kc = Kubeconfig::read_from(kubeconfig).expect("kubeconfig");
    let mut cfg = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("config");
    cfg.read_timeout = Some(Duration::from_secs(120));
    Client::try_from(cfg).expect("client")
}

pub async fn install_crds(c: &Client) {
    let crds = Api::<CustomResourceDefinition>::all(c.clone());
    for crd in pullkeeper::crd::crds() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        crds.patch(&name, &PatchParams::apply("bench").force(), &Patch::Apply(&crd))
            .await
            .expect("crd");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
}

/// `prefix-00000` .. : `n` namespaces labelled `LABEL=label`, created 32 at a time.
pub async fn create_namespaces(client: &Client, prefix: &str, n: usize, label: &str) -> Vec<String> {
    let names: Vec<String> = (0..n).map(|i| format!("{prefix}-{i:05}")).collect();
    futures::stream::iter(names.clone())
        .map(|name| create_namespace(client, name, label))
        .buffer_unordered(CONCURRENCY)
        .collect::<Vec<_>>()
        .await;
    names
}

pub async fn create_namespace(client: &Client, name: String, label: &str) {
    let mut ns = Namespace::default();
    ns.metadata.name = Some(name);
    ns.metadata.labels = Some([(LABEL.to_owned(), label.to_owned())].into());
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .expect("namespace");
}

/// Whether `cargo bench` runs this binary (it passes `--bench`); `cargo test --all-targets`
/// runs it without, and then it must not start clusters. Installs the TLS crypto provider.
pub fn benchmarking(name: &str) -> bool {
    pullkeeper::install_crypto_provider();
    let yes = std::env::args().any(|x| x == "--bench");
    if !yes {
        println!("{name} benchmark: run it with `cargo bench --bench {name}`");
    }
    yes
}

/// The value after `name` (`--pods 100`) on the command line; `default` if it is absent
/// or does not parse.
pub fn flag<T: std::str::FromStr>(name: &str, default: T) -> T {
    let argv: Vec<String> = std::env::args().collect();
    argv.iter()
        .position(|a| a == name)
        .and_then(|i| argv.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Polls `count` every half second until it reaches `n`; fails the benchmark, naming
/// `what`, if that takes longer than `limit`.
pub async fn wait_count<F: Future<Output = usize>>(what: &str, n: usize, limit: Duration, count: impl Fn() -> F) {
    let started = Instant::now();
    loop {
        let have = count().await;
        if have >= n {
            return;
        }
        assert!(
            started.elapsed() < limit,
            "only {have} of {n} {what} after {} s",
            limit.as_secs()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Waits until kube-controller-manager has given every namespace starting with `prefix` its
/// `default` ServiceAccount (`n` of them).
pub async fn wait_default_service_accounts(client: &Client, prefix: &str, n: usize) {
    let api = Api::<ServiceAccount>::all(client.clone());
    let lp = ListParams::default().fields("metadata.name=default");
    wait_count("default ServiceAccounts", n, Duration::from_secs(900), || async {
        api.list_metadata(&lp).await.map_or(0, |l| {
            l.items
                .iter()
                .filter(|sa| {
                    sa.metadata
                        .namespace
                        .as_deref()
                        .is_some_and(|ns| ns.starts_with(prefix))
                })
                .count()
        })
    })
    .await;
}

/// The operator binary as a separate process, killed on drop.
pub struct Operator {
    child: Child,
    pub addr: String,
}

impl Operator {
    /// Starts `pullkeeper controller` with its defaults and waits until it is ready.
    pub async fn start(kubeconfig: &Path) -> Self {
        Self::start_with(kubeconfig, &[]).await
    }

    /// Starts `pullkeeper controller` with `args` and waits until it is ready.
    pub async fn start_with(kubeconfig: &Path, args: &[&str]) -> Self {
        let addr = format!("127.0.0.1:{}", free_port());
        // PULLKEEPER_BENCH_BIN compares another build (e.g. another allocator) on the same
        // benchmark; by default the release binary of this checkout.
        let bin = std::env::var_os("PULLKEEPER_BENCH_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_pullkeeper").into());
        let child = Command::new(bin)
            .arg("controller")
            .args(args)
            .env("KUBECONFIG", kubeconfig)
            .env("PULLKEEPER_METRICS_ADDR", &addr)
            .env("PULLKEEPER_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("operator");
        let op = Operator { child, addr };
        op.wait_ready().await;
        op
    }

    async fn wait_ready(&self) {
        for _ in 0..600 {
            if http_get(&self.addr, "/readyz")
                .await
                .is_some_and(|(code, _)| code == 200)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("{}/readyz never answered 200", self.addr);
    }

    pub async fn counts(&self) -> Counts {
        Counts::parse(&self.metrics().await)
    }

    /// The text of `/metrics`.
    pub async fn metrics(&self) -> String {
        http_get(&self.addr, "/metrics").await.expect("metrics").1
    }

    /// Waits until the operator has sent no request for three seconds (at least `min`, at
    /// most ten minutes); the counts then.
    pub async fn settle(&self, min: Duration) -> Counts {
        let started = Instant::now();
        let mut last = self.counts().await;
        let mut quiet_since = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let now = self.counts().await;
            if now.requests != last.requests {
                quiet_since = Instant::now();
            }
            last = now;
            if started.elapsed() >= min && quiet_since.elapsed() >= Duration::from_secs(3) {
                return last;
            }
            if started.elapsed() > Duration::from_secs(600) {
                eprintln!("operator still busy after ten minutes; counting anyway");
                return last;
            }
        }
    }

    /// The process's peak resident set (`VmHWM`).
    pub fn peak_rss_mib(&self) -> f64 {
        self.status_mib("VmHWM:")
    }

    /// A size field of `/proc/PID/status` (`VmRSS:`, the resident set now), in MiB.
    pub fn status_mib(&self, field: &str) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Counters the operator exports.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counts {
    /// Every apiserver request (`pullkeeper_api_requests_total`).
    pub requests: u64,
    /// Those that were not GETs (lists and watches are GETs).
    pub writes: u64,
    /// Credential provider calls (`pullkeeper_provider_calls_total`), any provider and result.
    pub provider_calls: u64,
}

impl Counts {
    fn parse(body: &str) -> Self {
        let mut c = Counts::default();
        for line in body.lines() {
            let v: u64 = line.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or(0);
            if line.starts_with("pullkeeper_api_requests_total{") {
                c.requests += v;
                if !line.contains("method=\"GET\"") {
                    c.writes += v;
                }
            } else if line.starts_with("pullkeeper_provider_calls_total{") {
                c.provider_calls += v;
            }
        }
        c
    }
}

impl std::ops::Sub for Counts {
    type Output = Counts;
    fn sub(self, o: Counts) -> Counts {
        Counts {
            requests: self.requests - o.requests,
            writes: self.writes - o.writes,
            provider_calls: self.provider_calls - o.provider_calls,
        }
    }
}

async fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.ok()?;
    let code = buf.split_whitespace().nth(1)?.parse().ok()?;
    Some((
        code,
        buf.split_once("\r\n\r\n").map(|x| x.1.to_owned()).unwrap_or_default(),
    ))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port")
}
