//! Logging setup: `tracing` with text or JSON output, level from `PULLKEEPER_LOG`
//! (falling back to `RUST_LOG`, then `info`).

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Log output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log pipelines.
    Json,
}

/// Libraries that log requests and responses on the wire (headers, bodies) at debug or
/// trace: the AWS SDK (its answers carry tokens and session credentials), the HTTP
/// stacks, TLS. Whatever `PULLKEEPER_LOG` asks for, they log at `info` at most, so a
/// trace-level log never holds a secret.
pub const WIRE_CRATES: &[&str] = &[
    "aws_config",
    "aws_credential_types",
    "aws_runtime",
    "aws_sdk_ecr",
    "aws_sdk_sts",
    "aws_sdk_sso",
    "aws_sdk_ssooidc",
    "aws_sigv4",
    "aws_smithy_http",
    "aws_smithy_http_client",
    "aws_smithy_runtime",
    "aws_smithy_runtime_api",
    "aws_smithy_types",
    "h2",
    "hyper",
    "hyper_util",
    "reqwest",
    "rustls",
    "tower",
    "tower_http",
];

/// The filter from the environment (`PULLKEEPER_LOG`, else `RUST_LOG`, else `info`).
pub fn env_filter() -> EnvFilter {
    let spec = std::env::var("PULLKEEPER_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".to_owned());
    filter(&spec)
}

/// The filter for a `tracing` directive string, with [`WIRE_CRATES`] capped at `info`.
pub fn filter(spec: &str) -> EnvFilter {
    let capped = |spec: &str| {
        let mut directives: Vec<String> = spec
            .split(',')
            .map(str::trim)
            .filter(|d| !d.is_empty())
            // A user's own directive for a wire crate is dropped rather than trusted.
            .filter(|d| {
                let target = d.split(['=', '[']).next().unwrap_or("");
                !WIRE_CRATES
                    .iter()
                    .any(|c| target == *c || target.starts_with(&format!("{c}::")))
            })
            .map(str::to_owned)
            .collect();
        directives.extend(WIRE_CRATES.iter().map(|c| format!("{c}=info")));
        EnvFilter::try_new(directives.join(","))
    };
    capped(spec).unwrap_or_else(|e| {
        eprintln!("ignoring invalid log filter {spec:?}: {e}");
        capped("info").unwrap_or_else(|_| EnvFilter::new("info"))
    })
}

/// Installs the global subscriber.
pub fn init(format: LogFormat) {
    let registry = tracing_subscriber::registry().with(env_filter());
    match format {
        LogFormat::Text => registry.with(tracing_subscriber::fmt::layer()).init(),
        LogFormat::Json => registry
            .with(tracing_subscriber::fmt::layer().json().flatten_event(true))
            .init(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_crates_stay_at_info_whatever_is_asked() {
        for spec in [
            "trace",
            "debug",
            "trace,aws_smithy_runtime=trace",
            "info,hyper::proto=trace",
        ] {
            let text = filter(spec).to_string();
            assert!(text.contains("aws_smithy_runtime=info"), "{spec}: {text}");
            assert!(!text.contains("aws_smithy_runtime=trace"), "{spec}: {text}");
            assert!(!text.contains("hyper::proto=trace"), "{spec}: {text}");
        }
        assert!(filter("pullkeeper=trace").to_string().contains("pullkeeper=trace"));
    }

    #[test]
    fn an_invalid_filter_falls_back_to_info() {
        let text = filter("pullkeeper=loud").to_string();
        assert!(text.contains("info"), "{text}");
    }
}
