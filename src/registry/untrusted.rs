//! What a remote server chose: bodies read with a size cap while streaming (a registry
//! named in a spec must not be able to make the operator buffer gigabytes), and text
//! bounded and cleaned before it reaches status, Events or logs.

/// Largest manifest (or image config) read: real ones are a few KiB, big indexes ~100 KiB.
pub const MANIFEST_CAP: usize = 4 * 1024 * 1024;
/// Largest token-endpoint or error body read.
pub const SMALL_BODY_CAP: usize = 1024 * 1024;
/// Longest piece of server-chosen text kept, in characters.
pub const REMOTE_TEXT_MAX: usize = 200;

/// Why a body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// More than the cap (announced by Content-Length, or seen while streaming).
    #[error("larger than {}", human(*limit))]
    TooLarge {
        /// The cap in bytes.
        limit: usize,
    },
    /// The transfer failed.
    #[error("reading the body: {0}")]
    Read(#[source] reqwest::Error),
}

/// Bytes gathered up to a cap: the pure part of [`read_capped`].
#[derive(Debug)]
pub struct Capped {
    buf: Vec<u8>,
    limit: usize,
}

impl Capped {
    /// An empty buffer that refuses to grow past `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self { buf: Vec::new(), limit }
    }

    /// Refuses a body whose announced length is already over the cap, before reading it.
    pub fn announce(&self, content_length: Option<u64>) -> Result<(), BodyError> {
        match content_length {
            Some(n) if n > self.limit as u64 => Err(BodyError::TooLarge { limit: self.limit }),
            _ => Ok(()),
        }
    }

    /// Appends a chunk, or refuses it (keeping nothing more) if the total would pass the cap.
    pub fn push(&mut self, chunk: &[u8]) -> Result<(), BodyError> {
        if chunk.len() > self.limit - self.buf.len() {
            return Err(BodyError::TooLarge { limit: self.limit });
        }
        self.buf.extend_from_slice(chunk);
        Ok(())
    }

    /// The bytes read.
    pub fn into_inner(self) -> Vec<u8> {
        self.buf
    }
}

/// Reads a response body chunk by chunk, never holding more than `limit` bytes; dropping
/// the response on refusal closes the connection, so the rest is never transferred.
pub async fn read_capped(mut resp: reqwest::Response, limit: usize) -> Result<Vec<u8>, BodyError> {
    let mut body = Capped::new(limit);
    body.announce(resp.content_length())?;
    while let Some(chunk) = resp.chunk().await.map_err(BodyError::Read)? {
        body.push(&chunk)?;
    }
    Ok(body.into_inner())
}

/// `4 MiB`, `1 MiB`, `512 KiB`, `100 bytes`.
pub fn human(bytes: usize) -> String {
    const KIB: usize = 1024;
    const MIB: usize = 1024 * 1024;
    if bytes >= MIB && bytes.is_multiple_of(MIB) {
        format!("{} MiB", bytes / MIB)
    } else if bytes >= KIB && bytes.is_multiple_of(KIB) {
        format!("{} KiB", bytes / KIB)
    } else {
        format!("{bytes} bytes")
    }
}

/// Server-chosen text made safe to show: control characters (newlines included) and
/// invisible bidirectional/zero-width characters become spaces, runs of spaces collapse,
/// and anything past [`REMOTE_TEXT_MAX`] characters is cut with an ellipsis.
pub fn sanitize(text: &str) -> String {
    bounded(text, REMOTE_TEXT_MAX)
}

/// [`sanitize`] with another length.
pub fn bounded(text: &str, max: usize) -> String {
    let mut out = String::new();
    let mut kept = 0;
    let mut pending_space = false;
    for c in text.chars() {
        if c.is_control() || c.is_whitespace() || invisible(c) {
            pending_space = kept > 0;
            continue;
        }
        if kept + usize::from(pending_space) >= max {
            out.push('…');
            return out;
        }
        if pending_space {
            out.push(' ');
            kept += 1;
            pending_space = false;
        }
        out.push(c);
        kept += 1;
    }
    out
}

/// Characters that change how surrounding text displays without showing themselves.
fn invisible(c: char) -> bool {
    matches!(c, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2069}' | '\u{FEFF}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_at_the_cap_is_kept_and_one_byte_more_is_refused() {
        let mut b = Capped::new(10);
        b.push(b"12345").expect("half");
        b.push(b"67890").expect("exactly the cap");
        assert!(matches!(b.push(b"x"), Err(BodyError::TooLarge { limit: 10 })));
        assert_eq!(b.into_inner(), b"1234567890", "the refused chunk is not kept");
        let mut b = Capped::new(10);
        assert!(b.push(&[0; 11]).is_err(), "one big chunk");
    }

    #[test]
    fn an_announced_length_over_the_cap_is_refused_before_reading() {
        let b = Capped::new(4 * 1024 * 1024);
        assert!(b.announce(None).is_ok());
        assert!(b.announce(Some(4 * 1024 * 1024)).is_ok());
        let e = b.announce(Some(3 << 30)).expect_err("3 GiB");
        assert_eq!(e.to_string(), "larger than 4 MiB");
    }

    #[test]
    fn sizes_read_like_people_write_them() {
        assert_eq!(human(MANIFEST_CAP), "4 MiB");
        assert_eq!(human(SMALL_BODY_CAP), "1 MiB");
        assert_eq!(human(512 * 1024), "512 KiB");
        assert_eq!(human(100), "100 bytes");
    }

    #[test]
    fn control_characters_and_newlines_become_single_spaces() {
        assert_eq!(
            sanitize("DENIED\r\n\tfake: log line\x1b[31m"),
            "DENIED fake: log line [31m"
        );
        assert_eq!(sanitize("  a \u{202E}b\u{200B}c  "), "a b c");
        assert_eq!(sanitize(""), "");
    }

    #[test]
    fn long_text_is_cut_with_an_ellipsis() {
        let long = "x".repeat(10_000);
        let s = sanitize(&long);
        assert_eq!(s.chars().count(), REMOTE_TEXT_MAX + 1);
        assert!(s.ends_with('…'));
        assert_eq!(sanitize(&"y".repeat(REMOTE_TEXT_MAX)), "y".repeat(REMOTE_TEXT_MAX));
        // Multi-byte characters are counted, never split.
        assert_eq!(bounded("ééééé", 3), "ééé…");
    }
}
