//! An event about to be appended to a job's history: the one row type both dialects write.

use drover_core::{JobState, TaskState};

/// An event about to be appended; the store gives it the job's next sequence number.
#[derive(Debug, Default)]
pub(crate) struct Ev {
    pub(crate) job_id: i64,
    /// `job` or `task`.
    pub(crate) kind: &'static str,
    pub(crate) task_id: i64,
    pub(crate) task_name: String,
    pub(crate) frame: Option<i64>,
    pub(crate) state: String,
    pub(crate) message: String,
    pub(crate) exit_code: Option<i32>,
    pub(crate) attempt: u32,
    pub(crate) node: String,
}

impl Ev {
    /// A task of `job_id` reached `state`.
    pub(crate) fn task(job_id: i64, id: i64, name: &str, frame: Option<i64>, state: TaskState) -> Ev {
        Ev {
            job_id,
            kind: "task",
            task_id: id,
            task_name: name.to_string(),
            frame,
            state: state.to_string(),
            ..Ev::default()
        }
    }

    /// The job reached `state`.
    pub(crate) fn job(job_id: i64, state: JobState, message: String) -> Ev {
        Ev { job_id, kind: "job", state: state.to_string(), message, ..Ev::default() }
    }
}
