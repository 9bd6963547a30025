//! Pure translation of a [`TaskSpec`] into Docker API requests: names, labels, the sandbox's
//! host configuration, the step environment, and exit codes back into [`ExitStatus`].

use std::collections::HashMap;

use bollard::models::{ContainerCreateBody, HostConfig, Mount, MountType};
use drover_core::NetworkPolicy;

use crate::runtime::{ExitStatus, RuntimeError, TaskSpec};

/// Label keys put on everything the runtime creates.
pub(super) const LABEL_MANAGED: &str = "drover.managed";
pub(super) const LABEL_ATTEMPT: &str = "drover.attempt";
pub(super) const LABEL_TASK: &str = "drover.task";
pub(super) const LABEL_JOB: &str = "drover.job";
pub(super) const LABEL_ROLE: &str = "drover.role";
pub(super) const LABEL_SERVICE: &str = "drover.service";

/// Where the task workspace appears inside the container; also the working directory.
pub(super) const WORKSPACE: &str = "/workspace";

/// User the steps run as when the task names none: `nobody`, which exists in most images and
/// works by number where it does not.
pub(super) const DEFAULT_USER: &str = "65534:65534";

/// Upper bound on processes in one container (fork bombs stop here).
pub(super) const PIDS_LIMIT: i64 = 1024;

/// PID 1's child in the task container (PID 1 is docker's `init`, which reaps orphans and
/// forwards signals to this keeper). It idles so that steps can be `exec`ed one after another
/// into the same container, and turns a SIGTERM sent to the container into a SIGTERM for every
/// other process in it (`kill -1` skips PID 1 and the caller), which is how `signal(Terminate)`
/// reaches the running step and everything it started without needing the step's pid.
pub(super) const KEEPER_SCRIPT: &str =
    "trap 'kill -TERM -1 2>/dev/null' TERM; while :; do sleep 86400 & wait $!; done";

/// Label naming the agent instance that created a container or network.
pub(super) const LABEL_SCOPE: &str = "drover.scope";

/// The agent instance's scope: attempt ids are only unique per server, so two agents of
/// different clusters sharing one Docker engine (tests, laptops) would otherwise collide on
/// names and clean up each other's containers. One agent per process, so one scope.
static SCOPE: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Sets the scope of this process's containers (once; later calls are ignored).
pub fn set_scope(scope: &str) {
    let safe: String =
        scope.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '-' }).collect();
    let _ = SCOPE.set(safe);
}

/// The scope, `local` unless set.
pub(super) fn scope() -> &'static str {
    SCOPE.get().map(String::as_str).unwrap_or("local")
}

/// Label filters selecting everything of one attempt of this scope.
pub(super) fn attempt_filter(attempt_id: i64) -> [String; 2] {
    [format!("{LABEL_ATTEMPT}={attempt_id}"), format!("{LABEL_SCOPE}={}", scope())]
}

/// Name of the task container of an attempt.
pub(super) fn container_name(attempt_id: i64) -> String {
    format!("drover-{}-{attempt_id}", scope())
}

/// Name of the per-attempt network.
pub(super) fn network_name(attempt_id: i64) -> String {
    format!("drover-{}-{attempt_id}", scope())
}

/// Name of the bridge interface of the per-attempt network: at most 15 characters (the kernel's
/// limit), unique per agent scope and attempt, so firewall rules can name it.
pub(super) fn bridge_name(attempt_id: i64) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(format!("{}/{attempt_id}", scope()).as_bytes());
    format!("drv{}", &hex::encode(digest)[..12])
}

/// Name of a service container: the service name reduced to what Docker allows in names.
pub(super) fn service_container_name(attempt_id: i64, service: &str) -> String {
    let safe: String = service
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || "_.-".contains(c) { c } else { '_' })
        .collect();
    format!("drover-{}-{attempt_id}-svc-{safe}", scope())
}

/// Which role a container plays in an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Role {
    /// The container the steps run in (networks carry this role too).
    Task,
    /// A side container from `TaskSpec.services`.
    Service,
}

/// The labels of everything created for `task`.
pub(super) fn labels(task: &TaskSpec, role: Role) -> HashMap<String, String> {
    let role = match role {
        Role::Task => "task",
        Role::Service => "service",
    };
    [
        (LABEL_MANAGED, "true".to_owned()),
        (LABEL_SCOPE, scope().to_owned()),
        (LABEL_ATTEMPT, task.attempt_id.to_string()),
        (LABEL_TASK, task.task_id.to_string()),
        (LABEL_JOB, task.job_id.to_string()),
        (LABEL_ROLE, role.to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// How the attempt is networked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Networking {
    /// No interface but loopback.
    None,
    /// A network of the attempt's own. `internal` networks have no route out: services are
    /// reachable by name, nothing else is.
    Attempt { internal: bool },
}

/// The networking an attempt gets. A task with services always gets a network of its own so
/// that steps reach services by name; with `NetworkPolicy::None` it is internal (services only),
/// with `Bridge` or `Full` it also routes out. Egress allow-lists need a filtering proxy that
/// this runtime does not have yet, so they are refused rather than silently widened or dropped.
pub(super) fn networking(task: &TaskSpec) -> Result<Networking, String> {
    if !task.host_ports.is_empty() {
        // A container reaches the host only through the bridge gateway, which would also
        // open everything else listening there; refuse until that is filtered.
        return Err("the docker runtime cannot expose host ports to containers yet; use the process or microvm runtime".into());
    }
    let services = !task.services.is_empty();
    match (&task.network, services) {
        (NetworkPolicy::None, false) => Ok(Networking::None),
        (NetworkPolicy::None, true) => Ok(Networking::Attempt { internal: true }),
        // Full egress on a network of the attempt's own rather than Docker's default bridge, so
        // that its bridge can be sealed off the node (see `firewall`).
        (NetworkPolicy::Bridge | NetworkPolicy::Full, _) => Ok(Networking::Attempt { internal: false }),
        (NetworkPolicy::Egress { .. }, _) => {
            Err("the docker runtime cannot enforce egress allow-lists yet; use network none, bridge or full"
                .into())
        }
    }
}

/// What every container of a task gets, its services' included: no capabilities, no privilege
/// gain, and the task's memory, CPU and pids limits.
pub(super) fn confined(task: &TaskSpec) -> HostConfig {
    let memory = i64::try_from(task.memory_limit).unwrap_or(i64::MAX);
    let pids =
        if task.pids_limit > 0 { i64::try_from(task.pids_limit).unwrap_or(i64::MAX) } else { PIDS_LIMIT };
    HostConfig {
        cap_drop: Some(vec!["ALL".into()]),
        security_opt: Some(vec!["no-new-privileges".into()]),
        // Swap equal to memory means no swap at all, so the OOM killer acts at the limit.
        memory: (memory > 0).then_some(memory),
        memory_swap: (memory > 0).then_some(memory),
        cpuset_cpus: (!task.cpus.is_empty())
            .then(|| task.cpus.iter().map(usize::to_string).collect::<Vec<_>>().join(",")),
        pids_limit: Some(pids),
        ..Default::default()
    }
}

/// Refuses a task whose container or a service would run as root when its project does not
/// allow it: the server checked at submit, and the node checks again on what it is given.
pub(super) fn check_root(task: &TaskSpec) -> Result<(), RuntimeError> {
    if task.allow_root {
        return Ok(());
    }
    let task_user = task.user.iter().map(|u| ("the task", u.as_str()));
    let services = task.services.iter().filter_map(|s| s.user.as_deref().map(|u| (s.name.as_str(), u)));
    match task_user.chain(services).find(|(_, u)| drover_core::job::is_root_user(u)) {
        Some((who, _)) => Err(RuntimeError::Start {
            command: who.to_owned(),
            source: std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                "running a container as root needs the project setting containers_as_root",
            ),
        }),
        None => Ok(()),
    }
}

/// The create request of the task container: hardened by default (no network unless asked,
/// read-only root, writable `/tmp` and workspace only, unprivileged user, no capabilities, no
/// privilege gain, memory/CPU/pids limits).
pub(super) fn task_container(task: &TaskSpec, image: &str, net: &Networking) -> ContainerCreateBody {
    let network_mode = match net {
        Networking::None => "none".to_owned(),
        Networking::Attempt { .. } => network_name(task.attempt_id),
    };
    let host_config = HostConfig {
        init: Some(true),
        readonly_rootfs: Some(true),
        network_mode: Some(network_mode),
        mounts: Some(vec![Mount {
            target: Some(WORKSPACE.into()),
            source: Some(task.workspace.display().to_string()),
            typ: Some(MountType::BIND),
            read_only: Some(false),
            ..Default::default()
        }]),
        // runc gives a tmpfs the mode of the directory it covers (1777 for a normal /tmp).
        tmpfs: Some([("/tmp".to_owned(), "rw,nosuid,nodev,exec".to_owned())].into()),
        ..confined(task)
    };
    ContainerCreateBody {
        image: Some(image.to_owned()),
        user: Some(task.user.clone().unwrap_or_else(|| DEFAULT_USER.to_owned())),
        entrypoint: Some(vec!["/bin/sh".into(), "-c".into(), KEEPER_SCRIPT.into(), "drover-keeper".into()]),
        working_dir: Some(WORKSPACE.into()),
        labels: Some(labels(task, Role::Task)),
        host_config: Some(host_config),
        ..Default::default()
    }
}

/// The environment of a step: a base, then the task's variables, then its secrets (see
/// [`crate::runtime::layered_env`]). Passed per `exec` rather than on the container, so secrets
/// never show in `docker inspect`.
pub(super) fn step_env(task: &TaskSpec) -> Vec<String> {
    let env: Vec<(String, String)> = vec![
        ("HOME".into(), WORKSPACE.into()),
        ("DROVER_JOB_ID".into(), task.job_id.to_string()),
        ("DROVER_TASK_ID".into(), task.task_id.to_string()),
        ("DROVER_ATTEMPT_ID".into(), task.attempt_id.to_string()),
        ("DROVER_WORKSPACE".into(), WORKSPACE.into()),
    ];
    crate::runtime::layered_env(env, task).into_iter().map(|(k, v)| format!("{k}={v}")).collect()
}

/// Docker reports a process killed by signal N as exit code 128 + N, the same as a shell that
/// ran `exit 128+N`; codes 129..=192 are read as signals, since that is what they almost
/// always are (and what a shell would report for a killed child too).
pub(super) fn exit_status(code: i64) -> ExitStatus {
    match code {
        129..=192 => ExitStatus { code: None, signal: Some((code - 128) as i32), oom: false },
        _ => ExitStatus { code: Some(i32::try_from(code).unwrap_or(i32::MAX)), signal: None, oom: false },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> TaskSpec {
        TaskSpec {
            job_id: 1,
            task_id: 2,
            attempt_id: 3,
            workspace: "/ws".into(),
            cpus: vec![0, 2],
            memory_limit: 64 << 20,
            env: [("A".to_owned(), "1".to_owned()), ("HOME".to_owned(), "/h".to_owned())].into(),
            secrets: [("TOKEN".to_owned(), "s3cret".to_owned()), ("A".to_owned(), "2".to_owned())].into(),
            ..Default::default()
        }
    }

    #[test]
    fn container_is_locked_down_by_default() {
        let task = sample();
        let body = task_container(&task, "img", &networking(&task).expect("networking"));
        let host = body.host_config.expect("host config");
        assert_eq!(host.network_mode.as_deref(), Some("none"));
        assert_eq!(host.readonly_rootfs, Some(true));
        assert_eq!(host.cap_drop, Some(vec!["ALL".to_owned()]));
        assert_eq!(host.security_opt, Some(vec!["no-new-privileges".to_owned()]));
        assert_eq!(host.memory, Some(64 << 20));
        assert_eq!(host.memory_swap, Some(64 << 20));
        assert_eq!(host.cpuset_cpus.as_deref(), Some("0,2"));
        assert_eq!(host.pids_limit, Some(PIDS_LIMIT));
        assert_eq!(body.user.as_deref(), Some(DEFAULT_USER));
        let labels = body.labels.expect("labels");
        assert_eq!(labels[LABEL_ATTEMPT], "3");
        assert_eq!(labels[LABEL_ROLE], "task");
        assert_eq!(labels[LABEL_MANAGED], "true");
    }

    #[test]
    fn networking_follows_policy_and_services() {
        let mut task = sample();
        task.network = NetworkPolicy::Full;
        assert_eq!(networking(&task), Ok(Networking::Attempt { internal: false }));
        task.network = NetworkPolicy::Bridge;
        assert_eq!(networking(&task), Ok(Networking::Attempt { internal: false }));
        task.network = NetworkPolicy::Egress { allow: vec!["example.com".into()] };
        assert!(networking(&task).is_err());
        task.network = NetworkPolicy::None;
        task.host_ports =
            vec![crate::runtime::HostPort { name: "llm".into(), addr: "127.0.0.1:9".parse().expect("addr") }];
        assert!(networking(&task).is_err_and(|e| e.contains("host ports")));
    }

    #[test]
    fn secrets_win_over_env_and_env_over_base() {
        let env = step_env(&sample());
        assert!(env.contains(&"HOME=/h".to_owned()));
        assert!(env.contains(&"A=2".to_owned()) && !env.contains(&"A=1".to_owned()));
        assert!(env.contains(&"TOKEN=s3cret".to_owned()));
        assert!(env.contains(&"DROVER_WORKSPACE=/workspace".to_owned()));
    }

    #[test]
    fn decodes_exit_codes() {
        assert_eq!(exit_status(0).code, Some(0));
        assert_eq!(exit_status(7).code, Some(7));
        assert_eq!(exit_status(137).signal, Some(9));
        assert_eq!(exit_status(143).signal, Some(15));
        assert_eq!(exit_status(255).code, Some(255));
    }
}
