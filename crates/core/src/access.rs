//! Who may do what: the roles an API key carries.
//!
//! A key holds one role. Project roles are ordered (`viewer` < `submitter` < `admin`): each
//! can do everything the one below it can. `operator` is the cluster's role: every project,
//! the projects themselves, and the nodes.

use std::fmt;
use std::str::FromStr;

/// A role an API key carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Reads the project's jobs, logs, artifacts and usage.
    Viewer,
    /// Also submits and cancels jobs and uploads blobs.
    Submitter,
    /// Also manages the project's keys and secrets.
    Admin,
    /// The cluster operator: every project, projects themselves, nodes and join tokens.
    Operator,
}

impl Role {
    /// Every role, weakest first.
    pub const ALL: [Role; 4] = [Role::Viewer, Role::Submitter, Role::Admin, Role::Operator];

    /// The role's name as written in keys, flags and the store.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Submitter => "submitter",
            Role::Admin => "admin",
            Role::Operator => "operator",
        }
    }

    /// Whether a key with this role is scoped to one project (every role but `operator`).
    pub fn is_project_role(self) -> bool {
        self != Role::Operator
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A role name that is not one of [`Role::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a role; use viewer, submitter, admin or operator")]
pub struct UnknownRole(pub String);

impl FromStr for Role {
    type Err = UnknownRole;

    fn from_str(s: &str) -> Result<Role, UnknownRole> {
        Role::ALL.into_iter().find(|r| r.as_str() == s).ok_or_else(|| UnknownRole(s.to_owned()))
    }
}

/// Whether `name` can name a project: 1 to 63 lowercase letters, digits and `-`, starting
/// with a letter or digit (it appears in paths, labels and metric names).
pub fn valid_project_name(name: &str) -> bool {
    let mut chars = name.chars();
    (1..=63).contains(&name.len())
        && chars.next().is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// The kinds of bearer credentials and the prefix each is written with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialKind {
    /// An API key, `drv_<id>_<secret>`.
    ApiKey,
    /// A node credential, `drn_<id>_<secret>`.
    Node,
    /// A single-use join token, `drj_<id>_<secret>[_<CA fingerprint>]`.
    JoinToken,
}

impl CredentialKind {
    /// The prefix before the first `_`.
    pub fn prefix(self) -> &'static str {
        match self {
            CredentialKind::ApiKey => "drv",
            CredentialKind::Node => "drn",
            CredentialKind::JoinToken => "drj",
        }
    }
}

/// Hex digits in a credential's id (64 bits: ids are looked up, not secret).
pub const ID_HEX: usize = 16;
/// Hex digits in a credential's secret (256 bits).
pub const SECRET_HEX: usize = 64;
/// Hex digits of a SHA-256 fingerprint.
pub const FINGERPRINT_HEX: usize = 64;

/// A bearer credential split into its parts.
#[derive(Clone, PartialEq, Eq)]
pub struct Credential {
    /// What it is.
    pub kind: CredentialKind,
    /// The public id that looks the record up.
    pub id: String,
    /// The secret part, whose SHA-256 the server keeps.
    pub secret: String,
    /// For join tokens: the SHA-256 fingerprint of the server's CA certificate, when the server
    /// has TLS.
    pub ca_fingerprint: Option<String>,
}

impl fmt::Debug for Credential {
    // Never print the secret, not even in debug logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential")
            .field("kind", &self.kind)
            .field("id", &self.id)
            .field("ca_fingerprint", &self.ca_fingerprint)
            .finish_non_exhaustive()
    }
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl Credential {
    /// Parses `<prefix>_<id>_<secret>` (and a join token's optional `_<fingerprint>`).
    /// `None` for anything else: the caller answers with one message for every malformed
    /// credential.
    pub fn parse(text: &str) -> Option<Credential> {
        let mut parts = text.trim().split('_');
        let kind = match parts.next()? {
            "drv" => CredentialKind::ApiKey,
            "drn" => CredentialKind::Node,
            "drj" => CredentialKind::JoinToken,
            _ => return None,
        };
        let id = parts.next().filter(|p| is_hex(p, ID_HEX))?;
        let secret = parts.next().filter(|p| is_hex(p, SECRET_HEX))?;
        let ca_fingerprint = match (kind, parts.next()) {
            (_, None) => None,
            (CredentialKind::JoinToken, Some(fp)) if is_hex(fp, FINGERPRINT_HEX) => Some(fp.to_owned()),
            _ => return None,
        };
        if parts.next().is_some() {
            return None;
        }
        Some(Credential { kind, id: id.to_owned(), secret: secret.to_owned(), ca_fingerprint })
    }

    /// The credential as it is written, the form users copy.
    pub fn to_text(&self) -> String {
        let mut text = format!("{}_{}_{}", self.kind.prefix(), self.id, self.secret);
        if let Some(fp) = &self.ca_fingerprint {
            text.push('_');
            text.push_str(fp);
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_round_trip_and_order() {
        for r in Role::ALL {
            assert_eq!(r.as_str().parse::<Role>(), Ok(r));
        }
        assert!(Role::Viewer < Role::Submitter && Role::Submitter < Role::Admin);
        assert_eq!("root".parse::<Role>(), Err(UnknownRole("root".into())));
        assert!(!Role::Operator.is_project_role());
    }

    #[test]
    fn credentials_parse_and_print() {
        let id = "0123456789abcdef";
        let secret = "ab".repeat(32);
        let fp = "cd".repeat(32);
        let key = Credential::parse(&format!("drv_{id}_{secret}")).unwrap();
        assert_eq!(
            (key.kind, key.id.as_str(), key.ca_fingerprint.as_deref()),
            (CredentialKind::ApiKey, id, None)
        );
        assert_eq!(key.to_text(), format!("drv_{id}_{secret}"));
        let token = Credential::parse(&format!("drj_{id}_{secret}_{fp}")).unwrap();
        assert_eq!(token.ca_fingerprint.as_deref(), Some(fp.as_str()));
        assert_eq!(Credential::parse(&token.to_text()), Some(token));
        assert_eq!(Credential::parse(&format!("drn_{id}_{secret}")).unwrap().kind, CredentialKind::Node);
        for bad in [
            String::new(),
            format!("drv_{id}"),
            format!("drx_{id}_{secret}"),
            format!("drv_{id}_{secret}_{fp}"),
            format!("drv_{id}_{}", "AB".repeat(32)),
            format!("drv_{id}x_{secret}"),
            format!("drj_{id}_{secret}_{fp}_x"),
        ] {
            assert_eq!(Credential::parse(&bad), None, "{bad}");
        }
        assert!(!format!("{key:?}").contains(&secret));
    }

    #[test]
    fn project_names() {
        assert!(valid_project_name("default"));
        assert!(valid_project_name("fx-2"));
        assert!(!valid_project_name(""));
        assert!(!valid_project_name("-x"));
        assert!(!valid_project_name("Fx"));
        assert!(!valid_project_name("a/b"));
        assert!(!valid_project_name(&"a".repeat(64)));
    }
}
