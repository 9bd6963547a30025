//! Tests against real QEMU (TCG here; KVM where a probe boot works). They need the packages
//! `qemu-system-x86`, `linux-image-cloud-amd64` and `busybox-static`; the static guest agent is
//! built on first use into `target/guest-static` (or taken from `$DROVER_GUEST_AGENT`). VMs are
//! kept small (128–256 MiB, one vCPU, a busybox root filesystem).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::*;
use crate::runtime::conformance::{self, finish, run_step, sh, start, stream_text};
use crate::runtime::{Stream, stop_gracefully};
use drover_core::NetworkPolicy;

/// The static guest agent, built once per test process.
fn guest_agent() -> PathBuf {
    crate::test_support::static_guest_agent().expect("the static guest agent")
}

/// A directory shared by every runtime of this test process (the attach test needs two
/// runtimes to see the same VM directories), short enough for socket paths. Statics are never
/// dropped, so each process removes the directories of earlier, finished test processes.
fn shared_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        const PREFIX: &str = "drover-mvm-test-";
        let tmp = std::env::temp_dir();
        for entry in std::fs::read_dir(&tmp).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name.strip_prefix(PREFIX).and_then(|p| p.parse::<u32>().ok())
                && !Path::new(&format!("/proc/{pid}")).exists()
            {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        let dir = tmp.join(format!("{PREFIX}{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("test dir");
        dir
    })
}

/// A busybox root filesystem: applets linked in `/bin`, `nobody` in `/etc/passwd`.
fn busybox_rootfs() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let busybox = Path::new("/bin/busybox");
        assert!(busybox.exists(), "the microvm tests need /bin/busybox: apt-get install -y busybox-static");
        let root = shared_dir().join("rootfs");
        std::fs::create_dir_all(root.join("bin")).expect("mkdir");
        std::fs::create_dir_all(root.join("etc")).expect("mkdir");
        std::fs::copy(busybox, root.join("bin/busybox")).expect("copy busybox");
        let list = std::process::Command::new(busybox).arg("--list").output().expect("busybox --list");
        for applet in
            String::from_utf8_lossy(&list.stdout).lines().filter(|a| !a.is_empty() && *a != "busybox")
        {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).expect("link applet");
        }
        std::fs::write(
            root.join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        )
        .expect("passwd");
        root
    })
}

fn config() -> MicroVmConfig {
    MicroVmConfig {
        guest_agent: Some(guest_agent()),
        cache_dir: shared_dir().join("cache"),
        run_dir: shared_dir().join("vm"),
        memory_mib: 192,
        // Tests that restore from snapshots say so; the rest boot cold.
        snapshots: false,
        image_dirs: vec![shared_dir().to_path_buf()],
        // As the agent does when it runs as root: QEMU runs as a uid of its own.
        uids: nix::unistd::geteuid()
            .is_root()
            .then(|| std::sync::Arc::new(crate::runtime::uids::UidPool::new(1_100_000..1_165_536))),
        ..Default::default()
    }
}

async fn test_runtime() -> MicroVmRuntime {
    let _ = tracing_subscriber::fmt().with_test_writer().with_env_filter("drover_agent=info").try_init();
    // Build outside the async runtime's worker (it blocks for a while the first time).
    tokio::task::spawn_blocking(|| {
        guest_agent();
        busybox_rootfs();
    })
    .await
    .expect("setup");
    MicroVmRuntime::new(config()).await.expect("microvm runtime")
}

fn use_busybox(task: &mut TaskSpec) {
    task.image = Some(format!("{DIR_IMAGE_PREFIX}{}", busybox_rootfs().display()));
}

fn busybox_task(workspace: &Path, steps: Vec<Vec<String>>) -> TaskSpec {
    let mut task = conformance::task(workspace, steps);
    use_busybox(&mut task);
    task
}

/// Live QEMU processes whose command line mentions `needle`.
fn qemu_processes(needle: &str) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let zombie = stat.rfind(')').is_some_and(|i| stat[i + 1..].trim_start().starts_with('Z'));
            let cmdline = String::from_utf8_lossy(&cmdline);
            !zombie && cmdline.contains("qemu-system") && cmdline.contains(needle)
        })
        .collect()
}

conformance::runtime_conformance_tests!(test_runtime().await, use_busybox);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_steps_with_workspace_round_trip_and_reports_the_accelerator() {
    let runtime = test_runtime().await;
    let accelerator = runtime.accelerator().to_owned();
    assert!(accelerator == "kvm" || accelerator == "tcg", "{accelerator}");
    if std::env::var("DROVER_EXPECT_ACCELERATOR").is_ok_and(|a| a != accelerator) {
        panic!("expected accelerator {:?}, got {accelerator}", std::env::var("DROVER_EXPECT_ACCELERATOR"));
    }
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("input.txt"), "from the host\n").expect("input");
    std::fs::write(dir.path().join("doomed"), "x").expect("doomed");
    let task = busybox_task(
        dir.path(),
        vec![
            sh("cat input.txt; mkdir -p out; echo result > out/r.txt; rm doomed; echo oops >&2; exit 3"),
            sh("cat out/r.txt"),
        ],
    );
    let began = Instant::now();
    runtime.prepare(&task).await.expect("prepare");
    let boot = runtime.boot_time(task.attempt_id).expect("boot time");
    eprintln!("accelerator {accelerator}: cold boot {boot:?}, prepare {:?}", began.elapsed());

    let (handle, mut rx) = start(&runtime, &task, 0).await;
    let (status, chunks) = finish(&runtime, &handle, &mut rx).await;
    assert_eq!(status, ExitStatus { code: Some(3), signal: None, oom: false });
    assert_eq!(stream_text(&chunks, Stream::Stdout), "from the host\n");
    assert_eq!(stream_text(&chunks, Stream::Stderr), "oops\n");
    assert_eq!(std::fs::read_to_string(dir.path().join("out/r.txt")).expect("synced back"), "result\n");
    assert!(!dir.path().join("doomed").exists(), "removal not synced back");

    let (handle, mut rx) = start(&runtime, &task, 1).await;
    let (status, chunks) = finish(&runtime, &handle, &mut rx).await;
    assert!(status.success(), "{status:?}");
    assert_eq!(stream_text(&chunks, Stream::Stdout), "result\n");
    runtime.cleanup(&task).await.expect("cleanup");
}

/// A restarted agent (a second runtime over the same directories) re-attaches a running step:
/// it gets the step's output from then on and its end, the files the step changed, and runs
/// the next step in the same VM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_follows_a_running_step_and_runs_the_next_in_the_same_vm() {
    let first = test_runtime().await;
    let dir = conformance::scratch();
    let task = busybox_task(
        dir.path(),
        vec![
            sh("echo ready; sleep 2; echo after the restart; echo made > result.txt; exit 3"),
            sh("cat result.txt; echo second step"),
        ],
    );
    first.prepare(&task).await.expect("prepare");
    let (handle, mut rx) = start(&first, &task, 0).await;
    conformance::await_output(&mut rx, "ready").await;

    let second = test_runtime().await;
    let (tx, mut resumed) = tokio::sync::mpsc::channel(64);
    assert!(second.attach(&handle, tx, (0, 0)).await.expect("attach"), "running step not found");
    let (status, chunks) = finish(&second, &handle, &mut resumed).await;
    assert_eq!(status.code, Some(3), "{status:?}");
    assert_eq!(stream_text(&chunks, Stream::Stdout), "after the restart\n");
    assert_eq!(stream_text(&chunks, Stream::Stderr), "", "nothing was lost: the first agent still listened");
    assert_eq!(std::fs::read_to_string(dir.path().join("result.txt")).expect("synced back"), "made\n");

    let (next, mut rx) = start(&second, &task, 1).await;
    let (status, chunks) = finish(&second, &next, &mut rx).await;
    assert!(status.success(), "{status:?}");
    assert_eq!(stream_text(&chunks, Stream::Stdout), "made\nsecond step\n");
    // The restarted agent's cleanup ends the VM it did not boot.
    second.cleanup(&task).await.expect("cleanup");
    let needle = format!("/{}/", sandbox_id(task.attempt_id));
    assert!(qemu_processes(&needle).is_empty(), "qemu survived cleanup");
    first.cleanup(&task).await.expect("cleanup");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_the_vm_and_leaves_no_qemu_behind() {
    let runtime = test_runtime().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let task = busybox_task(dir.path(), vec![sh("echo ready; sleep 600")]);
    runtime.prepare(&task).await.expect("prepare");
    let needle = format!("/{}/", sandbox_id(task.attempt_id));
    assert_eq!(qemu_processes(&needle).len(), 1, "one qemu for the vm");
    let (handle, mut rx) = start(&runtime, &task, 0).await;
    conformance::await_output(&mut rx, "ready").await;
    let status = stop_gracefully(&runtime, &handle, Duration::from_secs(1)).await.expect("stop");
    assert_eq!(status.signal, Some(15), "{status:?}");
    runtime.cleanup(&task).await.expect("cleanup");
    assert!(qemu_processes(&needle).is_empty(), "qemu survived cleanup");
    assert!(
        !runtime.booter.config.run_dir.join(sandbox_id(task.attempt_id)).exists(),
        "vm directory left behind"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_of_a_hung_guest_kills_qemu() {
    let runtime = test_runtime().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let task = busybox_task(dir.path(), vec![sh("ls /sys/class/net; sleep 600")]);
    runtime.prepare(&task).await.expect("prepare");
    let (_handle, mut rx) = start(&runtime, &task, 0).await;
    let chunks = conformance::await_output(&mut rx, "lo").await;
    // Network isolation: no device but the loopback.
    assert_eq!(stream_text(&chunks, Stream::Stdout), "lo\n");
    let needle = format!("/{}/", sandbox_id(task.attempt_id));
    // The step keeps running: cleanup has to power the VM off under it.
    runtime.cleanup(&task).await.expect("cleanup");
    assert!(qemu_processes(&needle).is_empty(), "qemu survived cleanup");
}

#[tokio::test]
async fn missing_qemu_or_guest_agent_is_unavailable() {
    let bad_qemu = MicroVmConfig { qemu: "/nonexistent/qemu".into(), ..config_without_agent_build() };
    match MicroVmRuntime::new(bad_qemu).await {
        Err(RuntimeError::Unavailable { reason, .. }) => assert!(reason.contains("qemu"), "{reason}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    let dynamic_agent = MicroVmConfig { guest_agent: Some("/bin/ls".into()), ..config_without_agent_build() };
    match MicroVmRuntime::new(dynamic_agent).await {
        Err(RuntimeError::Unavailable { reason, .. }) => assert!(reason.contains("crt-static"), "{reason}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

fn config_without_agent_build() -> MicroVmConfig {
    MicroVmConfig { accelerator: Accelerator::Tcg, ..Default::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boots_a_docker_image_when_docker_is_available() {
    const IMAGE: &str = "drover-test/busybox:1";
    let docker_ok = tokio::process::Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output()
        .await
        .is_ok_and(|o| o.status.success());
    if !docker_ok {
        eprintln!("no Docker Engine here; skipping");
        return;
    }
    let runtime = test_runtime().await;
    ensure_docker_test_image(IMAGE).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut task = conformance::task(dir.path(), vec![sh("grep nobody /etc/passwd | cut -d: -f1")]);
    task.image = Some(IMAGE.into());
    let (status, chunks) = run_step(&runtime, &task, 0).await;
    assert!(status.success(), "{status:?} {chunks:?}");
    assert_eq!(stream_text(&chunks, Stream::Stdout), "nobody\n");
    runtime.cleanup(&task).await.expect("cleanup");
}

/// Imports the busybox root filesystem as the shared test image unless it exists; parallel
/// importers each produce a complete image and the tag ends on one of them.
async fn ensure_docker_test_image(image: &str) {
    let exists = tokio::process::Command::new("docker")
        .args(["image", "inspect", image])
        .output()
        .await
        .is_ok_and(|o| o.status.success());
    if exists {
        return;
    }
    let root = busybox_rootfs().to_path_buf();
    let tar = tokio::process::Command::new("tar")
        .arg("-C")
        .arg(&root)
        .args(["--owner=0", "--group=0", "-c", "."])
        .output()
        .await
        .expect("tar");
    assert!(tar.status.success());
    let mut import = tokio::process::Command::new("docker")
        .args(["import", "-", image])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("docker import");
    {
        use tokio::io::AsyncWriteExt;
        let mut stdin = import.stdin.take().expect("stdin");
        stdin.write_all(&tar.stdout).await.expect("write tar");
    }
    assert!(import.wait().await.expect("docker import").success());
}

/// A loopback HTTP server answering every request with `body`; returns its address.
async fn http_server(body: &'static str) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buffer = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buffer).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buffer[..n]),
                    }
                }
                let response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_reaches_only_the_allow_list_and_host_ports() {
    let runtime = test_runtime().await;
    let allowed = http_server("allowed-body").await;
    let other = http_server("other-body").await;
    let endpoint = http_server("endpoint-body").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut task = busybox_task(
        dir.path(),
        vec![sh(&format!(
            "wget -q -O - http://{allowed}/; echo; echo allowed=$?; \
             wget -q -O - http://{other}/ 2>/dev/null; echo other=$?; \
             nc -w 3 10.0.2.2 {port} </dev/null 2>/dev/null; echo direct=$?; \
             echo host=$DROVER_HOST_LLM; wget -q -Y off -O - http://$DROVER_HOST_LLM/; echo",
            port = allowed.port()
        ))],
    );
    task.network = NetworkPolicy::Egress { allow: vec![allowed.to_string()] };
    task.host_ports = vec![crate::runtime::HostPort { name: "llm".into(), addr: endpoint }];
    let (status, chunks) = run_step(&runtime, &task, 0).await;
    assert!(status.success(), "{status:?} {chunks:?}");
    let out = stream_text(&chunks, Stream::Stdout);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[..2], ["allowed-body", "allowed=0"], "{out}");
    assert!(lines[2].starts_with("other=") && lines[2] != "other=0", "{out}");
    assert!(lines[3].starts_with("direct=") && lines[3] != "direct=0", "{out}");
    assert_eq!(
        lines[4..],
        [format!("host={}", drover_guest::net::host_port(0)).as_str(), "endpoint-body"],
        "{out}"
    );
    runtime.cleanup(&task).await.expect("cleanup");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_network_device_without_egress_or_host_ports() {
    let runtime = test_runtime().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let task = busybox_task(dir.path(), vec![sh("ls /sys/class/net; echo proxy=$HTTP_PROXY")]);
    let (status, chunks) = run_step(&runtime, &task, 0).await;
    assert!(status.success(), "{status:?}");
    assert_eq!(stream_text(&chunks, Stream::Stdout), "lo\nproxy=\n");
    runtime.cleanup(&task).await.expect("cleanup");
}

#[test]
fn bridge_and_full_networks_are_refused() {
    let mut task = conformance::task(Path::new("/ws"), vec![]);
    task.network = NetworkPolicy::Full;
    assert!(forward::needs_network(&task).is_err());
    task.network = NetworkPolicy::Bridge;
    assert!(forward::needs_network(&task).is_err());
    task.network = NetworkPolicy::None;
    assert!(!forward::needs_network(&task).expect("none"));
}

/// Waits until the pool holds `count` idle VMs of `image`.
async fn await_warm(runtime: &MicroVmRuntime, image: &str, count: u32) {
    let deadline = Instant::now() + Duration::from_secs(180);
    while runtime.warm_counts().get(image).copied().unwrap_or(0) < count {
        assert!(Instant::now() < deadline, "the warm pool never filled: {:?}", runtime.warm_counts());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_claims_a_warm_vm_booted_before_it_came_and_cancel_leaves_no_qemu() {
    let _ = test_runtime().await;
    let image = format!("{DIR_IMAGE_PREFIX}{}", busybox_rootfs().display());
    let run_dir = shared_dir().join("pool");
    let config = MicroVmConfig { warm: [(image.clone(), 1)].into(), run_dir: run_dir.clone(), ..config() };
    let runtime = MicroVmRuntime::new(config).await.expect("runtime");
    await_warm(&runtime, &image, 1).await;
    let launches = runtime.launches();

    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("in.txt"), "warm input\n").expect("input");
    // `network: none`: the warm VM has no network device either.
    let task = busybox_task(dir.path(), vec![sh("cat in.txt; ls /sys/class/net; echo ready; sleep 600")]);
    let assigned = Instant::now();
    runtime.prepare(&task).await.expect("prepare");
    match runtime.origin(task.attempt_id) {
        Some(VmOrigin::Warm { launched_at, ready_at }) => {
            assert!(launched_at < ready_at && ready_at < assigned, "the claimed vm was booted for the task");
        }
        other => panic!("expected a warm vm, got {other:?}"),
    }
    let (handle, mut rx) = start(&runtime, &task, 0).await;
    let chunks = conformance::await_output(&mut rx, "ready").await;
    assert_eq!(stream_text(&chunks, Stream::Stdout), "warm input\nlo\nready\n");
    let sandbox = handle.sandbox_id.clone().expect("sandbox id");
    assert!(sandbox.starts_with(pool::WARM_PREFIX), "{sandbox}");
    let needle = format!("/{sandbox}/");
    assert_eq!(qemu_processes(&needle).len(), 1);

    // Cancel: the step stops, cleanup powers the claimed VM off; the pool refills on its own.
    let status = stop_gracefully(&runtime, &handle, Duration::from_secs(1)).await.expect("stop");
    assert_eq!(status.signal, Some(15), "{status:?}");
    runtime.cleanup(&task).await.expect("cleanup");
    assert!(qemu_processes(&needle).is_empty(), "qemu of the claimed vm survived cleanup");
    await_warm(&runtime, &image, 1).await;
    assert_eq!(runtime.launches(), launches + 1, "one refill boot after the claim");

    runtime.shutdown_pool().await;
    assert!(qemu_processes(&format!("{}/", run_dir.display())).is_empty(), "warm vms survived shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vms_restored_from_a_snapshot_run_tasks_with_the_current_time_and_their_own_randomness() {
    let _ = test_runtime().await;
    let run_dir = shared_dir().join("snap");
    let runtime =
        MicroVmRuntime::new(MicroVmConfig { snapshots: true, run_dir: run_dir.clone(), ..config() })
            .await
            .expect("runtime");
    let mut randoms = Vec::new();
    for round in 0..2 {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("in.txt"), format!("round {round}\n")).expect("input");
        let script = "cat in.txt; date +%s; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; \
                      ls /sys/class/net | tr '\\n' ' '; echo; echo out > out.txt";
        let task = busybox_task(dir.path(), vec![sh(script)]);
        runtime.prepare(&task).await.expect("prepare");
        assert_eq!(runtime.origin(task.attempt_id), Some(VmOrigin::Restored));
        let (handle, mut rx) = start(&runtime, &task, 0).await;
        let (status, chunks) = finish(&runtime, &handle, &mut rx).await;
        assert!(status.success(), "{status:?} {chunks:?}");
        let out = stream_text(&chunks, Stream::Stdout);
        let mut lines = out.lines();
        assert_eq!(lines.next(), Some(format!("round {round}").as_str()));
        let guest_time: u64 = lines.next().and_then(|t| t.parse().ok()).expect("date");
        let host_time = boot::unix_ms() / 1000;
        assert!(guest_time.abs_diff(host_time) < 60, "guest clock {guest_time}, host {host_time}");
        let random = lines.next().expect("random bytes").to_owned();
        assert_eq!(random.len(), 32, "{out}");
        randoms.push(random);
        assert_eq!(
            lines.next(),
            Some("lo "),
            "a restored vm of a `network: none` task has no network device"
        );
        assert_eq!(std::fs::read_to_string(dir.path().join("out.txt")).expect("synced"), "out\n");
        runtime.cleanup(&task).await.expect("cleanup");
        assert!(qemu_processes(&format!("/{}/", sandbox_id(task.attempt_id))).is_empty());
    }
    // A task with egress is restored from the other snapshot, which has the device.
    let dir = tempfile::tempdir().expect("tempdir");
    let mut task = busybox_task(dir.path(), vec![sh("ls /sys/class/net | tr '\\n' ' '")]);
    task.network = NetworkPolicy::Egress { allow: vec!["example.invalid:443".into()] };
    runtime.prepare(&task).await.expect("prepare");
    assert_eq!(runtime.origin(task.attempt_id), Some(VmOrigin::Restored));
    let (handle, mut rx) = start(&runtime, &task, 0).await;
    let (status, chunks) = finish(&runtime, &handle, &mut rx).await;
    assert!(status.success(), "{status:?} {chunks:?}");
    assert_eq!(stream_text(&chunks, Stream::Stdout), "eth0 lo ");
    runtime.cleanup(&task).await.expect("cleanup");
    runtime.shutdown_pool().await;
    assert!(qemu_processes(&format!("{}/", run_dir.display())).is_empty());
    // Both VMs resumed the same memory image; the host's seed sets them apart.
    assert_ne!(randoms[0], randoms[1], "two restored VMs drew the same random bytes");
}

#[test]
fn users_and_versions_parse() {
    assert_eq!(numeric_user("1000"), Some((1000, 1000)));
    assert_eq!(numeric_user("1000:50"), Some((1000, 50)));
    assert_eq!(numeric_user("nobody"), None);
    assert!(
        version_key(Path::new("/boot/vmlinuz-6.1.0-56-cloud-amd64"))
            > version_key(Path::new("/boot/vmlinuz-6.1.0-9-cloud-amd64"))
    );
}

#[test]
fn step_env_layers_image_base_and_task() {
    let mut task = conformance::task(Path::new("/host/ws"), vec![]);
    task.env.insert("PATH".into(), "/custom".into());
    task.secrets.insert("TOKEN".into(), "s3cret".into());
    let env = MicroVmRuntime::step_env(
        &task,
        &["PATH=/image/bin".into(), "LANG=C".into(), "HOME=/root".into()],
        &[],
    );
    let get = |key: &str| env.iter().filter(|(k, _)| k == key).map(|(_, v)| v.as_str()).collect::<Vec<_>>();
    assert_eq!(get("PATH"), ["/custom"]);
    assert_eq!(get("LANG"), ["C"]);
    assert_eq!(get("HOME"), [GUEST_WORKSPACE]);
    assert_eq!(get("DROVER_WORKSPACE"), [GUEST_WORKSPACE]);
    assert_eq!(get("TOKEN"), ["s3cret"]);
}

/// Cold boot (QEMU start to guest agent hello) of a few sequential VMs:
/// `cargo test -p drover-agent --lib cold_boot_times -- --ignored --nocapture`.
/// Set `DROVER_BENCH_ACCELERATOR=kvm` to measure KVM where it works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark; run by hand"]
async fn cold_boot_times() {
    let _ = test_runtime().await;
    let accelerator = match std::env::var("DROVER_BENCH_ACCELERATOR").as_deref() {
        Ok("kvm") => Accelerator::Kvm,
        _ => Accelerator::Tcg,
    };
    let runtime = MicroVmRuntime::new(MicroVmConfig { accelerator, ..config() }).await.expect("runtime");
    let mut boots = Vec::new();
    for _ in 0..5 {
        let dir = tempfile::tempdir().expect("tempdir");
        let task = busybox_task(dir.path(), vec![sh("true")]);
        runtime.prepare(&task).await.expect("prepare");
        boots.push(runtime.boot_time(task.attempt_id).expect("boot time"));
        runtime.cleanup(&task).await.expect("cleanup");
    }
    boots.sort();
    eprintln!("{} cold boots: {boots:?}, median {:?}", runtime.accelerator(), boots[boots.len() / 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_runs_under_its_seccomp_sandbox() {
    let runtime = test_runtime().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let task = busybox_task(dir.path(), vec![sh("true")]);
    runtime.prepare(&task).await.expect("prepare");
    let pids = qemu_processes(&format!("/{}/", sandbox_id(task.attempt_id)));
    assert_eq!(pids.len(), 1, "{pids:?}");
    let cmdline =
        String::from_utf8_lossy(&std::fs::read(format!("/proc/{}/cmdline", pids[0])).expect("cmdline"))
            .replace('\0', " ");
    assert!(cmdline.contains(&format!("-sandbox {}", vm::SANDBOX)), "{cmdline}");
    // Mode 2: a seccomp filter is in force, not only asked for.
    let status = std::fs::read_to_string(format!("/proc/{}/status", pids[0])).expect("status");
    assert!(
        status.lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == ["Seccomp:", "2"]),
        "{status}"
    );
    // Where the agent is root, QEMU is not: it runs as a uid of its own.
    if nix::unistd::geteuid().is_root() {
        let uid: u32 = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .expect("uid");
        assert!((1_100_000..1_165_536).contains(&uid), "QEMU runs as uid {uid}");
    }
    runtime.cleanup(&task).await.expect("cleanup");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dir_images_come_only_from_the_operators_directories() {
    let runtime = test_runtime().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut task = busybox_task(dir.path(), vec![sh("cat /etc/shadow")]);
    for image in ["dir:/etc", "dir:/", &format!("dir:{}/../../etc", shared_dir().display())] {
        task.image = Some(image.to_owned());
        let error = runtime.prepare(&task).await.expect_err(image).to_string();
        assert!(error.contains("outside the directories"), "{image}: {error}");
    }
    // A link inside an allowed directory that leads out is refused too.
    let link = shared_dir().join(format!("escape-{}", task.attempt_id));
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink("/etc", &link).expect("symlink");
    task.image = Some(format!("dir:{}", link.display()));
    let error = runtime.prepare(&task).await.expect_err("link").to_string();
    assert!(error.contains("outside the directories"), "{error}");
    let _ = std::fs::remove_file(&link);
    let closed =
        MicroVmRuntime::new(MicroVmConfig { image_dirs: Vec::new(), ..config() }).await.expect("runtime");
    task.image = Some(format!("dir:{}", busybox_rootfs().display()));
    let error = closed.prepare(&task).await.expect_err("no dirs").to_string();
    assert!(error.contains("takes no `dir:` images"), "{error}");
}
