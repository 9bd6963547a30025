//! The configuration of `drover server`, `drover agent` and `drover up`, in layers: defaults,
//! then a TOML file (`--config`), then `DROVER_*` environment variables, then flags. Every key
//! has a flag of the same name (`lease` is `--lease`, `DROVER_LEASE`); the environment and the
//! flags arrive together through clap (a flag beats its variable), so the layering is
//! `defaults < file < environment < flags`.
//!
//! ```toml
//! version = 1
//!
//! [server]
//! listen = "0.0.0.0:7370"
//! data_dir = "/var/lib/drover"
//! lease = "15s"
//!
//! [agent]
//! servers = ["https://farm.example.com:7370"]
//! cores = 8
//!
//! [oidc]                    # optional: people sign in with `drover login --oidc`
//! issuer = "https://login.example.com/realms/farm"
//! client_id = "drover"
//! [oidc.roles]              # claim value (a group) = "operator" or "PROJECT:ROLE"
//! fx-artists = "fx:submitter"
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use drover_server::auth::oidc::{OidcConfig, RoleGrant};
use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The only configuration format version so far.
pub const VERSION: u32 = 1;

/// Whether the server's listeners use TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// TLS unless the server listens on loopback only.
    #[default]
    Auto,
    /// Always TLS (a server-made CA when no certificate is given).
    On,
    /// Plain text; allowed on loopback only.
    Off,
}

/// `[server]`: the control plane.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSettings {
    /// Address for clients and agents (gRPC).
    pub listen: SocketAddr,
    /// Address of the HTTP API, if it is served.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http: Option<SocketAddr>,
    /// Directory of the database, blobs, TLS files and the first operator key.
    pub data_dir: PathBuf,
    /// `postgres://...` or `sqlite://PATH`; default SQLite in the data directory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database: Option<String>,
    /// A directory, `file:///path` or `s3://bucket/prefix`; default `<data_dir>/blobs`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blobs: Option<String>,
    /// S3 endpoint for `s3://` blob stores.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub s3_endpoint: Option<String>,
    /// S3 region for `s3://` blob stores.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub s3_region: Option<String>,
    /// Largest upload a client may send.
    #[serde(with = "size")]
    pub max_upload: u64,
    /// Most bytes of outputs one task may keep.
    #[serde(with = "size")]
    pub max_outputs_size: u64,
    /// Most output one attempt may log.
    #[serde(with = "size")]
    pub max_log_size: u64,
    /// How long the logs of ended attempts are kept.
    #[serde(with = "duration")]
    pub log_retention: Duration,
    /// How long a blob nothing references any more stays before it is deleted.
    #[serde(with = "duration")]
    pub blob_grace: Duration,
    /// How long a node may stay silent before its tasks are retried elsewhere.
    #[serde(with = "duration")]
    pub lease: Duration,
    /// How often agents send heartbeats.
    #[serde(with = "duration")]
    pub heartbeat: Duration,
    /// Most attempt starts and finishes committed in one transaction.
    pub completion_batch: usize,
    /// Whether busy nodes are given tasks ahead, to start the moment a task there ends.
    pub assign_ahead: bool,
    /// TLS on the listeners: auto (on unless listening on loopback), on, off (loopback only).
    pub tls: TlsMode,
    /// Certificate chain (PEM) to present; default a server-made CA and certificate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of `tls_cert`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
    /// More names (DNS or IP) for the server-made certificate, e.g. the name agents dial.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tls_names: Vec<String>,
    /// Turn authorization off (loopback only; for tests and benchmarks).
    pub no_auth: bool,
    /// Space kept free under the data dir and a local blob dir; below it, submits and uploads
    /// are refused.
    #[serde(with = "size")]
    pub min_free: u64,
    /// The key file that seals project secrets at rest; default `<data_dir>/secrets.key`,
    /// made on first start.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secrets_key: Option<PathBuf>,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            listen: SocketAddr::from(([127, 0, 0, 1], 7370)),
            http: None,
            data_dir: PathBuf::from(".drover"),
            database: None,
            blobs: None,
            s3_endpoint: None,
            s3_region: None,
            max_upload: 10 << 30,
            max_outputs_size: 10 << 30,
            max_log_size: 64 << 20,
            log_retention: drover_server::DEFAULT_RETENTION,
            blob_grace: drover_server::DEFAULT_BLOB_GRACE,
            lease: Duration::from_secs(15),
            heartbeat: Duration::from_secs(2),
            completion_batch: drover_server::DEFAULT_COMPLETION_BATCH,
            assign_ahead: true,
            tls: TlsMode::Auto,
            tls_cert: None,
            tls_key: None,
            tls_names: Vec::new(),
            no_auth: false,
            min_free: drover_server::DEFAULT_MIN_FREE,
            secrets_key: None,
        }
    }
}

/// `[agent]`: a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentSettings {
    /// Server URLs, tried in turn (`drover agent` only; `up` uses its own server).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub servers: Vec<String>,
    /// Node name, stable across restarts; default the host name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Labels for task constraints.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Cores to offer; default all.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cores: Option<u32>,
    /// Memory to offer; default all.
    #[serde(with = "opt_size", skip_serializing_if = "Option::is_none")]
    pub memory: Option<u64>,
    /// Directory for task workspaces and the agent's state.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub work_dir: Option<PathBuf>,
    /// Do not offer the docker runtime.
    pub no_docker: bool,
    /// Offer the microvm runtime.
    pub microvm: bool,
    /// Booted, idle microVMs to keep per image.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub microvm_warm: BTreeMap<String, usize>,
    /// Boot every microVM instead of restoring snapshots.
    pub microvm_no_snapshots: bool,
    /// Host directories `dir:` microVM images may come from; none by default.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub microvm_image_dirs: Vec<PathBuf>,
    /// Guest kernel for microVMs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub microvm_kernel: Option<PathBuf>,
    /// Time between SIGTERM and SIGKILL when a task is stopped.
    #[serde(with = "duration")]
    pub kill_grace: Duration,
    /// LLM API for agent tasks whose job names no upstream.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub llm_upstream: Option<String>,
    /// Let URL inputs reach this node's loopback, link-local and unspecified addresses.
    pub allow_local_urls: bool,
    /// Uids handed out to process tasks when the agent runs as root, as `FIRST-LAST`.
    pub task_uids: String,
    /// Accounts a process task's `user:` may name on this node.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub run_as: Vec<String>,
    /// Directories process tasks must not see, besides the agent's work dir.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub hide_from_tasks: Vec<PathBuf>,
    /// Most processes and threads of a process task that sets none.
    pub task_pids: u64,
    /// Space kept free in the work dir; below it, the node takes no new work.
    #[serde(with = "size")]
    pub min_free: u64,
    /// A single-use join token (secret; used once, then the credential is kept).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub join: Option<String>,
    /// The servers' CA (a PEM file) or `sha256:FINGERPRINT`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca: Option<String>,
}

impl Default for AgentSettings {
    fn default() -> Self {
        AgentSettings {
            servers: Vec::new(),
            name: None,
            labels: BTreeMap::new(),
            cores: None,
            memory: None,
            work_dir: None,
            no_docker: false,
            microvm: false,
            microvm_warm: BTreeMap::new(),
            microvm_no_snapshots: false,
            microvm_image_dirs: Vec::new(),
            microvm_kernel: None,
            kill_grace: Duration::from_secs(10),
            llm_upstream: None,
            allow_local_urls: false,
            task_uids: "1000000-1065535".into(),
            run_as: Vec::new(),
            hide_from_tasks: Vec::new(),
            task_pids: 8192,
            min_free: drover_agent::DEFAULT_MIN_FREE,
            join: None,
            ca: None,
        }
    }
}

/// `[oidc]`: people sign in through an OpenID Connect identity provider (`drover login
/// --oidc`), besides API keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcSection {
    /// The provider's issuer URL, exactly as its tokens' `iss` claim writes it; https (http on
    /// loopback only).
    pub issuer: String,
    /// The `aud` tokens must carry; default `client_id` (the audience of ID tokens).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
    /// The token claim whose values map to roles: a string or an array of strings, looked up
    /// as a dotted path (`realm_access.roles`) when no claim has the whole name.
    #[serde(default = "default_oidc_claim")]
    pub claim: String,
    /// The client id people's `drover login --oidc` uses (the server only shows it in its log).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// Claim value → `operator` or `PROJECT:ROLE` (`fx-artists = "fx:submitter"`). Every value
    /// a person's token carries adds its grant; the strongest role per project wins.
    #[serde(default)]
    pub roles: BTreeMap<String, RoleGrant>,
}

fn default_oidc_claim() -> String {
    drover_server::auth::oidc::DEFAULT_CLAIM.to_owned()
}

impl OidcSection {
    /// The server's view of the section.
    pub fn server_config(&self) -> OidcConfig {
        OidcConfig {
            issuer: self.issuer.clone(),
            audience: self.audience.clone().or_else(|| self.client_id.clone()).unwrap_or_default(),
            claim: self.claim.clone(),
            roles: self.roles.clone(),
            client_id: self.client_id.clone(),
            refetch_interval: drover_server::auth::oidc::DEFAULT_REFETCH_INTERVAL,
        }
    }
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The format version; must be 1.
    #[serde(default = "default_version")]
    pub version: u32,
    /// `[server]`.
    #[serde(default)]
    pub server: ServerSettings,
    /// `[agent]`.
    #[serde(default)]
    pub agent: AgentSettings,
    /// `[oidc]`: sign-in through an identity provider; absent, only API keys are accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oidc: Option<OidcSection>,
    /// `[prices]`: what work costs (per core-hour, GiB-hour, GPU-hour, 1k LLM input and
    /// output tokens, GiB-month stored). Recorded at start; work is priced at the prices in
    /// force when it was assigned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prices: Option<drover_core::tenancy::PriceTable>,
    /// `[projects.NAME]`: project settings as `drover projects set` takes them (`quota.cores =
    /// 40`, `images = ["reg.example.com/*"]`, `budget = "500/month"`), applied at every server
    /// start over what is stored; a project named here is created if missing.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub projects: BTreeMap<String, BTreeMap<String, SettingValue>>,
}

/// A project setting's value in the config file: text, a number, a flag, a list, or a table of
/// more settings (`[projects.fx.quota]` holding `cores = 40`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SettingValue {
    /// `true` or `false`.
    Flag(bool),
    /// A whole number.
    Integer(i64),
    /// A number with a fraction.
    Number(f64),
    /// Text.
    Text(String),
    /// A list, joined with commas.
    List(Vec<String>),
    /// Nested settings, named `parent.child`.
    Table(BTreeMap<String, SettingValue>),
}

impl SettingValue {
    /// Flattens into `(key, value text)` pairs as `drover projects set` takes them.
    fn flatten(&self, key: &str, out: &mut Vec<(String, String)>) {
        match self {
            SettingValue::Flag(b) => out.push((key.to_owned(), b.to_string())),
            SettingValue::Integer(n) => out.push((key.to_owned(), n.to_string())),
            SettingValue::Number(n) => out.push((key.to_owned(), n.to_string())),
            SettingValue::Text(t) => out.push((key.to_owned(), t.clone())),
            SettingValue::List(items) => out.push((key.to_owned(), items.join(","))),
            SettingValue::Table(t) => {
                for (k, v) in t {
                    v.flatten(&format!("{key}.{k}"), out);
                }
            }
        }
    }
}

impl Config {
    /// The settings of `[projects.NAME]`, as `(project, [(key, value)])`.
    pub fn project_settings(&self) -> Vec<(String, Vec<(String, String)>)> {
        self.projects
            .iter()
            .map(|(name, settings)| {
                let mut pairs = Vec::new();
                for (k, v) in settings {
                    v.flatten(k, &mut pairs);
                }
                (name.clone(), pairs)
            })
            .collect()
    }
}

fn default_version() -> u32 {
    VERSION
}

impl Default for Config {
    fn default() -> Self {
        Config {
            version: VERSION,
            server: ServerSettings::default(),
            agent: AgentSettings::default(),
            oidc: None,
            prices: None,
            projects: BTreeMap::new(),
        }
    }
}

/// A configuration that cannot be used, with the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file, a variable or a flag holds a value of the wrong shape.
    #[error("{0}")]
    Invalid(String),
    /// A key built from names in the file (a project's setting) is wrong.
    #[error("configuration key `{key}`: {message}")]
    Named {
        /// The key, like `projects.fx.quota.cores`.
        key: String,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// The values are well-formed but do not work together.
    #[error("configuration key `{key}`: {message}")]
    Rule {
        /// The key, like `server.heartbeat`.
        key: &'static str,
        /// What is wrong and how to fix it.
        message: String,
    },
}

/// Values set by flags or environment variables, by key (`server.lease`).
#[derive(Debug, Default, Clone)]
pub struct Overrides(Map<String, Value>);

impl Overrides {
    /// Sets `section.key` when `value` is given.
    pub fn set(&mut self, section: &str, key: &str, value: Option<impl Into<Value>>) {
        if let Some(v) = value {
            let table = self.0.entry(section).or_insert_with(|| Value::Object(Map::new()));
            if let Value::Object(t) = table {
                t.insert(key.to_owned(), v.into());
            }
        }
    }

    /// Sets a flag that can only turn something on.
    pub fn flag(&mut self, section: &str, key: &str, on: bool) {
        self.set(section, key, on.then_some(true));
    }
}

/// Reads the configuration: defaults, the file at `path` (which must exist when given), then
/// `overrides` from the environment and flags. The result is validated.
pub fn load(path: Option<&Path>, overrides: Overrides) -> Result<Config, ConfigError> {
    let mut figment = Figment::from(Serialized::defaults(Config::default()));
    if let Some(path) = path {
        if !path.is_file() {
            return Err(ConfigError::Invalid(format!("the config file {} does not exist", path.display())));
        }
        figment = figment.merge(Toml::file_exact(path));
    }
    figment = figment.merge(Serialized::defaults(Value::Object(overrides.0)));
    let config: Config = figment.extract().map_err(|e| ConfigError::Invalid(describe(e)))?;
    config.validate()?;
    Ok(config)
}

/// figment's errors as lines that name the key and where its value came from.
fn describe(error: figment::Error) -> String {
    let lines: Vec<String> = error
        .into_iter()
        .map(|e| {
            let key = e.path.join(".");
            let from = match &e.metadata {
                Some(m) => match &m.source {
                    Some(source) => format!(" (from {source})"),
                    None if m.name.contains("Serialized") => " (from a flag or DROVER_ variable)".into(),
                    None => format!(" (from {})", m.name),
                },
                None => String::new(),
            };
            if key.is_empty() {
                format!("invalid configuration{from}: {}", e.kind)
            } else {
                format!("configuration key `{key}`{from}: {}", e.kind)
            }
        })
        .collect();
    lines.join("\n")
}

impl Config {
    /// Checks the rules that tie keys together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let rule = |key, message: String| Err(ConfigError::Rule { key, message });
        for (project, pairs) in self.project_settings() {
            let named = |key: &str, message: String| ConfigError::Named {
                key: format!("projects.{project}.{key}"),
                message,
            };
            if !drover_core::access::valid_project_name(&project) {
                return Err(named(
                    "",
                    "is not a project name: 1 to 63 lowercase letters, digits and `-`".into(),
                ));
            }
            let mut settings = drover_core::tenancy::ProjectSettings::default();
            for (key, value) in pairs {
                settings.set(&key, &value).map_err(|e| named(&key, e.0))?;
            }
        }
        if let Some(p) = &self.prices {
            let all =
                [p.core_hour, p.gib_hour, p.gpu_hour, p.input_tokens_1k, p.output_tokens_1k, p.gib_month];
            if all.iter().any(|v| !v.is_finite() || *v < 0.0) {
                return rule("prices", "prices are numbers, 0 or more".into());
            }
        }
        if self.version != VERSION {
            return rule(
                "version",
                format!("version {} is not known; this drover reads version {VERSION}", self.version),
            );
        }
        if let Err(message) = uid_range(&self.agent.task_uids) {
            return rule("agent.task_uids", message);
        }
        let s = &self.server;
        if s.heartbeat >= s.lease {
            return rule(
                "server.heartbeat",
                format!(
                    "{} must be shorter than server.lease ({})",
                    humantime::format_duration(s.heartbeat),
                    humantime::format_duration(s.lease)
                ),
            );
        }
        if !(1..=65_536).contains(&s.completion_batch) {
            return rule("server.completion_batch", format!("{} is not from 1 to 65536", s.completion_batch));
        }
        if s.tls_cert.is_some() != s.tls_key.is_some() {
            return rule("server.tls_cert", "tls_cert and tls_key go together; give both or neither".into());
        }
        let loopback =
            drover_tls::is_loopback(&s.listen) && s.http.is_none_or(|h| drover_tls::is_loopback(&h));
        if s.tls == TlsMode::Off && !loopback {
            return rule(
                "server.tls",
                format!(
                    "off is allowed on loopback addresses only; {} is not (drop --tls off, or listen on 127.0.0.1)",
                    s.listen
                ),
            );
        }
        if s.no_auth && !loopback {
            return rule(
                "server.no_auth",
                "authorization can be turned off on loopback addresses only; give clients keys instead"
                    .into(),
            );
        }
        if s.tls == TlsMode::Off && s.tls_cert.is_some() {
            return rule("server.tls", "off contradicts tls_cert; drop one of them".into());
        }
        if let Some(o) = &self.oidc {
            if let Err(e) = drover_server::auth::oidc::check_issuer(&o.issuer) {
                return rule("oidc.issuer", e.to_string());
            }
            if o.audience.as_deref().or(o.client_id.as_deref()).is_none_or(str::is_empty) {
                return rule(
                    "oidc.audience",
                    "give the audience tokens carry, or client_id (its default)".into(),
                );
            }
            if o.claim.is_empty() {
                return rule("oidc.claim", "name the claim whose values map to roles, like groups".into());
            }
            if o.roles.is_empty() {
                return rule(
                    "oidc.roles",
                    "maps no claim value to a role, so nobody could sign in; add one like fx-artists = \"fx:submitter\""
                        .into(),
                );
            }
        }
        Ok(())
    }

    /// Whether the server's listeners use TLS.
    pub fn server_tls(&self) -> bool {
        let s = &self.server;
        match s.tls {
            TlsMode::On => true,
            TlsMode::Off => false,
            TlsMode::Auto => {
                s.tls_cert.is_some()
                    || !drover_tls::is_loopback(&s.listen)
                    || s.http.is_some_and(|h| !drover_tls::is_loopback(&h))
            }
        }
    }

    /// The configuration as TOML, with secrets elided: the agent's join token and the
    /// database password.
    pub fn to_toml_elided(&self) -> Result<String, ConfigError> {
        let mut shown = self.clone();
        if shown.agent.join.is_some() {
            shown.agent.join = Some("<elided>".into());
        }
        shown.server.database = shown.server.database.as_deref().map(elide_password);
        toml::to_string_pretty(&shown)
            .map_err(|e| ConfigError::Invalid(format!("cannot print the configuration: {e}")))
    }
}

/// `scheme://user:password@host/...` → `scheme://user:<elided>@host/...`.
fn elide_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    let Some((userinfo, host)) = rest.split_once('@') else { return url.to_owned() };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:<elided>@{host}"),
        None => url.to_owned(),
    }
}

/// Durations as humantime strings (`15s`, `30days`).
mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(|e| {
            serde::de::Error::custom(format!("`{text}` is not a duration like 15s or 30days: {e}"))
        })
    }
}

/// Sizes as `10GiB` strings or plain numbers of bytes.
mod size {
    use serde::{Deserialize, Deserializer, Serializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Bytes(u64),
        Text(String),
    }

    pub fn serialize<S: Serializer>(bytes: &u64, s: S) -> Result<S::Ok, S::Error> {
        let text = drover_core::resources::format_memory(*bytes);
        match drover_core::resources::parse_memory(&text) {
            Ok(b) if b == *bytes => s.serialize_str(&text),
            _ => s.serialize_u64(*bytes),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        match Size::deserialize(d)? {
            Size::Bytes(b) => Ok(b),
            Size::Text(t) => drover_core::resources::parse_memory(&t).map_err(serde::de::Error::custom),
        }
    }
}

/// An optional size.
mod opt_size {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
        match bytes {
            Some(b) => super::size::serialize(b, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        super::size::deserialize(d).map(Some)
    }
}

/// Reads a `FIRST-LAST` uid range (both included): at least one uid, and never root.
pub fn uid_range(text: &str) -> Result<std::ops::Range<u32>, String> {
    let bad = || format!("`{text}` is not a uid range like 1000000-1065535");
    let (first, last) = text.split_once('-').ok_or_else(bad)?;
    let first: u32 = first.trim().parse().map_err(|_| bad())?;
    let last: u32 = last.trim().parse().map_err(|_| bad())?;
    if first == 0 || last < first || last == u32::MAX {
        return Err(format!("`{text}`: the range must not include root (0) and must end below 4294967295"));
    }
    Ok(first..last + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("drover.toml");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    #[test]
    fn layers_file_then_overrides() {
        let (_dir, path) = file(
            "version = 1\n[server]\nlease = \"20s\"\nheartbeat = \"1s\"\nmax_upload = \"1GiB\"\n[agent]\ncores = 3\n",
        );
        let config = load(Some(&path), Overrides::default()).unwrap();
        assert_eq!(config.server.lease, Duration::from_secs(20));
        assert_eq!(config.server.max_upload, 1 << 30);
        assert_eq!(config.agent.cores, Some(3));
        assert_eq!(config.server.listen, ServerSettings::default().listen, "defaults fill the rest");
        let mut flags = Overrides::default();
        flags.set("server", "lease", Some("30s"));
        flags.set("agent", "cores", None::<u32>);
        let config = load(Some(&path), flags).unwrap();
        assert_eq!(config.server.lease, Duration::from_secs(30), "a flag beats the file");
        assert_eq!(config.agent.cores, Some(3), "an absent flag leaves the file's value");
    }

    #[test]
    fn assigning_ahead_is_on_unless_the_file_or_the_flag_turns_it_off() {
        assert!(load(None, Overrides::default()).unwrap().server.assign_ahead);
        let (_dir, path) = file("version = 1\n[server]\nassign_ahead = false\n");
        assert!(!load(Some(&path), Overrides::default()).unwrap().server.assign_ahead);
        let args = crate::args::ServerArgs { no_assign_ahead: true, ..Default::default() };
        let mut flags = Overrides::default();
        args.overrides(&mut flags);
        assert!(!load(None, flags).unwrap().server.assign_ahead);
    }

    #[test]
    fn errors_name_the_key() {
        let (_dir, path) = file("[server]\nlease = \"soon\"\n");
        let err = load(Some(&path), Overrides::default()).unwrap_err().to_string();
        assert!(
            err.contains("`server.lease`") && err.contains("drover.toml") && err.contains("soon"),
            "{err}"
        );
        let (_dir, path) = file("[server]\nleese = \"1s\"\n");
        let err = load(Some(&path), Overrides::default()).unwrap_err().to_string();
        assert!(err.contains("leese"), "{err}");
        let (_dir, path) = file("[server]\nheartbeat = \"20s\"\n");
        let err = load(Some(&path), Overrides::default()).unwrap_err().to_string();
        assert!(err.contains("`server.heartbeat`"), "{err}");
        let mut flags = Overrides::default();
        flags.set("server", "listen", Some("0.0.0.0:7370"));
        flags.flag("server", "no_auth", true);
        let err = load(None, flags).unwrap_err().to_string();
        assert!(err.contains("`server.no_auth`"), "{err}");
        assert!(load(Some(Path::new("/nonexistent/drover.toml")), Overrides::default()).is_err());
        let (_dir, path) = file("version = 2\n");
        assert!(load(Some(&path), Overrides::default()).unwrap_err().to_string().contains("`version`"));
    }

    #[test]
    fn oidc_section_is_checked() {
        let section = "[oidc]\nissuer = \"http://127.0.0.1:9000\"\nclient_id = \"drover\"\n";
        let (_dir, path) =
            file(&format!("{section}[oidc.roles]\nfx-team = \"fx:submitter\"\nops = \"operator\"\n"));
        let config = load(Some(&path), Overrides::default()).unwrap();
        let server = config.oidc.as_ref().unwrap().server_config();
        assert_eq!((server.audience.as_str(), server.claim.as_str()), ("drover", "groups"));
        assert_eq!(server.roles["ops"], RoleGrant::Operator);
        let back: Config = toml::from_str(&config.to_toml_elided().unwrap()).unwrap();
        assert_eq!(back, config, "printed oidc reads back the same");
        // Bad role strings name their key and the file.
        let (_dir, path) = file(&format!("{section}[oidc.roles]\nfx-team = \"fx\"\n"));
        let err = load(Some(&path), Overrides::default()).unwrap_err().to_string();
        assert!(err.contains("`oidc.roles.fx-team`") && err.contains("PROJECT:ROLE"), "{err}");
        for (text, key) in [
            (
                "[oidc]\nissuer = \"http://idp.example.com\"\nclient_id = \"d\"\n[oidc.roles]\na = \"operator\"\n",
                "`oidc.issuer`",
            ),
            (
                "[oidc]\nissuer = \"https://idp.example.com\"\n[oidc.roles]\na = \"operator\"\n",
                "`oidc.audience`",
            ),
            (section, "`oidc.roles`"),
        ] {
            let (_dir, path) = file(text);
            let err = load(Some(&path), Overrides::default()).unwrap_err().to_string();
            assert!(err.contains(key), "{key}: {err}");
        }
    }

    #[test]
    fn tls_defaults_follow_the_address() {
        let mut c = Config::default();
        assert!(!c.server_tls(), "loopback: plain text");
        c.server.listen = "0.0.0.0:7370".parse().unwrap();
        assert!(c.server_tls(), "off loopback: TLS");
        c.server.listen = "127.0.0.1:7370".parse().unwrap();
        c.server.tls = TlsMode::On;
        assert!(c.server_tls());
    }

    #[test]
    fn printing_elides_secrets() {
        let mut c = Config::default();
        c.agent.join = Some("drj_secret".into());
        c.server.database = Some("postgres://drover:hunter2@db/drover".into());
        let text = c.to_toml_elided().unwrap();
        assert!(!text.contains("hunter2") && !text.contains("drj_secret"), "{text}");
        assert!(text.contains("postgres://drover:<elided>@db/drover"), "{text}");
        let back: Config = toml::from_str(&Config::default().to_toml_elided().unwrap()).unwrap();
        assert_eq!(back, Config::default(), "printed defaults read back the same");
    }

    #[test]
    fn uid_ranges_exclude_root_and_read_both_ends() {
        assert_eq!(uid_range("1000-1002"), Ok(1000..1003));
        assert!(uid_range("0-10").is_err());
        assert!(uid_range("10-5").is_err());
        assert!(uid_range("lots").is_err());
    }
}
