//! The content digest that names every blob.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest as _, Sha256};

use crate::BlobError;

/// The only algorithm Drover uses, as written before the colon.
const PREFIX: &str = "sha256:";
/// Number of hex digits in a sha256 digest.
const HEX_LEN: usize = 64;
/// Inputs longer than this are cut in error messages, so a hostile value cannot flood logs.
const MAX_ECHO: usize = 80;

/// A sha256 content digest, displayed as `sha256:<64 lowercase hex>`.
///
/// Parsing is strict: only `sha256:` followed by exactly 64 lowercase hex digits is accepted, so
/// a parsed digest is always safe to use as a file name or object key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest([u8; 32]);

impl Digest {
    /// Wraps raw sha256 output.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Digest(bytes)
    }

    /// The digest of `data`.
    pub fn of(data: &[u8]) -> Self {
        Digest(Sha256::digest(data).into())
    }

    /// The raw 32 digest bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The 64 lowercase hex digits, without the `sha256:` prefix.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses the bare 64 lowercase hex digits (no `sha256:` prefix), as found in storage paths.
    pub fn from_hex(hex_digits: &str) -> Result<Self, BlobError> {
        parse_hex(hex_digits).map_err(|reason| invalid(hex_digits, reason))
    }
}

fn invalid(input: &str, reason: &'static str) -> BlobError {
    let input = if input.len() > MAX_ECHO {
        let mut end = MAX_ECHO;
        while !input.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}...", &input[..end])
    } else {
        input.to_owned()
    };
    BlobError::InvalidDigest { input, reason }
}

fn parse_hex(hex_digits: &str) -> Result<Digest, &'static str> {
    if hex_digits.len() != HEX_LEN {
        return Err("a sha256 digest has exactly 64 hex digits");
    }
    // `hex::decode` also accepts uppercase; the canonical form is lowercase only, so that one
    // blob has exactly one name (and one storage path).
    if !hex_digits.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err("only lowercase hex digits 0-9 and a-f are allowed");
    }
    let mut bytes = [0u8; 32];
    hex::decode_to_slice(hex_digits, &mut bytes).map_err(|_| "not valid hex")?;
    Ok(Digest(bytes))
}

impl FromStr for Digest {
    type Err = BlobError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let Some(hex_digits) = s.strip_prefix(PREFIX) else {
            return Err(invalid(s, "a digest must start with `sha256:`"));
        };
        parse_hex(hex_digits).map_err(|reason| invalid(s, reason))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}{}", self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({self})")
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Incremental sha256 with a byte count and an optional size cap, shared by every backend's
/// `put` so that all of them enforce `max_size` and `expected` identically.
pub(crate) struct Hashing {
    hasher: Sha256,
    size: u64,
    max_size: Option<u64>,
}

impl Hashing {
    pub(crate) fn new(max_size: Option<u64>) -> Self {
        Hashing { hasher: Sha256::new(), size: 0, max_size }
    }

    /// Feeds one chunk; fails as soon as the running size passes `max_size`.
    pub(crate) fn update(&mut self, chunk: &[u8]) -> Result<(), BlobError> {
        self.size += chunk.len() as u64;
        if let Some(limit) = self.max_size
            && self.size > limit
        {
            return Err(BlobError::TooLarge { limit });
        }
        self.hasher.update(chunk);
        Ok(())
    }

    /// Finishes the digest and checks it against `expected`.
    pub(crate) fn finish(self, expected: Option<&Digest>) -> Result<crate::BlobInfo, BlobError> {
        let digest = Digest(self.hasher.finalize().into());
        if let Some(expected) = expected
            && *expected != digest
        {
            return Err(BlobError::DigestMismatch { expected: *expected, actual: digest });
        }
        Ok(crate::BlobInfo { digest, size: self.size })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn reject(input: &str) {
        match input.parse::<Digest>() {
            Err(BlobError::InvalidDigest { .. }) => {}
            other => panic!("{input:?} should be rejected, got {other:?}"),
        }
    }

    #[test]
    fn parses_and_displays_canonical_form() {
        let digest: Digest = EMPTY.parse().unwrap();
        assert_eq!(digest, Digest::of(b""));
        assert_eq!(digest.to_string(), EMPTY);
        assert_eq!(digest.hex(), &EMPTY[7..]);
        assert_eq!(Digest::from_hex(&EMPTY[7..]).unwrap(), digest);
        assert_eq!(format!("{digest:?}"), format!("Digest({EMPTY})"));
    }

    #[test]
    fn rejects_bad_prefixes() {
        reject(&EMPTY[7..]);
        reject(&EMPTY.replace("sha256:", "SHA256:"));
        reject(&EMPTY.replace("sha256:", "sha512:"));
        reject(&EMPTY.replace("sha256:", "sha256::"));
        reject(&EMPTY.replace("sha256:", " sha256:"));
        reject(&EMPTY.replace("sha256:", "md5:"));
        reject("");
        reject("sha256:");
    }

    #[test]
    fn rejects_uppercase_and_non_hex() {
        reject(&EMPTY.to_uppercase());
        reject(&format!("sha256:{}", EMPTY[7..].to_uppercase()));
        reject(&EMPTY.replace('e', "E"));
        reject(&EMPTY.replace('e', "g"));
        reject(&format!("{} ", &EMPTY[..EMPTY.len() - 1]));
        // A multi-byte character of the right byte length must not slip through.
        reject(&format!("{}é", &EMPTY[..EMPTY.len() - 2]));
    }

    #[test]
    fn rejects_wrong_length() {
        reject(&EMPTY[..EMPTY.len() - 1]);
        reject(&format!("{EMPTY}0"));
        reject(&format!("{EMPTY}{}", &EMPTY[7..]));
    }

    #[test]
    fn rejects_path_traversal() {
        reject("sha256:../..");
        reject("sha256:../../../../etc/passwd");
        reject(&format!("sha256:../{}", &EMPTY[10..]));
        reject(&format!("sha256:{}/..", &EMPTY[10..]));
        reject(&format!("sha256:/{}", &EMPTY[8..]));
        reject(&format!("sha256:{}\0", &EMPTY[8..]));
        assert!(Digest::from_hex("../../etc/passwd").is_err());
    }

    #[test]
    fn error_message_is_bounded_and_helpful() {
        let long = "x".repeat(10_000);
        let err = long.parse::<Digest>().unwrap_err().to_string();
        assert!(err.len() < 300, "{err}");
        assert!(err.contains("sha256:"), "{err}");
    }

    #[test]
    fn serde_round_trip_as_string() {
        let digest = Digest::of(b"hello");
        let json = serde_json::to_string(&digest).unwrap();
        assert_eq!(json, format!("\"{digest}\""));
        assert_eq!(serde_json::from_str::<Digest>(&json).unwrap(), digest);
        assert!(serde_json::from_str::<Digest>("\"sha256:../..\"").is_err());
        assert!(serde_json::from_str::<Digest>("42").is_err());
    }

    #[test]
    fn hashing_enforces_limit_and_expected() {
        let mut hashing = Hashing::new(Some(5));
        hashing.update(b"hello").unwrap();
        assert!(matches!(hashing.update(b"!"), Err(BlobError::TooLarge { limit: 5 })));

        let mut hashing = Hashing::new(None);
        hashing.update(b"hello").unwrap();
        let wrong = Digest::of(b"other");
        assert!(matches!(hashing.finish(Some(&wrong)), Err(BlobError::DigestMismatch { .. })));
    }
}
