//! The task fields that choose and shape the sandbox: `runtime`, `image`, `build`, `user`,
//! `network`, `services` and `secrets`, and the rules that tie them to the runtime.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use super::{At, Fields, RawBuild, RawHealthCheck, RawService, Reader, TaskSpec, join, quoted};
use crate::job::{
    MAX_DNS_LABEL, NetworkPolicy, RuntimeKind, egress_problem, valid_secret_name, valid_service_name,
};
use crate::spec::error::{Pos, closest};
use crate::spec::tree::{Node, Value};

const RUNTIMES: &[&str] = &["process", "docker", "microvm"];
const NETWORK_MODES: &[&str] = &["none", "bridge", "full"];
const NETWORK_FIELDS: &[&str] = &["egress"];
const BUILD_FIELDS: &[&str] = &["dockerfile", "context", "args"];
const SERVICE_FIELDS: &[&str] = &["name", "image", "command", "env", "tmpfs", "user", "healthcheck"];
const HEALTHCHECK_FIELDS: &[&str] = &["command", "interval", "timeout", "retries"];

/// Defaults of a service health check: probe every second, give each probe five seconds, and
/// give up after 30 failed probes.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
const PROBE_RETRIES: u32 = 30;

impl Reader<'_> {
    /// Reads `runtime`, `image`, `build`, `user`, `network`, `services` and `secrets`.
    pub(super) fn sandbox(&mut self, t: &Fields<'_>, field: &str, task: &mut TaskSpec) {
        let f = |key: &str| join(field, key);
        if let Some(n) = t.get("runtime") {
            task.runtime = self.runtime(n, &f("runtime"));
        }
        if let Some(n) = t.get("image") {
            task.image = self.non_empty_string(n, &f("image"), "image");
        }
        if let Some(n) = t.get("build") {
            task.build = self.build(n, &f("build"));
        }
        if let Some(n) = t.get("user") {
            task.user = self.user(n, &f("user"));
        }
        if let Some(n) = t.get("network") {
            task.network = self.network(n, &f("network"));
        }
        if let Some(n) = t.get("services") {
            task.services = self.services(n, &f("services"));
        }
        if let Some(n) = t.get("secrets") {
            task.secrets = self.secrets(n, &f("secrets"));
        }
    }

    /// The rules between `runtime` and the fields that need a container or VM: `image` or
    /// `build` (exactly one) for docker and microvm, `services` only for docker, `agent` on a
    /// plain process only when `runtime: process` is written out. Skipped when `runtime` itself was bad.
    pub(super) fn check_runtime(&mut self, t: &Fields<'_>, field: &str, runtime: Option<RuntimeKind>) {
        let Some(runtime) = runtime else { return };
        let explicit = t.get("runtime").is_some();
        // A container has no network, so it cannot reach the node's metering proxy, and an
        // agent without its LLM is useless: refuse it here rather than at run time.
        if runtime == RuntimeKind::Docker
            && let Some(e) = t.entry("agent")
        {
            self.problems.add(
                e.key_pos,
                &join(field, "agent"),
                "an agent task cannot run with `runtime: docker`: containers cannot reach the node's LLM proxy",
                Some("set `runtime: microvm` (or `runtime: process` for a trusted agent)".to_owned()),
            );
        }
        if runtime == RuntimeKind::Process {
            let set_runtime = if explicit {
                "set `runtime: docker` or `runtime: microvm`"
            } else {
                "tasks run as plain processes unless they set `runtime: docker` or `runtime: microvm`"
            };
            for key in ["image", "build"] {
                if let Some(e) = t.entry(key) {
                    self.problems.add(
                        e.key_pos,
                        &join(field, key),
                        format!("`{key}` needs runtime `docker` or `microvm`"),
                        Some(format!("{set_runtime}, or remove `{key}`")),
                    );
                }
            }
            // An explicit `runtime: process` is a deliberate choice (trusted agents, tests):
            // the proxy still keeps the real key away, only the sandbox is missing.
            if let Some(e) = t.entry("agent").filter(|_| !explicit) {
                self.problems.add(
                    e.key_pos,
                    &join(field, "agent"),
                    "an agent task needs runtime `microvm`",
                    Some(
                        "agents run sandboxed unless `runtime: process` is set explicitly; set `runtime: \
                         microvm` and give an `image`"
                            .to_owned(),
                    ),
                );
            }
        } else {
            match (t.entry("image"), t.entry("build")) {
                (Some(a), Some(b)) => {
                    let later = if (a.key_pos.line, a.key_pos.column) > (b.key_pos.line, b.key_pos.column) {
                        a
                    } else {
                        b
                    };
                    self.problems.add(
                        later.key_pos,
                        &join(field, &later.key),
                        "both `image` and `build` are set",
                        Some("use `image` for an existing image or `build` to build one, not both".into()),
                    );
                }
                (None, None) => {
                    let pos = t.get("runtime").map_or(t.pos, |n| n.pos);
                    self.problems.add(
                        pos,
                        &join(field, "runtime"),
                        format!("runtime `{}` needs an `image` or a `build`", runtime.as_str()),
                        Some("add `image: NAME` (like `image: alpine:3`) or `build: { dockerfile: Dockerfile }`".into()),
                    );
                }
                _ => {}
            }
        }
        if runtime != RuntimeKind::Docker
            && let Some(e) = t.entry("services")
        {
            self.problems.add(
                e.key_pos,
                &join(field, "services"),
                "services need runtime `docker`",
                Some("services are containers beside the task's container; set `runtime: docker`".into()),
            );
        }
    }

    fn runtime(&mut self, node: &Node, field: &str) -> Option<RuntimeKind> {
        let word = self.string(node, field)?;
        match word.value.as_str() {
            "process" => Some(RuntimeKind::Process),
            "docker" => Some(RuntimeKind::Docker),
            "microvm" => Some(RuntimeKind::Microvm),
            other => {
                let hint = match closest(other, RUNTIMES.iter().copied()) {
                    Some(s) => format!("did you mean `{s}`?"),
                    None => format!("runtimes are {}", quoted(RUNTIMES)),
                };
                self.problems.add(node.pos, field, format!("unknown runtime `{other}`"), Some(hint));
                None
            }
        }
    }

    fn build(&mut self, node: &Node, field: &str) -> Option<RawBuild> {
        let m = self.mapping(node, field, BUILD_FIELDS)?;
        let default =
            |value: &str, key: &str| At { value: value.into(), pos: m.pos, field: join(field, key) };
        let mut build = RawBuild {
            dockerfile: default("Dockerfile", "dockerfile"),
            context: default(".", "context"),
            args: Default::default(),
        };
        if let Some(n) = m.get("dockerfile")
            && let Some(s) = self.non_empty_string(n, &join(field, "dockerfile"), "dockerfile path")
        {
            build.dockerfile = s;
        }
        if let Some(n) = m.get("context")
            && let Some(s) = self.non_empty_string(n, &join(field, "context"), "build context")
        {
            build.context = s;
        }
        if let Some(n) = m.get("args") {
            build.args = self.string_map(n, &join(field, "args"));
        }
        Some(build)
    }

    /// A user name, `uid` or `uid:gid`; a bare number is taken as a uid.
    fn user(&mut self, node: &Node, field: &str) -> Option<At<String>> {
        let value = match &node.value {
            Value::Str(s) if s.trim().is_empty() => {
                self.problems.add(
                    node.pos,
                    field,
                    "user is empty",
                    Some("omit `user` to run as the runtime's unprivileged default user".into()),
                );
                return None;
            }
            Value::Str(s) => s.clone(),
            Value::Int(i) if *i >= 0 => i.to_string(),
            Value::Int(i) => {
                self.problems.add(node.pos, field, format!("user id {i} is negative"), None);
                return None;
            }
            _ => {
                self.wrong_type(node, field, "a user name, `uid` or `uid:gid`");
                return None;
            }
        };
        Some(At { value, pos: node.pos, field: field.to_string() })
    }

    /// `none`, `bridge`, `full`, or `{ egress: [HOST, HOST:PORT, ...] }`.
    fn network(&mut self, node: &Node, field: &str) -> NetworkPolicy {
        let modes_hint =
            "write `none`, `bridge`, `full` or `{ egress: [api.example.com, \"10.0.0.1:443\"] }`";
        match &node.value {
            Value::Str(s) => match s.as_str() {
                "none" => NetworkPolicy::None,
                "bridge" => NetworkPolicy::Bridge,
                "full" => NetworkPolicy::Full,
                "egress" => {
                    self.problems.add(
                        node.pos,
                        field,
                        "`egress` needs the list of hosts the task may reach",
                        Some("write `network: { egress: [api.example.com, \"10.0.0.1:443\"] }`".into()),
                    );
                    NetworkPolicy::None
                }
                other => {
                    let hint = match closest(other, NETWORK_MODES.iter().copied().chain(["egress"])) {
                        Some(s) => format!("did you mean `{s}`?"),
                        None => modes_hint.to_string(),
                    };
                    self.problems.add(node.pos, field, format!("unknown network mode `{other}`"), Some(hint));
                    NetworkPolicy::None
                }
            },
            Value::Map(_) => {
                let Some(m) = self.mapping(node, field, NETWORK_FIELDS) else {
                    return NetworkPolicy::None;
                };
                let hint = "list the hosts the task may reach, like `egress: [api.example.com]`";
                let Some(n) = self.required(&m, field, "egress", hint) else {
                    return NetworkPolicy::None;
                };
                let path = join(field, "egress");
                let allow = self.list(n, &path, "hosts", "egress: [api.example.com]", |r, item, path| {
                    let host = r.non_empty_string(item, path, "host")?;
                    match egress_problem(&host.value) {
                        None => Some(host.value),
                        Some((message, hint)) => {
                            r.problems.add(item.pos, path, message, Some(hint.to_string()));
                            None
                        }
                    }
                });
                if matches!(&n.value, Value::Seq(items) if items.is_empty()) {
                    self.problems.add(
                        n.pos,
                        &path,
                        "the egress list is empty",
                        Some("use `network: none` for no network access".into()),
                    );
                }
                NetworkPolicy::Egress { allow }
            }
            _ => {
                self.problems.add(
                    node.pos,
                    field,
                    format!("expected a network mode, found {}", node.kind()),
                    Some(modes_hint.into()),
                );
                NetworkPolicy::None
            }
        }
    }

    fn services(&mut self, node: &Node, field: &str) -> Vec<RawService> {
        let services = self.list(
            node,
            field,
            "services",
            "services: [{ name: db, image: postgres:15 }]",
            |r, item, path| r.service(item, path),
        );
        let mut first: HashMap<&str, Pos> = HashMap::new();
        for s in &services {
            match first.get(s.name.value.as_str()) {
                Some(pos) => self.problems.add(
                    s.name.pos,
                    &s.name.field,
                    format!("duplicate service name `{}`", s.name.value),
                    Some(format!(
                        "service names must be unique within a task; the first `{}` is on line {}",
                        s.name.value, pos.line
                    )),
                ),
                None => {
                    first.insert(&s.name.value, s.name.pos);
                }
            }
        }
        services
    }

    fn service(&mut self, node: &Node, field: &str) -> Option<RawService> {
        let m = self.mapping(node, field, SERVICE_FIELDS)?;
        let f = |key: &str| join(field, key);
        let name = self
            .required(
                &m,
                field,
                "name",
                "give the service the host name the steps reach it by, like `name: db`",
            )
            .and_then(|n| self.service_name(n, &f("name")));
        let image = self
            .required(&m, field, "image", "name the image to run, like `image: postgres:15`")
            .and_then(|n| self.non_empty_string(n, &f("image"), "image"));
        let command = m.get("command").and_then(|n| self.command(n, &f("command")));
        let env = m.get("env").map(|n| self.string_map(n, &f("env"))).unwrap_or_default();
        let tmpfs = match m.get("tmpfs") {
            Some(n) => {
                self.list(n, &f("tmpfs"), "paths", "tmpfs: [/var/lib/postgresql/data]", |r, item, path| {
                    let p = r.non_empty_string(item, path, "tmpfs path")?;
                    if !p.value.starts_with('/') {
                        r.problems.add(
                            item.pos,
                            path,
                            format!("tmpfs path `{}` is not absolute", p.value),
                            Some(
                                "write a path inside the service container, like `/var/lib/postgresql/data`"
                                    .into(),
                            ),
                        );
                        return None;
                    }
                    Some(p.value)
                })
            }
            None => Vec::new(),
        };
        let healthcheck = m.get("healthcheck").and_then(|n| self.healthcheck(n, &f("healthcheck")));
        let user = m.get("user").and_then(|n| self.user(n, &f("user")));
        Some(RawService { name: name?, image: image?, command, env, tmpfs, user, healthcheck })
    }

    /// A DNS label: what the steps use as the service's host name.
    fn service_name(&mut self, node: &Node, field: &str) -> Option<At<String>> {
        let name = self.non_empty_string(node, field, "service name")?;
        let v = &name.value;
        if !valid_service_name(v) {
            let mut suggestion: String = v
                .to_ascii_lowercase()
                .chars()
                .map(|c| if c.is_ascii_lowercase() || c.is_ascii_digit() { c } else { '-' })
                .collect();
            suggestion = suggestion.trim_matches('-').chars().take(MAX_DNS_LABEL).collect();
            if suggestion.is_empty() {
                suggestion = "db".into();
            }
            self.problems.add(
                node.pos,
                field,
                format!(
                    "service name `{v}` must be a DNS label: lowercase letters, digits and `-`, \
                     at most {MAX_DNS_LABEL} characters"
                ),
                Some(format!("rename it, like `{suggestion}`")),
            );
            return None;
        }
        Some(name)
    }

    fn healthcheck(&mut self, node: &Node, field: &str) -> Option<RawHealthCheck> {
        let m = self.mapping(node, field, HEALTHCHECK_FIELDS)?;
        let f = |key: &str| join(field, key);
        let command = self
            .required(
                &m,
                field,
                "command",
                "give the probe that exits 0 when the service is ready, like `command: pg_isready`",
            )
            .and_then(|n| self.command(n, &f("command")));
        let mut check =
            |key: &str, default: Duration| match m.get(key).map(|n| self.nonzero_duration(n, &f(key), key)) {
                Some(Some(d)) => d,
                _ => default,
            };
        let interval = check("interval", PROBE_INTERVAL);
        let timeout = check("timeout", PROBE_TIMEOUT);
        let retries = m
            .get("retries")
            .and_then(|n| self.int_in(n, &f("retries"), "a number of probes", 1, i64::from(u32::MAX)))
            .and_then(|r| u32::try_from(r).ok())
            .unwrap_or(PROBE_RETRIES);
        Some(RawHealthCheck { command: command?, interval, timeout, retries })
    }

    /// Names of project secrets, each exposed to the task as the environment variable of the
    /// same name.
    fn secrets(&mut self, node: &Node, field: &str) -> Vec<At<String>> {
        let names = self.list(node, field, "secret names", "secrets: [DB_PASSWORD]", |r, item, path| {
            let name = r.non_empty_string(item, path, "secret name")?;
            let v = &name.value;
            if !valid_secret_name(v) {
                let mut suggestion: String = v
                    .to_ascii_uppercase()
                    .chars()
                    .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                    .collect();
                if suggestion.starts_with(|c: char| c.is_ascii_digit()) {
                    suggestion.insert(0, '_');
                }
                r.problems.add(
                    item.pos,
                    path,
                    format!(
                        "secret name `{v}` may only use uppercase letters, digits and `_`, and not start \
                         with a digit"
                    ),
                    Some(format!("secrets become environment variables; use a name like `{suggestion}`")),
                );
                return None;
            }
            Some(name)
        });
        let mut seen = HashSet::with_capacity(names.len());
        names.into_iter().filter(|n| seen.insert(n.value.clone())).collect()
    }
}
