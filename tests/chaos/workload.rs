//! The work the fleet runs while faults strike: arrays of short and long tasks, a DAG, tasks
//! that keep outputs, tasks that fail and retry, a job cancelled mid-run, and a log flood.
//!
//! Every task appends to a ledger file the test owns, outside Drover: a line when it starts,
//! one every tenth of a second while it runs, and one when it ends. The ledger is what the
//! invariants judge attempts by.

use rand::Rng;
use rand::rngs::StdRng;

/// How much work a run submits.
#[derive(Debug, Clone, Copy)]
pub struct Scale {
    /// Frames of each of the short array jobs.
    pub frames: usize,
    /// Short array jobs.
    pub batches: usize,
    /// DAG jobs (a head, an array, a tail).
    pub dags: usize,
    /// Frames of the job that keeps outputs.
    pub outputs: usize,
    /// Frames of the job whose tasks fail and retry.
    pub failing: usize,
    /// Frames of the job of long tasks.
    pub long: usize,
    /// Frames of the job that is cancelled mid-run.
    pub cancelled: usize,
    /// Random faults beyond one of each kind.
    pub extra_faults: usize,
    /// Fewest tasks a run of this scale submits.
    pub min_tasks: usize,
}

impl Scale {
    /// The run CI makes: a little over 300 tasks, each fault kind once, a few more faults.
    pub fn bounded() -> Scale {
        Scale {
            frames: 64,
            batches: 3,
            dags: 2,
            outputs: 30,
            failing: 10,
            long: 12,
            cancelled: 20,
            extra_faults: 2,
            min_tasks: 300,
        }
    }

    /// The run for a benchmark machine: over 2,000 tasks and many faults.
    pub fn soak() -> Scale {
        Scale {
            frames: 320,
            batches: 5,
            dags: 6,
            outputs: 150,
            failing: 40,
            long: 60,
            cancelled: 60,
            extra_faults: 40,
            min_tasks: 2000,
        }
    }
}

/// A job to submit: its name, its file, how many tasks it has.
#[derive(Debug, Clone)]
pub struct JobFile {
    /// The job's name.
    pub name: String,
    /// The job file's text.
    pub text: String,
    /// Its tasks.
    pub tasks: usize,
}

/// Shell that appends one ledger line: task, attempt, event, time (ns), pid.
const NOTE: &str =
    r#"note() { echo "$DROVER_TASK_ID $DROVER_ATTEMPT_ID $1 $(date +%s%N) $$" >> {{ params.ledger }}; }"#;

/// The command of a task that runs `ticks` tenths of a second, then exits with `code`.
fn command(ticks: u32, code: i32, output: bool) -> String {
    let keep =
        if output { "mkdir -p out && echo \"kept by task $DROVER_TASK_ID\" > out/result.txt\n" } else { "" };
    format!(
        "{NOTE}\nnote start\ni=0\nwhile [ $i -lt {ticks} ]; do sleep 0.1; note tick; i=$((i+1)); done\n{keep}note end\nexit {code}\n"
    )
}

/// Indents a block for a YAML literal under `command: |`.
fn block(text: &str) -> String {
    text.lines().map(|l| format!("      {l}\n")).collect()
}

/// The retries every task gets for lost attempts: faults lose attempts on purpose.
const RETRIES: &str = "retries: { count: 8, backoff: 0s, on: [lost] }";

/// The jobs of a run, submitted in this order (the cancelled job is among them; the driver
/// cancels it later).
pub fn jobs(scale: Scale, rng: &mut StdRng) -> Vec<JobFile> {
    let mut jobs = Vec::new();
    for b in 0..scale.batches {
        let ticks = rng.random_range(0..4);
        jobs.push(JobFile {
            name: format!("batch-{b}"),
            text: format!(
                "version: 1\nname: batch-{b}\ntasks:\n  - name: t\n    array: \"1-{}\"\n    {RETRIES}\n    command: |\n{}",
                scale.frames,
                block(&command(ticks, 0, false))
            ),
            tasks: scale.frames,
        });
    }
    for d in 0..scale.dags {
        let width = 20;
        jobs.push(JobFile {
            name: format!("dag-{d}"),
            text: format!(
                "version: 1\nname: dag-{d}\ntasks:\n  - name: head\n    {RETRIES}\n    command: |\n{head}  - name: body\n    array: \"1-{width}\"\n    depends_on: [head]\n    {RETRIES}\n    command: |\n{body}  - name: tail\n    depends_on: [body]\n    {RETRIES}\n    command: |\n{tail}",
                head = block(&command(2, 0, false)),
                body = block(&command(rng.random_range(1..6), 0, false)),
                tail = block(&command(1, 0, false)),
            ),
            tasks: width + 2,
        });
    }
    jobs.push(JobFile {
        name: "outputs".into(),
        text: format!(
            "version: 1\nname: outputs\ntasks:\n  - name: keep\n    array: \"1-{}\"\n    outputs: [\"out/*.txt\"]\n    {RETRIES}\n    command: |\n{}",
            scale.outputs,
            block(&command(2, 0, true))
        ),
        tasks: scale.outputs,
    });
    jobs.push(JobFile {
        name: "failing".into(),
        text: format!(
            "version: 1\nname: failing\ntasks:\n  - name: fail\n    array: \"1-{}\"\n    retries: {{ count: 1, backoff: 0s, on: [exit, lost] }}\n    command: |\n{}",
            scale.failing,
            block(&command(1, 3, false))
        ),
        tasks: scale.failing,
    });
    jobs.push(JobFile {
        name: "long".into(),
        text: format!(
            "version: 1\nname: long\ntasks:\n  - name: long\n    array: \"1-{}\"\n    {RETRIES}\n    command: |\n{}",
            scale.long,
            block(&command(rng.random_range(20..40), 0, false))
        ),
        tasks: scale.long,
    });
    jobs.push(cancelled(scale));
    jobs
}

/// The job the driver cancels while its tasks run: long enough never to end first.
pub fn cancelled(scale: Scale) -> JobFile {
    JobFile {
        name: CANCELLED.into(),
        text: format!(
            "version: 1\nname: {CANCELLED}\npriority: 10\ntasks:\n  - name: doomed\n    array: \"1-{}\"\n    {RETRIES}\n    command: |\n{}",
            scale.cancelled,
            block(&command(600, 0, false))
        ),
        tasks: scale.cancelled,
    }
}

/// The name of the job the driver cancels.
pub const CANCELLED: &str = "cancelled";

/// A job whose two tasks each write 5 MB of output as fast as they can.
pub fn flood(n: usize) -> JobFile {
    let body = format!(
        "{NOTE}\nnote start\nyes 'a line of a log flood that goes on and on' | head -c 5000000\nnote end\n"
    );
    JobFile {
        name: format!("flood-{n}"),
        text: format!(
            "version: 1\nname: flood-{n}\ntasks:\n  - name: flood\n    array: \"1-2\"\n    {RETRIES}\n    command: |\n{}",
            block(&body)
        ),
        tasks: 2,
    }
}
