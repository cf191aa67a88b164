//! Workload-checks benchmark against a real local control plane (`hack/control-plane.sh`)
//! and registry (`hack/registry.sh`, htpasswd). Prints a Markdown table.
//!
//!     cargo bench --bench workloads -- [--pods 5000] [--namespaces 500] [--images 400]
//!                                      [--interval 20s] [--rounds 3]
//!
//! Pushes `--images` distinct images (one tiny layer each, tags of ten repositories),
//! creates `--namespaces` namespaces and one `ClusterRegistryCredential` (`basic`) for the
//! registry targeting them all (pullkeeper writes the pull Secret and patches the
//! `default` ServiceAccount), then `--pods` Pods spread evenly over the namespaces, Pod `i`
//! using image `i mod images` (each image in several namespaces, so that de-duplication
//! matters; the Pods stay Pending: there is no node). Then, with the release operator:
//!
//! - **checks off**: a fresh `pullkeeper controller` with its defaults, its peak RSS
//!   (`VmHWM`) and resident set (`VmRSS`) once it has been quiet for three seconds (at
//!   least ten seconds after start);
//! - **checks on**: a fresh one with `--workload-checks --workload-check-interval
//!   <interval>`, until `--rounds` full rounds have run; for each full round, from its own
//!   metrics: resolutions (distinct image and credential pairs), HTTP requests sent to
//!   the registry, the round's duration, and the apiserver requests since the previous
//!   round; its peak RSS and resident set right after the last round.

#[path = "../common/cluster.rs"]
mod cluster;
#[path = "../../tests/common/registry.rs"]
mod registry;

use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Secret, ServiceAccount};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

use cluster::{CONCURRENCY, ControlPlane, LABEL, Operator};

const USER: &str = "bench";
const PASSWORD: &str = "bench-password";
/// Repositories the images are spread over.
const REPOSITORIES: usize = 10;
const CREDENTIAL: &str = "bench";

struct Args {
    pods: usize,
    namespaces: usize,
    images: usize,
    interval: String,
    rounds: usize,
}

fn args() -> Args {
    Args {
        pods: cluster::flag("--pods", 5000),
        namespaces: cluster::flag("--namespaces", 500).max(1),
        images: cluster::flag("--images", 400).max(1),
        interval: cluster::flag("--interval", "20s".to_owned()),
        rounds: cluster::flag("--rounds", 3).max(1),
    }
}

fn json_bytes(v: &serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(v).expect("json")
}

/// Pushes `n` single-platform images, each its own manifest over one shared layer; their
/// references.
async fn push_images(addr: &str, n: usize) -> Vec<String> {
    let p = registry::Pusher::basic(addr, USER, PASSWORD);
    let layer = b"one tiny layer";
    let config =
        json_bytes(&json!({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}));
    let repos: Vec<String> = (0..REPOSITORIES.min(n)).map(|r| format!("wl/svc-{r}")).collect();
    // Every repository holds the two blobs its manifests refer to.
    for repo in &repos {
        p.blob(repo, layer).await;
        p.blob(repo, &config).await;
    }
    let (layer_d, config_d) = (registry::digest(layer), registry::digest(&config));
    let refs: Vec<String> = futures::stream::iter(0..n)
        .map(|i| {
            let (p, repo) = (&p, &repos[i % repos.len()]);
            let manifest = json!({
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_d, "size": config.len()},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_d, "size": layer.len()}],
                "annotations": {"n": i.to_string()}
            });
            async move {
                let tag = format!("v{i}");
                p.manifest(repo, &tag, "application/vnd.oci.image.manifest.v1+json", &json_bytes(&manifest))
                    .await;
                format!("{addr}/{repo}:{tag}")
            }
        })
        .buffered(8)
        .collect()
        .await;
    refs
}

/// The login Secret and the credential that writes it into every benchmark namespace.
async fn apply_credential(c: &Client, addr: &str) {
    cluster::create_namespace(c, "src-bench".into(), "none").await;
    Api::<Secret>::namespaced(c.clone(), "src-bench")
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "login"},
                "stringData": {"username": USER, "password": PASSWORD}
            }))
            .expect("secret"),
        )
        .await
        .expect("source");
    Api::<pullkeeper::crd::ClusterRegistryCredential>::all(c.clone())
        .patch(
            CREDENTIAL,
            &PatchParams::apply("bench"),
            &Patch::Apply(json!({
                "apiVersion": "pullkeeper.io/v1alpha1", "kind": "ClusterRegistryCredential",
                "metadata": {"name": CREDENTIAL},
                "spec": {
                    "registry": addr,
                    "provider": {"basic": {"secretRef": {"name": "login", "namespace": "src-bench"}}},
                    "target": {"namespaceSelector": {"matchLabels": {LABEL: "wl"}}}
                }
            })),
        )
        .await
        .expect("credential");
}

/// Waits until `n` `default` ServiceAccounts list the credential's Secret.
async fn wait_fanout(c: &Client, n: usize) {
    let api = Api::<ServiceAccount>::all(c.clone());
    let lp = ListParams::default().fields("metadata.name=default");
    let secret = format!("pullkeeper-{CREDENTIAL}");
    let what = format!("ServiceAccounts listing {secret}");
    cluster::wait_count(&what, n, Duration::from_secs(600), || async {
        api.list(&lp).await.map_or(0, |l| {
            l.items
                .iter()
                .filter(|sa| sa.image_pull_secrets.iter().flatten().any(|r| r.name == secret))
                .count()
        })
    })
    .await;
}

/// `pods` Pods spread over `namespaces`, Pod `i` using image `i mod images`.
async fn create_pods(c: &Client, namespaces: &[String], images: &[String], pods: usize) {
    futures::stream::iter(0..pods)
        .map(|i| {
            let ns = &namespaces[i % namespaces.len()];
            let pod: Pod = serde_json::from_value(json!({
                "metadata": {"name": format!("app-{i:05}")},
                "spec": {"containers": [{"name": "app", "image": images[i % images.len()]}]}
            }))
            .expect("pod");
            async move {
                Api::<Pod>::namespaced(c.clone(), ns)
                    .create(&PostParams::default(), &pod)
                    .await
                    .expect("pod");
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect::<Vec<()>>()
        .await;
}

/// The value of one series (name and labels exactly as exported), 0 if absent.
fn metric(body: &str, series: &str) -> f64 {
    body.lines()
        .filter_map(|l| l.rsplit_once(' '))
        .find(|(s, _)| *s == series)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0.0)
}

/// The counters a round is read from.
#[derive(Clone, Copy, Default)]
struct Snapshot {
    full: f64,
    changed: f64,
    resolutions: f64,
    registry_requests: f64,
    full_seconds: f64,
    api_requests: u64,
}

impl Snapshot {
    async fn of(op: &Operator) -> Self {
        let body = op.metrics().await;
        Snapshot {
            full: metric(&body, r#"pullkeeper_workload_check_rounds_total{round="full"}"#),
            changed: metric(&body, r#"pullkeeper_workload_check_rounds_total{round="changed"}"#),
            resolutions: metric(&body, "pullkeeper_workload_check_resolutions_total"),
            registry_requests: metric(&body, "pullkeeper_workload_check_registry_requests_total"),
            full_seconds: metric(
                &body,
                r#"pullkeeper_workload_check_round_duration_seconds_sum{round="full"}"#,
            ),
            api_requests: op.counts().await.requests,
        }
    }
}

/// One full round, as the difference of the snapshots around it.
struct Round {
    resolutions: f64,
    registry_requests: f64,
    seconds: f64,
    api_requests: u64,
    /// Rounds of changed workloads that ran in between (their work is in the counts).
    changed: f64,
}

/// Peak and current resident set of an operator, MiB.
type Rss = (f64, f64);

fn rss(op: &Operator) -> Rss {
    (op.peak_rss_mib(), op.status_mib("VmRSS:"))
}

/// Runs the operator with the checks on until `rounds` full rounds have run.
async fn checks_on(kubeconfig: &std::path::Path, a: &Args) -> (Vec<Round>, Rss) {
    let op = Operator::start_with(
        kubeconfig,
        &["--workload-checks", "--workload-check-interval", &a.interval],
    )
    .await;
    // Every workload counter starts at 0 with the process; the first round's apiserver
    // requests include the operator's start-up.
    let mut last = Snapshot::default();
    let mut rounds = Vec::new();
    let started = Instant::now();
    while rounds.len() < a.rounds {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = Snapshot::of(&op).await;
        if now.full > last.full {
            rounds.push(Round {
                resolutions: now.resolutions - last.resolutions,
                registry_requests: now.registry_requests - last.registry_requests,
                seconds: (now.full_seconds - last.full_seconds) / (now.full - last.full),
                api_requests: now.api_requests - last.api_requests,
                changed: now.changed - last.changed,
            });
            eprintln!(
                "full round {}: {} resolutions",
                rounds.len(),
                now.resolutions - last.resolutions
            );
            last = now;
        }
        assert!(
            started.elapsed() < Duration::from_secs(1800),
            "only {} full rounds in 30 minutes",
            rounds.len()
        );
    }
    (rounds, rss(&op))
}

fn table(a: &Args, distinct: usize, rounds: &[Round], off: Rss, on: Rss) -> String {
    use std::fmt::Write as _;
    let mut out = String::from("\n");
    let _ = writeln!(
        out,
        "| full round | pods | namespaces | distinct images x credentials | resolutions | registry requests | requests per distinct pair | round time | apiserver requests since previous round | changed-workload rounds in between |"
    );
    let _ = writeln!(out, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (i, r) in rounds.iter().enumerate() {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {distinct} | {:.0} | {:.0} | {:.2} | {:.2} s | {} | {:.0} |",
            i + 1,
            a.pods,
            a.namespaces,
            r.resolutions,
            r.registry_requests,
            r.registry_requests / distinct as f64,
            r.seconds,
            r.api_requests,
            r.changed,
        );
    }
    out.push('\n');
    let _ = writeln!(out, "| operator | peak RSS (`VmHWM`) | RSS at the end (`VmRSS`) |");
    let _ = writeln!(out, "|---|---:|---:|");
    let _ = writeln!(out, "| checks off | {:.1} MiB | {:.1} MiB |", off.0, off.1);
    let _ = writeln!(
        out,
        "| checks on (`--workload-check-interval {}`, after {} full rounds) | {:.1} MiB | {:.1} MiB |",
        a.interval,
        rounds.len(),
        on.0,
        on.1
    );
    out
}

#[tokio::main]
async fn main() {
    let a = args();
    if !cluster::benchmarking("workloads") {
        return;
    }
    let tag = format!("[{}/{}/{}]", a.pods, a.namespaces, a.images);
    let dir = cluster::root().join("target/bench/registry-workloads");
    registry::stop(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    let addr = registry::start::<&str>(&dir, USER, PASSWORD, &[]);
    eprintln!("{tag} pushing {} images to {addr}", a.images);
    let images = push_images(&addr, a.images).await;
    let distinct = images.len().min(a.pods);

    let cp = ControlPlane::fresh();
    let c = cluster::client(&cp.kubeconfig).await;
    cluster::install_crds(&c).await;
    eprintln!("{tag} creating {} namespaces", a.namespaces);
    let namespaces = cluster::create_namespaces(&c, "wl", a.namespaces, "wl").await;
    cluster::wait_default_service_accounts(&c, "wl-", a.namespaces).await;
    {
        let _setup = Operator::start(&cp.kubeconfig).await;
        apply_credential(&c, &addr).await;
        eprintln!("{tag} waiting for the pull Secrets and ServiceAccount entries");
        wait_fanout(&c, a.namespaces).await;
        eprintln!("{tag} creating {} pods", a.pods);
        create_pods(&c, &namespaces, &images, a.pods).await;
    }

    eprintln!("{tag} checks off");
    let rss_off = {
        let op = Operator::start(&cp.kubeconfig).await;
        op.settle(Duration::from_secs(10)).await;
        rss(&op)
    };
    eprintln!("{tag} checks on, {} full rounds every {}", a.rounds, a.interval);
    let (rounds, rss_on) = checks_on(&cp.kubeconfig, &a).await;
    drop(cp);
    registry::stop(&dir);
    println!("{}", table(&a, distinct, &rounds, rss_off, rss_on));
}
