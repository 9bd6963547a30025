//! The Docker runtime: one container per attempt, each step `exec`ed into it in order.
//!
//! # Sandbox
//!
//! `prepare` creates the attempt's container `drover-<attempt>` from the task's image, with
//! docker's `init` as PID 1 and a small shell loop (the *keeper*) as its only child, so the
//! container stays up between steps and every step sees the filesystem the previous one left.
//! The container is locked down by default: no network but loopback, read-only root
//! filesystem, a tmpfs on `/tmp`, the workspace bind-mounted read-write at `/workspace` (the
//! working directory), user `65534:65534` unless the task names one, no capabilities,
//! `no-new-privileges`, and memory (swap equal to memory, so the OOM killer acts at the limit),
//! cpuset and pids limits. Images must therefore provide `/bin/sh` with `sleep` and `kill`
//! (busybox, Debian, Alpine and most language images do; distroless images do not).
//!
//! # Networks and services
//!
//! `NetworkPolicy::Full` uses docker's default bridge; `Bridge` gets a user-defined bridge
//! network `drover-<attempt>`. A task with services always gets that network (the services
//! join it with their name as alias); with `NetworkPolicy::None` it is created `internal`, so
//! the steps reach the services and nothing else. Egress allow-lists are refused (see
//! `config::networking`). Services start before the task container and `prepare` returns
//! only once each is healthy; one that is not fails `prepare` with the tail of its logs.
//!
//! # Steps, signals and accounting
//!
//! A step is an `exec` whose stdout and stderr are streamed live, line by line. Its exit code
//! comes from exec inspect (codes 129..=192 read as signals, see `config::exit_status`).
//! `signal` kills the container with SIGTERM, which the keeper turns into a SIGTERM to every
//! process but itself and init, or with SIGKILL, which ends the container and everything in it
//! (timeouts and cancels end the whole attempt anyway). Usage and OOM kills are read from the
//! container's cgroup on this host when it can be found (see the `cgroup` module), otherwise from
//! docker's stats endpoint and `oom` events.
//!
//! # Restarts
//!
//! A [`RunHandle`] carries the exec id in `sandbox_id` and the exec's host pid. After an agent
//! restart, `attach` finds the attempt's container by its labels and follows the exec by
//! polling exec inspect. The exec's output stream cannot be re-attached in Docker, so output
//! written after the restart is lost; the exit status is still exact.

mod cgroup;
mod config;
mod firewall;
mod services;
#[cfg(test)]
mod tests;
mod untag;

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bollard::Docker;
use bollard::container::LogOutput;
use bollard::exec::{CreateExecOptions, StartExecResults};
use bollard::models::NetworkCreateRequest;
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, EventsOptionsBuilder, ImportImageOptionsBuilder,
    KillContainerOptionsBuilder, ListContainersOptionsBuilder, ListNetworksOptionsBuilder,
    RemoveContainerOptionsBuilder, StatsOptionsBuilder,
};
use futures::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::watch;

use self::cgroup::{ContainerCgroup, Reading};
use self::config::{LABEL_ATTEMPT, LABEL_MANAGED, LABEL_ROLE, Networking};
use super::lines::LineSplitter;
use super::steps::{self, Finished, LiveMax, StepTable, larger};
use super::{
    ExitStatus, OutputChunk, OutputSink, RunHandle, Runtime, RuntimeError, StopSignal, Stream as OutStream,
    TaskSpec, Usage,
};

/// How long output may keep flowing after the step's process exited (a background process
/// can hold the stream open); after that the stream is no longer read.
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(3);

/// How long a freshly started exec may take to get a pid before `start` gives up.
const LAUNCH_PATIENCE: Duration = Duration::from_secs(30);

/// Exec inspect interval while the step's output is still open (its end usually means exit).
const POLL_STREAMING: Duration = Duration::from_millis(250);

/// Exec inspect interval once the output ended, until docker records the exit code.
const POLL_EXITING: Duration = Duration::from_millis(20);

/// Exec inspect interval for a step found by `attach` (no output stream to watch).
const ATTACH_POLL: Duration = Duration::from_millis(200);

/// How long engine discovery may take in [`DockerRuntime::connect`].
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

type ExecOutput = Pin<Box<dyn Stream<Item = Result<LogOutput, bollard::errors::Error>> + Send>>;

/// Runs each attempt in a Docker container through the local Docker Engine API.
#[derive(Debug, Clone)]
pub struct DockerRuntime {
    docker: Docker,
    state: Arc<Mutex<State>>,
    steps: Arc<StepTable<StepState>>,
    /// Addresses of the Drover servers, which no container may reach.
    servers: Vec<std::net::IpAddr>,
}

#[derive(Debug, Default)]
struct State {
    attempts: HashMap<i64, Arc<AttemptInfo>>,
}

/// The running task container of an attempt.
#[derive(Debug)]
struct AttemptInfo {
    container_id: String,
    cgroup: Option<ContainerCgroup>,
}

/// What the runtime knows about one step, started here or attached after a restart.
#[derive(Debug)]
struct StepState {
    attempt: Arc<AttemptInfo>,
    exec_id: String,
    /// The container's cgroup counters when the step started (zero when attached), so CPU time
    /// and OOM kills of earlier steps are not charged to this one.
    baseline: Reading,
    /// Set once the exec has exited and its output is drained.
    finished: watch::Receiver<Option<Finished>>,
    /// Highest usage seen by `stats`, so the final usage is never below a live reading.
    live: LiveMax,
}

/// How a freshly started exec turned out.
enum Launch {
    /// Running (or already done) with this host pid.
    Started(i64),
    /// The runtime could not execute the program; docker's exit code (126 or 127).
    Failed(i64),
}

impl DockerRuntime {
    /// Connects to the local Docker Engine (`DOCKER_HOST`, or the default socket) and checks
    /// that it answers. A missing or unreachable engine is [`RuntimeError::Unavailable`], so
    /// the agent simply does not offer the docker runtime.
    pub async fn connect() -> Result<DockerRuntime, RuntimeError> {
        Self::connect_client(Docker::connect_with_defaults()).await
    }

    /// [`DockerRuntime::connect`] for an agent whose containers are told apart from other
    /// agents' on the same engine by `scope` (stable across the agent's restarts).
    pub async fn connect_scoped(scope: &str) -> Result<DockerRuntime, RuntimeError> {
        config::set_scope(scope);
        Self::connect_client(Docker::connect_with_defaults()).await
    }

    /// Names the addresses of the Drover servers, which no container may reach.
    pub fn with_servers(mut self, servers: Vec<std::net::IpAddr>) -> DockerRuntime {
        self.servers = servers;
        self
    }

    /// [`DockerRuntime::connect`] with a given client.
    async fn connect_client(
        client: Result<Docker, bollard::errors::Error>,
    ) -> Result<DockerRuntime, RuntimeError> {
        let unavailable = |reason: String| RuntimeError::Unavailable { runtime: "docker", reason };
        let docker = client.map_err(|e| unavailable(format!("cannot set up a docker client: {e}")))?;
        let docker = tokio::time::timeout(CONNECT_TIMEOUT, docker.negotiate_version())
            .await
            .map_err(|_| unavailable("the docker engine did not answer within 10s".into()))?
            .map_err(|e| unavailable(format!("cannot reach the docker engine: {e}")))?;
        docker
            .ping()
            .await
            .map_err(|e| unavailable(format!("the docker engine does not answer pings: {e}")))?;
        Ok(DockerRuntime { docker, state: Arc::default(), steps: Arc::default(), servers: Vec::new() })
    }

    /// Whether `reference` (a name with tag, or an image id) is present on this node.
    pub async fn has_image(&self, reference: &str) -> bool {
        self.docker.inspect_image(reference).await.is_ok()
    }

    /// Loads images from a tar stream in `docker save` format (what `docker load` reads), as
    /// the agent does with images fetched from the server; this runtime never pulls. The
    /// archive's tags are dropped first (see [`untag`]): images arrive by id only, and
    /// [`DockerRuntime::name_loaded`] names them after their id.
    pub async fn load_image(&self, tar: impl AsyncRead + Send + 'static) -> Result<(), RuntimeError> {
        let spool = tempfile::tempfile()
            .map_err(|source| RuntimeError::Io { context: "spool an image archive".into(), source })?;
        let writer = spool
            .try_clone()
            .map_err(|source| RuntimeError::Io { context: "spool an image archive".into(), source })?;
        let input = tokio_util::io::SyncIoBridge::new(Box::pin(tar) as Pin<Box<dyn AsyncRead + Send>>);
        tokio::task::spawn_blocking(move || untag::strip_tags(input, std::io::BufWriter::new(writer)))
            .await
            .map_err(|e| RuntimeError::Io {
                context: "untag an image archive".into(),
                source: std::io::Error::other(e),
            })?
            .map_err(|source| RuntimeError::Io { context: "untag an image archive".into(), source })?;
        let mut spool = tokio::fs::File::from_std(spool);
        tokio::io::AsyncSeekExt::seek(&mut spool, std::io::SeekFrom::Start(0))
            .await
            .map_err(|source| RuntimeError::Io { context: "read the untagged archive".into(), source })?;
        let reader: Pin<Box<dyn AsyncRead + Send>> = Box::pin(spool);
        let body = futures::stream::unfold(Some(reader), |reader| async move {
            let mut reader = reader?;
            let mut buf = vec![0u8; 64 * 1024];
            match reader.read(&mut buf).await {
                Ok(0) => None,
                Ok(n) => {
                    buf.truncate(n);
                    Some((Ok(buf.into()), Some(reader)))
                }
                Err(e) => Some((Err(e), None)),
            }
        });
        let options = ImportImageOptionsBuilder::default().quiet(true).build();
        let mut progress = self.docker.import_image_stream(options, body, None);
        while let Some(item) = progress.next().await {
            item.map_err(|e| api_error("load image", e))?;
        }
        Ok(())
    }

    /// Names a loaded image after its id (`drover/loaded:<hex>`), so it is not a dangling
    /// image that a prune removes, and no name anyone chose is touched.
    pub async fn name_loaded(&self, image_id: &str) -> Result<(), RuntimeError> {
        let hex = image_id.strip_prefix("sha256:").unwrap_or(image_id);
        let options = bollard::query_parameters::TagImageOptionsBuilder::default()
            .repo("drover/loaded")
            .tag(hex)
            .build();
        self.docker.tag_image(image_id, Some(options)).await.map_err(|e| api_error("name a loaded image", e))
    }

    /// Removes every container and network this runtime created (label `drover.managed=true`)
    /// whose attempt is not in `keep`: what a crash or a lost cleanup left behind. The agent
    /// calls it at start with the attempts it still runs. Returns how many objects it removed.
    pub async fn remove_orphans(&self, keep: &[i64]) -> Result<usize, RuntimeError> {
        self.remove_unkept(&format!("{}={}", config::LABEL_SCOPE, config::scope()), keep).await
    }

    /// [`DockerRuntime::remove_orphans`] among the objects with label `filter` (`key=value`).
    async fn remove_unkept(&self, filter: &str, keep: &[i64]) -> Result<usize, RuntimeError> {
        let orphan = |labels: Option<&HashMap<String, String>>| {
            let attempt = labels.and_then(|l| l.get(LABEL_ATTEMPT)).and_then(|a| a.parse::<i64>().ok());
            attempt.is_none_or(|a| !keep.contains(&a))
        };
        let filter = [format!("{LABEL_MANAGED}=true"), filter.to_owned()];
        let containers = self.containers_labelled(&filter).await?;
        let mut removed = 0;
        for container in containers.iter().filter(|c| orphan(c.labels.as_ref())) {
            if let Some(id) = &container.id {
                tracing::info!(container = %id, labels = ?container.labels, "removing orphaned container");
                self.remove_container(id).await?;
                removed += 1;
            }
        }
        for network in self.networks_labelled(&filter).await?.iter().filter(|n| orphan(n.labels.as_ref())) {
            if let Some(id) = &network.id {
                tracing::info!(network = %id, "removing orphaned network");
                self.remove_network(id).await?;
                if let Some(bridge) =
                    network.options.as_ref().and_then(|o| o.get("com.docker.network.bridge.name"))
                {
                    firewall::unseal(bridge).await;
                }
                removed += 1;
            }
        }
        Ok(removed)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        super::steps::lock(&self.state)
    }

    fn step_state(&self, handle: &RunHandle) -> Result<Arc<StepState>, RuntimeError> {
        self.steps.get(handle)
    }

    /// The attempt's running task container, from the cache or from the engine.
    async fn attempt_info(&self, attempt_id: i64) -> Result<Arc<AttemptInfo>, RuntimeError> {
        if let Some(known) = self.lock().attempts.get(&attempt_id) {
            return Ok(known.clone());
        }
        let name = config::container_name(attempt_id);
        let inspect = self.docker.inspect_container(&name, None).await.map_err(|e| {
            start_error(&name, format!("the attempt's container is missing (was prepare called?): {e}"))
        })?;
        let state = inspect.state.unwrap_or_default();
        let (Some(id), Some(true)) = (inspect.id, state.running) else {
            return Err(start_error(&name, "the attempt's container is not running".into()));
        };
        let cgroup = state.pid.and_then(ContainerCgroup::of_pid);
        if cgroup.is_none() {
            tracing::debug!(attempt_id, container = %id, "container cgroup not readable; using the stats API");
        }
        let info = Arc::new(AttemptInfo { container_id: id, cgroup });
        Ok(self.lock().attempts.entry(attempt_id).or_insert(info).clone())
    }

    async fn require_image(&self, image: &str) -> Result<(), RuntimeError> {
        if self.has_image(image).await {
            return Ok(());
        }
        Err(RuntimeError::Start {
            command: image.to_owned(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!(
                    "image {image} is not present on this node (the docker runtime never pulls; load it first)"
                ),
            ),
        })
    }

    /// Creates the network, the services and the task container of an attempt.
    async fn create_sandbox(
        &self,
        task: &TaskSpec,
        image: &str,
        net: &Networking,
    ) -> Result<(), RuntimeError> {
        let attempt_id = task.attempt_id;
        if let Networking::Attempt { internal } = net {
            let name = config::network_name(attempt_id);
            let bridge = config::bridge_name(attempt_id);
            let request = NetworkCreateRequest {
                name: name.clone(),
                driver: Some("bridge".into()),
                internal: Some(*internal),
                labels: Some(config::labels(task, config::Role::Task)),
                options: Some([("com.docker.network.bridge.name".to_owned(), bridge.clone())].into()),
                ..Default::default()
            };
            self.docker
                .create_network(request)
                .await
                .map_err(|e| api_error(format!("create network {name}"), e))?;
            // Sealed before any container joins it.
            firewall::seal(&bridge, &self.servers).await.map_err(|reason| start_error(image, reason))?;
            tracing::debug!(attempt_id, network = %name, bridge, internal, "network created and sealed");
            services::start_all(&self.docker, task, &name).await?;
        }
        let name = config::container_name(attempt_id);
        let options = CreateContainerOptionsBuilder::default().name(&name).build();
        let body = config::task_container(task, image, net);
        self.docker
            .create_container(Some(options), body)
            .await
            .map_err(|e| start_error(image, e.to_string()))?;
        self.docker.start_container(&name, None).await.map_err(|e| start_error(image, e.to_string()))?;
        let info = self.attempt_info(attempt_id).await?;
        tracing::info!(attempt_id, container = %info.container_id, image, "task container started");
        Ok(())
    }

    /// Waits until a just-started exec has a pid, or has failed to execute.
    async fn await_launch(&self, exec_id: &str) -> Result<Launch, RuntimeError> {
        let deadline = tokio::time::Instant::now() + LAUNCH_PATIENCE;
        let mut delay = Duration::from_millis(2);
        loop {
            let info = self.docker.inspect_exec(exec_id).await.map_err(|e| api_error("inspect exec", e))?;
            match (info.pid.unwrap_or(0), info.running.unwrap_or(false), info.exit_code) {
                (pid, _, _) if pid > 0 => return Ok(Launch::Started(pid)),
                (_, false, Some(code)) => return Ok(Launch::Failed(code)),
                _ => {}
            }
            if tokio::time::Instant::now() > deadline {
                return Err(api_error(
                    "start exec",
                    bollard::errors::Error::IOError { err: std::io::Error::other("the exec never started") },
                ));
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(50));
        }
    }

    /// Usage of the container from docker's stats endpoint (slow: up to a second).
    async fn api_usage(&self, container: &str) -> Option<Usage> {
        let options = StatsOptionsBuilder::default().stream(false).one_shot(true).build();
        let stats = self.docker.stats(container, Some(options)).next().await?.ok()?;
        let cpu_ns = stats.cpu_stats?.cpu_usage?.total_usage?;
        let memory = stats.memory_stats.unwrap_or_default();
        Some(Usage {
            cpu_seconds: cpu_ns as f64 / 1e9,
            peak_memory_bytes: memory.max_usage.or(memory.usage).unwrap_or(0),
        })
    }

    /// Containers, running or not, that carry every label in `labels` (`key=value`).
    async fn containers_labelled(
        &self,
        labels: &[String],
    ) -> Result<Vec<bollard::models::ContainerSummary>, RuntimeError> {
        let filters = HashMap::from([("label", labels.to_vec())]);
        let options = ListContainersOptionsBuilder::default().all(true).filters(&filters).build();
        self.docker.list_containers(Some(options)).await.map_err(|e| api_error("list containers", e))
    }

    /// Networks that carry every label in `labels` (`key=value`).
    async fn networks_labelled(
        &self,
        labels: &[String],
    ) -> Result<Vec<bollard::models::Network>, RuntimeError> {
        let filters = HashMap::from([("label", labels.to_vec())]);
        let options = ListNetworksOptionsBuilder::default().filters(&filters).build();
        self.docker.list_networks(Some(options)).await.map_err(|e| api_error("list networks", e))
    }

    async fn remove_container(&self, id: &str) -> Result<(), RuntimeError> {
        let options = RemoveContainerOptionsBuilder::default().force(true).v(true).build();
        match self.docker.remove_container(id, Some(options)).await {
            Ok(()) => Ok(()),
            Err(e) if status_code(&e) == Some(404) => Ok(()),
            // 409: removal already in progress (a concurrent cleanup).
            Err(e) if status_code(&e) == Some(409) => Ok(()),
            Err(e) => Err(api_error(format!("remove container {id}"), e)),
        }
    }

    async fn remove_network(&self, id: &str) -> Result<(), RuntimeError> {
        match self.docker.remove_network(id).await {
            Ok(()) => Ok(()),
            Err(e) if status_code(&e) == Some(404) => Ok(()),
            Err(e) => Err(api_error(format!("remove network {id}"), e)),
        }
    }

    /// Removes the containers (task and services) and the network of an attempt.
    async fn remove_attempt(&self, attempt_id: i64) -> Result<(), RuntimeError> {
        let label = config::attempt_filter(attempt_id);
        let mut first_error = None;
        for container in self.containers_labelled(&label).await? {
            if let Some(id) = container.id {
                let role =
                    container.labels.as_ref().and_then(|l| l.get(LABEL_ROLE)).cloned().unwrap_or_default();
                tracing::debug!(attempt_id, container = %id, role, "removing container");
                if let Err(e) = self.remove_container(&id).await {
                    tracing::warn!(attempt_id, container = %id, error = %e, "cannot remove container");
                    first_error.get_or_insert(e);
                }
            }
        }
        for network in self.networks_labelled(&label).await? {
            if let Some(id) = network.id
                && let Err(e) = self.remove_network(&id).await
            {
                tracing::warn!(attempt_id, network = %id, error = %e, "cannot remove network");
                first_error.get_or_insert(e);
            }
            // Also when the network was made by an earlier agent process.
            firewall::unseal(&config::bridge_name(attempt_id)).await;
        }
        first_error.map_or(Ok(()), Err)
    }
}

#[async_trait]
impl Runtime for DockerRuntime {
    fn kind(&self) -> &'static str {
        "docker"
    }

    async fn prepare(&self, task: &TaskSpec) -> Result<(), RuntimeError> {
        let image = task.image.as_deref().filter(|i| !i.is_empty()).ok_or_else(|| {
            start_error("docker", "a docker task needs an image (set `image` on the task)".into())
        })?;
        let net = config::networking(task).map_err(|reason| start_error(image, reason))?;
        config::check_root(task)?;
        let context = || format!("prepare workspace {}", task.workspace.display());
        tokio::fs::create_dir_all(&task.workspace)
            .await
            .map_err(|source| RuntimeError::Io { context: context(), source })?;
        // The container user is unprivileged and usually not the workspace's owner.
        {
            use std::os::unix::fs::PermissionsExt;
            tokio::fs::set_permissions(&task.workspace, std::fs::Permissions::from_mode(0o777))
                .await
                .map_err(|source| RuntimeError::Io { context: context(), source })?;
        }
        self.require_image(image).await?;
        for service in &task.services {
            self.require_image(&service.image).await?;
        }
        // Leftovers of an earlier prepare of the same attempt would clash by name.
        self.lock().attempts.remove(&task.attempt_id);
        self.remove_attempt(task.attempt_id).await?;
        let created = self.create_sandbox(task, image, &net).await;
        if let Err(error) = &created {
            tracing::warn!(attempt_id = task.attempt_id, %error, "prepare failed; removing what it created");
            if let Err(error) = self.cleanup(task).await {
                tracing::warn!(attempt_id = task.attempt_id, %error, "cleanup after a failed prepare failed");
            }
        }
        created
    }

    async fn start(&self, task: &TaskSpec, step: usize, out: OutputSink) -> Result<RunHandle, RuntimeError> {
        let argv = super::steps::argv_of(task, step)?;
        let attempt = self.attempt_info(task.attempt_id).await?;
        let baseline = attempt.cgroup.as_ref().and_then(ContainerCgroup::read).unwrap_or_default();
        let since = SystemTime::now();
        let options = CreateExecOptions {
            cmd: Some(argv.clone()),
            env: Some(config::step_env(task)),
            working_dir: Some(config::WORKSPACE.to_owned()),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            ..Default::default()
        };
        let exec = self
            .docker
            .create_exec(&attempt.container_id, options)
            .await
            .map_err(|e| start_error(&argv[0], e.to_string()))?;
        let output = match self.docker.start_exec(&exec.id, None).await {
            Ok(StartExecResults::Attached { output, .. }) => output,
            Ok(StartExecResults::Detached) => {
                return Err(start_error(&argv[0], "exec started detached".into()));
            }
            Err(e) => return Err(start_error(&argv[0], e.to_string())),
        };
        let pid = match self.await_launch(&exec.id).await? {
            Launch::Started(pid) => pid,
            Launch::Failed(code) => {
                let message = collect_text(output).await;
                let kind = if message.contains("not found") || message.contains("no such file") {
                    std::io::ErrorKind::NotFound
                } else if message.contains("permission denied") {
                    std::io::ErrorKind::PermissionDenied
                } else {
                    std::io::ErrorKind::Other
                };
                let message = format!("exit code {code}: {}", message.trim());
                return Err(RuntimeError::Start {
                    command: argv[0].clone(),
                    source: std::io::Error::new(kind, message),
                });
            }
        };
        let pid = i32::try_from(pid).ok();
        let ticks = pid.and_then(proc_start_ticks);
        let (tx, rx) = watch::channel(None);
        let state = Arc::new(StepState {
            attempt,
            exec_id: exec.id.clone(),
            baseline,
            finished: rx,
            live: LiveMax::default(),
        });
        tracing::info!(
            attempt_id = task.attempt_id,
            step,
            container = %state.attempt.container_id,
            exec = %exec.id,
            pid,
            "step started"
        );
        self.steps.insert(task.attempt_id, step, state.clone());
        tokio::spawn(supervise(
            self.docker.clone(),
            state,
            Some((output, out)),
            tx,
            since,
            task.attempt_id,
            step,
        ));
        Ok(RunHandle {
            attempt_id: task.attempt_id,
            step,
            pid,
            pid_start_ticks: ticks,
            sandbox_id: Some(exec.id),
        })
    }

    async fn attach(
        &self,
        handle: &RunHandle,
        out: OutputSink,
        _from: (u64, u64),
    ) -> Result<bool, RuntimeError> {
        // An exec's output cannot be re-attached in Docker; nothing will be streamed.
        drop(out);
        if let Ok(known) = self.step_state(handle) {
            return Ok(known.finished.borrow().is_none());
        }
        let Some(exec_id) = &handle.sandbox_id else {
            return Ok(false);
        };
        let label = config::attempt_filter(handle.attempt_id);
        let running_task_container = self.containers_labelled(&label).await?.into_iter().find(|c| {
            let role = c.labels.as_ref().and_then(|l| l.get(LABEL_ROLE)).map(String::as_str);
            role == Some("task") && c.state == Some(bollard::models::ContainerSummaryStateEnum::RUNNING)
        });
        let Some(container_id) = running_task_container.and_then(|c| c.id) else {
            tracing::info!(attempt_id = handle.attempt_id, "no running task container to attach to");
            return Ok(false);
        };
        let exec = match self.docker.inspect_exec(exec_id).await {
            Ok(exec) => exec,
            Err(e) => {
                tracing::info!(attempt_id = handle.attempt_id, error = %e, "the step's exec is gone");
                return Ok(false);
            }
        };
        if exec.container_id.as_deref() != Some(container_id.as_str()) {
            tracing::info!(attempt_id = handle.attempt_id, "the step's exec belongs to another container");
            return Ok(false);
        }
        match (exec.running, exec.exit_code) {
            // A step that ended while no agent watched still has its exit code in the engine
            // (as long as its container exists): following it reports that code at once.
            (Some(false), Some(code)) => {
                tracing::info!(attempt_id = handle.attempt_id, code, "the step ended while no agent watched")
            }
            (Some(true), _) => {
                // A handle with a pid must still name the same process (pids are reused).
                if let (Some(pid), Some(ticks)) = (handle.pid, handle.pid_start_ticks)
                    && proc_start_ticks(pid) != Some(ticks)
                {
                    tracing::info!(attempt_id = handle.attempt_id, pid, "the step's process is gone");
                    return Ok(false);
                }
            }
            (running, _) => {
                tracing::info!(attempt_id = handle.attempt_id, ?running, "the step's exec state is unknown");
                return Ok(false);
            }
        }
        let attempt = self.attempt_info(handle.attempt_id).await?;
        let (tx, rx) = watch::channel(None);
        let state = Arc::new(StepState {
            attempt,
            exec_id: exec_id.clone(),
            baseline: Reading::default(),
            finished: rx,
            live: LiveMax::default(),
        });
        self.steps.insert(handle.attempt_id, handle.step, state.clone());
        tracing::info!(
            attempt_id = handle.attempt_id,
            step = handle.step,
            container = %container_id,
            exec = %exec_id,
            "attached to running step"
        );
        tokio::spawn(supervise(
            self.docker.clone(),
            state,
            None,
            tx,
            SystemTime::now(),
            handle.attempt_id,
            handle.step,
        ));
        Ok(true)
    }

    async fn signal(&self, handle: &RunHandle, signal: StopSignal) -> Result<(), RuntimeError> {
        let state = self.step_state(handle)?;
        let name = match signal {
            StopSignal::Terminate => "SIGTERM",
            StopSignal::Kill => "SIGKILL",
        };
        let container = &state.attempt.container_id;
        tracing::debug!(attempt_id = handle.attempt_id, container = %container, signal = name, "signalling container");
        let options = KillContainerOptionsBuilder::default().signal(name).build();
        match self.docker.kill_container(container, Some(options)).await {
            Ok(()) => Ok(()),
            // Not running (409) or gone (404): nothing left to signal.
            Err(e) if matches!(status_code(&e), Some(404 | 409)) => Ok(()),
            Err(e) => Err(api_error(format!("send {name} to container {container}"), e)),
        }
    }

    async fn wait(&self, handle: &RunHandle) -> Result<ExitStatus, RuntimeError> {
        let state = self.step_state(handle)?;
        Ok(wait_finished(&state).await?.status)
    }

    async fn stats(&self, handle: &RunHandle) -> Result<Usage, RuntimeError> {
        let state = self.step_state(handle)?;
        let finished = *state.finished.borrow();
        if let (Some(finished), Some(_)) = (finished, &state.attempt.cgroup) {
            return Ok(state.live.record(finished.usage));
        }
        let reading = match &state.attempt.cgroup {
            Some(cgroup) => cgroup.read().map(|now| usage_since(&state.baseline, now)),
            None => self.api_usage(&state.attempt.container_id).await,
        };
        let usage = match reading {
            Some(usage) => state.live.record(usage),
            None => state.live.get(),
        };
        Ok(finished.map_or(usage, |f| larger(usage, f.usage)))
    }

    async fn cleanup(&self, task: &TaskSpec) -> Result<(), RuntimeError> {
        {
            self.steps.take_attempt(task.attempt_id);
            self.lock().attempts.remove(&task.attempt_id);
        }
        self.remove_attempt(task.attempt_id).await?;
        tracing::info!(attempt_id = task.attempt_id, "sandbox removed");
        Ok(())
    }
}

/// Follows one exec to its end: pumps its output (when there is a stream), polls exec inspect
/// for the exit code, then publishes the status with OOM flag and usage.
async fn supervise(
    docker: Docker,
    state: Arc<StepState>,
    output: Option<(ExecOutput, OutputSink)>,
    tx: watch::Sender<Option<Finished>>,
    since: SystemTime,
    attempt_id: i64,
    step: usize,
) {
    let container = state.attempt.container_id.clone();
    let mut pump = output.map(|(stream, sink)| tokio::spawn(pump(stream, sink, step)));
    let mut streaming = pump.is_some();
    let code = loop {
        match pump.as_mut() {
            Some(pump) if streaming => tokio::select! {
                _ = pump => streaming = false,
                _ = tokio::time::sleep(POLL_STREAMING) => {}
            },
            Some(_) => tokio::time::sleep(POLL_EXITING).await,
            None => tokio::time::sleep(ATTACH_POLL).await,
        }
        match docker.inspect_exec(&state.exec_id).await {
            Ok(info) if info.running == Some(true) => {}
            Ok(info) => break info.exit_code,
            Err(error) => {
                tracing::warn!(attempt_id, step, container = %container, %error, "exec vanished; exit status unknown");
                break None;
            }
        }
    };
    if let Some(pump) = pump.filter(|_| streaming) {
        let abort = pump.abort_handle();
        if tokio::time::timeout(DRAIN_AFTER_EXIT, pump).await.is_err() {
            tracing::debug!(attempt_id, step, container = %container, "output still open after the step exited");
            abort.abort();
        }
    }

    let mut status = code.map_or(ExitStatus { code: None, signal: None, oom: false }, config::exit_status);
    let reading = state.attempt.cgroup.as_ref().and_then(ContainerCgroup::read);
    if code.is_some() && !status.success() {
        status.oom = match reading {
            Some(now) => now.oom_kills > state.baseline.oom_kills,
            None => status.signal == Some(9) && oom_event_since(&docker, &container, since).await,
        };
    }
    let usage = match reading {
        Some(now) => state.live.record(usage_since(&state.baseline, now)),
        None => state.live.get(),
    };
    steps::publish_end(&tx, Finished { status, usage }, attempt_id, step, &format!("container {container}"));
}

/// Sends an exec's output to the sink line by line. When the sink is closed the rest is still
/// read, so the step never blocks on a full pipe.
async fn pump(mut output: ExecOutput, sink: OutputSink, step: usize) {
    let mut stdout = LineSplitter::default();
    let mut stderr = LineSplitter::default();
    let mut listening = true;
    let send = async |stream: OutStream, data: Vec<u8>, listening: &mut bool| {
        if *listening {
            *listening = sink.send(OutputChunk { stream, step, data, end: None }).await.is_ok();
        }
    };
    while let Some(frame) = output.next().await {
        let (stream, splitter, message) = match frame {
            Ok(LogOutput::StdOut { message } | LogOutput::Console { message }) => {
                (OutStream::Stdout, &mut stdout, message)
            }
            Ok(LogOutput::StdErr { message }) => (OutStream::Stderr, &mut stderr, message),
            Ok(LogOutput::StdIn { .. }) => continue,
            Err(error) => {
                tracing::warn!(step, %error, "reading step output failed");
                break;
            }
        };
        for line in splitter.push(&message) {
            send(stream, line, &mut listening).await;
        }
    }
    for (stream, splitter) in [(OutStream::Stdout, &mut stdout), (OutStream::Stderr, &mut stderr)] {
        if let Some(line) = splitter.finish() {
            send(stream, line, &mut listening).await;
        }
    }
}

/// Everything a short-lived exec wrote (for error messages), read for at most a few seconds.
async fn collect_text(mut output: ExecOutput) -> String {
    let mut text = String::new();
    let read = async {
        while let Some(Ok(frame)) = output.next().await {
            text.push_str(&String::from_utf8_lossy(frame.as_ref()));
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), read).await;
    text
}

async fn wait_finished(state: &StepState) -> Result<Finished, RuntimeError> {
    steps::wait_finished(&state.finished, &format!("supervisor of exec {}", state.exec_id)).await
}

/// Whether docker recorded an OOM kill in `container` since `since` (used when the cgroup
/// cannot be read here).
async fn oom_event_since(docker: &Docker, container: &str, since: SystemTime) -> bool {
    let stamp = |t: SystemTime| {
        let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
        format!("{}.{:09}", d.as_secs(), d.subsec_nanos())
    };
    let filters = HashMap::from([
        ("type", vec!["container".to_owned()]),
        ("container", vec![container.to_owned()]),
        ("event", vec!["oom".to_owned()]),
    ]);
    let options = EventsOptionsBuilder::default()
        .since(&stamp(since))
        .until(&stamp(SystemTime::now()))
        .filters(&filters)
        .build();
    let events = docker.events(Some(options));
    tokio::pin!(events);
    matches!(tokio::time::timeout(Duration::from_secs(5), events.next()).await, Ok(Some(Ok(_))))
}

fn usage_since(baseline: &Reading, now: Reading) -> Usage {
    Usage {
        cpu_seconds: now.cpu_ns.saturating_sub(baseline.cpu_ns) as f64 / 1e9,
        peak_memory_bytes: now.peak_bytes,
    }
}

/// Component-wise maximum of two readings of the same usage.
/// Start time of a host process in clock ticks since boot.
fn proc_start_ticks(pid: i32) -> Option<u64> {
    drover_guest::procs::read(pid).map(|s| s.start_ticks)
}

fn status_code(error: &bollard::errors::Error) -> Option<u16> {
    match error {
        bollard::errors::Error::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

/// An engine API failure as a runtime error.
pub(super) fn api_error(context: impl Into<String>, error: bollard::errors::Error) -> RuntimeError {
    RuntimeError::Io { context: context.into(), source: std::io::Error::other(error) }
}

/// A start failure of `command` (an image, a program, a service) with a message.
pub(super) fn start_error(command: &str, message: String) -> RuntimeError {
    RuntimeError::Start { command: command.to_owned(), source: std::io::Error::other(message) }
}
