//! Registry hosts and, later, the OCI distribution client used for pullability checks.

pub mod challenge;
mod client;
mod host;
mod reference;

pub use client::{Login, PullError, RegistryClient, Resolved, TlsOptions};
pub use host::{HostError, RegistryHost};
pub use reference::{Reference, ReferenceError};
