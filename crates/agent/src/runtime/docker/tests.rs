//! Tests against the real Docker Engine. They build their own image (busybox, from the host's
//! `busybox-static` package) because nothing can be pulled here, and use one attempt id per
//! test so that they run in parallel.

use std::path::Path;
use std::time::{Duration, Instant};

use bollard::query_parameters::CreateImageOptionsBuilder;
use drover_core::{Command, HealthCheck, NetworkPolicy, ServiceSpec};

use super::*;
use crate::runtime::conformance::{self, finish, run_step, sh, stream_text, unique_attempt_id};
use crate::runtime::stop_gracefully;

/// The test image: busybox with its applets linked in `/bin`, `nobody` in `/etc/passwd`.
const TEST_IMAGE_REPO: &str = "drover-test/busybox";
const TEST_IMAGE_TAG: &str = "1";
const TEST_IMAGE: &str = "drover-test/busybox:1";

static IMAGE_READY: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();

/// A connected runtime with the test image present.
async fn test_runtime() -> DockerRuntime {
    let runtime = DockerRuntime::connect().await.expect("these tests need a running Docker Engine");
    IMAGE_READY
        .get_or_init(|| async {
            if !runtime.has_image(TEST_IMAGE).await {
                build_test_image(&runtime).await;
            }
        })
        .await;
    runtime
}

/// Imports a busybox root filesystem as [`TEST_IMAGE`]. Parallel test processes may both
/// import it: each import is complete on its own and the tag simply ends on one of them, while
/// containers already created from the other keep their image.
async fn build_test_image(runtime: &DockerRuntime) {
    let busybox = Path::new("/bin/busybox");
    assert!(busybox.exists(), "the docker tests need /bin/busybox: apt-get install -y busybox-static");
    let root = tempfile::tempdir().expect("tempdir");
    for dir in ["bin", "etc", "tmp", "workspace", "proc", "sys", "dev"] {
        std::fs::create_dir_all(root.path().join(dir)).expect("mkdir");
    }
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(root.path().join("tmp"), std::fs::Permissions::from_mode(0o1777))
            .expect("chmod");
    }
    std::fs::copy(busybox, root.path().join("bin/busybox")).expect("copy busybox");
    let list = std::process::Command::new(busybox).arg("--list").output().expect("busybox --list");
    for applet in String::from_utf8_lossy(&list.stdout).lines().filter(|a| !a.is_empty() && *a != "busybox") {
        std::os::unix::fs::symlink("busybox", root.path().join("bin").join(applet)).expect("link applet");
    }
    std::fs::write(
        root.path().join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    )
    .expect("passwd");
    std::fs::write(root.path().join("etc/group"), "root:x:0:\nnogroup:x:65534:\n").expect("group");
    let tar = std::process::Command::new("tar")
        .arg("-C")
        .arg(root.path())
        .args(["--owner=0", "--group=0", "-c", "."])
        .output()
        .expect("tar");
    assert!(tar.status.success(), "tar failed: {}", String::from_utf8_lossy(&tar.stderr));
    let options =
        CreateImageOptionsBuilder::default().from_src("-").repo(TEST_IMAGE_REPO).tag(TEST_IMAGE_TAG).build();
    let mut progress =
        runtime.docker.create_image(Some(options), Some(bollard::body_full(tar.stdout.into())), None);
    while let Some(item) = progress.next().await {
        item.expect("import test image");
    }
    assert!(runtime.has_image(TEST_IMAGE).await, "test image missing after import");
}

fn use_test_image(task: &mut TaskSpec) {
    task.image = Some(TEST_IMAGE.to_owned());
}

conformance::runtime_conformance_tests!(test_runtime().await, use_test_image);

/// A task on the test image with a fresh attempt id.
fn task(workspace: &Path, steps: Vec<Vec<String>>) -> TaskSpec {
    let mut task = conformance::task(workspace, steps);
    use_test_image(&mut task);
    task
}

fn stdout(chunks: &[OutputChunk]) -> String {
    stream_text(chunks, OutStream::Stdout)
}

async fn labelled(runtime: &DockerRuntime, label: &str) -> (usize, usize) {
    let label = [label.to_owned()];
    let containers = runtime.containers_labelled(&label).await.expect("list containers").len();
    let networks = runtime.networks_labelled(&label).await.expect("list networks").len();
    (containers, networks)
}

fn http_service(name: &str, delay: &str) -> ServiceSpec {
    let script = format!(
        "echo starting; sleep {delay}; mkdir -p /tmp/www && echo ready > /tmp/www/index.html && httpd -f -p 8080 -h /tmp/www"
    );
    ServiceSpec {
        name: name.to_owned(),
        image: TEST_IMAGE.to_owned(),
        command: Some(Command::Shell(script)),
        env: Default::default(),
        tmpfs: vec![],
        user: None,
        healthcheck: Some(HealthCheck {
            command: Command::Argv(vec![
                "wget".into(),
                "-q".into(),
                "-O".into(),
                "-".into(),
                "http://127.0.0.1:8080/".into(),
            ]),
            interval: Duration::from_millis(100),
            timeout: Duration::from_secs(2),
            retries: 100,
        }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_loopback_without_network() {
    let runtime = test_runtime().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let task = task(dir.path(), vec![sh("ls /sys/class/net")]);
    let (status, chunks) = run_step(&runtime, &task, 0).await;
    assert!(status.success(), "{status:?}");
    assert_eq!(stdout(&chunks), "lo\n");
    runtime.cleanup(&task).await.expect("cleanup");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_network_is_per_attempt_and_removed() {
    let runtime = test_runtime().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut task = task(dir.path(), vec![sh("ls /sys/class/net")]);
    task.network = NetworkPolicy::Bridge;
    let (status, chunks) = run_step(&runtime, &task, 0).await;
    assert!(status.success(), "{status:?}");
    assert!(stdout(&chunks).contains("eth0"), "{}", stdout(&chunks));
    let label = format!("{LABEL_ATTEMPT}={}", task.attempt_id);
    let networks = runtime.networks_labelled(std::slice::from_ref(&label)).await.expect("networks");
    assert_eq!(networks.len(), 1);
    let labels = networks[0].labels.clone().unwrap_or_default();
    assert_eq!(labels.get("drover.managed").map(String::as_str), Some("true"));
    assert_eq!(labels.get("drover.job"), Some(&task.job_id.to_string()));
    runtime.cleanup(&task).await.expect("cleanup");
    assert_eq!(labelled(&runtime, &label).await, (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_is_read_only_but_tmp_and_workspace_are_writable() {
    let runtime = test_runtime().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let script = "touch /root-file 2>/dev/null && echo root-writable; \
                  touch /tmp/t && echo tmp-ok; touch /workspace/w && echo workspace-ok; id -u";
    let task = task(dir.path(), vec![sh(script)]);
    let (status, chunks) = run_step(&runtime, &task, 0).await;
    assert!(status.success(), "{status:?}");
    assert_eq!(stdout(&chunks), "tmp-ok\nworkspace-ok\n65534\n");
    assert!(dir.path().join("w").exists());
    runtime.cleanup(&task).await.expect("cleanup");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steps_share_the_container() {
    let runtime = test_runtime().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let task = task(dir.path(), vec![sh("echo kept > /tmp/state"), sh("cat /tmp/state")]);
    let (first, _) = run_step(&runtime, &task, 0).await;
    assert!(first.success(), "{first:?}");
    let (handle, mut rx) = conformance::start(&runtime, &task, 1).await;
    let (second, chunks) = finish(&runtime, &handle, &mut rx).await;
    assert!(second.success(), "{second:?}");
    assert_eq!(stdout(&chunks), "kept\n");
    runtime.cleanup(&task).await.expect("cleanup");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_limit_kills_with_oom() {
    let runtime = test_runtime().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut task =
        task(dir.path(), vec![sh("echo fine"), sh("dd if=/dev/zero of=/dev/null bs=100000000 count=1")]);
    task.memory_limit = 32 * 1024 * 1024;
    let (fine, _) = run_step(&runtime, &task, 0).await;
    assert_eq!(fine, ExitStatus { code: Some(0), signal: None, oom: false });
    let (handle, mut rx) = conformance::start(&runtime, &task, 1).await;
    let (status, _) = finish(&runtime, &handle, &mut rx).await;
    assert!(!status.success(), "{status:?}");
    assert!(status.oom, "{status:?}");
    let usage = runtime.stats(&handle).await.expect("stats");
    assert!(usage.peak_memory_bytes <= 33 * 1024 * 1024, "{usage:?}");
    runtime.cleanup(&task).await.expect("cleanup");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthy_services_gate_the_steps() {
    let runtime = test_runtime().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut task = task(dir.path(), vec![sh("wget -q -O - http://db:8080/")]);
    task.services = vec![http_service("db", "2")];
    let began = Instant::now();
    runtime.prepare(&task).await.expect("prepare");
    let prepared = began.elapsed();
    assert!(
        prepared >= Duration::from_secs(2),
        "prepare returned before the service was healthy: {prepared:?}"
    );
    let (handle, mut rx) = conformance::start(&runtime, &task, 0).await;
    let (status, chunks) = finish(&runtime, &handle, &mut rx).await;
    // The service answered on the first try.
    assert!(status.success(), "{status:?}");
    assert_eq!(stdout(&chunks), "ready\n");
    // Without a network policy the attempt's network only connects the task to its services.
    let label = format!("{LABEL_ATTEMPT}={}", task.attempt_id);
    let networks = runtime.networks_labelled(std::slice::from_ref(&label)).await.expect("networks");
    assert_eq!(networks.iter().map(|n| n.internal).collect::<Vec<_>>(), vec![Some(true)]);
    let services =
        runtime.containers_labelled(&[label.clone(), format!("{LABEL_ROLE}=service")]).await.expect("list");
    assert_eq!(services.len(), 1, "one service container, labelled as such");
    runtime.cleanup(&task).await.expect("cleanup");
    assert_eq!(labelled(&runtime, &label).await, (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unhealthy_service_fails_prepare_with_its_logs() {
    let runtime = test_runtime().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut task = task(dir.path(), vec![sh("true")]);
    let mut service = http_service("cache", "1");
    service.command = Some(Command::Shell("echo service-log-marker; sleep 600".into()));
    service.healthcheck = Some(HealthCheck {
        command: Command::Shell("exit 1".into()),
        interval: Duration::from_millis(100),
        timeout: Duration::from_secs(1),
        retries: 3,
    });
    task.services = vec![service];
    let error = runtime.prepare(&task).await.expect_err("prepare must fail");
    let message = error.to_string();
    assert!(matches!(error, RuntimeError::Start { .. }), "{error:?}");
    assert!(message.contains("service-log-marker"), "{message}");
    assert!(message.contains("cache"), "{message}");
    let label = format!("{LABEL_ATTEMPT}={}", task.attempt_id);
    assert_eq!(labelled(&runtime, &label).await, (0, 0), "a failed prepare left things behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_leaves_nothing_behind() {
    let runtime = test_runtime().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut task = task(dir.path(), vec![sh("echo ready; sleep 60")]);
    task.network = NetworkPolicy::Bridge;
    task.services = vec![ServiceSpec { healthcheck: None, ..http_service("web", "0") }];
    runtime.prepare(&task).await.expect("prepare");
    let (handle, mut rx) = conformance::start(&runtime, &task, 0).await;
    conformance::await_output(&mut rx, "ready").await;
    let label = format!("{LABEL_ATTEMPT}={}", task.attempt_id);
    assert_eq!(labelled(&runtime, &label).await, (2, 1));
    let status = stop_gracefully(&runtime, &handle, Duration::from_secs(2)).await.expect("stop");
    assert_eq!(status.signal, Some(15), "{status:?}");
    runtime.cleanup(&task).await.expect("cleanup");
    assert_eq!(labelled(&runtime, &label).await, (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_runtime_attaches_and_the_step_completes() {
    let first = test_runtime().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let task = task(dir.path(), vec![sh("echo ready; sleep 2; echo done > done-marker; exit 5")]);
    first.prepare(&task).await.expect("prepare");
    let (handle, mut rx) = conformance::start(&first, &task, 0).await;
    conformance::await_output(&mut rx, "ready").await;
    // The agent restarts: a new runtime that knows nothing but the persisted handle.
    drop(rx);
    drop(first);
    let second = test_runtime().await;
    let (tx, _rx) = tokio::sync::mpsc::channel(1);
    assert!(second.attach(&handle, tx, (0, 0)).await.expect("attach"), "running step not found");
    let status = tokio::time::timeout(Duration::from_secs(20), second.wait(&handle)).await.expect("in time");
    assert_eq!(status.expect("wait"), ExitStatus { code: Some(5), signal: None, oom: false });
    assert_eq!(std::fs::read_to_string(dir.path().join("done-marker")).expect("marker"), "done\n");
    second.cleanup(&task).await.expect("cleanup");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_orphans_removes_leftovers_and_keeps_live_attempts() {
    let runtime = test_runtime().await;
    let dir = tempfile::tempdir().expect("tempdir");
    // A job id of its own, so that only this test's containers are in scope while other
    // tests run in parallel.
    let job_id = unique_attempt_id();
    let mut live = task(dir.path(), vec![sh("true")]);
    live.job_id = job_id;
    let mut leftover = task(dir.path(), vec![sh("true")]);
    leftover.job_id = job_id;
    leftover.network = NetworkPolicy::Bridge;
    runtime.prepare(&live).await.expect("prepare live");
    runtime.prepare(&leftover).await.expect("prepare leftover");
    // The agent restarts and only knows the live attempt.
    let restarted = test_runtime().await;
    let removed = restarted
        .remove_unkept(&format!("{}={job_id}", config::LABEL_JOB), &[live.attempt_id])
        .await
        .expect("remove orphans");
    assert_eq!(removed, 2, "the leftover container and its network");
    let leftover_label = format!("{LABEL_ATTEMPT}={}", leftover.attempt_id);
    assert_eq!(labelled(&restarted, &leftover_label).await, (0, 0));
    let live_label = format!("{LABEL_ATTEMPT}={}", live.attempt_id);
    assert_eq!(labelled(&restarted, &live_label).await, (1, 0));
    // The public entry point keeps every attempt it is told to keep.
    restarted.cleanup(&live).await.expect("cleanup");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_in_the_step_environment_only() {
    let runtime = test_runtime().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut task = task(dir.path(), vec![sh(r#"echo "$API_TOKEN""#)]);
    task.secrets.insert("API_TOKEN".into(), "tok-123".into());
    let (status, chunks) = run_step(&runtime, &task, 0).await;
    assert!(status.success(), "{status:?}");
    assert_eq!(stdout(&chunks), "tok-123\n");
    let inspect = runtime
        .docker
        .inspect_container(&config::container_name(task.attempt_id), None)
        .await
        .expect("inspect");
    let env = inspect.config.and_then(|c| c.env).unwrap_or_default();
    assert!(!env.iter().any(|e| e.contains("tok-123")), "secret visible in docker inspect: {env:?}");
    runtime.cleanup(&task).await.expect("cleanup");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_image_and_egress_are_clear_errors() {
    let runtime = test_runtime().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut task = task(dir.path(), vec![sh("true")]);
    task.image = Some("drover-test/no-such-image:0".into());
    let error = runtime.prepare(&task).await.expect_err("missing image");
    assert!(matches!(error, RuntimeError::Start { .. }), "{error:?}");
    assert!(error.to_string().contains("never pulls"), "{error}");
    use_test_image(&mut task);
    task.network = NetworkPolicy::Egress { allow: vec!["example.com".into()] };
    let error = runtime.prepare(&task).await.expect_err("egress");
    assert!(error.to_string().contains("egress"), "{error}");
    task.image = None;
    assert!(runtime.prepare(&task).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_image_reads_a_saved_image() {
    let runtime = test_runtime().await;
    let mut saved = Vec::new();
    let mut export = runtime.docker.export_image(TEST_IMAGE);
    while let Some(chunk) = export.next().await {
        saved.extend_from_slice(&chunk.expect("export"));
    }
    runtime.load_image(std::io::Cursor::new(saved)).await.expect("load");
    assert!(runtime.has_image(TEST_IMAGE).await);
    let error = runtime.load_image(std::io::Cursor::new(b"not a tar".to_vec())).await;
    assert!(error.is_err(), "{error:?}");
}

#[tokio::test]
async fn unreachable_engine_is_unavailable() {
    let client = Docker::connect_with_unix("/nonexistent/docker.sock", 5, bollard::API_DEFAULT_VERSION);
    match DockerRuntime::connect_client(client).await {
        Err(RuntimeError::Unavailable { runtime: "docker", reason }) => {
            assert!(reason.contains("docker"), "{reason}")
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

/// `docker` on the host, for what the runtime's API does not cover in tests.
fn docker_cli(args: &[&str]) -> String {
    let out = std::process::Command::new("docker").args(args).output().expect("run docker");
    assert!(out.status.success(), "docker {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// An archive that carries another image's name loads by id only: the name keeps pointing
/// where it did, and the loaded image gets a name made from its id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loaded_archive_never_retags_a_name_in_use() {
    let runtime = test_runtime().await;
    let unique = unique_attempt_id();
    let victim = format!("drover-test/victim-{unique}:1");
    let intruder = format!("drover-test/intruder-{unique}:1");
    docker_cli(&["tag", TEST_IMAGE, &victim]);
    let victim_id = docker_cli(&["image", "inspect", "--format", "{{.Id}}", &victim]);
    // Another image, saved under the victim's name.
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("Dockerfile"),
        format!("FROM {TEST_IMAGE}\nRUN echo {unique} > /intruder\n"),
    )
    .expect("dockerfile");
    docker_cli(&["build", "-q", "-t", &intruder, &dir.path().display().to_string()]);
    let intruder_id = docker_cli(&["image", "inspect", "--format", "{{.Id}}", &intruder]);
    docker_cli(&["tag", &intruder, &victim]);
    let archive = dir.path().join("archive.tar");
    docker_cli(&["save", "-o", &archive.display().to_string(), &victim]);
    docker_cli(&["tag", TEST_IMAGE, &victim]);
    docker_cli(&["rmi", &intruder]);
    assert!(!runtime.has_image(&intruder_id).await, "the intruder image is gone before the load");

    let file = tokio::fs::File::open(&archive).await.expect("archive");
    runtime.load_image(file).await.expect("load");
    assert!(runtime.has_image(&intruder_id).await, "the archive's image was loaded");
    assert_eq!(
        docker_cli(&["image", "inspect", "--format", "{{.Id}}", &victim]),
        victim_id,
        "the name moved"
    );
    runtime.name_loaded(&intruder_id).await.expect("name");
    let named = format!("drover/loaded:{}", intruder_id.trim_start_matches("sha256:"));
    assert_eq!(docker_cli(&["image", "inspect", "--format", "{{.Id}}", &named]), intruder_id);
    let _ = std::process::Command::new("docker").args(["rmi", &victim, &named]).output();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_get_the_steps_limits_capabilities_and_user() {
    let runtime = test_runtime().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut task = task(dir.path(), vec![sh("wget -q -O - http://web:8080/")]);
    task.network = NetworkPolicy::Bridge;
    task.memory_limit = 96 << 20;
    task.pids_limit = 77;
    task.cpus = vec![0];
    task.services = vec![http_service("web", "0")];
    runtime.prepare(&task).await.expect("prepare");
    let (status, chunks) = run_step(&runtime, &task, 0).await;
    assert_eq!(status.code, Some(0), "{}", stdout(&chunks));
    let name = config::service_container_name(task.attempt_id, "web");
    let inspected = runtime.docker.inspect_container(&name, None).await.expect("inspect service");
    let host = inspected.host_config.expect("host config");
    assert_eq!(host.cap_drop, Some(vec!["ALL".to_owned()]));
    assert_eq!(host.memory, Some(96 << 20));
    assert_eq!(host.pids_limit, Some(77));
    assert_eq!(host.cpuset_cpus.as_deref(), Some("0"));
    assert!(host.security_opt.unwrap_or_default().iter().any(|o| o == "no-new-privileges"));
    assert_eq!(inspected.config.and_then(|c| c.user).as_deref(), Some(config::DEFAULT_USER));
    runtime.cleanup(&task).await.expect("cleanup");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_in_a_container_needs_the_projects_leave() {
    let runtime = test_runtime().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut task = task(dir.path(), vec![sh("id -u")]);
    task.user = Some("0".into());
    let err = runtime.prepare(&task).await.expect_err("root refused without the setting");
    assert!(err.to_string().contains("containers_as_root"), "{err}");
    let mut service = http_service("web", "0");
    service.user = Some("root".into());
    let mut with_service = task.clone();
    with_service.user = None;
    with_service.network = NetworkPolicy::Bridge;
    with_service.services = vec![service];
    let err = runtime.prepare(&with_service).await.expect_err("a root service is refused too");
    assert!(err.to_string().contains("containers_as_root"), "{err}");
    let label = format!("{LABEL_ATTEMPT}={}", task.attempt_id);
    assert_eq!(labelled(&runtime, &label).await, (0, 0), "nothing was created");
    task.allow_root = true;
    runtime.prepare(&task).await.expect("prepare with the setting");
    let (status, chunks) = run_step(&runtime, &task, 0).await;
    assert_eq!((status.code, stdout(&chunks).trim()), (Some(0), "0"));
    runtime.cleanup(&task).await.expect("cleanup");
}

/// Runs `script` in a plain container of the test image (not a Drover one) on `network` and
/// returns what it printed.
async fn run_plain(runtime: &DockerRuntime, network: &str, script: &str) -> String {
    use bollard::models::{ContainerCreateBody, HostConfig};
    use bollard::query_parameters::{
        CreateContainerOptionsBuilder, LogsOptionsBuilder, WaitContainerOptions,
    };
    use futures::StreamExt;
    let name = format!("drover-test-plain-{}", unique_attempt_id());
    let body = ContainerCreateBody {
        image: Some(TEST_IMAGE.into()),
        cmd: Some(vec!["/bin/sh".into(), "-c".into(), script.into()]),
        host_config: Some(HostConfig { network_mode: Some(network.into()), ..Default::default() }),
        ..Default::default()
    };
    let options = CreateContainerOptionsBuilder::default().name(&name).build();
    runtime.docker.create_container(Some(options), body).await.expect("create plain container");
    runtime.docker.start_container(&name, None).await.expect("start plain container");
    let _ = runtime.docker.wait_container(&name, None::<WaitContainerOptions>).collect::<Vec<_>>().await;
    let logs = LogsOptionsBuilder::default().stdout(true).stderr(true).build();
    let text: String = runtime
        .docker
        .logs(&name, Some(logs))
        .filter_map(|chunk| async move { chunk.ok().map(|c| c.to_string()) })
        .collect::<Vec<_>>()
        .await
        .concat();
    let _ = runtime.remove_container(&name).await;
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_network_reaches_neither_the_node_nor_its_servers() {
    let runtime = test_runtime().await;
    // A port on every address of this node, standing for a Drover server's, and a network of
    // the test's own whose gateway is one of the node's addresses.
    let listener = std::net::TcpListener::bind("0.0.0.0:0").expect("listen");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            drop(stream);
        }
    });
    let network = format!("drover-test-gw-{}", unique_attempt_id());
    let request = bollard::models::NetworkCreateRequest {
        name: network.clone(),
        driver: Some("bridge".into()),
        ..Default::default()
    };
    runtime.docker.create_network(request).await.expect("create test network");
    let inspected = runtime.docker.inspect_network(&network, None).await.expect("inspect network");
    let gateway = inspected
        .ipam
        .and_then(|i| i.config)
        .and_then(|c| c.into_iter().find_map(|c| c.gateway))
        .expect("the test network's gateway");
    // Without Drover's rules, a container reaches the node through the gateway.
    let probe = format!("nc -w 3 {gateway} {port} </dev/null && echo reached");
    let plain = run_plain(&runtime, &network, &probe).await;
    assert!(plain.contains("reached"), "the control container should reach the node: {plain}");

    let dir = tempfile::tempdir().expect("tempdir");
    let script = format!(
        "nc -w 3 {gateway} {port} </dev/null && echo LEAK-node; \
         own=$(ip route | awk '/default/ {{print $3}}'); echo own-gateway=$own; \
         nc -w 3 $own {port} </dev/null && echo LEAK-own-gateway; echo checked"
    );
    let mut task = task(dir.path(), vec![sh(&script)]);
    task.network = NetworkPolicy::Full;
    runtime.prepare(&task).await.expect("prepare");
    let (status, chunks) = run_step(&runtime, &task, 0).await;
    let out = stdout(&chunks);
    assert_eq!(status.code, Some(0), "{out}");
    assert!(out.contains("checked") && out.contains("own-gateway=1"), "{out}");
    assert!(!out.contains("LEAK"), "{out}");
    runtime.cleanup(&task).await.expect("cleanup");
    let _ = runtime.docker.remove_network(&network).await;
    let rules = std::process::Command::new("iptables").args(["-S", "INPUT"]).output().expect("iptables");
    let bridge = config::bridge_name(task.attempt_id);
    assert!(!String::from_utf8_lossy(&rules.stdout).contains(&bridge), "rules removed with the network");
}
