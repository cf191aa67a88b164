//! Registry helpers shared by `tests/` and `benches/` (included with `#[path]`): start and
//! stop the local registry of `hack/registry.sh`, and push blobs and manifests over the
//! Distribution API with Basic auth.

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Stdio};

fn registry_sh() -> Command {
    let mut cmd = Command::new("bash");
    cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("hack/registry.sh"));
    cmd
}

/// Stops the registry whose state lives in `dir`, if one runs.
pub fn stop(dir: &Path) {
    let _ = registry_sh().arg("stop").arg(dir).status();
}

/// Starts the registry of `dir` (`hack/registry.sh start DIR USER PASSWORD EXTRA...`, after
/// stopping any old instance, whose htpasswd may differ); its `host:port`.
pub fn start<S: AsRef<OsStr>>(dir: &Path, user: &str, password: &str, extra: &[S]) -> String {
    stop(dir);
    let out = registry_sh()
        .arg("start")
        .arg(dir)
        .args([user, password])
        .args(extra)
        .stderr(Stdio::inherit())
        .output()
        .expect("running hack/registry.sh");
    assert!(out.status.success(), "hack/registry.sh start failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .expect("address")
        .trim()
        .to_owned()
}

/// Lower-case hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

/// The OCI digest (`sha256:...`) of `data`.
pub fn digest(data: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(data))
}

/// Pushes to one plain-HTTP registry with Basic auth.
pub struct Pusher {
    http: reqwest::Client,
    base: String,
    auth: String,
}

impl Pusher {
    /// A pusher for `addr` (`host:port`) as `user`.
    pub fn basic(addr: &str, user: &str, password: &str) -> Self {
        use base64::Engine as _;
        Pusher {
            http: reqwest::Client::new(),
            base: format!("http://{addr}"),
            auth: format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
            ),
        }
    }

    /// Uploads `data` as a blob of `repo` (monolithic upload); its digest.
    pub async fn blob(&self, repo: &str, data: &[u8]) -> String {
        let digest = digest(data);
        let start = self
            .http
            .post(format!("{}/v2/{repo}/blobs/uploads/", self.base))
            .header("Authorization", &self.auth)
            .send()
            .await
            .expect("start upload");
        assert!(start.status().is_success(), "upload start: {}", start.status());
        let location = start.headers()["location"].to_str().expect("location").to_owned();
        let url = if location.starts_with("http") {
            location
        } else {
            format!("{}{location}", self.base)
        };
        let sep = if url.contains('?') { '&' } else { '?' };
        let put = self
            .http
            .put(format!("{url}{sep}digest={digest}"))
            .header("Authorization", &self.auth)
            .header("Content-Type", "application/octet-stream")
            .body(data.to_vec())
            .send()
            .await
            .expect("upload");
        assert!(put.status().is_success(), "upload: {}", put.status());
        digest
    }

    /// Puts `body` as manifest `repo:reference` of `media_type`; its digest.
    pub async fn manifest(&self, repo: &str, reference: &str, media_type: &str, body: &[u8]) -> String {
        let resp = self
            .http
            .put(format!("{}/v2/{repo}/manifests/{reference}", self.base))
            .header("Authorization", &self.auth)
            .header("Content-Type", media_type)
            .body(body.to_vec())
            .send()
            .await
            .expect("manifest");
        assert!(
            resp.status().is_success(),
            "manifest put: {} {}",
            resp.status(),
            resp.text().await.unwrap_or_default()
        );
        digest(body)
    }
}
