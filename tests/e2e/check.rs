//! `pullkeeper check` against the real registry (CNCF distribution with htpasswd).

use std::path::Path;
use std::process::Command;

use base64::Engine as _;
use serde_json::{Value, json};

use crate::support;

fn run(args: &[&str], config: Option<&Path>, path_prefix: Option<&Path>) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pullkeeper"));
    cmd.arg("check");
    if let Some(c) = config {
        cmd.arg("--docker-config").arg(c);
    }
    cmd.args(args);
    if let Some(p) = path_prefix {
        let path = std::env::var("PATH").unwrap_or_default();
        cmd.env("PATH", format!("{}:{path}", p.display()));
    }
    let out = cmd.output().expect("pullkeeper check");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn config(dir: &Path, registry: &str, user: &str, password: &str) -> std::path::PathBuf {
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let p = dir.join(format!("config-{password}.json"));
    std::fs::write(&p, json!({"auths": {registry: {"auth": auth}}}).to_string()).expect("write");
    p
}

#[test]
fn check_reports_each_failure_reason() {
    let reg = support::registry();
    let dir = tempfile::tempdir().expect("tempdir");
    let good = config(dir.path(), &reg.addr, &reg.user, &reg.password);
    let image = format!("{}/demo:v1", reg.addr);

    let (code, out, err) = run(&[&image], Some(&good), None);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("OK") && out.contains("sha256:"), "{out}");

    let (code, out, _) = run(
        &[&image, "--output", "json", "--platform", "linux/amd64"],
        Some(&good),
        None,
    );
    assert_eq!(code, 0, "{out}");
    let v: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v[0]["pullable"], true);
    assert!(v[0]["digest"].as_str().is_some_and(|d| d.starts_with("sha256:")));
    assert_eq!(v[0]["mediaType"], "application/vnd.oci.image.manifest.v1+json");
    assert_eq!(v[0]["platforms"][0], "linux/amd64");

    let cases = [
        (
            vec![image.clone()],
            Some(config(dir.path(), &reg.addr, &reg.user, "wrong")),
            "Unauthorized",
        ),
        (vec![image.clone()], None, "Unauthorized"),
        (
            vec![format!("{}/demo:missing", reg.addr)],
            Some(good.clone()),
            "NotFound",
        ),
        (vec![format!("{}/nope:v1", reg.addr)], Some(good.clone()), "NotFound"),
        (
            vec![image.clone(), "--platform".into(), "linux/arm64".into()],
            Some(good.clone()),
            "PlatformMissing",
        ),
        (vec!["127.0.0.1:1/demo:v1".into()], Some(good.clone()), "Unreachable"),
        (vec!["Bad/Name".into()], Some(good.clone()), "InvalidReference"),
    ];
    for (args, cfg, reason) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut with_json = args.clone();
        with_json.extend(["--output", "json"]);
        let (code, out, err) = run(&with_json, cfg.as_deref(), None);
        assert_eq!(code, 1, "{args:?}: {out}{err}");
        let v: Value = serde_json::from_str(&out).unwrap_or_else(|_| panic!("{args:?}: not JSON: {out}{err}"));
        assert_eq!(v[0]["reason"], reason, "{args:?}: {out}");
        assert!(v[0]["message"].as_str().is_some_and(|m| !m.is_empty()));
        assert!(!out.contains(&reg.password), "the password was printed");
    }
}

#[test]
fn check_runs_credential_helpers_like_docker() {
    let reg = support::registry();
    let dir = tempfile::tempdir().expect("tempdir");
    let helper = dir.path().join("docker-credential-pktest");
    std::fs::write(
        &helper,
        format!(
            "#!/bin/sh\n[ \"$1\" = get ] || exit 1\nread server\n[ \"$server\" = \"{}\" ] || {{ echo \"unknown $server\" >&2; exit 1; }}\necho '{{\"ServerURL\":\"{}\",\"Username\":\"{}\",\"Secret\":\"{}\"}}'\n",
            reg.addr, reg.addr, reg.user, reg.password
        ),
    )
    .expect("helper");
    std::fs::set_permissions(&helper, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    let cfg = dir.path().join("config.json");
    std::fs::write(&cfg, json!({"credHelpers": {reg.addr.clone(): "pktest"}}).to_string()).expect("config");
    let (code, out, err) = run(&[&format!("{}/demo:v1", reg.addr)], Some(&cfg), Some(dir.path()));
    assert_eq!(code, 0, "{out}{err}");
    let store = dir.path().join("store.json");
    std::fs::write(&store, json!({"credsStore": "pktest"}).to_string()).expect("config");
    let (code, out, err) = run(&[&format!("{}/demo:v1", reg.addr)], Some(&store), Some(dir.path()));
    assert_eq!(code, 0, "{out}{err}");
}

#[test]
fn a_private_ca_needs_the_ca_bundle() {
    let (reg, ca) = support::tls_registry();
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path(), &reg.addr, &reg.user, &reg.password);
    let image = format!("{}/demo:v1", reg.addr);
    let (code, out, err) = run(&[&image, "--output", "json"], Some(&cfg), None);
    assert_eq!(code, 1, "{out}{err}");
    let v: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v[0]["reason"], "TLSError", "{out}");
    assert!(
        v[0]["message"].as_str().is_some_and(|m| m.contains("caBundle")),
        "{out}"
    );
    let ca = ca.to_string_lossy().into_owned();
    let (code, out, err) = run(&[&image, "--ca-file", &ca], Some(&cfg), None);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = run(&[&image, "--insecure-skip-verify"], Some(&cfg), None);
    assert_eq!(code, 0, "{out}{err}");
}

#[test]
fn a_rate_limited_registry_is_reported_as_such() {
    let f = crate::fakes::fakes();
    let host = f.base.trim_start_matches("http://");
    let (code, out, err) = run(&[&format!("{host}/library/nginx:1"), "--output", "json"], None, None);
    assert_eq!(code, 1, "{out}{err}");
    let v: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v[0]["reason"], "RateLimited", "{out}");
    assert!(v[0]["message"].as_str().is_some_and(|m| m.contains("30")), "{out}");
}

#[test]
fn bearer_token_registries_grant_per_repository() {
    let addr = support::token_registry();
    let dir = tempfile::tempdir().expect("tempdir");
    let puller = config(dir.path(), addr, "puller", "puller-pw");
    let reason = |args: &[&str], cfg: Option<&Path>| {
        let mut a = args.to_vec();
        a.extend(["--output", "json"]);
        let (code, out, err) = run(&a, cfg, None);
        let v: Value = serde_json::from_str(&out).unwrap_or_else(|_| panic!("{out}{err}"));
        (code, v[0]["reason"].as_str().unwrap_or("").to_owned(), out)
    };
    let demo = format!("{addr}/demo:v1");
    let private = format!("{addr}/private:v1");
    let (code, _, out) = reason(&[&demo], Some(&puller));
    assert_eq!(code, 0, "{out}");
    let (code, r, out) = reason(&[&private], Some(&puller));
    assert_eq!((code, r.as_str()), (1, "Denied"), "{out}");
    let wrong = config(dir.path(), addr, "puller", "nope");
    let (code, r, out) = reason(&[&demo], Some(&wrong));
    assert_eq!((code, r.as_str()), (1, "Unauthorized"), "{out}");
    let (code, r, out) = reason(&[&demo], None);
    assert_eq!((code, r.as_str()), (1, "Unauthorized"), "{out}");
}

#[tokio::test]
async fn image_indexes_are_checked_for_platforms() {
    let reg = support::registry();
    support::push_index(&reg.addr, &reg.user, &reg.password, "multi", "v1").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path(), &reg.addr, &reg.user, &reg.password);
    let image = format!("{}/multi:v1", reg.addr);
    let (code, out, err) = run(
        &[
            &image,
            "--platform",
            "linux/amd64",
            "--platform",
            "linux/arm64",
            "--output",
            "json",
        ],
        Some(&cfg),
        None,
    );
    assert_eq!(code, 0, "{out}{err}");
    let v: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v[0]["mediaType"], "application/vnd.oci.image.index.v1+json");
    assert_eq!(v[0]["platforms"], json!(["linux/amd64", "linux/arm64"]));
    let (code, out, _) = run(
        &[&image, "--platform", "linux/s390x", "--output", "json"],
        Some(&cfg),
        None,
    );
    assert_eq!(code, 1);
    let v: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v[0]["reason"], "PlatformMissing");
    assert!(
        v[0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("linux/s390x") && m.contains("linux/arm64")),
        "{out}"
    );
}

#[tokio::test]
async fn check_reads_a_kubernetes_pull_secret() {
    let reg = support::registry();
    let env = support::env();
    let client = support::client().await;
    let ns = support::namespace(&client, "check-secret", &[]).await;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", reg.user, reg.password));
    kube::Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), &ns)
        .create(
            &Default::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "pull"},
                "type": "kubernetes.io/dockerconfigjson",
                "stringData": {".dockerconfigjson": json!({"auths": {reg.addr.clone(): {"auth": auth}}}).to_string()}
            }))
            .expect("secret"),
        )
        .await
        .expect("create");
    let out = Command::new(env!("CARGO_BIN_EXE_pullkeeper"))
        .args([
            "check",
            &format!("{}/demo:v1", reg.addr),
            "--secret",
            &format!("{ns}/pull"),
        ])
        .env("KUBECONFIG", &env.kubeconfig)
        .output()
        .expect("check");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn one_client_remembers_authorization_but_never_across_passwords() {
    use pullkeeper::registry::{Login, Reference, RegistryClient, TlsOptions};
    let reg = support::registry();
    let client = RegistryClient::new(&TlsOptions::default()).expect("client");
    let good = Login {
        username: reg.user.clone(),
        password: secrecy::SecretString::from(reg.password.clone()),
    };
    let wrong = Login {
        username: reg.user.clone(),
        password: secrecy::SecretString::from("wrong".to_owned()),
    };
    let demo = Reference::parse(&format!("{}/demo:v1", reg.addr)).expect("ref");
    client.resolve(&demo, Some(&good), &[]).await.expect("first");
    let before = client.requests();
    client.resolve(&demo, Some(&good), &[]).await.expect("second");
    assert_eq!(
        client.requests() - before,
        1,
        "a repeated check should be a single HEAD"
    );
    let err = client
        .resolve(&demo, Some(&wrong), &[])
        .await
        .expect_err("wrong password");
    assert_eq!(err.reason(), "Unauthorized");
    client.resolve(&demo, Some(&good), &[]).await.expect("good again");
}
