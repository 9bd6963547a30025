//! CI smoke test: the whole benchmark in `--quick --no-slurm` mode against the debug `drover`
//! binary. Every section must run end to end and print its row, in well under a minute.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The `drover` binary of the profile this test was built with, built if it is missing.
fn drover_binary() -> PathBuf {
    // The test runs from target/<profile>/deps/; binaries live in target/<profile>/.
    let exe = std::env::current_exe().expect("path of the test executable");
    let profile_dir = exe.parent().and_then(|d| d.parent()).expect("target profile directory").to_path_buf();
    let bin = profile_dir.join("drover");
    if !bin.is_file() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        build.args(["build", "-p", "drover"]);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            build.arg("--release");
        }
        let status = build.status().expect("run cargo build -p drover");
        assert!(status.success(), "cargo build -p drover failed: {status}");
    }
    assert!(bin.is_file(), "no drover binary at {}", bin.display());
    bin
}

#[test]
fn quick_benchmark_prints_a_row_for_every_section() {
    let drover = drover_binary();
    let start = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_drover-bench"))
        .args(["--quick", "--no-slurm", "--drover"])
        .arg(&drover)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start drover-bench");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let limit = Duration::from_secs(50);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for drover-bench") {
            break Some(status);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = out_reader.join().unwrap_or_default();
    let err = err_reader.join().unwrap_or_default();
    let status = status.unwrap_or_else(|| panic!("drover-bench took over {limit:?}\nstderr:\n{err}"));
    assert!(status.success(), "drover-bench failed: {status}\nstdout:\n{out}\nstderr:\n{err}");
    for section in ["throughput", "latency", "placement", "logs", "footprint", "store", "replicas"] {
        let rows: Vec<&str> = out.lines().filter(|l| l.starts_with(&format!("| {section} |"))).collect();
        assert!(!rows.is_empty(), "no row for {section}\nstdout:\n{out}\nstderr:\n{err}");
        assert!(
            rows.iter().all(|r| !r.contains("FAILED")),
            "a {section} measurement failed:\n{}\nstderr:\n{err}",
            rows.join("\n")
        );
    }
    // The HyperQueue peer has a row even where it is not installed (it then says why).
    assert!(
        out.lines().any(|l| l.starts_with("| throughput |") && l.contains("HyperQueue")),
        "no HyperQueue row in throughput\nstdout:\n{out}\nstderr:\n{err}"
    );
    eprintln!("{out}");
}
