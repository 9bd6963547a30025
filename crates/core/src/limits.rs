//! How much one job may hold. The job-file compiler and [`crate::JobPlan::validate`] enforce
//! the same numbers, so `drover validate` refuses exactly what the server would, and an API
//! client that skips the CLI meets the same limits.
//!
//! Each limit is generous for real work and finite so that one submit can neither exhaust the
//! server's memory nor fill the store with a job no node can run. Every task becomes a row in
//! the store, an entry in every status answer and a plan the scheduler reads, so the counts
//! bound work per job; the byte limits bound what a single request makes the server hold.

use std::time::Duration;

/// Tasks in one job, counted after array expansion (one per frame).
///
/// Room for two maximal arrays ([`MAX_FRAMES`]) or a generated DAG of tens of thousands of
/// listed tasks, which is more than any job seen in practice; past it a job takes seconds to
/// insert and its status answer runs to tens of megabytes, and it is better split.
pub const MAX_TASKS: usize = 200_000;

/// Frames in one array task.
///
/// A 100,000-frame array covers the largest render and sweep jobs (over an hour of 24 fps
/// film, or a parameter sweep of 100k points). A range written by mistake (`1-1000000`) is
/// refused before any task is made, instead of expanding into a million tasks.
pub const MAX_FRAMES: usize = 100_000;

/// Entries in one task's `depends_on`.
///
/// A dependency names a task, which covers every frame of an array, so only a fan-in over
/// many listed tasks needs many entries: a `report` after each of the 20,000 tasks of a
/// generated DAG fits. Each frame of an array carries its own copy of the list, so the list
/// is also bounded by [`MAX_PLAN_BYTES`].
pub const MAX_DEPENDS_ON: usize = 50_000;

/// Steps in one task. Steps run one after the other with their own events and log markers;
/// a thousand is far beyond any hand-written task and still cheap to track.
pub const MAX_STEPS: usize = 1_000;

/// Most memory one task may ask for: 1 PiB, beyond any node, and well within what the
/// stores keep (signed 64-bit) and the kernel's limits take.
pub const MAX_MEMORY: u64 = 1 << 50;

/// Bytes in a job or task name. Names appear in every table, log prefix and event, and name
/// the directories artifacts are downloaded into: 200 bytes leaves room for a `[frame]` suffix
/// within a file name's 255.
pub const MAX_NAME_LEN: usize = 200;

/// Variables in one task's (or service's) environment, the job's `env` included.
pub const MAX_ENV_VARS: usize = 1_000;

/// Bytes of one program argument, such as a `command` run by the shell.
///
/// The kernel refuses (`E2BIG`) to start a program when any single argument or environment
/// string, with its terminating NUL, exceeds `MAX_ARG_STRLEN` (32 pages, 128 KiB): such a task
/// could never start on any node, so it is refused at submit. Put longer scripts in a file
/// (an input) and run that.
pub const MAX_ARG_BYTES: usize = 128 * 1024 - 1;

/// Bytes of one environment variable written as `NAME=value`, for the same reason and with the
/// same value as [`MAX_ARG_BYTES`].
pub const MAX_ENV_ENTRY_BYTES: usize = MAX_ARG_BYTES;

/// Bytes of a plan's JSON (after decompression) that the server accepts.
///
/// A 100,000-frame array with a short command is about 34 MB of JSON; 256 MiB leaves about
/// 1.3 KB per task at [`MAX_TASKS`]. The job-file compiler stops expanding at this size, and
/// the server stops decompressing at it, so neither holds more than this of plan text.
pub const MAX_PLAN_BYTES: usize = 256 << 20;

/// Bytes of job-file text that the server keeps with a job (`drover submit` sends the file so
/// that it can be shown later).
///
/// 16 MiB holds a generated file of 20,000 listed tasks with long commands (about 200 bytes a
/// task is 4 MB) several times over, and matches the parser's budget of a million values;
/// the compiler refuses larger files before parsing them.
pub const MAX_SOURCE_BYTES: usize = 16 << 20;

/// Longest duration a job may give (a timeout, a retry backoff, a health check's interval or
/// timeout): 36,500 days (a hundred years), which is no limit in practice.
///
/// Durations travel in plans as whole milliseconds in 64 bits; without a bound, a duration
/// written in the job file as `600000000years` would wrap around to a few days on the way
/// to the server. For the same reason durations must be whole milliseconds: `1500us` would
/// arrive as `1ms`, and `1ns` as zero.
pub const MAX_DURATION: Duration = Duration::from_secs(36_500 * 24 * 60 * 60);
