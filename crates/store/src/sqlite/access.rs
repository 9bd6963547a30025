//! [`AccessStore`] on SQLite.
//!
//! Every write runs on the single writer connection (see the module header of
//! [`crate::sqlite`]), so a check and the write it guards, such as "the token is unused" and
//! spending it, are one step without further locking.

use std::collections::BTreeMap;

use async_trait::async_trait;
use sqlx::sqlite::SqliteRow;
use sqlx::{Connection, QueryBuilder, Row, Sqlite, SqliteConnection};

use super::{SqliteStore, json, lose_node_attempts, parse_word, to_json};
use crate::access::{
    AccessStore, JoinTokenRecord, KeyRecord, NodeCredentialRecord, ProjectRecord, Redeemed, RevokedNode,
};
use crate::pages::{self, List};
use crate::{Page, PageRequest, Result};

/// Columns of [`key_record`], in its order.
const KEY_COLUMNS: &str =
    "id, secret_sha256, project, role, name, created_ms, expires_ms, revoked_ms, created_by";

/// A key read with [`KEY_COLUMNS`].
fn key_record(r: &SqliteRow) -> Result<KeyRecord> {
    Ok(KeyRecord {
        id: r.try_get(0)?,
        secret_sha256: r.try_get(1)?,
        project: r.try_get(2)?,
        role: parse_word("key role", r.try_get::<&str, _>(3)?)?,
        name: r.try_get(4)?,
        created_ms: r.try_get(5)?,
        expires_ms: r.try_get(6)?,
        revoked_ms: r.try_get(7)?,
        created_by: r.try_get(8)?,
    })
}

#[async_trait]
impl AccessStore for SqliteStore {
    async fn create_project(&self, name: &str, now_ms: i64) -> Result<bool> {
        let n = sqlx::query(
            "INSERT INTO projects (name, created_ms) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(now_ms)
        .execute(&mut *self.writer.lock().await)
        .await?
        .rows_affected();
        Ok(n == 1)
    }

    async fn projects(&self) -> Result<Vec<ProjectRecord>> {
        let rows: Vec<(String, i64)> = sqlx::query_as("SELECT name, created_ms FROM projects ORDER BY name")
            .fetch_all(&self.reader)
            .await?;
        Ok(rows.into_iter().map(|(name, created_ms)| ProjectRecord { name, created_ms }).collect())
    }

    async fn list_projects(
        &self,
        only: Option<&[String]>,
        page: &PageRequest,
    ) -> Result<Page<ProjectRecord>> {
        let at = pages::open::<String>(List::Projects, page)?;
        let mut q = QueryBuilder::<Sqlite>::new("SELECT name, created_ms FROM projects WHERE TRUE");
        if let Some(only) = only {
            if only.is_empty() {
                return Ok(Page { items: Vec::new(), next_token: String::new() });
            }
            q.push(" AND name IN (");
            let mut list = q.separated(", ");
            for p in only {
                list.push_bind(p);
            }
            q.push(")");
        }
        if let Some(after) = &at.after {
            q.push(" AND name > ").push_bind(after);
        }
        q.push(" ORDER BY name LIMIT ").push_bind(at.limit());
        let rows: Vec<(String, i64)> = q.build_query_as().fetch_all(&self.reader).await?;
        let projects =
            rows.into_iter().map(|(name, created_ms)| ProjectRecord { name, created_ms }).collect();
        pages::close(List::Projects, &at, projects, |p| p.name.clone())
    }

    async fn create_key(&self, key: &KeyRecord) -> Result<()> {
        insert_key(&mut *self.writer.lock().await, key, false).await.map(|_| ())
    }

    async fn create_first_key(&self, key: &KeyRecord) -> Result<bool> {
        insert_key(&mut *self.writer.lock().await, key, true).await
    }

    async fn key(&self, id: &str) -> Result<Option<KeyRecord>> {
        // Every call reads its key: a quick read.
        self.quick.read(|conn| {
            let mut statement =
                conn.prepare_cached(&format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = ?"))?;
            let mut rows = statement.query([id])?;
            let Some(r) = rows.next()? else { return Ok(None) };
            Ok(Some(KeyRecord {
                id: r.get(0)?,
                secret_sha256: r.get(1)?,
                project: r.get(2)?,
                role: parse_word("key role", &r.get::<_, String>(3)?)?,
                name: r.get(4)?,
                created_ms: r.get(5)?,
                expires_ms: r.get(6)?,
                revoked_ms: r.get(7)?,
                created_by: r.get(8)?,
            }))
        })
    }

    async fn keys(&self, project: Option<&str>) -> Result<Vec<KeyRecord>> {
        let filter = if project.is_some() { "WHERE project = ?" } else { "" };
        let sql = format!("SELECT {KEY_COLUMNS} FROM api_keys {filter} ORDER BY created_ms, id");
        let mut query = sqlx::query(&sql);
        if let Some(project) = project {
            query = query.bind(project);
        }
        query.fetch_all(&self.reader).await?.iter().map(key_record).collect()
    }

    async fn list_keys(&self, project: Option<&str>, page: &PageRequest) -> Result<Page<KeyRecord>> {
        let at = pages::open::<(i64, String)>(List::Keys, page)?;
        let mut q = QueryBuilder::<Sqlite>::new(format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE TRUE"));
        if let Some(project) = project {
            q.push(" AND project = ").push_bind(project);
        }
        if let Some((created_ms, id)) = &at.after {
            q.push(" AND (created_ms > ").push_bind(*created_ms);
            q.push(" OR (created_ms = ").push_bind(*created_ms).push(" AND id > ").push_bind(id).push("))");
        }
        q.push(" ORDER BY created_ms, id LIMIT ").push_bind(at.limit());
        let keys =
            q.build().fetch_all(&self.reader).await?.iter().map(key_record).collect::<Result<Vec<_>>>()?;
        pages::close(List::Keys, &at, keys, |k| (k.created_ms, k.id.clone()))
    }

    async fn revoke_key(&self, id: &str, now_ms: i64) -> Result<bool> {
        let n = sqlx::query("UPDATE api_keys SET revoked_ms = ? WHERE id = ? AND revoked_ms IS NULL")
            .bind(now_ms)
            .bind(id)
            .execute(&mut *self.writer.lock().await)
            .await?
            .rows_affected();
        Ok(n == 1)
    }

    async fn create_join_token(&self, token: &JoinTokenRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO join_tokens (id, secret_sha256, labels, created_ms, expires_ms, used_ms, used_by, \
             created_by) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&token.id)
        .bind(&token.secret_sha256)
        .bind(to_json("labels", &token.labels)?)
        .bind(token.created_ms)
        .bind(token.expires_ms)
        .bind(token.used_ms)
        .bind(&token.used_by)
        .bind(&token.created_by)
        .execute(&mut *self.writer.lock().await)
        .await?;
        Ok(())
    }

    async fn join_token(&self, id: &str) -> Result<Option<JoinTokenRecord>> {
        let row = sqlx::query(
            "SELECT id, secret_sha256, labels, created_ms, expires_ms, used_ms, used_by, created_by \
             FROM join_tokens WHERE id = ?",
        )
        .bind(id)
        .fetch_optional(&self.reader)
        .await?;
        row.map(|r| {
            Ok(JoinTokenRecord {
                id: r.try_get(0)?,
                secret_sha256: r.try_get(1)?,
                labels: json::<BTreeMap<String, String>>("labels", r.try_get::<&str, _>(2)?)?,
                created_ms: r.try_get(3)?,
                expires_ms: r.try_get(4)?,
                used_ms: r.try_get(5)?,
                used_by: r.try_get(6)?,
                created_by: r.try_get(7)?,
            })
        })
        .transpose()
    }

    async fn redeem_join_token(
        &self,
        token_id: &str,
        credential: &NodeCredentialRecord,
        now_ms: i64,
    ) -> Result<Redeemed> {
        let labels = to_json("labels", &credential.labels)?;
        // Read on the writer connection inside the transaction: the reader pool could see a
        // state older than the writer's last commit.
        let mut writer = self.writer.lock().await;
        let mut tx = writer.begin().await?;
        let token: Option<(i64, Option<i64>)> =
            sqlx::query_as("SELECT expires_ms, used_ms FROM join_tokens WHERE id = ?")
                .bind(token_id)
                .fetch_optional(&mut *tx)
                .await?;
        // Returning early drops the transaction: nothing was written.
        match token {
            None => return Ok(Redeemed::Unknown),
            Some((_, Some(_))) => return Ok(Redeemed::AlreadyUsed),
            Some((expires_ms, None)) if expires_ms <= now_ms => return Ok(Redeemed::Expired),
            Some(_) => {}
        }
        let inserted = sqlx::query(
            "INSERT INTO node_credentials (id, secret_sha256, node_name, labels, created_ms, revoked_ms) \
             VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (node_name) WHERE revoked_ms IS NULL DO NOTHING",
        )
        .bind(&credential.id)
        .bind(&credential.secret_sha256)
        .bind(&credential.node_name)
        .bind(&labels)
        .bind(credential.created_ms)
        .bind(credential.revoked_ms)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted == 0 {
            // Another credential in force holds the name; the token stays unused.
            return Ok(Redeemed::NameTaken);
        }
        sqlx::query("UPDATE join_tokens SET used_ms = ?, used_by = ? WHERE id = ?")
            .bind(now_ms)
            .bind(&credential.node_name)
            .bind(token_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Redeemed::Enrolled)
    }

    async fn node_credential(&self, id: &str) -> Result<Option<NodeCredentialRecord>> {
        let row = sqlx::query(
            "SELECT id, secret_sha256, node_name, labels, created_ms, revoked_ms FROM node_credentials WHERE id = ?",
        )
        .bind(id)
        .fetch_optional(&self.reader)
        .await?;
        row.map(|r| {
            Ok(NodeCredentialRecord {
                id: r.try_get(0)?,
                secret_sha256: r.try_get(1)?,
                node_name: r.try_get(2)?,
                labels: json::<BTreeMap<String, String>>("labels", r.try_get::<&str, _>(3)?)?,
                created_ms: r.try_get(4)?,
                revoked_ms: r.try_get(5)?,
            })
        })
        .transpose()
    }

    async fn revoke_node(&self, name: &str, now_ms: i64) -> Result<Option<RevokedNode>> {
        let mut writer = self.writer.lock().await;
        let mut tx = writer.begin().await?;
        let credentials = sqlx::query(
            "UPDATE node_credentials SET revoked_ms = ? WHERE node_name = ? AND revoked_ms IS NULL",
        )
        .bind(now_ms)
        .bind(name)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let node_id: Option<i64> =
            sqlx::query_scalar("UPDATE nodes SET state = 'down' WHERE name = ? RETURNING id")
                .bind(name)
                .fetch_optional(&mut *tx)
                .await?;
        let Some(node_id) = node_id else {
            let known: Option<i64> =
                sqlx::query_scalar("SELECT 1 FROM node_credentials WHERE node_name = ? LIMIT 1")
                    .bind(name)
                    .fetch_optional(&mut *tx)
                    .await?;
            tx.commit().await?;
            return Ok(known.map(|_| RevokedNode {
                node_id: None,
                credentials: u32::try_from(credentials).unwrap_or(u32::MAX),
                lost: Vec::new(),
            }));
        };
        let mut changes = super::JobChanges::default();
        let why = format!("node {name} was revoked by an operator");
        let lost = lose_node_attempts(&mut tx, &mut changes, node_id, &why, now_ms).await?;
        changes.write(&mut tx, now_ms).await?;
        tx.commit().await?;
        tracing::warn!(node_id, node = %name, credentials, lost = lost.len(), "node revoked; marked down");
        Ok(Some(RevokedNode {
            node_id: Some(node_id),
            credentials: u32::try_from(credentials).unwrap_or(u32::MAX),
            lost,
        }))
    }

    async fn add_project_blob(&self, project: &str, digest: &str, size: u64, now_ms: i64) -> Result<()> {
        sqlx::query(
            "INSERT INTO project_blobs (project, digest, size, created_ms) VALUES (?, ?, ?, ?) \
             ON CONFLICT (project, digest) DO NOTHING",
        )
        .bind(project)
        .bind(digest)
        .bind(i64::try_from(size).unwrap_or(i64::MAX))
        .bind(now_ms)
        .execute(&mut *self.writer.lock().await)
        .await?;
        Ok(())
    }

    async fn blob_projects(&self, digest: &str) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar("SELECT project FROM project_blobs WHERE digest = ? ORDER BY project")
            .bind(digest)
            .fetch_all(&self.reader)
            .await?)
    }

    async fn node_may_read_blob(&self, node_id: i64, digest: &str) -> Result<bool> {
        let found: Option<i64> = sqlx::query_scalar(
            "SELECT 1 FROM attempts a JOIN jobs j ON j.id = a.job_id \
             JOIN project_blobs b ON b.project = j.project AND b.digest = ? \
             WHERE a.node_id = ? AND a.state != 'ended' LIMIT 1",
        )
        .bind(digest)
        .bind(node_id)
        .fetch_optional(&self.reader)
        .await?;
        Ok(found.is_some())
    }
}

/// Inserts a key; with `once`, nothing happens (and `false` comes back) when a key the schema
/// allows only once (the bootstrap key) exists already.
async fn insert_key(conn: &mut SqliteConnection, key: &KeyRecord, once: bool) -> Result<bool> {
    let sql = format!(
        "INSERT INTO api_keys (id, secret_sha256, project, role, name, created_ms, expires_ms, revoked_ms, \
         created_by) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?){}",
        if once { " ON CONFLICT DO NOTHING" } else { "" }
    );
    let done = sqlx::query(&sql)
        .bind(&key.id)
        .bind(&key.secret_sha256)
        .bind(&key.project)
        .bind(key.role.as_str())
        .bind(&key.name)
        .bind(key.created_ms)
        .bind(key.expires_ms)
        .bind(key.revoked_ms)
        .bind(&key.created_by)
        .execute(conn)
        .await?;
    Ok(done.rows_affected() == 1)
}

#[cfg(test)]
mod tests {
    use sqlx::migrate::Migrator;
    use sqlx::sqlite::{SqliteConnectOptions, SqlitePool};

    use super::SqliteStore;

    /// The first migration of identities, which backfills what older servers stored.
    const ACCESS_MIGRATION: i64 = 7;

    #[tokio::test]
    async fn upgraded_database_keeps_working() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("drover.db");
        crate::conformance::copy_migrations_before("sqlite", ACCESS_MIGRATION, &dir.path().join("old"));
        let pool =
            SqlitePool::connect_with(SqliteConnectOptions::new().filename(&db).create_if_missing(true))
                .await
                .unwrap();
        Migrator::new(dir.path().join("old")).await.unwrap().run(&pool).await.unwrap();
        sqlx::raw_sql(crate::conformance::LEGACY_ROWS).execute(&pool).await.unwrap();
        pool.close().await;
        let store = SqliteStore::open(&db).await.unwrap();
        crate::conformance::upgraded_store_keeps_working(&store).await;
    }
}
