//! The Drover agent: one per node. It registers with a server over one long-lived gRPC
//! session, heartbeats, receives assignments, runs them in a runtime, and reports events,
//! output and usage back through an outbox that survives disconnects.
#![warn(missing_docs)]

mod agent;
pub mod ai_task;
pub mod attempt;
pub mod beneath;
pub mod files;
pub mod images;
pub mod journal;
mod lease;
pub mod link;
pub mod log_cap;
pub mod mask;
pub mod monitor;
pub mod outbox;
pub mod reach;
pub mod reservation;
pub mod runtime;
pub mod setup;
pub mod state_log;
#[cfg(any(test, feature = "test-support"))]
pub mod test_support;

pub use agent::{Agent, AgentConfig, AgentError, CREDENTIAL_FILE, DEFAULT_MIN_FREE};
