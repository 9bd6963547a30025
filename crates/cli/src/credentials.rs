//! The local credentials file: which key (and which CA) to use for which server, written by
//! `drover login` and `drover up`, read by every client command. It holds secrets, so it is
//! created readable by its owner only and replaced whole.
//!
//! ```toml
//! default = "http://127.0.0.1:7370"
//!
//! [servers."http://127.0.0.1:7370"]
//! key = "drv_..."
//! ca = "/home/me/.drover/tls/ca.pem"   # optional
//!
//! [servers."https://farm:7370"]          # signed in with `drover login --oidc`
//! token = "eyJ..."
//! expires_ms = 1767225600000
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow};
use serde::{Deserialize, Serialize};

/// The credentials of one server.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerCredentials {
    /// The API key, `drv_<id>_<secret>`; empty when signed in through an identity provider.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub key: String,
    /// How to trust the server: a CA file or `sha256:<fingerprint>`; absent for plain text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<String>,
    /// The identity provider's token (a JWT) that `drover login --oidc` got, sent as the bearer
    /// when there is no key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// When `token` expires (ms since the epoch), if it says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_ms: Option<i64>,
}

impl ServerCredentials {
    /// What to send as the bearer: the key, else the token.
    pub fn bearer(&self) -> Option<String> {
        match &self.token {
            _ if !self.key.is_empty() => Some(self.key.clone()),
            Some(token) => Some(token.clone()),
            None => None,
        }
    }
}

/// The whole file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialsFile {
    /// The server commands talk to when neither `--server` nor `DROVER_SERVER` names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<String>,
    /// Credentials by server URL.
    #[serde(default)]
    pub servers: BTreeMap<String, ServerCredentials>,
}

/// Where the file is: `DROVER_CREDENTIALS`, else `$XDG_CONFIG_HOME/drover/credentials`,
/// else `~/.config/drover/credentials`. `None` when there is no home to put it in.
pub fn default_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("DROVER_CREDENTIALS").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let config =
        std::env::var_os("XDG_CONFIG_HOME").filter(|p| !p.is_empty()).map(PathBuf::from).or_else(|| {
            std::env::var_os("HOME").filter(|h| !h.is_empty()).map(|h| PathBuf::from(h).join(".config"))
        })?;
    Some(config.join("drover").join("credentials"))
}

impl CredentialsFile {
    /// Reads the file; a missing file is an empty one.
    pub fn load(path: &Path) -> Result<CredentialsFile> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(CredentialsFile::default()),
            Err(e) => return Err(anyhow!("cannot read the credentials file {}: {e}", path.display())),
        };
        toml::from_str(&text).with_context(|| {
            format!(
                "the credentials file {} is not valid; fix it or run `drover login` again",
                path.display()
            )
        })
    }

    /// Writes the file, readable by its owner only.
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = format!(
            "# Drover credentials, written by `drover login` and `drover up`. Keep this file private.\n{}",
            toml::to_string_pretty(self).context("cannot encode the credentials")?
        );
        drover_tls::write_private_file(path, text.as_bytes())
            .with_context(|| format!("cannot write the credentials file {}", path.display()))
    }

    /// Records `creds` for `server`, and makes it the default when there is none yet or
    /// `make_default` says so.
    pub fn set(&mut self, server: &str, creds: ServerCredentials, make_default: bool) {
        self.servers.insert(server.to_owned(), creds);
        if make_default || self.default.is_none() {
            self.default = Some(server.to_owned());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn round_trip_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("drover/credentials");
        assert_eq!(CredentialsFile::load(&path).unwrap(), CredentialsFile::default());
        let mut file = CredentialsFile::default();
        let key = |k: &str| ServerCredentials { key: k.into(), ..Default::default() };
        file.set("http://127.0.0.1:7370", key("drv_a_b"), false);
        file.set(
            "https://farm:7370",
            ServerCredentials { ca: Some("/ca.pem".into()), ..key("drv_c_d") },
            false,
        );
        let signed_in =
            ServerCredentials { token: Some("eyJ.a.b".into()), expires_ms: Some(5), ..Default::default() };
        file.set("https://idp-farm:7370", signed_in.clone(), false);
        assert_eq!(file.default.as_deref(), Some("http://127.0.0.1:7370"));
        file.save(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(CredentialsFile::load(&path).unwrap(), file);
        assert!(!std::fs::read_to_string(&path).unwrap().contains("key = \"\""), "no empty key is written");
        assert_eq!(signed_in.bearer().as_deref(), Some("eyJ.a.b"));
        assert_eq!(key("drv_a_b").bearer().as_deref(), Some("drv_a_b"));
        assert_eq!(ServerCredentials::default().bearer(), None);
        std::fs::write(&path, "nonsense = [").unwrap();
        assert!(CredentialsFile::load(&path).unwrap_err().to_string().contains("not valid"));
    }
}
