//! [`AccessStore`] on PostgreSQL.
//!
//! Two writes race here and are settled by the database, not by a check before the write:
//! a join token is spent under its row lock (`FOR UPDATE`), so a second redemption waits and
//! then sees it used; and one node name is held by one credential in force through a unique
//! partial index, so two tokens enrolling the same name at once conflict there and the loser
//! writes nothing. `revoke_node` takes its locks in the global order of [`super`]: the node,
//! its credentials, its open attempts, their jobs, their tasks.

use std::collections::BTreeMap;

use async_trait::async_trait;
use sqlx::postgres::PgRow;
use sqlx::{Postgres, QueryBuilder, Row};

use super::{MAX_TRIES, PostgresStore, json, lose_node_attempts, parse_word, retryable, to_json};
use crate::access::{
    AccessStore, JoinTokenRecord, KeyRecord, NodeCredentialRecord, ProjectRecord, Redeemed, RevokedNode,
};
use crate::pages::{self, List};
use crate::{Page, PageRequest, Result};

/// Columns of [`key_record`], in its order.
const KEY_COLUMNS: &str =
    "id, secret_sha256, project, role, name, created_ms, expires_ms, revoked_ms, created_by";

/// A key read with [`KEY_COLUMNS`].
fn key_record(r: &PgRow) -> Result<KeyRecord> {
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
impl AccessStore for PostgresStore {
    async fn create_project(&self, name: &str, now_ms: i64) -> Result<bool> {
        let n = sqlx::query(
            "INSERT INTO projects (name, created_ms) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(now_ms)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n == 1)
    }

    async fn projects(&self) -> Result<Vec<ProjectRecord>> {
        let rows: Vec<(String, i64)> = sqlx::query_as("SELECT name, created_ms FROM projects ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().map(|(name, created_ms)| ProjectRecord { name, created_ms }).collect())
    }

    async fn list_projects(
        &self,
        only: Option<&[String]>,
        page: &PageRequest,
    ) -> Result<Page<ProjectRecord>> {
        let at = pages::open::<String>(List::Projects, page)?;
        let mut q = QueryBuilder::<Postgres>::new("SELECT name, created_ms FROM projects WHERE TRUE");
        if let Some(only) = only {
            q.push(" AND name = ANY(").push_bind(only.to_vec()).push(")");
        }
        if let Some(after) = &at.after {
            q.push(" AND name > ").push_bind(after);
        }
        q.push(" ORDER BY name LIMIT ").push_bind(at.limit());
        let rows: Vec<(String, i64)> = q.build_query_as().fetch_all(&self.pool).await?;
        let projects =
            rows.into_iter().map(|(name, created_ms)| ProjectRecord { name, created_ms }).collect();
        pages::close(List::Projects, &at, projects, |p| p.name.clone())
    }

    async fn create_key(&self, key: &KeyRecord) -> Result<()> {
        insert_key(&self.pool, key, false).await.map(|_| ())
    }

    async fn create_first_key(&self, key: &KeyRecord) -> Result<bool> {
        insert_key(&self.pool, key, true).await
    }

    async fn key(&self, id: &str) -> Result<Option<KeyRecord>> {
        let sql = format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = $1");
        let row = sqlx::query(&sql).bind(id).fetch_optional(&self.pool).await?;
        row.as_ref().map(key_record).transpose()
    }

    async fn keys(&self, project: Option<&str>) -> Result<Vec<KeyRecord>> {
        let filter = if project.is_some() { "WHERE project = $1" } else { "" };
        let sql = format!("SELECT {KEY_COLUMNS} FROM api_keys {filter} ORDER BY created_ms, id");
        let mut query = sqlx::query(&sql);
        if let Some(project) = project {
            query = query.bind(project);
        }
        query.fetch_all(&self.pool).await?.iter().map(key_record).collect()
    }

    async fn list_keys(&self, project: Option<&str>, page: &PageRequest) -> Result<Page<KeyRecord>> {
        let at = pages::open::<(i64, String)>(List::Keys, page)?;
        let mut q = QueryBuilder::<Postgres>::new(format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE TRUE"));
        if let Some(project) = project {
            q.push(" AND project = ").push_bind(project);
        }
        if let Some((created_ms, id)) = &at.after {
            q.push(" AND (created_ms, id) > (").push_bind(*created_ms).push(", ").push_bind(id).push(")");
        }
        q.push(" ORDER BY created_ms, id LIMIT ").push_bind(at.limit());
        let keys =
            q.build().fetch_all(&self.pool).await?.iter().map(key_record).collect::<Result<Vec<_>>>()?;
        pages::close(List::Keys, &at, keys, |k| (k.created_ms, k.id.clone()))
    }

    async fn revoke_key(&self, id: &str, now_ms: i64) -> Result<bool> {
        let n = sqlx::query("UPDATE api_keys SET revoked_ms = $1 WHERE id = $2 AND revoked_ms IS NULL")
            .bind(now_ms)
            .bind(id)
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(n == 1)
    }

    async fn create_join_token(&self, token: &JoinTokenRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO join_tokens (id, secret_sha256, labels, created_ms, expires_ms, used_ms, used_by, \
             created_by) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&token.id)
        .bind(&token.secret_sha256)
        .bind(to_json("labels", &token.labels)?)
        .bind(token.created_ms)
        .bind(token.expires_ms)
        .bind(token.used_ms)
        .bind(&token.used_by)
        .bind(&token.created_by)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn join_token(&self, id: &str) -> Result<Option<JoinTokenRecord>> {
        let row = sqlx::query(
            "SELECT id, secret_sha256, labels, created_ms, expires_ms, used_ms, used_by, created_by \
             FROM join_tokens WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
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
        let redeemed = transaction!(self.pool, "redeem_join_token", |tx| {
            // The token's row lock makes "unused" and spending it one step: a concurrent
            // redemption waits here and then reads the token as used (READ COMMITTED re-reads
            // a locked row that changed).
            let token: Option<(i64, Option<i64>)> =
                sqlx::query_as("SELECT expires_ms, used_ms FROM join_tokens WHERE id = $1 FOR UPDATE")
                    .bind(token_id)
                    .fetch_optional(&mut *tx)
                    .await?;
            match token {
                None => return Ok(Redeemed::Unknown),
                Some((_, Some(_))) => return Ok(Redeemed::AlreadyUsed),
                Some((expires_ms, None)) if expires_ms <= now_ms => return Ok(Redeemed::Expired),
                Some(_) => {}
            }
            // The unique partial index decides whether the name is free, also against another
            // token enrolling it right now; on conflict nothing is written.
            let inserted = sqlx::query(
                "INSERT INTO node_credentials (id, secret_sha256, node_name, labels, created_ms, revoked_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (node_name) WHERE revoked_ms IS NULL DO NOTHING",
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
                return Ok(Redeemed::NameTaken);
            }
            sqlx::query("UPDATE join_tokens SET used_ms = $1, used_by = $2 WHERE id = $3")
                .bind(now_ms)
                .bind(&credential.node_name)
                .bind(token_id)
                .execute(&mut *tx)
                .await?;
            Ok(Redeemed::Enrolled)
        })?;
        tracing::debug!(token = token_id, node = %credential.node_name, ?redeemed, "join token redeemed");
        Ok(redeemed)
    }

    async fn node_credential(&self, id: &str) -> Result<Option<NodeCredentialRecord>> {
        let row = sqlx::query(
            "SELECT id, secret_sha256, node_name, labels, created_ms, revoked_ms FROM node_credentials \
             WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
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
        let why = |_: i64| format!("node {name} was revoked by an operator");
        let revoked = transaction!(self.pool, "revoke_node", |tx| {
            // The node's row lock first (the global lock order); a registration of the same
            // name waits for this to commit.
            let node_id: Option<i64> =
                sqlx::query_scalar("UPDATE nodes SET state = 'down' WHERE name = $1 RETURNING id")
                    .bind(name)
                    .fetch_optional(&mut *tx)
                    .await?;
            let credentials = sqlx::query(
                "UPDATE node_credentials SET revoked_ms = $1 WHERE node_name = $2 AND revoked_ms IS NULL",
            )
            .bind(now_ms)
            .bind(name)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            let credentials = u32::try_from(credentials).unwrap_or(u32::MAX);
            let Some(node_id) = node_id else {
                let known: bool =
                    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM node_credentials WHERE node_name = $1)")
                        .bind(name)
                        .fetch_one(&mut *tx)
                        .await?;
                return Ok(known.then(|| RevokedNode { node_id: None, credentials, lost: Vec::new() }));
            };
            let lost = lose_node_attempts(&mut tx, &[node_id], &why, now_ms).await?;
            Ok(Some(RevokedNode { node_id: Some(node_id), credentials, lost }))
        })?;
        if let Some(r) = &revoked {
            tracing::warn!(node = %name, node_id = ?r.node_id, r.credentials, lost = r.lost.len(), "node revoked");
        }
        Ok(revoked)
    }

    async fn add_project_blob(&self, project: &str, digest: &str, size: u64, now_ms: i64) -> Result<()> {
        sqlx::query(
            "INSERT INTO project_blobs (project, digest, size, created_ms) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (project, digest) DO NOTHING",
        )
        .bind(project)
        .bind(digest)
        .bind(i64::try_from(size).unwrap_or(i64::MAX))
        .bind(now_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn blob_projects(&self, digest: &str) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar("SELECT project FROM project_blobs WHERE digest = $1 ORDER BY project")
            .bind(digest)
            .fetch_all(&self.pool)
            .await?)
    }

    async fn node_may_read_blob(&self, node_id: i64, digest: &str) -> Result<bool> {
        Ok(sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM attempts a JOIN jobs j ON j.id = a.job_id \
             JOIN project_blobs b ON b.project = j.project AND b.digest = $2 \
             WHERE a.node_id = $1 AND a.state <> 'ended')",
        )
        .bind(node_id)
        .bind(digest)
        .fetch_one(&self.pool)
        .await?)
    }
}

/// Inserts a key; with `once`, nothing happens (and `false` comes back) when a key the schema
/// allows only once (the bootstrap key) exists already.
async fn insert_key(pool: &sqlx::PgPool, key: &KeyRecord, once: bool) -> Result<bool> {
    let sql = format!(
        "INSERT INTO api_keys (id, secret_sha256, project, role, name, created_ms, expires_ms, revoked_ms, \
         created_by) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9){}",
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
        .execute(pool)
        .await?;
    Ok(done.rows_affected() == 1)
}

#[cfg(test)]
mod tests {
    use sqlx::migrate::Migrator;
    use sqlx::postgres::PgPool;

    use super::PostgresStore;
    use crate::pg_test::TempPostgres;

    /// The first migration of identities, which backfills what older servers stored.
    const ACCESS_MIGRATION: i64 = 6;

    #[tokio::test]
    async fn upgraded_database_keeps_working() {
        let url = TempPostgres::shared().url_for_new_database().await;
        let dir = tempfile::tempdir().unwrap();
        crate::conformance::copy_migrations_before("postgres", ACCESS_MIGRATION, &dir.path().join("old"));
        let pool = PgPool::connect(&url).await.unwrap();
        Migrator::new(dir.path().join("old")).await.unwrap().run(&pool).await.unwrap();
        sqlx::raw_sql(crate::conformance::LEGACY_ROWS).execute(&pool).await.unwrap();
        pool.close().await;
        let store = PostgresStore::connect(&url).await.unwrap();
        crate::conformance::upgraded_store_keeps_working(&store).await;
    }
}
