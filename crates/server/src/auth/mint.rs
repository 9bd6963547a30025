//! Making credentials: random ids and secrets, and the hashes the store keeps.

use drover_core::access::{Credential, CredentialKind, ID_HEX, SECRET_HEX};
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// `digits / 2` random bytes as lowercase hex, from the thread's CSPRNG (seeded by the
/// operating system).
fn random_hex(digits: usize) -> String {
    let mut bytes = vec![0u8; digits / 2];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// SHA-256 of a credential's secret part: what the store keeps.
pub(crate) fn hash_secret(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

/// Whether `secret` hashes to `stored`, compared in constant time.
pub(crate) fn secret_matches(secret: &str, stored: &[u8]) -> bool {
    hash_secret(secret).ct_eq(stored).into()
}

/// A new credential of `kind` with a fresh id and secret.
pub(crate) fn credential(kind: CredentialKind, ca_fingerprint: Option<String>) -> Credential {
    Credential { kind, id: random_hex(ID_HEX), secret: random_hex(SECRET_HEX), ca_fingerprint }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_credentials_parse_and_match_their_hash() {
        let c = credential(CredentialKind::ApiKey, None);
        let parsed = Credential::parse(&c.to_text()).unwrap();
        assert_eq!(parsed, c);
        let stored = hash_secret(&c.secret);
        assert!(secret_matches(&parsed.secret, &stored));
        assert!(!secret_matches(&credential(CredentialKind::ApiKey, None).secret, &stored));
        assert!(!secret_matches(&c.secret, &stored[..31]));
        assert_ne!(c.id, credential(CredentialKind::ApiKey, None).id);
    }
}
