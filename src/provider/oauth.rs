//! Shared HTTP plumbing for the OAuth2-style providers (GCP, ACR): one client with
//! timeouts and proxy support, and error classification by HTTP status.

use std::time::Duration;

use serde::de::DeserializeOwned;

use super::{CloudFailure, ProviderError};

/// An HTTP client with sane timeouts; honours `HTTPS_PROXY`/`NO_PROXY`.
pub fn http_client() -> reqwest::Client {
    crate::install_crypto_provider();
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(15))
        .user_agent(concat!("pullkeeper/", env!("CARGO_PKG_VERSION")))
        .build()
        .unwrap_or_else(|_| reqwest::Client::new())
}

/// Largest answer read from a token or metadata endpoint (they are a few KiB); an
/// endpoint override can name any server, so the body is capped while streaming.
pub const BODY_CAP: usize = crate::registry::untrusted::SMALL_BODY_CAP;

/// Sends a request and decodes a JSON answer, classifying failures. Error bodies are
/// summarised by their OAuth2 `error`/`error_description` fields only.
pub async fn json<T: DeserializeOwned>(
    provider: &'static str,
    what: &str,
    req: reqwest::RequestBuilder,
) -> Result<T, ProviderError> {
    let fail = |failure, message: String| ProviderError::Cloud {
        provider,
        failure,
        message,
    };
    let resp = req.send().await.map_err(|e| {
        let failure = if e.is_connect() || e.is_timeout() {
            CloudFailure::Unreachable
        } else {
            CloudFailure::Other
        };
        fail(failure, format!("{what}: {}", without_url_query(&e)))
    })?;
    let status = resp.status();
    if !status.is_success() {
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| super::retry_after(v, k8s_openapi::jiff::Timestamp::now()));
        // Too big or not JSON: classified by status alone.
        let body: serde_json::Value = crate::registry::untrusted::read_capped(resp, BODY_CAP)
            .await
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let code = body["error"].as_str().unwrap_or("");
        let desc = body["error_description"]
            .as_str()
            .or_else(|| body["error"]["message"].as_str())
            .unwrap_or("");
        let failure = match status.as_u16() {
            401 => CloudFailure::Unauthorized,
            400 if matches!(code, "invalid_grant" | "invalid_client" | "unauthorized_client") => {
                CloudFailure::Unauthorized
            }
            403 => CloudFailure::Denied,
            429 => CloudFailure::Throttled { retry_after },
            // Unavailable for a time the server named: honoured like throttling.
            503 if retry_after.is_some() => CloudFailure::Throttled { retry_after },
            500..=599 => CloudFailure::Unreachable,
            _ => CloudFailure::Other,
        };
        let detail = [code, desc]
            .iter()
            .filter(|s| !s.is_empty())
            .cloned()
            .collect::<Vec<_>>()
            .join(": ");
        return Err(fail(
            failure,
            format!("{what}: HTTP {status} {detail}").trim().to_owned(),
        ));
    }
    let body = crate::registry::untrusted::read_capped(resp, BODY_CAP)
        .await
        .map_err(|e| match e {
            crate::registry::untrusted::BodyError::TooLarge { .. } => {
                fail(CloudFailure::Other, format!("{what}: the answer is {e}"))
            }
            crate::registry::untrusted::BodyError::Read(e) => {
                fail(CloudFailure::Unreachable, format!("{what}: {}", without_url_query(&e)))
            }
        })?;
    serde_json::from_slice::<T>(&body).map_err(|_| {
        fail(
            CloudFailure::Other,
            format!("{what}: the answer is not the expected JSON"),
        )
    })
}

fn without_url_query(e: &reqwest::Error) -> String {
    // reqwest errors print the URL; a query string could carry a token, so drop it.
    let text = e.to_string();
    match e.url() {
        Some(u) if u.query().is_some() => {
            let mut clean = u.clone();
            clean.set_query(None);
            text.replace(u.as_str(), clean.as_str())
        }
        _ => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Serves `status` with a 1 GiB body generated while sent.
    async fn endless(status: u16) -> String {
        static CHUNK: [u8; 64 * 1024] = [b' '; 64 * 1024];
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let app = axum::Router::new().fallback(move || async move {
            let chunks = (1u64 << 30) / CHUNK.len() as u64;
            let body = axum::body::Body::from_stream(futures::stream::iter(
                (0..chunks).map(|_| Ok::<_, std::convert::Infallible>(axum::body::Bytes::from_static(&CHUNK))),
            ));
            (axum::http::StatusCode::from_u16(status).expect("status"), body)
        });
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        format!("http://{addr}/token")
    }

    #[tokio::test]
    async fn a_retry_after_is_read_from_429_and_503() {
        for (status, failure) in [
            (
                429,
                CloudFailure::Throttled {
                    retry_after: Some(Duration::from_secs(30)),
                },
            ),
            (
                503,
                CloudFailure::Throttled {
                    retry_after: Some(Duration::from_secs(30)),
                },
            ),
        ] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("addr");
            let app = axum::Router::new().fallback(move || async move {
                (
                    axum::http::StatusCode::from_u16(status).expect("status"),
                    [("Retry-After", "30")],
                    "slow down",
                )
            });
            tokio::spawn(async move {
                let _ = axum::serve(listener, app).await;
            });
            let e = json::<serde_json::Value>("gcp", "token endpoint", http_client().get(format!("http://{addr}/t")))
                .await
                .expect_err("throttled");
            match e {
                ProviderError::Cloud { failure: f, .. } => assert_eq!(f, failure, "{status}"),
                other => panic!("{other}"),
            }
        }
    }

    #[tokio::test]
    async fn gigabyte_answers_are_refused_at_the_cap() {
        let url = endless(200).await;
        let e = json::<serde_json::Value>("gcp", "token endpoint", http_client().get(&url))
            .await
            .expect_err("1 GiB answer");
        assert!(e.to_string().contains("larger than 1 MiB"), "{e}");

        let url = endless(403).await;
        let e = json::<serde_json::Value>("gcp", "token endpoint", http_client().get(&url))
            .await
            .expect_err("1 GiB error");
        assert!(matches!(
            e,
            ProviderError::Cloud {
                failure: CloudFailure::Denied,
                ..
            }
        ));
    }
}
