//! Registry hosts and, later, the OCI distribution client used for pullability checks.

mod host;

pub use host::{HostError, RegistryHost};
