//! Project secrets: set by operators, never read back through the API, handed to the tasks
//! that name them.

use std::collections::BTreeMap;

use async_trait::async_trait;

use crate::{Page, PageRequest, Result};

/// Where project secrets live. Kept apart from [`crate::Store`] because only the API and the
/// dispatcher touch it.
#[async_trait]
pub trait SecretStore: Send + Sync + 'static {
    /// Sets (or replaces) a secret; `true` when it did not exist before.
    async fn set_secret(&self, project: &str, name: &str, value: &str, now_ms: i64) -> Result<bool>;

    /// Names of a project's secrets, sorted.
    async fn secret_names(&self, project: &str) -> Result<Vec<String>>;

    /// A page of [`secret_names`](Self::secret_names).
    async fn list_secret_names(&self, project: &str, page: &PageRequest) -> Result<Page<String>>;

    /// Values of the named secrets that exist; missing names are simply absent.
    async fn secret_values(&self, project: &str, names: &[String]) -> Result<BTreeMap<String, String>>;

    /// Removes a secret; `true` when it existed.
    async fn delete_secret(&self, project: &str, name: &str) -> Result<bool>;
}

/// Whether `name` can be a secret's name: it becomes an environment variable.
pub fn valid_secret_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_uppercase() || c == '_')
        && chars.all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
}

#[cfg(test)]
mod tests {
    #[test]
    fn names() {
        assert!(super::valid_secret_name("DB_PASSWORD"));
        assert!(super::valid_secret_name("_X1"));
        assert!(!super::valid_secret_name("db"));
        assert!(!super::valid_secret_name("1X"));
        assert!(!super::valid_secret_name(""));
        assert!(!super::valid_secret_name("A-B"));
    }
}
