//! Identity commands: `keys`, `projects`, `nodes token|revoke`, `login`.

use std::io::BufRead;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use drover_proto as pb;
use serde_json::json;

use crate::client::{ServerOpt, connect, connect_target, rpc_error};
use crate::credentials::{self, CredentialsFile, ServerCredentials};
use crate::jobs::Format;
use crate::render;

fn parse_lifetime(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("`{s}` is not a duration like 30d or 12h: {e}"))
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("`{s}` is not a label; write key=value"))
}

/// Arguments of `keys`.
#[derive(clap::Args)]
pub struct KeysArgs {
    #[command(subcommand)]
    command: KeysCommand,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t, global = true)]
    output: Format,
    #[command(flatten)]
    server: ServerOpt,
}

#[derive(clap::Subcommand)]
enum KeysCommand {
    /// Create an API key and print it (the only time it is shown).
    Create {
        /// The key's project (every role but operator needs one).
        #[arg(long)]
        project: Option<String>,
        /// viewer (read), submitter (read, submit, cancel), admin (also keys and secrets of the
        /// project) or operator (the whole cluster).
        #[arg(long, default_value = "submitter")]
        role: String,
        /// A note saying what the key is for.
        #[arg(long, default_value = "")]
        name: String,
        /// Lifetime, like 30d or 12h (default: no expiry).
        #[arg(long, value_parser = parse_lifetime)]
        expires: Option<Duration>,
    },
    /// List keys (never their secrets).
    Ls {
        /// Only this project's keys.
        #[arg(long)]
        project: Option<String>,
    },
    /// Revoke a key at once.
    Revoke {
        /// The key's id (or the whole key).
        id: String,
    },
}

/// `drover keys ...`.
pub async fn keys(args: KeysArgs) -> Result<ExitCode> {
    let mut client = connect(&args.server).await?;
    match args.command {
        KeysCommand::Create { project, role, name, expires } => {
            let req = pb::CreateKeyRequest {
                project: project.unwrap_or_default(),
                role,
                name,
                expires_in_ms: expires.map(|d| d.as_millis() as u64).unwrap_or(0),
            };
            let resp = client.create_key(req).await.map_err(rpc_error)?.into_inner();
            let key = resp.key.unwrap_or_default();
            match args.output {
                Format::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &json!({"key": resp.secret, "id": key.id, "role": key.role,
                        "project": key.project, "expires_ms": key.expires_ms})
                    )?
                ),
                Format::Human => {
                    println!("{}", resp.secret);
                    let scope = if key.project.is_empty() {
                        "the cluster".to_owned()
                    } else {
                        format!("project {}", key.project)
                    };
                    eprintln!(
                        "created key {} ({} of {scope}); it is shown only this once: store it now",
                        key.id, key.role
                    );
                }
            }
        }
        KeysCommand::Ls { project } => {
            let project = project.unwrap_or_default();
            let keys = crate::pages::collect(None, async |page_size, page_token| {
                let req = pb::ListKeysRequest { project: project.clone(), page_size, page_token };
                let page = client.list_keys(req).await.map_err(rpc_error)?.into_inner();
                Ok((page.keys, page.next_page_token))
            })
            .await?;
            match args.output {
                Format::Json => {
                    let rows: Vec<_> = keys
                        .iter()
                        .map(|k| json!({"id": k.id, "project": k.project, "role": k.role, "name": k.name,
                            "created_ms": k.created_ms, "expires_ms": k.expires_ms, "revoked_ms": k.revoked_ms,
                            "created_by": k.created_by}))
                        .collect();
                    println!("{}", serde_json::to_string_pretty(&rows)?);
                }
                Format::Human => {
                    let mut table =
                        render::table(&["ID", "PROJECT", "ROLE", "NAME", "CREATED", "EXPIRES", "REVOKED"]);
                    for k in &keys {
                        let project = if k.project.is_empty() { "*" } else { &k.project };
                        table.add_row([
                            k.id.as_str(),
                            project,
                            &k.role,
                            &k.name,
                            &render::time(k.created_ms),
                            &render::time(k.expires_ms),
                            &render::time(k.revoked_ms),
                        ]);
                    }
                    println!("{table}");
                }
            }
        }
        KeysCommand::Revoke { id } => {
            let resp = client.revoke_key(pb::RevokeKeyRequest { id: id.clone() }).await.map_err(rpc_error)?;
            if resp.into_inner().revoked {
                println!("key revoked");
            } else {
                println!("the key was revoked already");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Arguments of `projects`.
#[derive(clap::Args)]
pub struct ProjectsArgs {
    #[command(subcommand)]
    command: ProjectsCommand,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t, global = true)]
    output: Format,
    #[command(flatten)]
    server: ServerOpt,
}

#[derive(clap::Subcommand)]
enum ProjectsCommand {
    /// Create a project (operator).
    Create {
        /// Its name: lowercase letters, digits and `-`.
        name: String,
    },
    /// List the projects you have a role in.
    Ls,
    /// Show a project's settings, quotas and budget, and what it uses now.
    Show {
        /// The project.
        name: String,
    },
    /// Change settings: runtimes, images, networks, llm_upstreams, containers_as_root,
    /// run_as (accounts process tasks' `user:` may name), max_priority, quota.cores, quota.memory, quota.tasks, quota.gpus, quota.stored_bytes,
    /// budget (like 500/month), retention (how long ended jobs are kept, like 30days); `none`
    /// clears one. Admins may tighten, operators loosen.
    Set {
        /// The project.
        name: String,
        /// KEY=VALUE, one or more (lists are comma-separated: images=reg.example.com/*,build:*).
        #[arg(required = true, value_parser = crate::tenants::parse_setting)]
        settings: Vec<(String, String)>,
    },
}

/// `drover projects ...`.
pub async fn projects(args: ProjectsArgs) -> Result<ExitCode> {
    let mut client = connect(&args.server).await?;
    match args.command {
        ProjectsCommand::Show { name } => {
            return crate::tenants::project_show(&mut client, name, args.output).await;
        }
        ProjectsCommand::Set { name, settings } => {
            return crate::tenants::project_set(&mut client, name, settings, args.output).await;
        }
        ProjectsCommand::Create { name } => {
            let req = pb::CreateProjectRequest { name: name.clone() };
            let created = client.create_project(req).await.map_err(rpc_error)?.into_inner().created;
            if created {
                println!(
                    "project {name} created; give people keys with `drover keys create --project {name}`"
                );
            } else {
                println!("project {name} exists already");
            }
        }
        ProjectsCommand::Ls => {
            let projects = crate::pages::collect(None, async |page_size, page_token| {
                let req = pb::ListProjectsRequest { page_size, page_token };
                let page = client.list_projects(req).await.map_err(rpc_error)?.into_inner();
                Ok((page.projects, page.next_page_token))
            })
            .await?;
            match args.output {
                Format::Json => {
                    let rows: Vec<_> = projects
                        .iter()
                        .map(|p| json!({"name": p.name, "role": p.role, "created_ms": p.created_ms}))
                        .collect();
                    println!("{}", serde_json::to_string_pretty(&rows)?);
                }
                Format::Human => {
                    let mut table = render::table(&["PROJECT", "YOUR ROLE", "CREATED"]);
                    for p in &projects {
                        table.add_row([p.name.as_str(), &p.role, &render::time(p.created_ms)]);
                    }
                    println!("{table}");
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// What `drover nodes` does besides listing.
#[derive(clap::Subcommand)]
pub enum NodesCommand {
    /// List worker nodes and what they have free (the default).
    Ls,
    /// Join tokens that enroll new agents.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Revoke a node: its session ends at once, its tasks are retried elsewhere, and its
    /// agent must be enrolled again with a new token.
    Revoke {
        /// The node's name.
        name: String,
    },
}

/// `drover nodes token ...`.
#[derive(clap::Subcommand)]
pub enum TokenCommand {
    /// Create a single-use join token: `drover agent --server URL --join TOKEN` on the new node.
    Create {
        /// Labels the node will carry whatever its agent says: k=v,k2=v2.
        #[arg(long, value_delimiter = ',', value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// How long the token may be used, like 1h (at most 30d).
        #[arg(long, default_value = "1h", value_parser = parse_lifetime)]
        expires: Duration,
    },
}

/// `drover nodes ...`.
pub async fn nodes(command: NodesCommand, output: Format, server: &ServerOpt) -> Result<ExitCode> {
    let mut client = connect(server).await?;
    match command {
        NodesCommand::Ls => return crate::jobs::list_nodes(&mut client, output).await,
        NodesCommand::Token { command: TokenCommand::Create { labels, expires } } => {
            let req = pb::CreateJoinTokenRequest {
                labels: labels.into_iter().collect(),
                expires_in_ms: expires.as_millis() as u64,
            };
            let resp = client.create_join_token(req).await.map_err(rpc_error)?.into_inner();
            match output {
                Format::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &json!({"token": resp.token, "expires_ms": resp.expires_ms,
                        "ca_fingerprint": resp.ca_fingerprint})
                    )?
                ),
                Format::Human => {
                    println!("{}", resp.token);
                    eprintln!(
                        "single-use join token, valid until {}; on the new node run:\n  drover agent --server URL --join TOKEN",
                        render::time(resp.expires_ms)
                    );
                }
            }
        }
        NodesCommand::Revoke { name } => {
            let resp =
                client.revoke_node(pb::RevokeNodeRequest { name: name.clone() }).await.map_err(rpc_error)?;
            let resp = resp.into_inner();
            println!(
                "node {name} revoked: {} credential(s), {} running task(s) handed on",
                resp.credentials, resp.lost
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Arguments of `login`.
#[derive(clap::Args)]
pub struct LoginArgs {
    /// Make this server the default of later commands (the first login always does).
    #[arg(long)]
    default: bool,
    /// Sign in through the identity provider the server trusts (OpenID Connect device flow)
    /// instead of with an API key: open the URL shown, enter the code, and the token is stored.
    #[arg(long)]
    oidc: bool,
    /// The identity provider's issuer URL (with --oidc; your operator has it).
    #[arg(long, env = "DROVER_OIDC_ISSUER")]
    issuer: Option<String>,
    /// The client id drover has at the identity provider (with --oidc).
    #[arg(long, env = "DROVER_OIDC_CLIENT_ID")]
    client_id: Option<String>,
    /// The scopes to ask the identity provider for (with --oidc); some providers put groups
    /// into tokens only when asked, like `openid groups`.
    #[arg(long, default_value = "openid")]
    scope: String,
    #[command(flatten)]
    server: ServerOpt,
}

/// How to trust the server, as the credentials file keeps it: a CA given as a file is stored
/// by its absolute path, so later commands find it from any directory.
fn stored_ca(opt: &ServerOpt) -> Option<String> {
    match opt.ca.as_deref() {
        Some(ca) if !ca.starts_with("sha256:") => {
            Some(std::path::absolute(ca).map(|p| p.display().to_string()).unwrap_or_else(|_| ca.to_owned()))
        }
        other => other.map(str::to_owned),
    }
}

/// `drover login`: checks a key against a server and stores it in the credentials file.
pub async fn login(args: LoginArgs) -> Result<ExitCode> {
    if args.oidc {
        return login_oidc(args).await;
    }
    let mut opt = args.server.clone();
    if opt.key.is_none() {
        if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
            eprintln!("paste your API key (drv_...) and press Enter:");
        }
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line).context("cannot read the key from stdin")?;
        opt.key = Some(line.trim().to_owned()).filter(|k| !k.is_empty());
    }
    let key = opt
        .key
        .clone()
        .ok_or_else(|| anyhow!("no key given; pass --key, set DROVER_KEY, or paste it on stdin"))?;
    let target = opt.targets()?.into_iter().next().ok_or_else(|| anyhow!("--server names no server"))?;
    let mut client =
        connect_target(&target).await.map_err(|e| anyhow!("cannot reach the drover server at {e}"))?;
    let me = client.who_am_i(pb::WhoAmIRequest {}).await.map_err(rpc_error)?.into_inner();
    if me.kind == "node" {
        bail!("that is a node credential; log in with an API key (drv_...)");
    }
    let ca = stored_ca(&opt);
    let path =
        credentials::default_path().ok_or_else(|| anyhow!("no home directory; set DROVER_CREDENTIALS"))?;
    let mut file = CredentialsFile::load(&path)?;
    file.set(&target.url, ServerCredentials { key, ca, ..ServerCredentials::default() }, args.default);
    file.save(&path)?;
    let scope =
        if me.project.is_empty() { "every project".to_owned() } else { format!("project {}", me.project) };
    println!(
        "logged in to {} as key {} ({} of {scope}); saved in {}",
        target.url,
        me.id,
        me.role,
        path.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// `drover login --oidc`: the device flow at the identity provider, then the token checked
/// against the server and stored in the credentials file.
async fn login_oidc(args: LoginArgs) -> Result<ExitCode> {
    let issuer = args.issuer.ok_or_else(|| {
        anyhow!(
            "--oidc needs the identity provider's --issuer URL (or DROVER_OIDC_ISSUER); ask your operator"
        )
    })?;
    let client_id = args.client_id.ok_or_else(|| {
        anyhow!("--oidc needs drover's --client-id at the identity provider (or DROVER_OIDC_CLIENT_ID)")
    })?;
    // A key from --key or DROVER_KEY is not what this login is about.
    let opt = ServerOpt { key: None, ..args.server };
    let target = opt.targets()?.into_iter().next().ok_or_else(|| anyhow!("--server names no server"))?;
    let tokens = crate::oidc::device_flow(&issuer, &client_id, &args.scope).await?;
    // The first token the server takes is kept: the ID token, else an access token that is a
    // JWT (for servers whose audience is an API rather than this client).
    let mut refusal = None;
    for token in tokens.candidates() {
        let target = crate::client::Target { key: Some(token.clone()), ..target.clone() };
        let mut client =
            connect_target(&target).await.map_err(|e| anyhow!("cannot reach the drover server at {e}"))?;
        let me = match client.who_am_i(pb::WhoAmIRequest {}).await {
            Ok(me) => me.into_inner(),
            Err(s) if s.code() == tonic::Code::Unauthenticated => {
                refusal.get_or_insert(s);
                continue;
            }
            Err(s) => return Err(rpc_error(s)),
        };
        let expires_ms = crate::oidc::expiry_ms(&token);
        let path = credentials::default_path()
            .ok_or_else(|| anyhow!("no home directory; set DROVER_CREDENTIALS"))?;
        let mut file = CredentialsFile::load(&path)?;
        let creds =
            ServerCredentials { ca: stored_ca(&opt), token: Some(token), expires_ms, ..Default::default() };
        file.set(&target.url, creds, args.default);
        file.save(&path)?;
        let scope = if me.project.is_empty() {
            "every project".to_owned()
        } else {
            format!("project {}", me.project)
        };
        let until = expires_ms.map(|ms| format!(", until {}", render::time(ms))).unwrap_or_default();
        println!(
            "logged in to {} as {} ({} of {scope}{until}); saved in {}",
            target.url,
            me.id,
            me.role,
            path.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    Err(match refusal {
        Some(s) => rpc_error(s),
        None => anyhow!("the identity provider handed out no token drover can use (no ID token)"),
    })
}
