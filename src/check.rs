//! `pullkeeper check`: resolve images from the command line with a docker config (with
//! credential helpers, as docker does), a Kubernetes pull Secret, or anonymously.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use secrecy::SecretString;
use serde::{Deserialize, Serialize};

use crate::provider::entry_for;
use crate::registry::{HostError, Login, PullError, Reference, RegistryClient, RegistryHost, Resolved};

/// Why no login could be found for a registry.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The registry part of the image is not a host.
    #[error(transparent)]
    Host(#[from] HostError),
    /// The docker config could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A credential helper could not be run.
    #[error("running {program}: {source}")]
    Spawn {
        /// `docker-credential-<name>`.
        program: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A credential helper failed.
    #[error("{program} get failed: {stderr}")]
    Helper {
        /// `docker-credential-<name>`.
        program: String,
        /// What it printed on stderr, bounded.
        stderr: String,
    },
    /// A credential helper answered something else than credentials.
    #[error("{program} did not answer with credentials JSON")]
    HelperAnswer {
        /// `docker-credential-<name>`.
        program: String,
    },
}

impl CheckError {
    /// The reason printed for the image.
    pub fn reason(&self) -> &'static str {
        "CredentialError"
    }
}

/// Where logins come from.
pub enum Logins {
    /// No credentials.
    Anonymous,
    /// A docker `config.json` document.
    DockerConfig(Vec<u8>),
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct ConfigFile {
    #[serde(default)]
    cred_helpers: BTreeMap<String, String>,
    #[serde(default)]
    creds_store: Option<String>,
}

#[derive(Deserialize)]
struct HelperAnswer {
    #[serde(rename = "Username")]
    username: String,
    #[serde(rename = "Secret")]
    secret: SecretString,
}

impl Logins {
    /// The login for `registry`, if any: an `auths` entry, else the registry's credential
    /// helper, else the default credential store.
    pub fn for_registry(&self, registry: &str) -> Result<Option<Login>, CheckError> {
        let Logins::DockerConfig(doc) = self else {
            return Ok(None);
        };
        let host = RegistryHost::parse(registry)?;
        if let Ok(c) = entry_for(doc, &host) {
            return Ok(Some(Login {
                username: c.username,
                password: c.password,
            }));
        }
        let cfg: ConfigFile = serde_json::from_slice(doc).unwrap_or_default();
        let server = host.auth_key();
        let helper = cfg
            .cred_helpers
            .iter()
            .find(|(k, _)| {
                RegistryHost::parse(k.trim_start_matches("https://").trim_end_matches('/'))
                    .is_ok_and(|h| h.same_registry(&host))
            })
            .map(|(_, v)| v.clone())
            .or(cfg.creds_store);
        match helper {
            Some(h) => run_helper(&h, &server).map(Some),
            None => Ok(None),
        }
    }
}

fn run_helper(helper: &str, server: &str) -> Result<Login, CheckError> {
    let program = format!("docker-credential-{helper}");
    let spawn = |source| CheckError::Spawn {
        program: program.clone(),
        source,
    };
    let mut child = Command::new(&program)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(server.as_bytes()).map_err(spawn)?;
    }
    let out = child.wait_with_output().map_err(spawn)?;
    if !out.status.success() {
        return Err(CheckError::Helper {
            stderr: crate::registry::untrusted::sanitize(&String::from_utf8_lossy(&out.stderr)),
            program,
        });
    }
    let a: HelperAnswer = serde_json::from_slice(&out.stdout).map_err(|_| CheckError::HelperAnswer {
        program: program.clone(),
    })?;
    Ok(Login {
        username: a.username,
        password: a.secret,
    })
}

/// Reads a docker config file.
pub fn read_docker_config(path: &Path) -> Result<Logins, CheckError> {
    std::fs::read(path)
        .map(Logins::DockerConfig)
        .map_err(|source| CheckError::Read {
            path: path.display().to_string(),
            source,
        })
}

/// One image's result, as printed.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// The image as given.
    pub image: String,
    /// Whether it would pull.
    pub pullable: bool,
    /// What it resolved to.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub resolved: Option<Resolved>,
    /// Failure reason (API.md constants).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// What went wrong and what to do.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Resolves every image; never fails as a whole.
pub async fn check(client: &RegistryClient, logins: &Logins, images: &[String], platforms: &[String]) -> Vec<Report> {
    let mut out = Vec::new();
    for image in images {
        let result = async {
            let r = Reference::parse(image).map_err(|e| ("InvalidReference".to_owned(), e.to_string()))?;
            let login = logins
                .for_registry(&r.registry)
                .map_err(|e| (e.reason().to_owned(), e.to_string()))?;
            client
                .resolve(&r, login.as_ref(), platforms)
                .await
                .map_err(|e: PullError| (e.reason().to_owned(), e.to_string()))
        }
        .await;
        out.push(match result {
            Ok(resolved) => Report {
                image: image.clone(),
                pullable: true,
                resolved: Some(resolved),
                reason: None,
                message: None,
            },
            Err((reason, message)) => Report {
                image: image.clone(),
                pullable: false,
                resolved: None,
                reason: Some(reason),
                message: Some(message),
            },
        });
    }
    out
}

/// Human-readable lines.
pub fn render_text(reports: &[Report]) -> String {
    let mut s = String::new();
    for r in reports {
        match (&r.resolved, &r.reason) {
            (Some(res), _) => {
                s.push_str(&format!(
                    "OK    {}\n      digest {}\n      type   {}\n",
                    r.image, res.digest, res.media_type
                ));
                if let Some(size) = res.size {
                    s.push_str(&format!("      size   {size} bytes\n"));
                }
                if !res.platforms.is_empty() {
                    s.push_str(&format!("      platforms {}\n", res.platforms.join(", ")));
                }
            }
            (None, reason) => s.push_str(&format!(
                "FAIL  {}\n      {}: {}\n",
                r.image,
                reason.as_deref().unwrap_or(""),
                r.message.as_deref().unwrap_or("")
            )),
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_helper_is_a_credential_error_naming_it() {
        let logins = Logins::DockerConfig(br#"{"credsStore":"pullkeeper-test-none"}"#.to_vec());
        let Err(e) = logins.for_registry("ghcr.io") else {
            panic!("a helper that does not exist gave a login");
        };
        assert_eq!(e.reason(), "CredentialError");
        assert!(e.to_string().contains("docker-credential-pullkeeper-test-none"), "{e}");
        assert!(matches!(Logins::Anonymous.for_registry("ghcr.io"), Ok(None)));
    }
}
