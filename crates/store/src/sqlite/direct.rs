//! The writer's hot transactions, run on the calling thread.
//!
//! sqlx runs every SQLite statement on a worker thread of its own: each round trip is a
//! channel send and two thread wake-ups, and on the hot path those cost more than the
//! statements themselves (a profile of the server had a third of its CPU in the kernel's task
//! switch, and SQLite's own execution a thirtieth). A submit, a placement round's claim and a
//! batch of starts and finishes therefore run through a second connection to the same file,
//! called directly on the caller's thread: a whole transaction with no hand-off at all.
//!
//! The connection is used only while the store's writer lock is held (every entry point
//! takes the locked writer as proof), so the two write connections never write at once and
//! SQLite's one-writer rule is kept in-process as before. A transaction here has no await
//! point between its `BEGIN` and its `COMMIT`: a caller that goes away cannot leave it open
//! (what [`super::open_tx`] guards against for transactions on the sqlx connection).

use std::sync::{Mutex, PoisonError, TryLockError};

use rusqlite::{Connection, OpenFlags, Row, TransactionBehavior};

use super::*;

/// Prepared statements kept per connection: the hot transactions use a few dozen shapes.
const STATEMENT_CACHE: usize = 128;

/// The second write connection (see the module's documentation).
pub(super) struct Direct(Mutex<Connection>);

impl Direct {
    /// Opens the database at `path`, created and migrated already, with the writer's settings.
    pub(super) fn open(path: &Path) -> Result<Direct> {
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(path, flags)?;
        conn.busy_timeout(Duration::from_secs(10))?;
        // Per connection, as `SqliteStore::open` sets them on the sqlx writer: see there why.
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", true)?;
        conn.pragma_update(None, "cache_size", format!("-{CACHE_KIB}"))?;
        conn.pragma_update(None, "wal_autocheckpoint", checkpoint::WRITER_BACKSTOP)?;
        let mode: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(corrupt("journal mode", format!("{mode}, not wal")));
        }
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        Ok(Direct(Mutex::new(conn)))
    }

    /// Runs `work` in a transaction of its own, committed if it returns `Ok` and rolled back
    /// otherwise. `_writer` is the store's writer, locked by the caller for the whole call.
    pub(super) fn transaction<T>(
        &self,
        _writer: &mut SqliteConnection,
        work: impl FnOnce(&Connection) -> Result<T>,
    ) -> Result<T> {
        // A panic inside `work` rolled its transaction back as it unwound (the transaction's
        // drop), so the connection is sound to use again.
        let mut conn = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let value = work(&tx)?;
        tx.commit()?;
        Ok(value)
    }
}

/// Read-only connections for the hot path's small reads (an API key per call, a job's new
/// events per change a watcher is told of), called on the caller's thread as the writer's
/// transactions are. Reads that may return many rows stay on the sqlx pool, whose threads
/// leave the caller's free meanwhile.
pub(super) struct Readers(Vec<Mutex<Connection>>);

impl Readers {
    /// Opens `count` (at least one) read-only connections to the database at `path`.
    pub(super) fn open(path: &Path, count: usize) -> Result<Readers> {
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        (0..count.max(1))
            .map(|_| {
                let conn = Connection::open_with_flags(path, flags)?;
                conn.busy_timeout(Duration::from_secs(10))?;
                conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
                Ok(Mutex::new(conn))
            })
            .collect::<Result<Vec<_>>>()
            .map(Readers)
    }

    /// Runs `work` on a free reader, or on the first once it is free if none is (a read here
    /// takes microseconds).
    pub(super) fn read<T>(&self, work: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        for slot in &self.0 {
            match slot.try_lock() {
                Ok(conn) => return work(&conn),
                // A panic mid-read changed nothing.
                Err(TryLockError::Poisoned(poisoned)) => return work(&poisoned.into_inner()),
                Err(TryLockError::WouldBlock) => continue,
            }
        }
        let first = self.0.first().ok_or_else(|| corrupt("readers", "none opened"))?;
        let conn = first.lock().unwrap_or_else(PoisonError::into_inner);
        work(&conn)
    }
}

/// Runs each of the statements in `sql` (separated by `;`; none of ours has one inside a
/// literal), binding `param` as `?1` to those that take it, and drops any rows they return.
pub(super) fn run(conn: &Connection, sql: &str, param: &str) -> Result<()> {
    for one in statements(sql) {
        let mut statement = conn.prepare_cached(one)?;
        let mut rows = match statement.parameter_count() {
            0 => statement.query([])?,
            _ => statement.query([param])?,
        };
        while rows.next()?.is_some() {}
    }
    Ok(())
}

/// The rows of one statement, with `param` bound as `?1` (if it takes it), each read by `read`.
pub(super) fn rows<T>(
    conn: &Connection,
    sql: &str,
    param: &str,
    mut read: impl FnMut(&Row<'_>) -> Result<T>,
) -> Result<Vec<T>> {
    let mut statement = conn.prepare_cached(sql)?;
    let mut rows = match statement.parameter_count() {
        0 => statement.query([])?,
        _ => statement.query([param])?,
    };
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        out.push(read(row)?);
    }
    Ok(out)
}

/// The statements of a multi-statement text, trimmed, empty ones left out.
fn statements(sql: &str) -> impl Iterator<Item = &str> {
    sql.split(';').map(str::trim).filter(|s| !s.is_empty())
}

/// A non-negative count read as `u32` (saturating: a corrupt negative reads as 0).
pub(super) fn get_u32(row: &Row<'_>, index: usize) -> Result<u32> {
    Ok(u32::try_from(row.get::<_, i64>(index)?.max(0)).unwrap_or(u32::MAX))
}

/// A non-negative size read as `u64`.
pub(super) fn get_u64(row: &Row<'_>, index: usize) -> Result<u64> {
    Ok(u64::try_from(row.get::<_, i64>(index)?).unwrap_or(0))
}

/// Runs `work`, which may hold the calling thread for long (a submit of a large job), so
/// that the runtime's other tasks move to another thread meanwhile, where the runtime has one.
pub(super) fn long<T>(work: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(work),
        _ => work(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_are_split_and_trimmed() {
        let sql = "BEGIN; SELECT 1 ;\n SELECT ?1 ->> '$.a';  ";
        assert_eq!(statements(sql).collect::<Vec<_>>(), vec!["BEGIN", "SELECT 1", "SELECT ?1 ->> '$.a'"]);
    }

    #[test]
    fn the_parameter_goes_to_the_statements_that_take_it() {
        let conn = Connection::open_in_memory().expect("memory database");
        let sql = "CREATE TABLE t (v TEXT); INSERT INTO t SELECT value FROM json_each(?1, '$.v'); \
                   INSERT INTO t VALUES ('fixed') RETURNING v";
        run(&conn, sql, r#"{"v": ["a", "b"]}"#).expect("statements run");
        let all =
            rows(&conn, "SELECT v FROM t ORDER BY rowid", "", |r| Ok(r.get::<_, String>(0)?)).expect("rows");
        assert_eq!(all, vec!["a", "b", "fixed"]);
        let error = run(&conn, "INSERT INTO nowhere VALUES (?1)", "x").expect_err("no such table");
        assert!(error.to_string().contains("nowhere"), "{error}");
    }
}
