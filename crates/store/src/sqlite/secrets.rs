//! [`SecretStore`] on SQLite.

use super::*;

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
