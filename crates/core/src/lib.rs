//! Drover's core vocabulary: the job spec (parsed, validated, templated and expanded into
//! concrete tasks), task and node states, failure classes, resources, and the pure placement
//! function that the server applies.
#![warn(missing_docs)]

pub mod access;
pub mod dag;
pub mod enforce;
pub mod job;
pub mod limits;
pub mod outcome;
pub mod placement;
pub mod resources;
pub mod schedule_state;
pub mod spec;
pub mod state;
pub mod tenancy;

pub use access::Role;
pub use job::{
    AgentSpec, BuildSpec, Command, ExitCodes, HealthCheck, InputSource, InputSpec, JobPlan, LlmProvider,
    NetworkPolicy, PushSpec, RetryPolicy, RuntimeKind, ServiceSpec, TaskPlan,
};
pub use resources::Resources;
pub use state::{FailureClass, JobState, NodeState, TaskState};
