//! [`SecretStore`] on SQLite.

use super::*;
use crate::pages::{self, List};

#[async_trait]
impl SecretStore for SqliteStore {
    async fn set_secret(&self, project: &str, name: &str, value: &str, now_ms: i64) -> Result<bool> {
        let existed: Option<i64> = sqlx::query_scalar("SELECT 1 FROM secrets WHERE project = ? AND name = ?")
            .bind(project)
            .bind(name)
            .fetch_optional(&mut *self.writer.lock().await)
            .await?;
        sqlx::query(
            "INSERT INTO secrets (project, name, value, updated_ms) VALUES (?, ?, ?, ?) \
             ON CONFLICT (project, name) DO UPDATE SET value = excluded.value, updated_ms = excluded.updated_ms",
        )
        .bind(project)
        .bind(name)
        .bind(value)
        .bind(now_ms)
        .execute(&mut *self.writer.lock().await)
        .await?;
        Ok(existed.is_none())
    }

    async fn secret_names(&self, project: &str) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar("SELECT name FROM secrets WHERE project = ? ORDER BY name")
            .bind(project)
            .fetch_all(&self.reader)
            .await?)
    }

    async fn list_secret_names(&self, project: &str, page: &PageRequest) -> Result<Page<String>> {
        let at = pages::open::<String>(List::Secrets, page)?;
        let mut q = QueryBuilder::<Sqlite>::new("SELECT name FROM secrets WHERE project = ");
        q.push_bind(project);
        if let Some(after) = &at.after {
            q.push(" AND name > ").push_bind(after);
        }
        q.push(" ORDER BY name LIMIT ").push_bind(at.limit());
        let names: Vec<String> = q.build_query_scalar().fetch_all(&self.reader).await?;
        pages::close(List::Secrets, &at, names, String::clone)
    }

    async fn secret_values(&self, project: &str, names: &[String]) -> Result<BTreeMap<String, String>> {
        let mut out = BTreeMap::new();
        for name in names {
            let value: Option<String> =
                sqlx::query_scalar("SELECT value FROM secrets WHERE project = ? AND name = ?")
                    .bind(project)
                    .bind(name)
                    .fetch_optional(&self.reader)
                    .await?;
            if let Some(v) = value {
                out.insert(name.clone(), v);
            }
        }
        Ok(out)
    }

    async fn delete_secret(&self, project: &str, name: &str) -> Result<bool> {
        let n = sqlx::query("DELETE FROM secrets WHERE project = ? AND name = ?")
            .bind(project)
            .bind(name)
            .execute(&mut *self.writer.lock().await)
            .await?
            .rows_affected();
        Ok(n > 0)
    }
}
