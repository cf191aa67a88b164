//! Pullability benchmark against a real local registry (CNCF distribution, htpasswd).
//!
//!     cargo bench --bench verify -- [--images 200]
//!
//! Pushes N images over the Distribution API (three quarters single-platform manifests,
//! one quarter two-platform indexes), then resolves them all by tag or digest, with the
//! platform check for the indexes, the way the operator does (4 at a time) and one after
//! another. Prints images/second and requests per image as a Markdown table.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures::StreamExt;
use pullkeeper::registry::{Login, Reference, RegistryClient, TlsOptions};
use secrecy::SecretString;
use serde_json::json;

#[path = "../tests/common/registry.rs"]
mod registry;

use registry::{Pusher, digest as sha};

const USER: &str = "bench";
const PASSWORD: &str = "bench-password";

fn json_bytes(v: &serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(v).expect("json")
}

async fn push(addr: &str, n: usize) -> Vec<(String, Vec<String>)> {
    let p = Pusher::basic(addr, USER, PASSWORD);
    let repo = "bench/app";
    let layer = b"not really a tarball, but a blob is a blob";
    let layer_d = p.blob(repo, layer).await;
    let mut platform_manifests = Vec::new();
    for arch in ["amd64", "arm64"] {
        let config = serde_json::to_vec(
            &json!({"architecture": arch, "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}),
        )
        .expect("config");
        let config_d = p.blob(repo, &config).await;
        platform_manifests.push((arch, config_d, config.len()));
    }
    let manifest = |config: &(&str, String, usize), i: usize| {
        json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config.1, "size": config.2},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_d, "size": layer.len()}],
            "annotations": {"n": i.to_string()}
        })
    };
    let mut refs = Vec::new();
    let singles = n * 3 / 4;
    for i in 0..singles {
        let tag = format!("v{i}");
        let d = p
            .manifest(
                repo,
                &tag,
                "application/vnd.oci.image.manifest.v1+json",
                &json_bytes(&manifest(&platform_manifests[0], i)),
            )
            .await;
        // Half by tag, half by digest.
        let r = if i % 2 == 0 {
            format!("{addr}/{repo}:{tag}")
        } else {
            format!("{addr}/{repo}@{d}")
        };
        refs.push((r, vec![]));
    }
    for i in singles..n {
        let mut entries = Vec::new();
        for (k, pm) in platform_manifests.iter().enumerate() {
            let m = manifest(pm, i * 10 + k);
            let size = serde_json::to_vec(&m).expect("json").len();
            let d = p
                .manifest(
                    repo,
                    &sha(&json_bytes(&m)),
                    "application/vnd.oci.image.manifest.v1+json",
                    &json_bytes(&m),
                )
                .await;
            entries.push(json!({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": d, "size": size, "platform": {"os": "linux", "architecture": pm.0}}));
        }
        let tag = format!("multi{i}");
        let index =
            json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": entries});
        p.manifest(
            repo,
            &tag,
            "application/vnd.oci.image.index.v1+json",
            &json_bytes(&index),
        )
        .await;
        refs.push((
            format!("{addr}/{repo}:{tag}"),
            vec!["linux/amd64".to_owned(), "linux/arm64".to_owned()],
        ));
    }
    refs
}

async fn run(refs: &[(String, Vec<String>)], parallel: usize) -> (Duration, u64, usize) {
    let client = RegistryClient::new(&TlsOptions::default()).expect("client");
    let login = Login {
        username: USER.to_owned(),
        password: SecretString::from(PASSWORD),
    };
    let t = Instant::now();
    let ok: Vec<bool> = futures::stream::iter(refs.iter())
        .map(|(r, platforms)| {
            let (client, login) = (&client, &login);
            async move {
                let reference = Reference::parse(r).expect("reference");
                client.resolve(&reference, Some(login), platforms).await.is_ok()
            }
        })
        .buffer_unordered(parallel)
        .collect()
        .await;
    (t.elapsed(), client.requests(), ok.iter().filter(|x| **x).count())
}

#[tokio::main]
async fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("verify benchmark: run it with `cargo bench --bench verify`");
        return;
    }
    pullkeeper::install_crypto_provider();
    let argv: Vec<String> = std::env::args().collect();
    let n: usize = argv
        .iter()
        .position(|a| a == "--images")
        .and_then(|i| argv.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = root.join("target/bench/registry");
    registry::stop(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    let addr = registry::start::<&str>(&dir, USER, PASSWORD, &[]);
    eprintln!("pushing {n} images to {addr}");
    let refs = push(&addr, n).await;
    // Warm-up, then measure.
    let _ = run(&refs[..refs.len().min(10)], 4).await;
    let (seq_t, seq_req, seq_ok) = run(&refs, 1).await;
    let (par_t, par_req, par_ok) = run(&refs, 4).await;
    registry::stop(&dir);
    println!();
    println!("| mode | images | pullable | time | images/s | requests per image |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (mode, t, req, ok) in [
        ("one after another", seq_t, seq_req, seq_ok),
        ("operator (4 at a time)", par_t, par_req, par_ok),
    ] {
        println!(
            "| {mode} | {n} | {ok} | {:.2} s | {:.0} | {:.2} |",
            t.as_secs_f64(),
            n as f64 / t.as_secs_f64(),
            req as f64 / n as f64
        );
    }
}
