//! Fan-out benchmark against a real local control plane (etcd, kube-apiserver,
//! kube-controller-manager started by `hack/control-plane.sh`). Prints Markdown tables.
//!
//!     cargo bench --bench fanout -- [--sizes 1000,3000] [--credentials 1] [--new 100] [--diy-max 1000]
//!
//! For each size N it starts a fresh control plane, creates N labelled namespaces, waits
//! until each has its `default` ServiceAccount, runs the real `pullkeeper` binary with its
//! defaults as a separate process, applies K ClusterRegistryCredentials each selecting all
//! N namespaces (N x K Secrets, K entries per `default` ServiceAccount), and measures: time
//! until every namespace holds its K Secrets and its ServiceAccount lists them (watched,
//! not polled), apiserver requests the operator made, writes and provider calls on a
//! no-change resync and after a restart, latency for a new namespace to get its Secrets and
//! ServiceAccount entries (p50/p99), and the operator's peak RSS. On the same apiserver it
//! measures two baselines doing the same writes: the floor (a minimal concurrent client in
//! bulk, and a minimal watch-and-write client for new namespaces, timed by the same watch)
//! and the DIY kubectl loop (sizes above `--diy-max` are extrapolated; 0 skips it).

#[path = "../common/cluster.rs"]
mod cluster;
mod floor;
mod track;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

use cluster::{ControlPlane, Counts, LABEL, Operator};
use track::{Tracker, pct};

struct Args {
    sizes: Vec<usize>,
    credentials: usize,
    diy_max: usize,
    new: usize,
}

fn args() -> Args {
    Args {
        sizes: cluster::flag("--sizes", "1000,3000".to_owned())
            .split(',')
            .filter_map(|s| s.trim().parse().ok())
            .collect(),
        credentials: cluster::flag("--credentials", 1).max(1),
        diy_max: cluster::flag("--diy-max", 1000),
        new: cluster::flag("--new", 100),
    }
}

struct Row {
    n: usize,
    k: usize,
    /// Until the last namespace held all its Secrets / until the last ServiceAccount listed
    /// them all (fan-out is the later of the two).
    secrets_done: Duration,
    entries_done: Duration,
    /// The operator's counters from applying the credentials until the fan-out settled.
    work: Counts,
    resync: Counts,
    restart: Counts,
    new: Vec<Duration>,
    rss_mib: f64,
    floor: Duration,
    floor_new: Vec<Duration>,
    diy: Option<(Duration, bool)>,
}

impl Row {
    fn fanout(&self) -> Duration {
        self.secrets_done.max(self.entries_done)
    }
}

fn credential_name(i: usize) -> String {
    format!("bench-{i:02}")
}

/// Applies (or, with `poke`, touches) the K credentials.
async fn apply_credentials(c: &Client, k: usize, poke: Option<&str>) {
    let api = Api::<pullkeeper::crd::ClusterRegistryCredential>::all(c.clone());
    for i in 0..k {
        let name = credential_name(i);
        let (params, patch) = match poke {
            Some(v) => (
                PatchParams::default(),
                Patch::Merge(json!({"metadata": {"annotations": {"bench/poke": v}}})),
            ),
            None => (
                PatchParams::apply("bench"),
                Patch::Apply(json!({
                    "apiVersion": "pullkeeper.io/v1alpha1", "kind": "ClusterRegistryCredential",
                    "metadata": {"name": name},
                    "spec": {
                        "registry": "registry.example.com:5000",
                        "provider": {"basic": {"secretRef": {"name": "login", "namespace": "src-bench"}}},
                        "target": {"namespaceSelector": {"matchLabels": {LABEL: "fan"}}}
                    }
                })),
            ),
        };
        api.patch(&name, &params, &patch).await.expect("credential");
    }
}

async fn run_size(n: usize, a: &Args, kubectl: &Path) -> Row {
    let k = a.credentials;
    let cp = ControlPlane::fresh();
    let c = cluster::client(&cp.kubeconfig).await;
    cluster::install_crds(&c).await;
    eprintln!("[{n}x{k}] creating {n} namespaces");
    let namespaces = cluster::create_namespaces(&c, "bench", n, "fan").await;
    cluster::create_namespace(&c, "src-bench".into(), "none").await;
    Api::<Secret>::namespaced(c.clone(), "src-bench")
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
    eprintln!("[{n}x{k}] waiting for the default ServiceAccounts");
    cluster::wait_default_service_accounts(&c, "bench-", n).await;

    let op = Operator::start(&cp.kubeconfig).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let c0 = op.counts().await;
    let mut tracker = Tracker::start(&c, "pullkeeper.io/credential", "pullkeeper-bench-", k);
    // Let the tracker's watches list what there is before the clock starts.
    tokio::time::sleep(Duration::from_secs(1)).await;
    eprintln!("[{n}x{k}] fan-out");
    let t = Instant::now();
    apply_credentials(&c, k, None).await;
    let all_done = tracker
        .until(Duration::from_secs(3600), |s| (s.done() >= n).then_some(()))
        .await;
    assert!(all_done.is_some(), "fan-out did not finish within an hour");
    let (secrets_done, entries_done) = tracker.with(|s| {
        let last = |m: &std::collections::HashMap<String, Instant>| {
            m.values()
                .max()
                .map_or(Duration::ZERO, |at| at.saturating_duration_since(t))
        };
        (last(&s.secrets_at), last(&s.entries_at))
    });
    let c1 = op.settle(Duration::from_secs(2)).await;

    eprintln!("[{n}x{k}] resync with nothing changed");
    apply_credentials(&c, k, Some("1")).await;
    let c2 = op.settle(Duration::from_secs(3)).await;

    eprintln!("[{n}x{k}] {} new namespaces one by one", a.new);
    let new = track::new_namespaces(&c, &mut tracker, "late", "fan", a.new).await;
    // The status counts follow new namespaces within seconds: let them land, so the
    // restart below really has nothing to change.
    op.settle(Duration::from_secs(3)).await;
    let rss_mib = op.peak_rss_mib();
    eprintln!(
        "[{n}x{k}] operator resident set: peak {rss_mib:.1} MiB; now {:.1} MiB, of which {:.1} MiB heap and stacks, {:.1} MiB the binary's pages",
        op.status_mib("VmRSS:"),
        op.status_mib("RssAnon:"),
        op.status_mib("RssFile:")
    );
    drop(op);
    drop(tracker);

    eprintln!("[{n}x{k}] restart with nothing changed");
    let op = Operator::start(&cp.kubeconfig).await;
    let restart = op.settle(Duration::from_secs(5)).await;
    drop(op);

    eprintln!("[{n}x{k}] floor client");
    let floor = floor::fanout(&c, &namespaces, k).await;
    eprintln!("[{n}x{k}] floor watch-and-write, {} new namespaces one by one", a.new);
    let floor_new = {
        let mut tracker = Tracker::start(&c, floor::SECRET_LABEL, floor::PREFIX, k);
        let _client = floor::WatchAndWrite::start(&c, "floor", k);
        tokio::time::sleep(Duration::from_secs(2)).await;
        track::new_namespaces(&c, &mut tracker, "floor-late", "floor", a.new).await
    };

    let diy = (a.diy_max > 0).then(|| {
        let diy_n = n.min(a.diy_max);
        eprintln!("[{n}x{k}] DIY loop over {diy_n} namespaces");
        let t = floor::diy(kubectl, &cp.kubeconfig, &namespaces[..diy_n], k);
        (t.mul_f64(n as f64 / diy_n as f64), diy_n < n)
    });
    Row {
        n,
        k,
        secrets_done,
        entries_done,
        work: c1 - c0,
        resync: c2 - c1,
        restart,
        new,
        rss_mib,
        floor,
        floor_new,
        diy,
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The two tables for `rows`.
fn tables(rows: &[Row]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    out.push('\n');
    let _ = writeln!(
        out,
        "| namespaces | credentials | Secrets | pullkeeper fan-out | last Secret | last ServiceAccount entry | floor client | pullkeeper / floor | DIY kubectl loop | DIY / pullkeeper | apiserver requests | provider calls | writes on resync | writes after restart | provider calls after restart | operator peak RSS |"
    );
    let _ = writeln!(
        out,
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for r in rows {
        let (diy, diy_ratio) = match r.diy {
            Some((t, extrapolated)) => (
                format!("{}{:.1} s", if extrapolated { "~" } else { "" }, t.as_secs_f64()),
                format!("{:.0}x", t.as_secs_f64() / r.fanout().as_secs_f64()),
            ),
            None => ("-".into(), "-".into()),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.2} s | {:.2} s | {:.2} s | {:.2} s | {:.2}x | {diy} | {diy_ratio} | {} | {} | {} | {} | {} | {:.1} MiB |",
            r.n,
            r.k,
            r.n * r.k,
            r.fanout().as_secs_f64(),
            r.secrets_done.as_secs_f64(),
            r.entries_done.as_secs_f64(),
            r.floor.as_secs_f64(),
            r.fanout().as_secs_f64() / r.floor.as_secs_f64(),
            r.work.requests,
            r.work.provider_calls,
            r.resync.writes,
            r.restart.writes,
            r.restart.provider_calls,
            r.rss_mib,
        );
    }
    out.push('\n');
    let _ = writeln!(
        out,
        "| namespaces | credentials | new namespaces | pullkeeper p50 | pullkeeper p99 | floor watch-and-write p50 | floor p99 | pullkeeper / floor p99 |"
    );
    let _ = writeln!(out, "|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        let (p99, f99) = (pct(&r.new, 0.99), pct(&r.floor_new, 0.99));
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms | {:.2}x |",
            r.n,
            r.k,
            r.new.len(),
            ms(pct(&r.new, 0.5)),
            ms(p99),
            ms(pct(&r.floor_new, 0.5)),
            ms(f99),
            p99.as_secs_f64() / f99.as_secs_f64(),
        );
    }
    out
}

#[tokio::main]
async fn main() {
    let a = args();
    if !cluster::benchmarking("fanout") {
        return;
    }
    let kubectl = PathBuf::from(cluster::sh(
        Command::new("bash").arg(cluster::root().join("hack/tools.sh")),
    ))
    .join("kubectl");
    let mut rows = Vec::new();
    for &n in &a.sizes {
        rows.push(run_size(n, &a, &kubectl).await);
        // Each size's tables as soon as it is done, in case a later size does not finish.
        eprintln!("{}", tables(&rows[rows.len() - 1..]));
    }
    println!("{}", tables(&rows));
}
