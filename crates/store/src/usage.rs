//! What projects and jobs used: compute time and LLM tokens, summed over attempts.

/// Which jobs [`Store::usage`](crate::Store::usage) sums.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsageFilter {
    /// Only jobs of this project.
    pub project: Option<String>,
    /// Only this job.
    pub job_id: Option<i64>,
}

/// What one job used, summed over every attempt of its tasks (retries included, since they
/// consumed the resources too).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobUsage {
    /// The job's project.
    pub project: String,
    /// Job id.
    pub job_id: i64,
    /// Job name.
    pub job_name: String,
    /// Tasks of the job.
    pub tasks: u32,
    /// Attempts handed out, running ones included.
    pub attempts: u32,
    /// CPU seconds the attempts reported.
    pub cpu_seconds: f64,
    /// Wall-clock seconds from start to end of the attempts that ended.
    pub wall_seconds: f64,
    /// LLM input tokens counted by the attempts' metering proxies.
    pub input_tokens: u64,
    /// LLM output tokens.
    pub output_tokens: u64,
}

/// What the jobs of one project that retention deleted used, summed as they went, so that the
/// project's totals do not shrink when its old jobs are deleted.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RetiredUsage {
    /// The project.
    pub project: String,
    /// Jobs deleted.
    pub jobs: u64,
    /// Their tasks.
    pub tasks: u64,
    /// Their attempts.
    pub attempts: u64,
    /// CPU seconds their attempts reported.
    pub cpu_seconds: f64,
    /// Wall-clock seconds from start to end of their attempts.
    pub wall_seconds: f64,
    /// LLM input tokens.
    pub input_tokens: u64,
    /// LLM output tokens.
    pub output_tokens: u64,
    /// Their reserved core and memory time and tokens per price version, which price them.
    pub spend: drover_core::tenancy::MeteredByVersion,
}
