//! Registry hosts and the OCI distribution client used for pullability checks, with the
//! limits that keep a hostile registry from hurting the operator.

pub mod challenge;
mod client;
mod host;
mod policy;
mod reference;
pub mod untrusted;

pub(crate) use client::login_key;
pub use client::{ClientError, Login, PullError, RegistryClient, Resolved, TlsOptions, check_platforms};
pub use host::{HostError, RegistryHost};
pub use policy::{AddressPolicy, AddressRefused, Cidr, CidrError, CidrList, Insecure, parse_cidrs};
pub use reference::{Reference, ReferenceError};
