//! Status and messages bounded whatever the input.

use crate::crd::RegistryCredentialStatus;

/// The largest status pullkeeper writes, whatever the input: etcd and every watcher of
/// the credential pay for each byte on every change.
pub const MAX_STATUS_BYTES: usize = 16 * 1024;
/// Longest condition message.
const MAX_CONDITION_MESSAGE: usize = 1024;
/// Longest message of one namespace failure or image.
const MAX_ITEM_MESSAGE: usize = 300;
/// Longest image reference shown.
const MAX_IMAGE: usize = 256;

/// `text` cut to at most `max` characters, with `…` where it was cut.
fn truncate(text: &mut String, max: usize) {
    if let Some((at, _)) = text.char_indices().nth(max.saturating_sub(1))
        && text.chars().count() > max
    {
        text.truncate(at);
        text.push('…');
    }
}

/// Keeps a status under [`MAX_STATUS_BYTES`]: long messages are cut, and while it is still
/// too large, listed images (those that resolve first) and namespace failures are
/// dropped from the end. The counts in `namespaces` and the conditions' messages still
/// say how many there are.
pub fn bounded(mut status: RegistryCredentialStatus) -> RegistryCredentialStatus {
    for c in &mut status.conditions {
        truncate(&mut c.message, MAX_CONDITION_MESSAGE);
    }
    for f in &mut status.failures {
        truncate(&mut f.message, MAX_ITEM_MESSAGE);
    }
    for i in &mut status.images {
        truncate(&mut i.message, MAX_ITEM_MESSAGE);
        truncate(&mut i.image, MAX_IMAGE);
    }
    let size = |s: &RegistryCredentialStatus| serde_json::to_vec(s).map_or(0, |v| v.len());
    while size(&status) > MAX_STATUS_BYTES {
        if let Some(pos) = status.images.iter().rposition(|i| i.pullable) {
            status.images.remove(pos);
        } else if status.images.len() > status.failures.len() {
            status.images.pop();
        } else if status.failures.pop().is_none() {
            break;
        }
    }
    status
}
