//! Fan-out benchmark against a real local control plane (etcd, kube-apiserver,
//! kube-controller-manager started by `hack/control-plane.sh`). Prints a Markdown table.
//!
//!     cargo bench --bench fanout -- [--sizes 100,1000,5000] [--diy-max 1000] [--new 100]
//!
//! For each size N it starts a fresh control plane, creates N labelled namespaces, runs
//! the real `pullkeeper` binary as a separate process, applies one ClusterRegistryCredential
//! selecting them, and measures: time until every namespace holds the secret, apiserver
//! requests the operator made, writes on a no-change resync (in-process and after a
//! restart), latency for a new namespace to get its secret (p50/p99), and the operator's
//! peak RSS. On the same apiserver it measures two baselines: the DIY loop
//! (`kubectl create secret docker-registry --dry-run=client -o yaml | kubectl apply -f -`
//! per namespace; sizes above `--diy-max` are extrapolated from that many) and the floor
//! (a minimal concurrent client that only applies the same Secrets).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use serde_json::json;

const LABEL: &str = "bench-target";
const CONCURRENCY: usize = 32;

struct Args {
    sizes: Vec<usize>,
    diy_max: usize,
    new: usize,
}

fn args() -> Args {
    let mut a = Args {
        sizes: vec![100, 1000, 5000],
        diy_max: 1000,
        new: 100,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let val = argv.get(i + 1).cloned().unwrap_or_default();
        match argv[i].as_str() {
            "--sizes" => a.sizes = val.split(',').filter_map(|s| s.trim().parse().ok()).collect(),
            "--diy-max" => a.diy_max = val.parse().unwrap_or(a.diy_max),
            "--new" => a.new = val.parse().unwrap_or(a.new),
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    a
}

struct Row {
    n: usize,
    fanout: Duration,
    requests: u64,
    resync_writes: u64,
    restart_writes: u64,
    new_p50: Duration,
    new_p99: Duration,
    rss_mib: f64,
    floor: Duration,
    diy: Duration,
    diy_extrapolated: bool,
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn sh(cmd: &mut Command) -> String {
    let out = cmd.stderr(Stdio::inherit()).output().expect("spawn");
    assert!(out.status.success(), "{cmd:?} failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or("")
        .trim()
        .to_owned()
}

async fn client(kubeconfig: &Path) -> Client {
    let kc = Kubeconfig::read_from(kubeconfig).expect("kubeconfig");
    let mut cfg = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("config");
    cfg.read_timeout = Some(Duration::from_secs(120));
    Client::try_from(cfg).expect("client")
}

async fn wait_http(addr: &str, path: &str) {
    for _ in 0..600 {
        if let Some(body) = http_get(addr, path).await
            && body.0 == 200
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{addr}{path} never answered 200");
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

/// (all requests, write requests) from the operator's metrics.
async fn request_counts(addr: &str) -> (u64, u64) {
    let (_, body) = http_get(addr, "/metrics").await.expect("metrics");
    let mut all = 0;
    let mut writes = 0;
    for line in body.lines().filter(|l| l.starts_with("pullkeeper_api_requests_total{")) {
        let v: u64 = line.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or(0);
        all += v;
        if !line.contains("method=\"GET\"") {
            writes += v;
        }
    }
    (all, writes)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port")
}

fn start_operator(kubeconfig: &Path, addr: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_pullkeeper"))
        .arg("controller")
        .env("KUBECONFIG", kubeconfig)
        .env("PULLKEEPER_METRICS_ADDR", addr)
        .env("PULLKEEPER_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("operator")
}

fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

async fn count_secrets(client: &Client, selector: &str) -> usize {
    Api::<Secret>::all(client.clone())
        .list_metadata(&ListParams::default().labels(selector))
        .await
        .map(|l| l.items.len())
        .unwrap_or(0)
}

async fn create_namespaces(client: &Client, prefix: &str, n: usize, label: &str) -> Vec<String> {
    let api = Api::<Namespace>::all(client.clone());
    let names: Vec<String> = (0..n).map(|i| format!("{prefix}-{i:05}")).collect();
    futures::stream::iter(names.clone())
        .map(|name| {
            let api = api.clone();
            async move {
                let mut ns = Namespace::default();
                ns.metadata.name = Some(name);
                ns.metadata.labels = Some([(LABEL.to_owned(), label.to_owned())].into());
                api.create(&PostParams::default(), &ns).await.expect("namespace");
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect::<Vec<_>>()
        .await;
    names
}

fn dockerconfig(password: &str) -> String {
    use base64::Engine as _;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("robot:{password}"));
    json!({"auths": {"registry.example.com:5000": {"username": "robot", "password": password, "auth": auth}}})
        .to_string()
}

async fn floor(client: &Client, namespaces: &[String]) -> Duration {
    let t = Instant::now();
    let data = dockerconfig("floor-password");
    futures::stream::iter(namespaces.iter().cloned())
        .map(|ns| {
            let api = Api::<Secret>::namespaced(client.clone(), &ns);
            let body = json!({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": "floor-pull", "namespace": ns},
                "type": "kubernetes.io/dockerconfigjson",
                "stringData": {".dockerconfigjson": data},
            });
            async move {
                api.patch("floor-pull", &PatchParams::apply("floor").force(), &Patch::Apply(body))
                    .await
                    .expect("floor apply");
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect::<Vec<_>>()
        .await;
    t.elapsed()
}

fn diy(kubectl: &Path, kubeconfig: &Path, namespaces: &[String]) -> Duration {
    let t = Instant::now();
    for ns in namespaces {
        let st = Command::new("bash")
            .arg("-c")
            .arg(format!(
                "'{k}' create secret docker-registry diy-pull --docker-server=registry.example.com:5000 \
                 --docker-username=robot --docker-password=diy-password -n {ns} --dry-run=client -o yaml \
                 | '{k}' apply -f - >/dev/null",
                k = kubectl.display()
            ))
            .env("KUBECONFIG", kubeconfig)
            .status()
            .expect("kubectl");
        assert!(st.success(), "DIY loop failed in {ns}");
    }
    t.elapsed()
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

async fn run_size(n: usize, a: &Args, kubectl: &Path) -> Row {
    let cp = root().join("target/bench/control-plane");
    let cp_s = cp.to_string_lossy().into_owned();
    sh(Command::new("bash")
        .arg(root().join("hack/control-plane.sh"))
        .args(["stop", &cp_s]));
    let kubeconfig = PathBuf::from(sh(Command::new("bash")
        .arg(root().join("hack/control-plane.sh"))
        .args(["start", &cp_s])));
    let c = client(&kubeconfig).await;
    let crds = Api::<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>::all(
        c.clone(),
    );
    for crd in pullkeeper::crd::crds() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        crds.patch(&name, &PatchParams::apply("bench").force(), &Patch::Apply(&crd))
            .await
            .expect("crd");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    eprintln!("[{n}] creating {n} namespaces");
    let namespaces = create_namespaces(&c, "bench", n, "fan").await;
    create_namespaces(&c, "bench-src", 1, "none").await;
    Api::<Secret>::namespaced(c.clone(), "bench-src-00000")
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "login"},
                "stringData": {"username": "robot", "password": "bench-password"}
            }))
            .expect("secret"),
        )
        .await
        .expect("source");

    let addr = format!("127.0.0.1:{}", free_port());
    let mut op = start_operator(&kubeconfig, &addr);
    wait_http(&addr, "/readyz").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (req0, _) = request_counts(&addr).await;
    let crc = Api::<pullkeeper::crd::ClusterRegistryCredential>::all(c.clone());
    let body = json!({
        "apiVersion": "pullkeeper.io/v1alpha1", "kind": "ClusterRegistryCredential",
        "metadata": {"name": "bench"},
        "spec": {
            "registry": "registry.example.com:5000",
            "provider": {"basic": {"secretRef": {"name": "login", "namespace": "bench-src-00000"}}},
            "target": {"namespaceSelector": {"matchLabels": {LABEL: "fan"}}, "serviceAccounts": []}
        }
    });
    eprintln!("[{n}] fan-out");
    let t = Instant::now();
    crc.patch("bench", &PatchParams::apply("bench"), &Patch::Apply(&body))
        .await
        .expect("crc");
    let selector = "pullkeeper.io/credential=bench";
    while count_secrets(&c, selector).await < n {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let fanout = t.elapsed();
    // Let status settle, then count.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (req1, w1) = request_counts(&addr).await;

    eprintln!("[{n}] resync with nothing changed");
    crc.patch(
        "bench",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {"bench/poke": "1"}}})),
    )
    .await
    .expect("poke");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, w2) = request_counts(&addr).await;
    let resync_writes = w2 - w1;

    eprintln!("[{n}] new namespaces one by one");
    let mut lat = Vec::new();
    let ns_api = Api::<Namespace>::all(c.clone());
    for i in 0..a.new {
        let name = format!("late-{i:04}");
        let mut ns = Namespace::default();
        ns.metadata.name = Some(name.clone());
        ns.metadata.labels = Some([(LABEL.to_owned(), "fan".to_owned())].into());
        let secrets = Api::<Secret>::namespaced(c.clone(), &name);
        let t = Instant::now();
        ns_api.create(&PostParams::default(), &ns).await.expect("late ns");
        loop {
            if secrets
                .get_metadata_opt("pullkeeper-bench")
                .await
                .ok()
                .flatten()
                .is_some()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        lat.push(t.elapsed());
    }
    lat.sort();
    let rss_mib = peak_rss_mib(op.id());
    let _ = op.kill();
    let _ = op.wait();

    eprintln!("[{n}] restart with nothing changed");
    let addr2 = format!("127.0.0.1:{}", free_port());
    let mut op2 = start_operator(&kubeconfig, &addr2);
    wait_http(&addr2, "/readyz").await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (_, restart_writes) = request_counts(&addr2).await;
    let _ = op2.kill();
    let _ = op2.wait();

    eprintln!("[{n}] floor client");
    let floor = floor(&c, &namespaces).await;
    eprintln!("[{n}] DIY loop over {} namespaces", n.min(a.diy_max));
    let diy_n = n.min(a.diy_max);
    let mut diy_t = diy(kubectl, &kubeconfig, &namespaces[..diy_n]);
    let diy_extrapolated = diy_n < n;
    if diy_extrapolated {
        diy_t = diy_t.mul_f64(n as f64 / diy_n as f64);
    }
    sh(Command::new("bash")
        .arg(root().join("hack/control-plane.sh"))
        .args(["stop", &cp_s]));
    Row {
        n,
        fanout,
        requests: req1 - req0,
        resync_writes,
        restart_writes,
        new_p50: pct(&lat, 0.5),
        new_p99: pct(&lat, 0.99),
        rss_mib,
        floor,
        diy: diy_t,
        diy_extrapolated,
    }
}

#[tokio::main]
async fn main() {
    pullkeeper::install_crypto_provider();
    let a = args();
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this binary without it
    // and must not start clusters.
    if !std::env::args().any(|x| x == "--bench") {
        println!("fanout benchmark: run it with `cargo bench --bench fanout`");
        return;
    }
    let kubectl = PathBuf::from(sh(Command::new("bash").arg(root().join("hack/tools.sh")))).join("kubectl");
    let mut rows = Vec::new();
    for &n in &a.sizes {
        rows.push(run_size(n, &a, &kubectl).await);
    }
    println!();
    println!(
        "| namespaces | pullkeeper fan-out | floor client | DIY kubectl loop | pullkeeper / floor | DIY / pullkeeper | apiserver requests | writes on resync | writes after restart | new namespace p50 | p99 | operator peak RSS |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {:.2} s | {:.2} s | {}{:.1} s | {:.2}x | {:.0}x | {} | {} | {} | {:.0} ms | {:.0} ms | {:.1} MiB |",
            r.n,
            r.fanout.as_secs_f64(),
            r.floor.as_secs_f64(),
            if r.diy_extrapolated { "~" } else { "" },
            r.diy.as_secs_f64(),
            r.fanout.as_secs_f64() / r.floor.as_secs_f64(),
            r.diy.as_secs_f64() / r.fanout.as_secs_f64(),
            r.requests,
            r.resync_writes,
            r.restart_writes,
            r.new_p50.as_secs_f64() * 1000.0,
            r.new_p99.as_secs_f64() * 1000.0,
            r.rss_mib,
        );
    }
}
