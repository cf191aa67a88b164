//! Which Events a status change deserves.

use crate::crd::RegistryCredentialStatus;
use crate::crd::conditions::{self, Status, types};

/// An Event worth emitting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    /// True for Warning, false for Normal.
    pub warning: bool,
    /// CamelCase reason.
    pub reason: String,
    /// Message.
    pub message: String,
}

/// Events for what changed: the `Ready` condition's status or reason, and each namespace
/// that newly failed. Never one per retry of the same state.
pub fn events(previous: Option<&RegistryCredentialStatus>, next: &RegistryCredentialStatus) -> Vec<Transition> {
    let mut out = Vec::new();
    let before = previous.and_then(|s| conditions::find(&s.conditions, types::READY));
    if let Some(after) = conditions::find(&next.conditions, types::READY) {
        let changed = before.is_none_or(|b| b.status != after.status || b.reason != after.reason);
        if changed {
            out.push(Transition {
                // Waiting for a provider is no failure: a Normal Event.
                warning: after.status == Status::False.as_str()
                    && after.reason != crate::crd::conditions::reasons::ISSUING,
                reason: after.reason.clone(),
                message: after.message.clone(),
            });
        }
    }
    let old: Vec<(&str, &str)> = previous
        .map(|p| {
            p.failures
                .iter()
                .map(|f| (f.namespace.as_str(), f.reason.as_str()))
                .collect()
        })
        .unwrap_or_default();
    for img in &next.images {
        let before = previous.and_then(|p| p.images.iter().find(|i| i.image == img.image));
        let changed = match before {
            None => !img.pullable,
            Some(b) => b.pullable != img.pullable || (!img.pullable && b.reason != img.reason),
        };
        if changed {
            out.push(Transition {
                warning: !img.pullable,
                reason: if img.pullable {
                    "ImagePullable".into()
                } else {
                    "ImageNotPullable".into()
                },
                message: if img.pullable {
                    format!("{} resolves again ({})", img.image, img.digest.as_deref().unwrap_or(""))
                } else {
                    format!("{}: {}: {}", img.image, img.reason, img.message)
                },
            });
        }
    }
    for f in &next.failures {
        if !old.contains(&(f.namespace.as_str(), f.reason.as_str())) {
            out.push(Transition {
                warning: true,
                reason: f.reason.clone(),
                message: f.message.clone(),
            });
        }
    }
    out
}
