//! Fault injection: a token endpoint failing (500, hanging, refusing) across a refresh, the
//! operator killed mid renewal, the apiserver killed and etcd paused on a control plane of
//! this test's own, and a few hundred hostile credentials beside good ones; and what a
//! restart or a shared source Secret costs in writes and provider calls. Each test runs
//! its own operator process (a shard) so that what it counts (provider requests, log
//! lines, API requests) is that operator's alone; measurements are printed as
//! `faults: ...` lines (`cargo test --test e2e faults -- --nocapture`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams};
use kube::{Api, Client, ResourceExt};
use pullkeeper::crd::ClusterRegistryCredential;
use serde_json::{Value, json};

use crate::fakes::{self, Behaviour, Fault, Front};
use crate::support::{self, Operator, SHARD_LABEL, eventually, metric, metric_with};

/// An operator process of its own, logging at its default level (`info`), reconciling
/// only credentials labelled with `shard`; namespaces labelled `e2e-target=<shard>` are
/// the targets of the credentials of a test.
struct Shard {
    client: Client,
    shard: String,
    op: Operator,
    _dir: tempfile::TempDir,
}

impl Shard {
    async fn start(kubeconfig: &Path, prefix: &str) -> Shard {
        let stopped = Stopped {
            client: support::client_for(kubeconfig).await,
            shard: support::unique(prefix),
        };
        stopped.start(kubeconfig, "operator")
    }

    /// Kills the operator process (SIGKILL).
    fn kill(self) -> Stopped {
        Stopped {
            client: self.client,
            shard: self.shard,
        }
    }

    async fn target(&self, prefix: &str) -> String {
        support::namespace(&self.client, prefix, &[("e2e-target", &self.shard)]).await
    }

    async fn apply(&self, name: &str, spec: Value) {
        let mut spec = spec;
        if spec.get("target").is_none() {
            spec["target"] = json!({"namespaceSelector": {"matchLabels": {"e2e-target": self.shard}}});
        }
        support::apply_credential(&self.client, name, json!({SHARD_LABEL: self.shard}), spec).await;
    }

    /// A GCP credential whose metadata server is `front`, with 10-minute tokens due for
    /// refresh 30 s after issue, targeting this shard's namespaces; waits until Synced.
    async fn gcp_behind(&self, front: &Front, prefix: &str) -> String {
        let id = support::unique(prefix);
        fakes::fakes().set(&id, Behaviour::ok(600));
        let name = support::unique(prefix);
        self.apply(
            &name,
            json!({
                "registry": "gcr.io",
                "provider": {"gcp": {"metadataUrl": format!("{}/meta/{id}", front.base)}},
                "refresh": {"renewBefore": "570s"},
            }),
        )
        .await;
        support::wait_ready(&self.client, &name, "True", "Synced").await;
        name
    }

    /// Lines the operator logged so far.
    fn log_lines(&self) -> usize {
        self.op.log_text().lines().count()
    }

    /// Deletes the credentials and waits (60 s) until the operator has removed its
    /// finalizers, so nothing is left behind once the operator is gone.
    async fn delete(&self, names: &[String]) {
        let api = Api::<ClusterRegistryCredential>::all(self.client.clone());
        for n in names {
            let _ = api.delete(n, &DeleteParams::default()).await;
        }
        let lp = ListParams::default().labels(&format!("{SHARD_LABEL}={}", self.shard));
        let gone = eventually(Duration::from_secs(60), || async {
            api.list_metadata(&lp).await.ok()?.items.is_empty().then_some(())
        })
        .await;
        assert!(gone.is_some(), "credentials of {} were not cleaned up", self.shard);
    }
}

/// A shard whose operator was killed.
struct Stopped {
    client: Client,
    shard: String,
}

impl Stopped {
    /// Starts an operator process for the shard again, logging to `<name>.log`.
    fn start(self, kubeconfig: &Path, name: &str) -> Shard {
        let dir = tempfile::tempdir().expect("tempdir");
        let op = support::start(kubeconfig, &self.shard, &[("PULLKEEPER_LOG", "info")], dir.path(), name);
        Shard {
            client: self.client,
            shard: self.shard,
            op,
            _dir: dir,
        }
    }
}

/// `(password, uid, resourceVersion)` of the pull Secret `name` in `ns`.
async fn secret_state(client: &Client, ns: &str, name: &str, registry: &str) -> Option<(String, String, String)> {
    let s = Api::<Secret>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .ok()??;
    let v: Value = serde_json::from_slice(&s.data.as_ref()?.get(".dockerconfigjson")?.0).ok()?;
    Some((
        v["auths"][registry]["password"].as_str()?.to_owned(),
        s.metadata.uid.clone()?,
        s.resource_version()?,
    ))
}

/// What a provider outage cost and how it ended.
#[derive(Debug)]
struct OutageReport {
    /// Provider requests in each minute of the outage.
    requests_per_minute: Vec<u32>,
    /// Operator log lines in each minute of the outage.
    log_lines_per_minute: Vec<usize>,
    /// From the endpoint's recovery to a fresh token in the namespace.
    recovery: Duration,
    /// From a good credential's source change to its namespace during the outage.
    good_propagation: Duration,
}

/// A GCP credential whose metadata server (a [`Front`]) fails with `fault` for `minutes`
/// from the first refresh it fails; its token lives 10 minutes and is due for refresh
/// after 30 s, so the whole outage happens while the Secret in place is valid. A good basic
/// credential of the same operator changes its password mid-outage.
async fn provider_outage(prefix: &str, fault: Fault, minutes: u32) -> OutageReport {
    let env = support::env();
    let s = Shard::start(&env.kubeconfig, prefix).await;
    let front = Front::start();
    let ns = s.target(prefix).await;
    let src = support::namespace(&s.client, &format!("{prefix}-src"), &[]).await;
    support::put_secret(
        &s.client,
        &src,
        "login",
        json!({"username": "robot", "password": "good-1"}),
    )
    .await;
    let failing = s.gcp_behind(&front, prefix).await;
    let good = support::unique(&format!("{prefix}-good"));
    s.apply(
        &good,
        json!({
            "registry": "registry.example.com",
            "provider": {"basic": {"secretRef": {"name": "login", "namespace": src}}},
        }),
    )
    .await;
    support::wait_ready(&s.client, &good, "True", "Synced").await;
    let secret = format!("pullkeeper-{failing}");
    let before = secret_state(&s.client, &ns, &secret, "gcr.io").await.expect("written");
    let gcp_calls = || async { metric_with(&s.op.addr, "pullkeeper_provider_calls_total", "provider=\"gcp\"").await };
    let issued = gcp_calls().await.expect("metrics");

    front.set(fault);
    // The outage starts with the first refresh that fails (due about 30 s after issue).
    let started = eventually(Duration::from_secs(60), || async {
        (gcp_calls().await? > issued).then_some(())
    })
    .await;
    assert!(
        started.is_some(),
        "no refresh was attempted within 60 s; log:\n{}",
        s.op.log_text()
    );
    let t0 = Instant::now();
    let mut calls_at = vec![issued];
    let mut lines_at = vec![s.log_lines()];
    let mut good_propagation = None;
    for minute in 1..=minutes {
        while t0.elapsed() < Duration::from_secs(60 * u64::from(minute)) {
            let now = secret_state(&s.client, &ns, &secret, "gcr.io").await;
            assert_eq!(
                now.as_ref(),
                Some(&before),
                "the working Secret changed or disappeared during the outage"
            );
            if good_propagation.is_none() && t0.elapsed() > Duration::from_secs(20) {
                // Other credentials keep working meanwhile.
                support::put_secret(
                    &s.client,
                    &src,
                    "login",
                    json!({"username": "robot", "password": "good-2"}),
                )
                .await;
                let changed = Instant::now();
                let ok = eventually(Duration::from_secs(10), || async {
                    let (p, _, _) =
                        secret_state(&s.client, &ns, &format!("pullkeeper-{good}"), "registry.example.com").await?;
                    (p == "good-2").then_some(())
                })
                .await;
                assert!(ok.is_some(), "a good credential stalled during the outage");
                good_propagation = Some(changed.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        calls_at.push(gcp_calls().await.expect("metrics"));
        lines_at.push(s.log_lines());
    }
    let status = support::credential_status(&s.client, &failing).await.expect("status");
    let ready = status.conditions.iter().find(|c| c.type_ == "Ready").expect("Ready");
    assert_eq!(ready.status, "False", "the outage is not in status: {ready:?}");
    // The retry schedule is in status (the next attempt) and in a metric.
    assert!(ready.message.contains("next attempt at"), "{}", ready.message);
    let next_attempt = metric_with(
        &s.op.addr,
        "pullkeeper_credential_next_attempt_timestamp_seconds",
        &format!("name=\"{failing}\""),
    )
    .await
    .expect("metrics");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    // (A call may be under way right now, e.g. one that hangs until its timeout.)
    assert!(
        next_attempt > now - 30.0 && next_attempt < now + 3600.0,
        "next attempt at {next_attempt}, now {now}"
    );

    front.set(Fault::Pass);
    let recovered = Instant::now();
    let fresh = eventually(Duration::from_secs(60), || async {
        let (p, _, _) = secret_state(&s.client, &ns, &secret, "gcr.io").await?;
        (p != before.0).then_some(())
    })
    .await;
    let recovery = recovered.elapsed();
    assert!(fresh.is_some(), "no fresh token within 60 s of recovery");
    support::wait_ready(&s.client, &failing, "True", "Synced").await;
    let report = OutageReport {
        requests_per_minute: calls_at.windows(2).map(|w| (w[1] - w[0]) as u32).collect(),
        log_lines_per_minute: lines_at.windows(2).map(|w| w[1] - w[0]).collect(),
        recovery,
        good_propagation: good_propagation.expect("measured"),
    };
    println!(
        "faults: provider {fault:?} for {minutes} min: {report:?}; front saw {} failed connections",
        front.faulty_connections()
    );
    s.delete(&[failing, good]).await;
    support::delete_namespace(&s.client, &ns).await;
    report
}

fn assert_bounded(r: &OutageReport) {
    for (i, n) in r.requests_per_minute.iter().enumerate() {
        assert!(
            *n <= 12,
            "{n} provider requests in minute {} of the outage: {r:?}",
            i + 1
        );
    }
    for (i, n) in r.log_lines_per_minute.iter().enumerate() {
        assert!(*n <= 20, "{n} log lines in minute {} of the outage: {r:?}", i + 1);
    }
    assert!(r.recovery <= Duration::from_secs(30), "{r:?}");
    assert!(r.good_propagation <= Duration::from_secs(2), "{r:?}");
}

/// A token endpoint answering 429 with `Retry-After: 40` when a refresh is due: no
/// attempt before 40 s, the hint in status, the working Secret untouched.
async fn provider_throttled() {
    let env = support::env();
    let s = Shard::start(&env.kubeconfig, "f429").await;
    let front = Front::start();
    let ns = s.target("f429").await;
    let name = s.gcp_behind(&front, "f429").await;
    let secret = format!("pullkeeper-{name}");
    let before = secret_state(&s.client, &ns, &secret, "gcr.io").await.expect("written");
    front.set(Fault::Http429);
    let throttled = eventually(Duration::from_secs(60), || async {
        (front.faulty_connections() > 0).then_some(())
    })
    .await;
    assert!(throttled.is_some(), "no refresh within 60 s");
    let t0 = Instant::now();
    let status = support::wait_ready(&s.client, &name, "False", "ProviderThrottled").await;
    let message = support::ready_message(&status).to_owned();
    assert!(message.contains("provider asked to retry after 40s"), "{message}");
    let second = eventually(Duration::from_secs(70), || async {
        (front.faulty_connections() > 1).then_some(())
    })
    .await;
    let waited = t0.elapsed();
    assert!(second.is_some(), "no second attempt within 70 s");
    assert!(
        waited >= Duration::from_secs(39),
        "the second attempt came after {waited:?}"
    );
    assert_eq!(
        secret_state(&s.client, &ns, &secret, "gcr.io").await.as_ref(),
        Some(&before)
    );
    front.set(Fault::Pass);
    println!(
        "faults: provider throttled (429, Retry-After: 40): next attempt {waited:?} later; status says {message:?}"
    );
    s.delete(std::slice::from_ref(&name)).await;
    support::delete_namespace(&s.client, &ns).await;
}

/// The outages run side by side (each with its own operator): they mostly wait.
#[tokio::test]
async fn faults_a_token_endpoint_answering_500_hanging_refusing_or_throttling_across_a_refresh() {
    let (http500, hang, refuse, ()) = tokio::join!(
        provider_outage("f500", Fault::Http500, 2),
        provider_outage("fhang", Fault::Hang, 1),
        provider_outage("frefuse", Fault::Refuse, 1),
        provider_throttled(),
    );
    assert_bounded(&http500);
    assert_bounded(&hang);
    assert_bounded(&refuse);
}

/// Per namespace, what a watcher of the written Secrets saw: token numbers in order, and
/// how many times the Secret was written.
#[derive(Default, Debug)]
struct Seen {
    tokens: Vec<u32>,
    versions: Vec<String>,
    /// Annotations and labels of each version, to tell what a write changed.
    metadata: Vec<String>,
}

#[tokio::test]
async fn faults_the_operator_killed_mid_renewal() {
    let env = support::env();
    let f = fakes::fakes();
    let id = support::unique("fkill");
    // 20 s tokens: renewed about every 15 s.
    f.set(&id, Behaviour::ok(20));
    let s = Shard::start(&env.kubeconfig, "fkill").await;
    let mut namespaces = Vec::new();
    for _ in 0..12 {
        namespaces.push(s.target("fkill").await);
    }
    let name = support::unique("fkill");
    let spec = json!({
        "registry": "gcr.io",
        "provider": {"gcp": {"metadataUrl": format!("{}/meta/{id}", f.base)}},
    });
    s.apply(&name, spec).await;
    support::wait_ready(&s.client, &name, "True", "Synced").await;
    let secret = format!("pullkeeper-{name}");

    // Watches every namespace until told to stop: no expired token, no token older than
    // one already seen there (a stale write), no write that changes nothing.
    let stop = tokio_util::sync::CancellationToken::new();
    let monitor = {
        let (client, namespaces, secret, stop) = (s.client.clone(), namespaces.clone(), secret.clone(), stop.clone());
        tokio::spawn(async move {
            let mut seen: BTreeMap<String, Seen> = BTreeMap::new();
            let mut expired = Vec::new();
            while !stop.is_cancelled() {
                for ns in &namespaces {
                    let Ok(Some(sec)) = Api::<Secret>::namespaced(client.clone(), ns).get_opt(&secret).await else {
                        expired.push(format!("{ns}: missing"));
                        continue;
                    };
                    let exp: Option<Timestamp> = sec
                        .annotations()
                        .get("pullkeeper.io/expires-at")
                        .and_then(|e| e.parse().ok());
                    if exp.is_none_or(|e| e <= Timestamp::now()) {
                        expired.push(format!("{ns}: expires-at {exp:?}"));
                    }
                    let cfg: Value = sec
                        .data
                        .as_ref()
                        .and_then(|d| d.get(".dockerconfigjson"))
                        .and_then(|b| serde_json::from_slice(&b.0).ok())
                        .unwrap_or_default();
                    let n: u32 = cfg["auths"]["gcr.io"]["password"]
                        .as_str()
                        .and_then(|p| p.rsplit('-').next()?.parse().ok())
                        .unwrap_or(0);
                    let e = seen.entry(ns.clone()).or_default();
                    let rv = sec.resource_version().unwrap_or_default();
                    if e.versions.last() != Some(&rv) {
                        e.versions.push(rv);
                        e.tokens.push(n);
                        e.metadata.push(format!(
                            "{:?} {:?} {:?}",
                            sec.annotations(),
                            sec.labels(),
                            sec.metadata
                                .managed_fields
                                .iter()
                                .flatten()
                                .map(|m| (m.manager.clone(), m.time.clone()))
                                .collect::<Vec<_>>()
                        ));
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (seen, expired)
        })
    };

    // Kill the operator (SIGKILL) the moment the renewal's token is minted: it is then
    // writing the new token into the namespaces.
    let first = f.issued(&id);
    let minted = eventually(Duration::from_secs(30), || async {
        (f.issued(&id) > first).then_some(())
    })
    .await;
    assert!(minted.is_some(), "no renewal within 30 s");
    let stopped = s.kill();
    let killed = Instant::now();
    let renewed_token = f.issued(&id);
    let partial = {
        let mut with_new = 0;
        for ns in &namespaces {
            if let Some((p, _, _)) = secret_state(&stopped.client, ns, &secret, "gcr.io").await
                && p.ends_with(&format!("-{renewed_token}"))
            {
                with_new += 1;
            }
        }
        with_new
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let s = stopped.start(&env.kubeconfig, "restarted");
    // Converged: every namespace holds one and the same unexpired token, Ready again.
    let converged = eventually(Duration::from_secs(60), || async {
        let mut tokens = std::collections::BTreeSet::new();
        for ns in &namespaces {
            tokens.insert(secret_state(&s.client, ns, &secret, "gcr.io").await?.0);
        }
        let st = support::credential_status(&s.client, &name).await?;
        let ns_ok = st
            .namespaces
            .as_ref()
            .is_some_and(|n| n.synced == namespaces.len() as i32);
        (tokens.len() == 1 && ns_ok).then_some(())
    })
    .await;
    let convergence = killed.elapsed();
    assert!(
        converged.is_some(),
        "not converged 60 s after the restart; log:\n{}",
        s.op.log_text()
    );
    // One more renewal by the new process.
    let before = f.issued(&id);
    let renewed = eventually(Duration::from_secs(30), || async {
        (f.issued(&id) > before).then_some(())
    })
    .await;
    assert!(renewed.is_some(), "the restarted operator does not renew");
    // Killed again while its token is fresh (status written): the next process reuses that
    // token, mints nothing and writes nothing.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stopped = s.kill();
    let minted = f.issued(&id);
    let s = stopped.start(&env.kubeconfig, "third");
    let reused = eventually(Duration::from_secs(10), || async {
        s.op.log_text()
            .contains("reusing the unexpired credential")
            .then_some(())
    })
    .await;
    assert!(
        reused.is_some(),
        "the fresh token was not reused; log:\n{}",
        s.op.log_text()
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        f.issued(&id),
        minted,
        "a token was minted although the one written is fresh"
    );
    stop.cancel();
    let (seen, expired) = monitor.await.expect("monitor");
    assert!(
        expired.is_empty(),
        "an expired or missing token was served: {expired:?}"
    );
    let mut writes = 0;
    for (ns, e) in &seen {
        assert!(
            e.tokens.windows(2).all(|w| w[0] < w[1]),
            "{ns}: a write that went backwards or changed nothing: tokens {:?}, versions:\n{}",
            e.tokens,
            e.metadata.join("\n")
        );
        writes += e.versions.len();
    }
    for ns in &namespaces {
        let sa = Api::<ServiceAccount>::namespaced(s.client.clone(), ns)
            .get("default")
            .await
            .expect("default SA");
        let entries = sa
            .image_pull_secrets
            .unwrap_or_default()
            .iter()
            .filter(|r| r.name == secret)
            .count();
        assert_eq!(entries, 1, "{ns}: imagePullSecrets lists the secret {entries} times");
    }
    println!(
        "faults: operator killed mid renewal ({partial}/{} namespaces had the new token): converged {convergence:?} after the kill; {} tokens minted in all; {writes} Secret versions seen over {} namespaces",
        namespaces.len(),
        f.issued(&id),
        namespaces.len()
    );
    s.delete(std::slice::from_ref(&name)).await;
    for ns in &namespaces {
        support::delete_namespace(&s.client, ns).await;
    }
}

/// A control plane of this test's own (`hack/control-plane.sh start DIR`), stopped when
/// dropped.
struct OwnControlPlane {
    dir: PathBuf,
    kubeconfig: PathBuf,
}

fn control_plane_script(args: &[&str]) -> String {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    support::hack("control-plane.sh", &args)
}

impl OwnControlPlane {
    fn start(name: &str) -> OwnControlPlane {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
        let d = dir.to_string_lossy().into_owned();
        control_plane_script(&["stop", &d]);
        let kubeconfig = PathBuf::from(control_plane_script(&["start", &d]));
        OwnControlPlane { dir, kubeconfig }
    }

    fn pid(&self, daemon: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{daemon}.pid")))
            .expect("pid file")
            .trim()
            .to_owned()
    }

    fn signal(&self, daemon: &str, signal: &str) {
        let st = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid(daemon))
            .status()
            .expect("kill");
        assert!(st.success(), "kill -{signal} {daemon}");
    }

    fn restart_apiserver(&self) {
        control_plane_script(&["restart-apiserver", &self.dir.to_string_lossy()]);
    }
}

impl Drop for OwnControlPlane {
    fn drop(&mut self) {
        let _ = std::process::Command::new("bash")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("hack/control-plane.sh"))
            .arg("stop")
            .arg(&self.dir)
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// Waits (up to `timeout`) until every namespace holds `password` and the credential is
/// Ready with every namespace synced; returns how long it took.
async fn converge(
    client: &Client,
    name: &str,
    namespaces: &[String],
    password: &str,
    timeout: Duration,
) -> Option<Duration> {
    let t0 = Instant::now();
    let secret = format!("pullkeeper-{name}");
    eventually(timeout, || async {
        for ns in namespaces {
            let (p, _, _) = secret_state(client, ns, &secret, "registry.example.com").await?;
            if p != password {
                return None;
            }
            let sa = Api::<ServiceAccount>::namespaced(client.clone(), ns)
                .get_opt("default")
                .await
                .ok()??;
            if sa.image_pull_secrets?.iter().filter(|r| r.name == secret).count() != 1 {
                return None;
            }
        }
        let st = support::credential_status(client, name).await?;
        let ready = st.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True");
        let synced = st
            .namespaces
            .as_ref()
            .is_some_and(|n| n.synced == namespaces.len() as i32);
        (ready && synced).then_some(())
    })
    .await
    .map(|()| t0.elapsed())
}

#[tokio::test]
async fn faults_apiserver_killed_mid_fan_out_and_etcd_paused() {
    support::env();
    let cp = OwnControlPlane::start("faults-control-plane");
    let admin = support::client_for(&cp.kubeconfig).await;
    support::install_crds(&admin).await;
    let s = Shard::start(&cp.kubeconfig, "fcp").await;
    let src = support::namespace(&s.client, "fcp-src", &[]).await;
    support::put_secret(&s.client, &src, "login", json!({"username": "robot", "password": "p1"})).await;
    let mut namespaces = Vec::new();
    for _ in 0..40 {
        namespaces.push(s.target("fcp").await);
    }
    let name = support::unique("fcp");
    s.apply(
        &name,
        json!({
            "registry": "registry.example.com",
            "provider": {"basic": {"secretRef": {"name": "login", "namespace": src}}},
        }),
    )
    .await;
    let first = converge(&s.client, &name, &namespaces, "p1", Duration::from_secs(60)).await;
    assert!(first.is_some(), "first fan-out incomplete; log:\n{}", s.op.log_text());

    // The apiserver SIGKILLed 100 ms into the fan-out of a new password, down 10 s, then
    // restarted in place on the same etcd.
    support::put_secret(&s.client, &src, "login", json!({"username": "robot", "password": "p2"})).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    cp.signal("kube-apiserver", "KILL");
    let lines_before = s.log_lines();
    let killed = Instant::now();
    tokio::time::sleep(Duration::from_secs(10)).await;
    cp.restart_apiserver();
    let down = killed.elapsed();
    let converged = converge(&s.client, &name, &namespaces, "p2", Duration::from_secs(90)).await;
    let apiserver_lines = s.log_lines() - lines_before;
    assert!(
        converged.is_some(),
        "not converged 90 s after the apiserver came back; log:\n{}",
        s.op.log_text()
    );
    println!(
        "faults: apiserver killed mid fan-out of {} namespaces, back after {down:?}: converged {:?} later; {apiserver_lines} log lines from the kill to convergence",
        namespaces.len(),
        converged.expect("converged")
    );

    // etcd paused (SIGSTOP) for 30 s, 100 ms into the fan-out of another password.
    support::put_secret(&s.client, &src, "login", json!({"username": "robot", "password": "p3"})).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    cp.signal("etcd", "STOP");
    let lines_before = s.log_lines();
    tokio::time::sleep(Duration::from_secs(30)).await;
    cp.signal("etcd", "CONT");
    let converged = converge(&s.client, &name, &namespaces, "p3", Duration::from_secs(90)).await;
    let etcd_lines = s.log_lines() - lines_before;
    assert!(
        converged.is_some(),
        "not converged 90 s after etcd resumed; log:\n{}",
        s.op.log_text()
    );
    println!(
        "faults: etcd paused 30 s mid fan-out: converged {:?} after SIGCONT; {etcd_lines} log lines from the pause to convergence",
        converged.expect("converged")
    );
    // One outage, a handful of lines (each repeated error once a minute with a count).
    assert!(
        apiserver_lines <= 60,
        "{apiserver_lines} log lines for one apiserver outage"
    );
    assert!(etcd_lines <= 60, "{etcd_lines} log lines for one etcd pause");
    drop(s);
    drop(cp);
}

/// A `kubernetes.io/dockerconfigjson` Secret with `n` entries, none for the registries used.
async fn huge_docker_config(client: &Client, ns: &str, name: &str, n: usize) {
    let auths: serde_json::Map<String, Value> = (0..n)
        .map(|i| (format!("registry-{i}.example.net"), json!({"auth": "dTpw"})))
        .collect();
    let body = json!({
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/dockerconfigjson",
        "metadata": {"name": name, "namespace": ns},
        "stringData": {".dockerconfigjson": json!({"auths": auths}).to_string()},
    });
    Api::<Secret>::namespaced(client.clone(), ns)
        .patch(
            name,
            &kube::api::PatchParams::apply("e2e-user").force(),
            &kube::api::Patch::Apply(&body),
        )
        .await
        .expect("huge docker config");
}

/// About 200 hostile credentials beside 3 good ones, all of one operator process: failing
/// and hanging endpoints, missing and huge source Secrets, specs only the operator can
/// refuse, names too long for the Secrets they would write.
struct Hostile {
    s: Shard,
    /// Hostile credentials by group (`h-fail`, `h-missing`, ...).
    groups: BTreeMap<&'static str, Vec<String>>,
    good: Vec<String>,
    targets: [String; 2],
    src: String,
    /// When the last credential was applied.
    applied: Instant,
    _fronts: (Front, Front),
}

impl Hostile {
    async fn apply() -> Hostile {
        let env = support::env();
        let f = fakes::fakes();
        let s = Shard::start(&env.kubeconfig, "fhostile").await;
        let failing = Front::start();
        failing.set(Fault::Http500);
        let hanging = Front::start();
        hanging.set(Fault::Hang);
        let hang_host = hanging.base.trim_start_matches("http://").to_owned();
        let targets = [s.target("fhostile").await, s.target("fhostile").await];
        let src = support::namespace(&s.client, "fhostile-src", &[]).await;
        huge_docker_config(&s.client, &src, "huge", 5000).await;
        // The good credentials' sources are their own: a change to one concerns no other
        // credential. The hostile ones that need a working login share `login-hostile`.
        for login in ["login-0", "login-1", "login-2", "login-hostile"] {
            let data = json!({"username": "robot", "password": "good-1"});
            support::put_secret(&s.client, &src, login, data).await;
        }
        let basic = |secret: &str| json!({"basic": {"secretRef": {"name": secret, "namespace": src}}});
        let one_target = json!({"namespaces": [targets[0]]});
        let mut hostile: Vec<(&'static str, String, Value)> = Vec::new();
        let mut add = |group: &'static str, n: usize, spec: &dyn Fn(usize) -> Value| {
            for i in 0..n {
                let prefix = support::unique(group);
                let name = if group == "h-long" {
                    // 240 characters: "pullkeeper-<name>" is too long for a Secret name.
                    format!("{prefix}-{i:02}-{}", "x".repeat(240 - prefix.len() - 4))
                } else {
                    format!("{prefix}-{i}")
                };
                hostile.push((group, name, spec(i)));
            }
        };
        add("h-fail", 50, &|_| {
            let id = support::unique("fhostile");
            f.set(&id, Behaviour::ok(3600));
            json!({"registry": "gcr.io", "provider": {"gcp": {"metadataUrl": format!("{}/meta/{id}", failing.base)}}})
        });
        add(
            "h-missing",
            40,
            &|_| json!({"registry": "registry.example.com", "provider": basic("no-such-secret")}),
        );
        add("h-huge", 30, &|_| {
            json!({"registry": "registry.example.com",
                   "provider": {"dockerConfig": {"secretRef": {"name": "huge", "namespace": src}}}})
        });
        // Invalid in ways only the operator sees (the CRD's schema lets them in).
        add("h-invalid", 30, &|i| {
            if i % 2 == 0 {
                json!({"registry": "registry.example.com", "provider": basic("login-hostile"), "refresh": {"renewBefore": "0s"}})
            } else {
                json!({"registry": "registry.example.com", "provider": basic("login-hostile"),
                       "target": {"namespaces": [targets[0]], "excludeNamespaces": [targets[0]]}})
            }
        });
        add("h-hang", 20, &|_| {
            json!({"registry": hang_host, "provider": basic("login-hostile"), "target": one_target,
                   "verify": {"images": [format!("{hang_host}/app:v1")]}})
        });
        add(
            "h-long",
            30,
            &|_| json!({"registry": "registry.example.com", "provider": basic("login-hostile"), "target": one_target}),
        );
        assert_eq!(hostile.len(), 200);
        let good: Vec<String> = (0..3)
            .map(|i| format!("{}-good{i}", support::unique("fhostile")))
            .collect();
        for (i, g) in good.iter().enumerate() {
            let spec = json!({"registry": format!("good-{i}.example.com"), "provider": basic(&format!("login-{i}"))});
            s.apply(g, spec).await;
        }
        futures::stream::iter(hostile.iter())
            .for_each_concurrent(8, |(_, name, spec)| s.apply(name, spec.clone()))
            .await;
        let mut groups: BTreeMap<&'static str, Vec<String>> = BTreeMap::new();
        for (g, name, _) in hostile {
            groups.entry(g).or_default().push(name);
        }
        Hostile {
            s,
            groups,
            good,
            targets,
            src,
            applied: Instant::now(),
            _fronts: (failing, hanging),
        }
    }

    /// Credentials without a Ready condition yet, by group.
    async fn without_status(&self) -> Option<BTreeMap<&'static str, usize>> {
        let api = Api::<ClusterRegistryCredential>::all(self.s.client.clone());
        let lp = ListParams::default().labels(&format!("{SHARD_LABEL}={}", self.s.shard));
        let list = api.list(&lp).await.ok()?;
        let mut missing = BTreeMap::new();
        for c in &list.items {
            let has = c
                .status
                .as_ref()
                .is_some_and(|st| st.conditions.iter().any(|c| c.type_ == "Ready"));
            if !has {
                let name = c.name_any();
                let group = self
                    .groups
                    .iter()
                    .find(|(_, names)| names.contains(&name))
                    .map_or("good", |(g, _)| *g);
                *missing.entry(group).or_default() += 1;
            }
        }
        Some(missing)
    }

    /// Waits (up to `timeout` from the last apply) until every credential has a status;
    /// the time it took, or what was still missing.
    async fn statuses(&self, timeout: Duration) -> Result<Duration, BTreeMap<&'static str, usize>> {
        let left = timeout.saturating_sub(self.applied.elapsed());
        let done = eventually(left, || async { self.without_status().await?.is_empty().then_some(()) }).await;
        match done {
            Some(()) => Ok(self.applied.elapsed()),
            None => Err(self.without_status().await.unwrap_or_default()),
        }
    }

    async fn delete(self) {
        let mut names: Vec<String> = self.groups.into_values().flatten().collect();
        names.extend(self.good);
        self.s.delete(&names).await;
        for ns in self.targets.iter().chain([&self.src]) {
            support::delete_namespace(&self.s.client, ns).await;
        }
    }
}

#[tokio::test]
async fn faults_two_hundred_hostile_credentials_stay_small_quiet_and_fair_to_good_ones() {
    let h = Hostile::apply().await;
    let s = &h.s;
    let at_60 = h.statuses(Duration::from_secs(60)).await;
    let log_at_60 = h.s.op.log_text();
    // Measured on, for the report, if some were late.
    let all = h.statuses(Duration::from_secs(180)).await;
    let api = Api::<ClusterRegistryCredential>::all(s.client.clone());
    let lp = ListParams::default().labels(&format!("{SHARD_LABEL}={}", s.shard));
    let largest = api
        .list(&lp)
        .await
        .expect("list")
        .items
        .iter()
        .map(|c| serde_json::to_vec(&c.status).map(|v| v.len()).unwrap_or(0))
        .max()
        .unwrap_or(0);
    for g in &h.good {
        support::wait_ready(&s.client, g, "True", "Synced").await;
    }

    // Idle: settled for 20 s, then API requests over one minute.
    tokio::time::sleep(Duration::from_secs(20)).await;
    let requests = || async {
        metric(&s.op.addr, "pullkeeper_api_requests_total")
            .await
            .expect("metrics")
    };
    let r0 = requests().await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    let idle_per_minute = requests().await - r0;

    // A good credential's source change reaches its namespaces within 2 s.
    support::put_secret(
        &s.client,
        &h.src,
        "login-0",
        json!({"username": "robot", "password": "good-2"}),
    )
    .await;
    let changed = Instant::now();
    let secret = format!("pullkeeper-{}", h.good[0]);
    let propagated = eventually(Duration::from_secs(30), || async {
        for ns in &h.targets {
            let (p, _, _) = secret_state(&s.client, ns, &secret, "good-0.example.com").await?;
            if p != "good-2" {
                return None;
            }
        }
        Some(())
    })
    .await;
    let propagation = changed.elapsed();
    println!(
        "faults: 200 hostile credentials beside 3 good ones: without a status 60 s after the last apply: {at_60:?}; all with one: {all:?}; largest status {largest} bytes; idle API requests {idle_per_minute} a minute; a good source change propagated in {propagation:?} ({})",
        if propagated.is_some() {
            "done"
        } else {
            "NOT within 30 s"
        }
    );
    h.delete().await;
    let tail: Vec<&str> = log_at_60.lines().rev().take(40).collect();
    assert!(
        at_60.is_ok(),
        "without a status 60 s after the last apply, by group: {at_60:?}; the operator's last lines:\n{}",
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    );
    assert!(largest <= 16 * 1024, "a status of {largest} bytes");
    assert!(
        idle_per_minute < 300.0,
        "{idle_per_minute} API requests a minute while idle"
    );
    assert!(propagated.is_some(), "the good credential's change never arrived");
    assert!(
        propagation <= Duration::from_secs(2),
        "propagation took {propagation:?}"
    );
}

/// A restart with nothing to change sends no write: stored credentials read again
/// unchanged keep the schedule in their status, and the admission policies and bindings in
/// place are kept as they are. Two credentials, so their entries share each ServiceAccount.
#[tokio::test]
async fn faults_a_restart_with_nothing_to_change_writes_nothing() {
    let env = support::env();
    let s = Shard::start(&env.kubeconfig, "frestart").await;
    let mut namespaces = Vec::new();
    for _ in 0..4 {
        namespaces.push(s.target("frestart").await);
    }
    let login = json!({"name": "login", "namespace": namespaces[0]});
    support::put_secret(
        &s.client,
        &namespaces[0],
        "login",
        json!({"username": "robot", "password": "pw"}),
    )
    .await;
    let names = [support::unique("frestart-a"), support::unique("frestart-b")];
    for (i, name) in names.iter().enumerate() {
        let spec = json!({"registry": format!("r{i}.example.com"), "provider": {"basic": {"secretRef": login}}});
        s.apply(name, spec).await;
    }
    for name in &names {
        support::wait_ready(&s.client, name, "True", "Synced").await;
    }
    let wanted: Vec<String> = names.iter().map(|n| format!("pullkeeper-{n}")).collect();
    let listed = eventually(Duration::from_secs(30), || async {
        for ns in &namespaces {
            let sa = Api::<ServiceAccount>::namespaced(s.client.clone(), ns)
                .get("default")
                .await
                .ok()?;
            let entries: Vec<String> = sa
                .image_pull_secrets
                .unwrap_or_default()
                .into_iter()
                .map(|r| r.name)
                .collect();
            if !wanted.iter().all(|w| entries.iter().filter(|e| *e == w).count() == 1) {
                return None;
            }
        }
        Some(())
    })
    .await;
    assert!(listed.is_some(), "every default ServiceAccount lists both Secrets once");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let s = s.kill().start(&env.kubeconfig, "restarted");
    // Both credentials are reconciled (read again) within a few seconds of the start.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let mut writes = 0.0;
    for method in ["POST", "PUT", "PATCH", "DELETE"] {
        let label = format!("method=\"{method}\"");
        writes += metric_with(&s.op.addr, "pullkeeper_api_requests_total", &label)
            .await
            .unwrap_or(0.0);
    }
    let reads = metric_with(&s.op.addr, "pullkeeper_api_requests_total", "method=\"GET\"").await;
    assert!(reads.unwrap_or(0.0) > 0.0, "the restarted operator did not run");
    assert_eq!(
        writes,
        0.0,
        "writes after a restart with nothing to change; log:\n{}",
        s.op.log_text()
    );
    s.delete(&names).await;
}

/// Twenty credentials reading one source Secret: the provider is asked once for each (the
/// list that starts the Secret's watch shows the very copy the first one read), and once
/// more for each after the Secret is edited.
#[tokio::test]
async fn the_provider_is_asked_once_per_credential_reading_a_shared_source_secret() {
    let env = support::env();
    let s = Shard::start(&env.kubeconfig, "fonce").await;
    let ns = s.target("fonce").await;
    support::put_secret(&s.client, &ns, "login", json!({"username": "robot", "password": "pw"})).await;
    let login = json!({"name": "login", "namespace": ns});
    let names: Vec<String> = (0..20).map(|_| support::unique("fonce")).collect();
    for (i, name) in names.iter().enumerate() {
        let spec = json!({"registry": format!("r{i}.example.com"), "provider": {"basic": {"secretRef": login}}});
        s.apply(name, spec).await;
    }
    for name in &names {
        support::wait_ready(&s.client, name, "True", "Synced").await;
    }
    let calls = || async {
        metric_with(&s.op.addr, "pullkeeper_provider_calls_total", "provider=\"basic\"")
            .await
            .unwrap_or(0.0)
    };
    // Long enough for a late watch list to ask again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(calls().await, 20.0, "provider calls; log:\n{}", s.op.log_text());

    support::put_secret(&s.client, &ns, "login", json!({"username": "robot", "password": "pw2"})).await;
    let propagated = eventually(Duration::from_secs(30), || async {
        for (i, name) in names.iter().enumerate() {
            let (password, _, _) = secret_state(
                &s.client,
                &ns,
                &format!("pullkeeper-{name}"),
                &format!("r{i}.example.com"),
            )
            .await?;
            (password == "pw2").then_some(())?;
        }
        Some(())
    })
    .await;
    assert!(propagated.is_some(), "the edit reached every credential");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        calls().await,
        40.0,
        "provider calls after the edit; log:\n{}",
        s.op.log_text()
    );
    s.delete(&names).await;
}
