//! [`SecretStore`] on PostgreSQL.

use super::*;
use crate::pages::{self, List};

#[async_trait]
impl SecretStore for PostgresStore {
    async fn set_secret(&self, project: &str, name: &str, value: &str, now_ms: i64) -> Result<bool> {
        // `xmax = 0` only on a freshly inserted row: one statement tells insert from update.
        let inserted: bool = sqlx::query_scalar(
            "INSERT INTO secrets (project, name, value, updated_ms) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (project, name) DO UPDATE SET value = excluded.value, updated_ms = excluded.updated_ms \
             RETURNING (xmax = 0)",
        )
        .bind(project)
        .bind(name)
        .bind(value)
        .bind(now_ms)
        .fetch_one(&self.pool)
        .await?;
        Ok(inserted)
    }

    async fn secret_names(&self, project: &str) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar("SELECT name FROM secrets WHERE project = $1 ORDER BY name")
            .bind(project)
            .fetch_all(&self.pool)
            .await?)
    }

    async fn list_secret_names(&self, project: &str, page: &PageRequest) -> Result<Page<String>> {
        let at = pages::open::<String>(List::Secrets, page)?;
        let mut q = QueryBuilder::<Postgres>::new("SELECT name FROM secrets WHERE project = ");
        q.push_bind(project);
        if let Some(after) = &at.after {
            q.push(" AND name > ").push_bind(after);
        }
        q.push(" ORDER BY name LIMIT ").push_bind(at.limit());
        let names: Vec<String> = q.build_query_scalar().fetch_all(&self.pool).await?;
        pages::close(List::Secrets, &at, names, String::clone)
    }

    async fn secret_values(&self, project: &str, names: &[String]) -> Result<BTreeMap<String, String>> {
        let rows: Vec<(String, String)> =
            sqlx::query_as("SELECT name, value FROM secrets WHERE project = $1 AND name = ANY($2)")
                .bind(project)
                .bind(names)
                .fetch_all(&self.pool)
                .await?;
        Ok(rows.into_iter().collect())
    }

    async fn delete_secret(&self, project: &str, name: &str) -> Result<bool> {
        let n = sqlx::query("DELETE FROM secrets WHERE project = $1 AND name = $2")
            .bind(project)
            .bind(name)
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(n > 0)
    }
}
