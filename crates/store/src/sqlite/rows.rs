//! Row decoding shared by the SQLite store's queries.

use super::*;

/// A non-negative count read as `u32` (saturating: a corrupt negative reads as 0).
pub(super) fn get_u32(row: &sqlx::sqlite::SqliteRow, index: usize) -> u32 {
    u32::try_from(row.get::<i64, _>(index).max(0)).unwrap_or(u32::MAX)
}

/// A non-negative size read as `u64`.
pub(super) fn get_u64(row: &sqlx::sqlite::SqliteRow, index: usize) -> u64 {
    u64::try_from(row.get::<i64, _>(index)).unwrap_or(0)
}

/// A chunk read with the columns `c.id, c.task_id, t.name, t.frame, c.attempt, c.heads,
/// c.data`, in that order (every log query selects them so).
pub(super) fn stored_chunk(r: &sqlx::sqlite::SqliteRow) -> log_chunks::StoredChunk {
    log_chunks::StoredChunk {
        id: r.get(0),
        task_id: r.get(1),
        task_name: r.get(2),
        frame: r.get(3),
        attempt: get_u32(r, 4),
        heads: r.get(5),
        data: r.get(6),
    }
}
