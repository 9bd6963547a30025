//! The `drover` command line, built as two executables:
//!
//! - `drover` (src/main.rs): the server, the agent and the client in one file;
//! - `drover-agent` (src/bin/drover-agent.rs): the agent alone, for worker nodes. It takes the
//!   same flags as `drover agent`; what it leaves out (the server, its stores and the client
//!   commands) is not linked in, so an idle node keeps a fraction of the memory.

mod access;
mod args;
mod artifacts;
mod client;
mod config;
mod credentials;
mod images;
mod jobs;
mod log_out;
mod oidc;
mod pages;
mod render;
mod run;
mod secrets;
mod tenants;
mod usage;

use std::future::Future;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Drover runs batch jobs on a fleet of machines: write a job file, submit it, and watch its
/// tasks run on worker nodes with room.
///
/// Start here:  drover up --submit examples/hello.yaml
#[derive(Parser)]
#[command(name = "drover", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a server and one local agent in one process (data under ./.drover by default).
    Up(Box<args::UpArgs>),
    /// Run the server: the API for clients and agents, the scheduler and the store.
    Server(Box<args::ServerCommand>),
    /// Run an agent: enroll this machine with a server (--join TOKEN, once) and run the tasks
    /// it is given.
    Agent(Box<args::AgentArgs>),
    /// Check a job file without submitting it.
    Validate(jobs::ValidateArgs),
    /// Submit a job file; prints the job id.
    Submit(jobs::SubmitArgs),
    /// List jobs (only unfinished ones unless --all).
    Ps(jobs::PsArgs),
    /// Show a job and its tasks.
    Status(jobs::StatusArgs),
    /// Follow a job's state changes live until it ends; exits 0 if it succeeded or warned.
    Watch(jobs::WatchArgs),
    /// Print a job's output; -f keeps following until its tasks end.
    Logs(jobs::LogsArgs),
    /// Cancel every unfinished task of a job.
    Cancel(jobs::CancelArgs),
    /// List worker nodes and what they have free.
    Nodes(jobs::NodesArgs),
    /// List and download the outputs tasks kept.
    Artifacts(artifacts::ArtifactsArgs),
    /// Manage project secrets (set from stdin, list names, remove).
    Secrets(secrets::SecretsArgs),
    /// Show compute time and LLM tokens used, per project and per job.
    Usage(usage::UsageArgs),
    /// Manage API keys (create, list, revoke).
    Keys(access::KeysArgs),
    /// Manage projects (create, list).
    Projects(access::ProjectsArgs),
    /// Show who changed what: submits, cancels, keys, secrets, projects, nodes.
    Audit(tenants::AuditArgs),
    /// Check an API key against a server, or sign in through its identity provider (--oidc),
    /// and store the credential (and the server's CA) for later commands.
    Login(access::LoginArgs),
    /// Show the effective configuration of server and agent.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print the configuration the given file, DROVER_* variables and flags make, as TOML,
    /// with secrets elided.
    Print(Box<args::PrintArgs>),
}

fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("DROVER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).init();
}

/// `drover`: parses the command line and runs the command.
pub fn drover_main() -> ExitCode {
    let cli = Cli::parse();
    drover_tls::install_crypto_provider();
    // `up --submit` is a demo: the job's progress is the output, the daemons' logs are noise.
    let daemon = match &cli.command {
        Command::Up(a) => a.submit.is_none(),
        Command::Server(_) | Command::Agent(_) => true,
        _ => false,
    };
    init_tracing(if daemon { "info" } else { "warn" });
    if !matches!(cli.command, Command::Up(_) | Command::Server(_) | Command::Agent(_)) {
        // A client's output piped into `head` ends it quietly, as any command-line tool; the
        // daemons keep ignoring SIGPIPE, which their sockets raise.
        // SAFETY: sets a signal's disposition before any other thread exists.
        let _ = unsafe {
            nix::sys::signal::signal(nix::sys::signal::Signal::SIGPIPE, nix::sys::signal::SigHandler::SigDfl)
        };
    }
    run_to_exit(async move {
        match cli.command {
            Command::Up(a) => run::up(*a).await,
            Command::Server(a) => run::server(*a).await,
            Command::Agent(a) => run::agent(*a).await,
            Command::Validate(a) => jobs::validate(a),
            Command::Submit(a) => jobs::submit(a).await,
            Command::Ps(a) => jobs::ps(a).await,
            Command::Status(a) => jobs::status(a).await,
            Command::Watch(a) => jobs::watch(a).await,
            Command::Logs(a) => jobs::logs(a).await,
            Command::Cancel(a) => jobs::cancel(a).await,
            Command::Nodes(a) => jobs::nodes(a).await,
            Command::Secrets(a) => secrets::secrets(a).await,
            Command::Artifacts(a) => artifacts::artifacts(a).await,
            Command::Usage(a) => usage::usage(a).await,
            Command::Keys(a) => access::keys(a).await,
            Command::Projects(a) => access::projects(a).await,
            Command::Login(a) => access::login(a).await,
            Command::Audit(a) => tenants::audit(a).await,
            Command::Config { command: ConfigCommand::Print(a) } => run::config_print(*a),
        }
    })
}

/// The Drover agent alone: enroll this machine with a server (--join TOKEN, once) and run the
/// tasks it is given.
///
/// The same as `drover agent`, in an executable that holds only the agent, so a worker node
/// keeps less memory for it. Flags, DROVER_* variables and the config file's [agent] table are
/// those of `drover agent`.
///
/// Start here:  drover-agent --server https://SERVER:7070 --join TOKEN
#[derive(Parser)]
#[command(name = "drover-agent", version)]
struct AgentCli {
    #[command(flatten)]
    args: args::AgentArgs,
}

/// `drover-agent`: parses the agent's flags and runs the agent until SIGTERM or Ctrl-C.
pub fn agent_main() -> ExitCode {
    let cli = AgentCli::parse();
    drover_tls::install_crypto_provider();
    init_tracing("info");
    run_to_exit(run::agent(cli.args))
}

/// Runs `command` on a multi-threaded runtime and turns its outcome into the exit code, printing
/// the error chain of a failure.
fn run_to_exit(command: impl Future<Output = anyhow::Result<ExitCode>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
