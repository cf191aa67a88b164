//! Registry hosts and, later, the OCI distribution client used for pullability checks.

pub mod challenge;
mod host;
mod reference;

pub use host::{HostError, RegistryHost};
pub use reference::{Reference, ReferenceError};
