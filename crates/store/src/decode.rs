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
