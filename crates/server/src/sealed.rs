//! Project secrets encrypted at rest: values are sealed with AES-256-GCM under a server key
//! before they reach the store, so a copy of the database (a backup, a replica's disk) reveals
//! nothing without the key.
//!
//! Keys live in a key file, one per line as `<id> <base64 of 32 bytes>`; the first line seals
//! new values, every line opens old ones. Rotation is: put a new key first, keep the old one
//! below it, restart (every value is then sealed again with the new key, see
//! [`SealedSecrets::reseal_all`]), and remove the old line at leisure. A stored value reads
//! `sealed:v1:<key id>:<base64 of nonce ‖ ciphertext ‖ tag>`; a value without that prefix was
//! stored before encryption existed and is read as it is, then sealed by the next reseal.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use drover_store::{Result as StoreResult, SecretStore, StoreError};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

/// The prefix of a sealed value.
const PREFIX: &str = "sealed:v1:";
/// Bytes of a key.
const KEY_BYTES: usize = 32;
/// Most keys a key file may hold (a rotation needs two).
const MAX_KEYS: usize = 16;

/// Why the secret keys cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The key file cannot be read or written.
    #[error("the secrets key file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A line of the key file is not `<id> <base64 of 32 bytes>`.
    #[error("the secrets key file {path}, line {line}: {why}")]
    Format {
        /// The file.
        path: String,
        /// The line number, from 1.
        line: usize,
        /// What is wrong.
        why: String,
    },
}

/// The keys secrets are sealed with: the first seals, all open.
pub struct SecretKeys {
    keys: Vec<(String, LessSafeKey)>,
}

impl std::fmt::Debug for SecretKeys {
    // Never print key material.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretKeys")
            .field("ids", &self.keys.iter().map(|(id, _)| id).collect::<Vec<_>>())
            .finish()
    }
}

fn valid_id(id: &str) -> bool {
    (1..=32).contains(&id.len()) && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

impl SecretKeys {
    /// Parses a key file's text.
    pub fn parse(text: &str, path: &str) -> Result<SecretKeys, KeyError> {
        let mut keys = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad =
                |why: &str| KeyError::Format { path: path.to_owned(), line: n + 1, why: why.to_owned() };
            let (id, material) =
                line.split_once(char::is_whitespace).ok_or_else(|| bad("write `<id> <base64 key>`"))?;
            if !valid_id(id) {
                return Err(bad("a key id is 1 to 32 letters, digits, `-` and `_`"));
            }
            if keys.iter().any(|(k, _)| k == id) {
                return Err(bad("this key id appears twice"));
            }
            let bytes = STANDARD.decode(material.trim()).map_err(|_| bad("the key is not base64"))?;
            if bytes.len() != KEY_BYTES {
                return Err(bad("a key is 32 bytes (44 characters of base64)"));
            }
            let key = UnboundKey::new(&AES_256_GCM, &bytes).map_err(|_| bad("the key is not usable"))?;
            keys.push((id.to_owned(), LessSafeKey::new(key)));
        }
        if keys.is_empty() {
            return Err(KeyError::Format { path: path.to_owned(), line: 0, why: "it holds no key".into() });
        }
        if keys.len() > MAX_KEYS {
            return Err(KeyError::Format {
                path: path.to_owned(),
                line: 0,
                why: format!("at most {MAX_KEYS} keys"),
            });
        }
        Ok(SecretKeys { keys })
    }

    /// Reads the key file at `path`; when it does not exist and `create` is set, makes one
    /// with a fresh random key (mode 0600). Returns the keys and whether the file was made.
    pub fn load_or_create(path: &Path, create: bool) -> Result<(SecretKeys, bool), KeyError> {
        let shown = path.display().to_string();
        let io = |source| KeyError::Io { path: shown.clone(), source };
        match std::fs::read_to_string(path) {
            Ok(text) => Ok((SecretKeys::parse(&text, &shown)?, false)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
                let mut key = [0u8; KEY_BYTES];
                SystemRandom::new()
                    .fill(&mut key)
                    .map_err(|_| io(std::io::Error::other("no random bytes")))?;
                let text = format!(
                    "# Keys that seal Drover's project secrets: the first seals, all open. Keep it private.\nk1 {}\n",
                    STANDARD.encode(key)
                );
                drover_tls::write_private_file(path, text.as_bytes()).map_err(io)?;
                Ok((SecretKeys::parse(&text, &shown)?, true))
            }
            Err(e) => Err(io(e)),
        }
    }

    /// The id of the key that seals.
    pub fn current(&self) -> &str {
        &self.keys[0].0
    }

    fn seal(&self, plain: &str) -> StoreResult<String> {
        let (id, key) = &self.keys[0];
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new().fill(&mut nonce).map_err(|_| corrupt("no random bytes for a nonce"))?;
        let mut data = plain.as_bytes().to_vec();
        // The key id is authenticated with the value, so a value cannot be passed off as
        // sealed under another key.
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(id.as_bytes()),
            &mut data,
        )
        .map_err(|_| corrupt("cannot seal a secret"))?;
        let mut blob = nonce.to_vec();
        blob.extend_from_slice(&data);
        Ok(format!("{PREFIX}{id}:{}", STANDARD.encode(blob)))
    }

    fn open(&self, stored: &str) -> StoreResult<String> {
        let Some(rest) = stored.strip_prefix(PREFIX) else {
            // Stored before secrets were sealed: read as it is (the next reseal seals it).
            return Ok(stored.to_owned());
        };
        let (id, b64) = rest.split_once(':').ok_or_else(|| corrupt("a sealed secret without a key id"))?;
        let (_, key) = self.keys.iter().find(|(k, _)| k == id).ok_or_else(|| StoreError::Corrupt {
            what: "secret",
            detail: format!(
                "it was sealed with key `{id}`, which this server's key file lacks; give every server the same key file"
            ),
        })?;
        let blob = STANDARD.decode(b64).map_err(|_| corrupt("a sealed secret that is not base64"))?;
        if blob.len() < NONCE_LEN {
            return Err(corrupt("a sealed secret too short to hold its nonce"));
        }
        let (nonce, sealed) = blob.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| corrupt("a bad nonce"))?;
        let mut data = sealed.to_vec();
        let plain = key.open_in_place(nonce, Aad::from(id.as_bytes()), &mut data).map_err(|_| {
            corrupt("a sealed secret does not open with its key (damaged, or another key of that id)")
        })?;
        String::from_utf8(plain.to_vec()).map_err(|_| corrupt("a sealed secret that is not text"))
    }

    fn sealed_with_current(&self, stored: &str) -> bool {
        stored
            .strip_prefix(PREFIX)
            .and_then(|r| r.split_once(':'))
            .is_some_and(|(id, _)| id == self.current())
    }
}

fn corrupt(detail: &str) -> StoreError {
    StoreError::Corrupt { what: "secret", detail: detail.to_owned() }
}

/// A [`SecretStore`] that seals values on their way in and opens them on their way out.
pub struct SealedSecrets {
    inner: Arc<dyn SecretStore>,
    keys: SecretKeys,
}

impl SealedSecrets {
    /// Seals the secrets of `inner` with `keys`.
    pub fn new(inner: Arc<dyn SecretStore>, keys: SecretKeys) -> SealedSecrets {
        SealedSecrets { inner, keys }
    }

    /// Seals again, with the current key, every secret of `projects` that is stored in plain
    /// text or under an older key; returns how many were. Run at start, so a rotation completes
    /// without anyone touching the secrets.
    pub async fn reseal_all(&self, projects: &[String], now_ms: i64) -> StoreResult<usize> {
        let mut resealed = 0;
        for project in projects {
            let names = self.inner.secret_names(project).await?;
            let stored = self.inner.secret_values(project, &names).await?;
            for (name, value) in stored {
                if !self.keys.sealed_with_current(&value) {
                    let plain = self.keys.open(&value)?;
                    self.inner.set_secret(project, &name, &self.keys.seal(&plain)?, now_ms).await?;
                    resealed += 1;
                }
            }
        }
        Ok(resealed)
    }
}

#[async_trait]
impl SecretStore for SealedSecrets {
    async fn set_secret(&self, project: &str, name: &str, value: &str, now_ms: i64) -> StoreResult<bool> {
        self.inner.set_secret(project, name, &self.keys.seal(value)?, now_ms).await
    }

    async fn secret_names(&self, project: &str) -> StoreResult<Vec<String>> {
        self.inner.secret_names(project).await
    }

    async fn list_secret_names(
        &self,
        project: &str,
        page: &drover_store::PageRequest,
    ) -> StoreResult<drover_store::Page<String>> {
        self.inner.list_secret_names(project, page).await
    }

    async fn secret_values(&self, project: &str, names: &[String]) -> StoreResult<BTreeMap<String, String>> {
        let sealed = self.inner.secret_values(project, names).await?;
        sealed.into_iter().map(|(name, value)| Ok((name, self.keys.open(&value)?))).collect()
    }

    async fn delete_secret(&self, project: &str, name: &str) -> StoreResult<bool> {
        self.inner.delete_secret(project, name).await
    }
}

#[cfg(test)]
mod tests {
    use drover_store::sqlite::SqliteStore;

    use super::*;

    fn key_line(id: &str, byte: u8) -> String {
        format!("{id} {}\n", STANDARD.encode([byte; KEY_BYTES]))
    }

    #[tokio::test]
    async fn secrets_are_unreadable_without_the_key_and_survive_a_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("drover.db");
        let raw = Arc::new(SqliteStore::open(&db).await.unwrap());
        let old = SecretKeys::parse(&key_line("old", 1), "keys").unwrap();
        let sealed = SealedSecrets::new(raw.clone(), old);
        sealed.set_secret("p", "TOKEN", "hunter2\nline two", 1).await.unwrap();
        let names = vec!["TOKEN".to_string()];
        // What the database holds: no trace of the value, in the store's answers or the file.
        let stored = raw.secret_values("p", &names).await.unwrap()["TOKEN"].clone();
        assert!(stored.starts_with("sealed:v1:old:") && !stored.contains("hunter2"), "{stored}");
        drop(sealed);
        let file = std::fs::read(&db).unwrap();
        let wal = std::fs::read(dir.path().join("drover.db-wal")).unwrap_or_default();
        let needle = b"hunter2";
        assert!(!file.windows(needle.len()).chain(wal.windows(needle.len())).any(|w| w == needle));

        // A key file with another key cannot open it, and says why.
        let stranger =
            SealedSecrets::new(raw.clone(), SecretKeys::parse(&key_line("new", 2), "keys").unwrap());
        let err = stranger.secret_values("p", &names).await.unwrap_err().to_string();
        assert!(err.contains("key `old`"), "{err}");

        // Rotation: the new key first, the old one kept; values open, and a reseal moves them.
        let both = SecretKeys::parse(&(key_line("new", 2) + &key_line("old", 1)), "keys").unwrap();
        let rotated = SealedSecrets::new(raw.clone(), both);
        assert_eq!(rotated.secret_values("p", &names).await.unwrap()["TOKEN"], "hunter2\nline two");
        assert_eq!(rotated.reseal_all(&["p".to_string()], 2).await.unwrap(), 1);
        assert_eq!(rotated.reseal_all(&["p".to_string()], 3).await.unwrap(), 0, "nothing left to reseal");
        // The old key can go now.
        let only_new =
            SealedSecrets::new(raw.clone(), SecretKeys::parse(&key_line("new", 2), "keys").unwrap());
        assert_eq!(only_new.secret_values("p", &names).await.unwrap()["TOKEN"], "hunter2\nline two");
    }

    #[tokio::test]
    async fn plain_values_from_before_are_read_and_sealed_by_the_next_reseal() {
        let dir = tempfile::tempdir().unwrap();
        let raw = Arc::new(SqliteStore::open(&dir.path().join("drover.db")).await.unwrap());
        raw.set_secret("p", "OLD", "plain", 1).await.unwrap();
        let sealed = SealedSecrets::new(raw.clone(), SecretKeys::parse(&key_line("k1", 7), "keys").unwrap());
        assert_eq!(sealed.secret_values("p", &["OLD".into()]).await.unwrap()["OLD"], "plain");
        assert_eq!(sealed.reseal_all(&["p".into()], 2).await.unwrap(), 1);
        assert!(raw.secret_values("p", &["OLD".into()]).await.unwrap()["OLD"].starts_with("sealed:v1:k1:"));
    }

    #[test]
    fn key_files_are_checked_line_by_line_and_created_private() {
        for (text, why) in [
            ("", "no key"),
            ("k1\n", "<id> <base64 key>"),
            ("k1 not-base64!\n", "not base64"),
            ("k1 AAAA\n", "32 bytes"),
            ("bad/id AAAA\n", "key id"),
        ] {
            let err = SecretKeys::parse(text, "keys").unwrap_err().to_string();
            assert!(err.contains(why), "{text:?}: {err}");
        }
        let twice = key_line("k1", 1) + &key_line("k1", 2);
        assert!(SecretKeys::parse(&twice, "keys").unwrap_err().to_string().contains("twice"));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets.key");
        let (keys, created) = SecretKeys::load_or_create(&path, true).unwrap();
        assert!(created && keys.current() == "k1");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let (_, again) = SecretKeys::load_or_create(&path, true).unwrap();
        assert!(!again, "an existing file is kept");
        assert!(SecretKeys::load_or_create(&dir.path().join("missing"), false).is_err());
        let text = std::fs::read_to_string(&path).unwrap();
        let material =
            text.lines().find(|l| l.starts_with("k1 ")).unwrap().split_whitespace().nth(1).unwrap();
        let shown = format!("{keys:?}");
        assert!(shown.contains("k1") && !shown.contains(material), "{shown}");
    }
}
