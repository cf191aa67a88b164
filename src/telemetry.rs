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

/// The filter from the environment.
pub fn env_filter() -> EnvFilter {
    let spec = std::env::var("PULLKEEPER_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".to_owned());
    EnvFilter::try_new(&spec).unwrap_or_else(|e| {
        eprintln!("ignoring invalid log filter {spec:?}: {e}");
        EnvFilter::new("info")
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
