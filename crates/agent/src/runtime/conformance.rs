//! The runtime conformance suite: behaviour every [`Runtime`] must show, written once and run
//! against each implementation with [`runtime_conformance_tests!`].
//!
//! Checks take the runtime as `&dyn Runtime` and panic on failure. Commands are POSIX `sh` and
//! coreutils/busybox only, so a busybox container image or a minimal VM passes too. Each check
//! uses its own temporary workspace and a process-unique attempt id.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::{
    ExitStatus, MAX_LINE, OutputChunk, RunHandle, Runtime, RuntimeError, Stream, TaskSpec, stop_gracefully,
};

/// Generates one `#[tokio::test]` per check for the runtime that `$make` constructs (the
/// expression is evaluated once per test, twice in the attach test, to model an agent restart).
/// The optional second argument, an [`Adjust`], completes every task the checks build with what
/// the runtime needs (an image, say) before the check runs it.
macro_rules! runtime_conformance_tests {
    ($make:expr) => {
        $crate::runtime::conformance::runtime_conformance_tests!($make, |_| {});
    };
    ($make:expr, $adjust:expr) => {
        mod conformance_suite {
            #[allow(unused_imports)]
            use super::*;

            $crate::runtime::conformance::runtime_conformance_tests!(@each $make, $adjust;
                exit_code_zero,
                exit_code_nonzero,
                killed_by_signal,
                output_streams_in_order,
                long_line_is_split,
                many_lines_none_lost,
                environment,
                working_directory,
                missing_binary,
                wait_is_repeatable,
                stop_gracefully_ends_the_whole_group,
                kill_after_grace_when_term_is_ignored,
                live_cpu_stats,
                peak_memory,
                cpu_pinning,
            );

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn attach_after_restart() {
                let (first, second) = ($make, $make);
                $crate::runtime::conformance::attach_after_restart(&first, &second, $adjust).await;
            }
        }
    };
    (@each $make:expr, $adjust:expr; $($check:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                let runtime = $make;
                $crate::runtime::conformance::$check(&runtime, $adjust).await;
            }
        )*
    };
}
pub(crate) use runtime_conformance_tests;

/// Where the checks' workspaces go: outside `/tmp`, because a confined process task gets a
/// private `/tmp` that would hide a workspace beneath it; and one directory for all, so that a
/// confined runtime can treat it as the agent's work dir (see [`scratch_base`]).
pub fn scratch_base() -> PathBuf {
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/conformance-work");
    let _ = std::fs::create_dir_all(&base);
    std::fs::canonicalize(&base).unwrap_or(base)
}

/// A fresh workspace directory under [`scratch_base`], removed when dropped.
pub fn scratch() -> tempfile::TempDir {
    tempfile::tempdir_in(scratch_base()).expect("scratch workspace")
}

/// Generous bound for things that should take milliseconds; only hit when a check fails.
const PATIENCE: Duration = Duration::from_secs(20);

/// An attempt id no other check in this process (or, through the pid, in a parallel test
/// process) uses, since runtimes name host resources such as cgroups after it.
pub fn unique_attempt_id() -> i64 {
    static NEXT: AtomicI64 = AtomicI64::new(1);
    (i64::from(std::process::id()) << 20) | NEXT.fetch_add(1, Ordering::Relaxed)
}

/// `sh -c SCRIPT` as an argv.
pub fn sh(script: &str) -> Vec<String> {
    vec!["sh".into(), "-c".into(), script.into()]
}

/// A task with the given steps, running in `workspace`, without pinning or limits.
pub fn task(workspace: &Path, steps: Vec<Vec<String>>) -> TaskSpec {
    TaskSpec {
        job_id: 11,
        task_id: 22,
        attempt_id: unique_attempt_id(),
        steps,
        env: Default::default(),
        workspace: workspace.to_path_buf(),
        cpus: Vec::new(),
        memory_limit: 0,
        ..Default::default()
    }
}

/// Completes a task built by a check with what a runtime needs (for example the image of a
/// container runtime); the process runtime needs nothing.
pub type Adjust = fn(&mut TaskSpec);

/// `task` after `adjust`.
fn adjusted(adjust: Adjust, mut task: TaskSpec) -> TaskSpec {
    adjust(&mut task);
    task
}

/// Starts `step` of `task` and returns its handle and the receiving end of its output.
pub async fn start(
    runtime: &dyn Runtime,
    task: &TaskSpec,
    step: usize,
) -> (RunHandle, mpsc::Receiver<OutputChunk>) {
    let (tx, rx) = mpsc::channel(64);
    let handle = runtime.start(task, step, tx).await.expect("start");
    (handle, rx)
}

/// Waits for the step while receiving its output; returns how it ended and everything it
/// wrote. Receiving concurrently matters: the sink is bounded, so an unread sink would stall
/// the step and `wait` with it.
pub async fn finish(
    runtime: &dyn Runtime,
    handle: &RunHandle,
    rx: &mut mpsc::Receiver<OutputChunk>,
) -> (ExitStatus, Vec<OutputChunk>) {
    let mut chunks = Vec::new();
    let wait = tokio::time::timeout(PATIENCE, runtime.wait(handle));
    tokio::pin!(wait);
    let status = loop {
        tokio::select! {
            Some(chunk) = rx.recv() => chunks.push(chunk),
            status = &mut wait => break status.expect("step ended in time").expect("wait"),
        }
    };
    // Everything was sent before wait returned, so whatever is left is already queued.
    while let Ok(chunk) = rx.try_recv() {
        chunks.push(chunk);
    }
    (status, chunks)
}

/// Prepares, runs step `step` to its end, and returns its status and output. No cleanup.
pub async fn run_step(runtime: &dyn Runtime, task: &TaskSpec, step: usize) -> (ExitStatus, Vec<OutputChunk>) {
    runtime.prepare(task).await.expect("prepare");
    let (handle, mut rx) = start(runtime, task, step).await;
    finish(runtime, &handle, &mut rx).await
}

/// Receives output until a chunk contains `needle`, so a check can act once the step reached a
/// known point. Returns the chunks received so far.
pub async fn await_output(rx: &mut mpsc::Receiver<OutputChunk>, needle: &str) -> Vec<OutputChunk> {
    let mut seen = Vec::new();
    let deadline = Instant::now() + PATIENCE;
    while !seen.iter().any(|c: &OutputChunk| String::from_utf8_lossy(&c.data).contains(needle)) {
        let left = deadline.saturating_duration_since(Instant::now());
        let chunk =
            tokio::time::timeout(left, rx.recv()).await.expect("output in time").expect("output before end");
        seen.push(chunk);
    }
    seen
}

/// Concatenated bytes of one stream.
pub fn stream_text(chunks: &[OutputChunk], stream: Stream) -> String {
    let bytes: Vec<u8> = chunks.iter().filter(|c| c.stream == stream).flat_map(|c| c.data.clone()).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The lines of one stream as a receiver finds them in the chunks: split at newlines, a
/// chunk's last piece without one being a line of its own.
pub fn stream_lines(chunks: &[OutputChunk], stream: Stream) -> Vec<String> {
    chunks
        .iter()
        .filter(|c| c.stream == stream)
        .flat_map(|c| {
            c.data.split_inclusive(|&b| b == b'\n').map(|l| String::from_utf8_lossy(l).into_owned())
        })
        .collect()
}

/// Asserts that no running (non-zombie) process with process group `pgid` is left, allowing a
/// moment for killed processes to finish exiting.
pub async fn assert_group_gone(pgid: i32) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let alive = alive_in_group(pgid);
        if alive.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "processes of group {pgid} survived: {alive:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn alive_in_group(pgid: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            let Some(close) = stat.rfind(')') else {
                return false;
            };
            let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
            // fields[0] is the state, fields[2] the process group.
            fields.len() > 2 && !matches!(fields[0], "Z" | "X") && fields[2] == pgid.to_string()
        })
        .collect()
}

/// A step that exits 0 is reported as success.
pub async fn exit_code_zero(runtime: &dyn Runtime, adjust: Adjust) {
    let dir = scratch();
    let task = adjusted(adjust, task(dir.path(), vec![sh("exit 0")]));
    let (status, _) = run_step(runtime, &task, 0).await;
    assert_eq!(status, ExitStatus { code: Some(0), signal: None, oom: false });
    assert!(status.success());
    runtime.cleanup(&task).await.expect("cleanup");
}

/// A step's exit code is reported as is.
pub async fn exit_code_nonzero(runtime: &dyn Runtime, adjust: Adjust) {
    let dir = scratch();
    let task = adjusted(adjust, task(dir.path(), vec![sh("exit 7")]));
    let (status, _) = run_step(runtime, &task, 0).await;
    assert_eq!(status, ExitStatus { code: Some(7), signal: None, oom: false });
    assert!(!status.success());
    runtime.cleanup(&task).await.expect("cleanup");
}

/// A step killed by a signal reports the signal and no code.
pub async fn killed_by_signal(runtime: &dyn Runtime, adjust: Adjust) {
    let dir = scratch();
    let task = adjusted(adjust, task(dir.path(), vec![sh("kill -KILL $$")]));
    let (status, _) = run_step(runtime, &task, 0).await;
    assert_eq!(status, ExitStatus { code: None, signal: Some(9), oom: false });
    runtime.cleanup(&task).await.expect("cleanup");
}

/// Lines of stdout and stderr arrive in order, tagged with their stream and step.
pub async fn output_streams_in_order(runtime: &dyn Runtime, adjust: Adjust) {
    let dir = scratch();
    let script = "for i in 1 2 3 4 5; do echo out$i; echo err$i >&2; done";
    let task = adjusted(adjust, task(dir.path(), vec![sh("true"), sh(script)]));
    let (status, chunks) = run_step(runtime, &task, 1).await;
    assert!(status.success(), "{status:?}");
    assert!(chunks.iter().all(|c| c.step == 1), "{chunks:?}");
    for (stream, prefix) in [(Stream::Stdout, "out"), (Stream::Stderr, "err")] {
        let lines = stream_lines(&chunks, stream);
        let expected: Vec<String> = (1..=5).map(|i| format!("{prefix}{i}\n")).collect();
        assert_eq!(lines, expected, "{stream:?}");
    }
    runtime.cleanup(&task).await.expect("cleanup");
}

/// A 200 KiB line without newline arrives in chunks of at most [`MAX_LINE`] bytes that add up
/// to exactly the original.
pub async fn long_line_is_split(runtime: &dyn Runtime, adjust: Adjust) {
    const LEN: usize = 200 * 1024;
    let dir = scratch();
    // The numbers 1..50000 written back to back: deterministic, and any lost or reordered
    // piece shows.
    let script = format!("seq 1 50000 | tr -d '\\n' | head -c {LEN}");
    let task = adjusted(adjust, task(dir.path(), vec![sh(&script)]));
    let (status, chunks) = run_step(runtime, &task, 0).await;
    assert!(status.success(), "{status:?}");
    let expected: String = (1..=50000).map(|i: u32| i.to_string()).collect::<String>()[..LEN].to_owned();
    assert!(chunks.iter().all(|c| c.data.len() <= MAX_LINE), "a chunk exceeds MAX_LINE");
    assert!(chunks.len() >= LEN.div_ceil(MAX_LINE));
    assert_eq!(stream_text(&chunks, Stream::Stdout), expected);
    runtime.cleanup(&task).await.expect("cleanup");
}

/// 100,000 short lines all arrive, in order.
pub async fn many_lines_none_lost(runtime: &dyn Runtime, adjust: Adjust) {
    let dir = scratch();
    let task = adjusted(adjust, task(dir.path(), vec![sh("seq 1 100000")]));
    let (status, chunks) = run_step(runtime, &task, 0).await;
    assert!(status.success(), "{status:?}");
    // Lines travel many to a chunk, each chunk ending at a line end.
    assert!(chunks.len() < 100_000 && chunks.iter().all(|c| c.data.ends_with(b"\n")), "{}", chunks.len());
    let lines = stream_lines(&chunks, Stream::Stdout);
    assert_eq!(lines.len(), 100_000);
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(*line, format!("{}\n", i + 1), "line {}", i + 1);
    }
    runtime.cleanup(&task).await.expect("cleanup");
}

/// The task's variables and the `DROVER_*` variables are visible to the step.
pub async fn environment(runtime: &dyn Runtime, adjust: Adjust) {
    let dir = scratch();
    let script = r#"printf '%s\n' "$GREETING" "$DROVER_JOB_ID" "$DROVER_TASK_ID" "$DROVER_ATTEMPT_ID" "$DROVER_WORKSPACE" "$API_TOKEN" "$SHADOWED""#;
    let mut task = adjusted(adjust, task(dir.path(), vec![sh(script)]));
    task.env.insert("GREETING".into(), "hello, world".into());
    // Secrets reach the steps too, and win over a variable of the same name.
    task.secrets.insert("API_TOKEN".into(), "s3cret".into());
    task.env.insert("SHADOWED".into(), "from env".into());
    task.secrets.insert("SHADOWED".into(), "from secrets".into());
    let (status, chunks) = run_step(runtime, &task, 0).await;
    assert!(status.success(), "{status:?}");
    let out = stream_text(&chunks, Stream::Stdout);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 7, "{out}");
    assert_eq!(lines[5..], ["s3cret", "from secrets"], "{out}");
    let ids = [task.job_id.to_string(), task.task_id.to_string(), task.attempt_id.to_string()];
    assert_eq!(lines[..4], ["hello, world", ids[0].as_str(), ids[1].as_str(), ids[2].as_str()]);
    assert!(!lines[4].is_empty(), "DROVER_WORKSPACE is empty");
    runtime.cleanup(&task).await.expect("cleanup");
}

/// The step runs in the workspace: `DROVER_WORKSPACE` is its working directory, and files it
/// writes there appear in the task's workspace.
pub async fn working_directory(runtime: &dyn Runtime, adjust: Adjust) {
    let dir = scratch();
    let script = r#"echo here > cwd-marker; pwd -P; cd "$DROVER_WORKSPACE" && pwd -P"#;
    let task = adjusted(adjust, task(dir.path(), vec![sh(script)]));
    let (status, chunks) = run_step(runtime, &task, 0).await;
    assert!(status.success(), "{status:?}");
    let out = stream_text(&chunks, Stream::Stdout);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert_eq!(lines[0], lines[1], "cwd differs from DROVER_WORKSPACE");
    let marker = std::fs::read_to_string(dir.path().join("cwd-marker")).expect("marker in workspace");
    assert_eq!(marker, "here\n");
    runtime.cleanup(&task).await.expect("cleanup");
}

/// A program that does not exist fails `start` with [`RuntimeError::Start`].
pub async fn missing_binary(runtime: &dyn Runtime, adjust: Adjust) {
    let dir = scratch();
    let task = adjusted(adjust, task(dir.path(), vec![vec!["drover-no-such-program-here".into()]]));
    runtime.prepare(&task).await.expect("prepare");
    let (tx, _rx) = mpsc::channel(1);
    match runtime.start(&task, 0, tx).await {
        Err(RuntimeError::Start { .. }) => {}
        other => panic!("expected RuntimeError::Start, got {other:?}"),
    }
    runtime.cleanup(&task).await.expect("cleanup");
}

/// `wait` can be called concurrently and again after the end, always with the same answer.
pub async fn wait_is_repeatable(runtime: &dyn Runtime, adjust: Adjust) {
    let dir = scratch();
    let task = adjusted(adjust, task(dir.path(), vec![sh("sleep 0.3; exit 3")]));
    runtime.prepare(&task).await.expect("prepare");
    let (handle, _rx) = start(runtime, &task, 0).await;
    let (a, b) = tokio::join!(runtime.wait(&handle), runtime.wait(&handle));
    let again = runtime.wait(&handle).await.expect("third wait");
    assert_eq!(a.expect("first wait").code, Some(3));
    assert_eq!(b.expect("second wait"), again);
    assert_eq!(again.code, Some(3));
    runtime.cleanup(&task).await.expect("cleanup");
}

/// [`stop_gracefully`] ends a step and everything it started, grandchildren included.
///
/// Where the handle has a host pid, the step's process group is checked in `/proc`; for every
/// runtime, a background job that would write a marker into the workspace two seconds later
/// must never write it.
pub async fn stop_gracefully_ends_the_whole_group(runtime: &dyn Runtime, adjust: Adjust) {
    const SURVIVOR_DELAY: Duration = Duration::from_secs(2);
    let dir = scratch();
    let script = "(sleep 2; echo survived > survivor) & sleep 60 & echo ready; sleep 60; wait";
    let task = adjusted(adjust, task(dir.path(), vec![sh(script)]));
    runtime.prepare(&task).await.expect("prepare");
    let (handle, mut rx) = start(runtime, &task, 0).await;
    await_output(&mut rx, "ready").await;
    let ready = Instant::now();
    if let Some(pid) = handle.pid {
        assert!(alive_in_group(pid).len() >= 2, "the background sleep should be running");
    }
    let began = Instant::now();
    let status = tokio::time::timeout(PATIENCE, stop_gracefully(runtime, &handle, Duration::from_secs(1)))
        .await
        .expect("stopped in time")
        .expect("stop");
    assert!(!status.success(), "{status:?}");
    assert!(began.elapsed() < Duration::from_secs(10));
    if let Some(pid) = handle.pid {
        assert_group_gone(pid).await;
    }
    tokio::time::sleep(
        (ready + SURVIVOR_DELAY + Duration::from_millis(500)).saturating_duration_since(Instant::now()),
    )
    .await;
    assert!(!dir.path().join("survivor").exists(), "a background job survived the stop");
    runtime.cleanup(&task).await.expect("cleanup");
}

/// A step that ignores SIGTERM is killed once the grace period is over.
pub async fn kill_after_grace_when_term_is_ignored(runtime: &dyn Runtime, adjust: Adjust) {
    let dir = scratch();
    let task = adjusted(adjust, task(dir.path(), vec![sh(r#"trap "" TERM; echo ready; sleep 60"#)]));
    runtime.prepare(&task).await.expect("prepare");
    let (handle, mut rx) = start(runtime, &task, 0).await;
    await_output(&mut rx, "ready").await;
    let grace = Duration::from_secs(1);
    let began = Instant::now();
    let status = tokio::time::timeout(PATIENCE, stop_gracefully(runtime, &handle, grace))
        .await
        .expect("stopped in time")
        .expect("stop");
    assert!(began.elapsed() >= grace, "ended before the grace period: {status:?}");
    assert_eq!(status.signal, Some(9), "{status:?}");
    if let Some(pid) = handle.pid {
        assert_group_gone(pid).await;
    }
    runtime.cleanup(&task).await.expect("cleanup");
}

/// `stats` on a running busy loop shows CPU time.
pub async fn live_cpu_stats(runtime: &dyn Runtime, adjust: Adjust) {
    let dir = scratch();
    let task = adjusted(adjust, task(dir.path(), vec![sh("while :; do :; done")]));
    runtime.prepare(&task).await.expect("prepare");
    let (handle, _rx) = start(runtime, &task, 0).await;
    let deadline = Instant::now() + PATIENCE;
    let usage = loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let usage = runtime.stats(&handle).await.expect("stats");
        if usage.cpu_seconds > 0.0 || Instant::now() > deadline {
            break usage;
        }
    };
    runtime.signal(&handle, super::StopSignal::Kill).await.expect("kill");
    runtime.wait(&handle).await.expect("wait");
    assert!(usage.cpu_seconds > 0.0, "{usage:?}");
    let total = runtime.stats(&handle).await.expect("final stats");
    assert!(total.cpu_seconds >= usage.cpu_seconds, "final {total:?} below live {usage:?}");
    runtime.cleanup(&task).await.expect("cleanup");
}

/// After a step that touched 50 MB, its peak memory is well above 10 MB.
pub async fn peak_memory(runtime: &dyn Runtime, adjust: Adjust) {
    let dir = scratch();
    // dd reads into one buffer of bs bytes, so all of it becomes resident.
    let task = adjusted(
        adjust,
        task(dir.path(), vec![sh("dd if=/dev/zero of=/dev/null bs=50000000 count=1 2>/dev/null")]),
    );
    runtime.prepare(&task).await.expect("prepare");
    let (handle, mut rx) = start(runtime, &task, 0).await;
    let (status, _) = finish(runtime, &handle, &mut rx).await;
    assert!(status.success(), "{status:?}");
    let usage = runtime.stats(&handle).await.expect("stats");
    assert!(usage.peak_memory_bytes > 10_000_000, "{usage:?}");
    runtime.cleanup(&task).await.expect("cleanup");
}

/// A task pinned to CPU 0 can only run there.
pub async fn cpu_pinning(runtime: &dyn Runtime, adjust: Adjust) {
    let dir = scratch();
    let mut task = adjusted(adjust, task(dir.path(), vec![sh("grep Cpus_allowed_list /proc/self/status")]));
    task.cpus = vec![0];
    let (status, chunks) = run_step(runtime, &task, 0).await;
    assert!(status.success(), "{status:?}");
    let out = stream_text(&chunks, Stream::Stdout);
    let allowed = out.split_once(':').map(|(_, v)| v.trim());
    assert_eq!(allowed, Some("0"), "{out}");
    runtime.cleanup(&task).await.expect("cleanup");
}

/// A runtime created after an "agent restart" finds a step the first one started, and refuses
/// handles whose process is gone or whose start time does not match.
pub async fn attach_after_restart(first: &dyn Runtime, second: &dyn Runtime, adjust: Adjust) {
    let dir = scratch();
    let task = adjusted(adjust, task(dir.path(), vec![sh("echo ready; sleep 60")]));
    first.prepare(&task).await.expect("prepare");
    let (handle, mut rx) = start(first, &task, 0).await;
    await_output(&mut rx, "ready").await;

    if let Some(ticks) = handle.pid_start_ticks {
        let reused = RunHandle { pid_start_ticks: Some(ticks + 1), ..handle.clone() };
        let (tx, _) = mpsc::channel(1);
        assert!(
            !second.attach(&reused, tx, (0, 0)).await.expect("attach"),
            "attached despite wrong start time"
        );
    }

    let (tx, _) = mpsc::channel(1);
    assert!(second.attach(&handle, tx, (0, 0)).await.expect("attach"), "running step not found");
    second.stats(&handle).await.expect("stats of attached step");
    second.signal(&handle, super::StopSignal::Kill).await.expect("kill attached");
    tokio::time::timeout(PATIENCE, second.wait(&handle)).await.expect("attached wait in time").expect("wait");
    let (status, _) = finish(first, &handle, &mut rx).await;
    assert_eq!(status.signal, Some(9), "{status:?}");

    let (tx, _) = mpsc::channel(1);
    assert!(!second.attach(&handle, tx, (0, 0)).await.expect("attach"), "attached to an ended step");
    let elsewhere = RunHandle { attempt_id: unique_attempt_id(), ..handle.clone() };
    let (tx, _) = mpsc::channel(1);
    assert!(!second.attach(&elsewhere, tx, (0, 0)).await.expect("attach"), "attached to a dead process");

    second.cleanup(&task).await.expect("cleanup");
    first.cleanup(&task).await.expect("cleanup");
}
