//! Masks a secret in a byte stream, even when it straddles chunk boundaries, without delaying
//! anything that cannot be the start of the secret.

use bytes::{Bytes, BytesMut};

/// Replaces every occurrence of `secret` with as many `*`, so lengths (and `content-length`)
/// stay valid. Only a chunk's tail that could begin the secret is held back until the next
/// chunk; SSE events end in `\n`, which never does, so streaming is not delayed.
#[derive(Debug)]
pub(super) struct Redactor {
    secret: Box<[u8]>,
    held: BytesMut,
}

impl Redactor {
    pub(super) fn new(secret: &[u8]) -> Self {
        Redactor { secret: secret.into(), held: BytesMut::new() }
    }

    /// Takes the next chunk, returns what can be sent now.
    pub(super) fn push(&mut self, chunk: Bytes) -> Bytes {
        let n = self.secret.len();
        if n == 0 {
            return chunk;
        }
        if self.held.is_empty() && !chunk.contains(&self.secret[0]) {
            return chunk; // fast path: nothing here can be or begin the secret
        }
        let mut buf = std::mem::take(&mut self.held);
        buf.extend_from_slice(&chunk);
        let mut i = 0;
        while i + n <= buf.len() {
            if buf[i..i + n] == self.secret[..] {
                buf[i..i + n].fill(b'*');
                i += n;
            } else {
                i += 1;
            }
        }
        // Hold back the longest tail that is a proper prefix of the secret.
        let keep =
            (1..n.min(buf.len() + 1)).rev().find(|&k| buf[buf.len() - k..] == self.secret[..k]).unwrap_or(0);
        self.held = buf.split_off(buf.len() - keep);
        buf.freeze()
    }

    /// The stream ended: whatever was held back was not the secret after all.
    pub(super) fn finish(&mut self) -> Bytes {
        std::mem::take(&mut self.held).freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(secret: &str, chunks: &[&str]) -> String {
        let mut r = Redactor::new(secret.as_bytes());
        let mut out = Vec::new();
        for c in chunks {
            out.extend_from_slice(&r.push(Bytes::copy_from_slice(c.as_bytes())));
        }
        out.extend_from_slice(&r.finish());
        String::from_utf8(out).unwrap_or_default()
    }

    #[test]
    fn masks_across_every_split() {
        let text = "key=sk-secret-1 and sk-secret-1, not sk-secr";
        let want = "key=*********** and ***********, not sk-secr";
        for a in 0..=text.len() {
            for b in a..=text.len() {
                assert_eq!(run("sk-secret-1", &[&text[..a], &text[a..b], &text[b..]]), want, "{a} {b}");
            }
        }
    }

    #[test]
    fn does_not_hold_back_an_event_end() {
        let mut r = Redactor::new(b"sk-1");
        assert_eq!(&r.push(Bytes::from_static(b"data: {}\n\n"))[..], b"data: {}\n\n");
        assert_eq!(&r.push(Bytes::from_static(b"data: s"))[..], b"data: ");
        assert_eq!(&r.push(Bytes::from_static(b"o\n\n"))[..], b"so\n\n");
    }
}
