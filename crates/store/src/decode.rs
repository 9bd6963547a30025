//! Decoding and encoding of stored values, shared by every dialect: a value the store cannot
//! read back is [`StoreError::Corrupt`], never a panic or a silent default.

use std::str::FromStr;

use drover_core::{FailureClass, RuntimeKind};

use crate::{AttemptReport, Result, StoreError};

/// A stored value that cannot be decoded.
pub(crate) fn corrupt(what: &'static str, detail: impl ToString) -> StoreError {
    StoreError::Corrupt { what, detail: detail.to_string() }
}

/// A word of one of core's vocabularies (states, classes).
pub(crate) fn parse_word<T: FromStr>(what: &'static str, text: &str) -> Result<T>
where
    T::Err: std::fmt::Display,
{
    text.parse().map_err(|e: T::Err| corrupt(what, e))
}

/// A JSON column.
pub(crate) fn json<T: serde::de::DeserializeOwned>(what: &'static str, text: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| corrupt(what, e))
}

/// A runtime's name, as placement needs it.
pub(crate) fn runtime_kind(word: &str) -> Result<RuntimeKind> {
    serde_json::from_value(serde_json::Value::String(word.to_string())).map_err(|e| corrupt("runtime", e))
}

/// A value for a JSON column.
pub(crate) fn to_json<T: serde::Serialize>(what: &'static str, value: &T) -> Result<String> {
    serde_json::to_string(value).map_err(|e| corrupt(what, e))
}

/// The report the store settles an attempt with when its node lost it.
pub(crate) fn lost_report(attempt_id: i64, epoch: i64, message: &str) -> AttemptReport {
    AttemptReport {
        attempt_id,
        epoch,
        exit_code: None,
        signal: None,
        failure: Some(FailureClass::Lost),
        message: message.to_string(),
        cpu_seconds: 0.0,
        peak_memory: 0,
        input_tokens: 0,
        output_tokens: 0,
    }
}

/// The columns every queue-feed query selects, in this order, as both dialects read them.
pub(crate) struct QueueRow<'a> {
    pub id: i64,
    pub priority: i32,
    pub cores: i64,
    pub memory: i64,
    pub constraints: &'a str,
    pub runtime: &'a str,
    /// The image of a microvm task.
    pub image: Option<String>,
    pub project: String,
    pub not_before_ms: i64,
    /// Whether the task is queued now (the feed also reports tasks that left).
    pub queued: bool,
}

/// Sorts the rows of a queue-feed read into the tasks queued and the ids of those that left.
pub(crate) fn queue_changes<'a>(
    cursor: i64,
    rows: impl IntoIterator<Item = Result<QueueRow<'a>>>,
) -> Result<crate::QueueChanges> {
    let mut changes = crate::QueueChanges { cursor, ..Default::default() };
    for row in rows {
        let row = row?;
        if !row.queued {
            changes.left.push(row.id);
            continue;
        }
        changes.queued.push(drover_core::schedule_state::QueueEntry {
            task: drover_core::placement::QueuedTask {
                id: row.id,
                priority: row.priority,
                resources: drover_core::Resources {
                    cores: u32::try_from(row.cores.max(0)).unwrap_or(u32::MAX),
                    memory: u64::try_from(row.memory.max(0)).unwrap_or(u64::MAX),
                    pids: 0,
                },
                constraints: json("constraints", row.constraints)?,
                runtime: runtime_kind(row.runtime)?,
                image: row.image,
                project: row.project,
            },
            not_before_ms: row.not_before_ms,
        });
    }
    Ok(changes)
}

/// A node's columns as `node_books` reads them, and its open attempts' reservations.
pub(crate) fn node_book(
    id: i64,
    labels: &str,
    runtimes: &str,
    capacity: drover_core::Resources,
    attempts: std::collections::BTreeMap<i64, drover_core::Resources>,
) -> Result<drover_core::schedule_state::NodeBook> {
    let runtimes: Vec<String> = json("runtimes", runtimes)?;
    Ok(drover_core::schedule_state::NodeBook {
        id,
        labels: json("labels", labels)?,
        // Runtimes this server does not know (a newer agent) are ignored.
        runtimes: runtimes.iter().filter_map(|r| runtime_kind(r).ok()).collect(),
        capacity,
        attempts,
    })
}
