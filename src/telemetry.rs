//! Logging setup: `tracing` with text or JSON output, level from `PULLKEEPER_LOG`
//! (falling back to `RUST_LOG`, then `info`), and [`repeated`]: an error that recurs (a
//! provider outage, an apiserver outage) is logged once per interval with a count, not
//! once per attempt.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

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

/// Targets silenced whatever `PULLKEEPER_LOG` asks for: kube's HTTP trace layer logs one
/// ERROR line per failed API request (thousands during an apiserver outage); the
/// operator's client logs those failures itself, once per [`REPEAT_INTERVAL`] with a
/// count (`operator::client`).
pub const SILENCED: &[&str] = &["kube_client::client::builder"];

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
        directives.extend(SILENCED.iter().map(|c| format!("{c}=off")));
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

/// How often one kind of error on one object is logged at most.
pub const REPEAT_INTERVAL: Duration = Duration::from_secs(60);

/// Remembers when each key was last logged and how many repeats were held back since.
#[derive(Debug)]
pub struct Repeats {
    interval: Duration,
    seen: Mutex<HashMap<String, Seen>>,
}

#[derive(Debug, Clone, Copy)]
struct Seen {
    logged_at: Instant,
    held_back: u64,
}

/// Keys kept before forgetting those not seen for an interval.
const MAX_KEYS: usize = 4096;

impl Repeats {
    /// Logs each key at most once per `interval`.
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            seen: Mutex::default(),
        }
    }

    /// Whether an occurrence of `key` at `now` is to be logged: `Some(n)` with the `n`
    /// occurrences held back since the last logged one, `None` to hold this one back.
    pub fn admit(&self, key: &str, now: Instant) -> Option<u64> {
        let mut seen = crate::lock(&self.seen);
        if let Some(s) = seen.get_mut(key) {
            if now.saturating_duration_since(s.logged_at) < self.interval {
                s.held_back += 1;
                return None;
            }
            let held_back = s.held_back;
            *s = Seen {
                logged_at: now,
                held_back: 0,
            };
            return Some(held_back);
        }
        if seen.len() >= MAX_KEYS {
            let interval = self.interval;
            seen.retain(|_, s| now.saturating_duration_since(s.logged_at) < interval);
        }
        seen.insert(
            key.to_owned(),
            Seen {
                logged_at: now,
                held_back: 0,
            },
        );
        Some(0)
    }

    /// Forgets `key` (the error went away): its next occurrence is logged at once.
    pub fn clear(&self, key: &str) {
        crate::lock(&self.seen).remove(key);
    }
}

/// `warn!` an error of `site` about `object` at most once per [`REPEAT_INTERVAL`], with a
/// `repeats` field counting the occurrences held back since (those go to `debug!`).
#[macro_export]
macro_rules! warn_repeated {
    ($site:expr, $object:expr, $($arg:tt)+) => {
        match $crate::telemetry::repeated($site, $object) {
            Some(repeats) => ::tracing::warn!(repeats, $($arg)+),
            None => ::tracing::debug!($($arg)+),
        }
    };
}

static REPEATS: LazyLock<Repeats> = LazyLock::new(|| Repeats::new(REPEAT_INTERVAL));

/// Whether to log an error of `site` (a fixed name of where it happened) about `object`
/// now: `Some(repeats held back since the last line)`, or `None` within
/// [`REPEAT_INTERVAL`] of the last line for the same site and object. Callers log the
/// held-back ones at debug.
pub fn repeated(site: &str, object: &str) -> Option<u64> {
    REPEATS.admit(&format!("{site}\u{1f}{object}"), Instant::now())
}

/// The error of `site` about `object` is over: the next one is logged at once.
pub fn resolved(site: &str, object: &str) {
    REPEATS.clear(&format!("{site}\u{1f}{object}"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_error_is_logged_once_per_interval_with_a_count() {
        let r = Repeats::new(Duration::from_secs(60));
        let t0 = Instant::now();
        assert_eq!(r.admit("provider/a", t0), Some(0));
        // 119 more attempts in the next two minutes (one a second): one line a minute.
        let mut lines = vec![];
        for s in 1..120 {
            if let Some(n) = r.admit("provider/a", t0 + Duration::from_secs(s)) {
                lines.push((s, n));
            }
        }
        assert_eq!(lines, vec![(60, 59)], "{lines:?}");
        // Another object, or another site, has its own line.
        assert_eq!(r.admit("provider/b", t0 + Duration::from_secs(1)), Some(0));
        assert_eq!(r.admit("watch/a", t0 + Duration::from_secs(1)), Some(0));
        // Once resolved, the next failure is logged at once.
        r.clear("provider/a");
        assert_eq!(r.admit("provider/a", t0 + Duration::from_secs(121)), Some(0));
    }

    #[test]
    fn old_keys_are_forgotten_when_many() {
        let r = Repeats::new(Duration::from_secs(60));
        let t0 = Instant::now();
        for i in 0..MAX_KEYS {
            r.admit(&format!("k{i}"), t0);
        }
        assert_eq!(r.admit("new", t0 + Duration::from_secs(61)), Some(0));
        assert!(crate::lock(&r.seen).len() < 10, "stale keys were kept");
    }

    #[test]
    fn kube_request_errors_are_silenced_whatever_is_asked() {
        let text = filter("trace").to_string();
        assert!(text.contains("kube_client::client::builder=off"), "{text}");
    }

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
