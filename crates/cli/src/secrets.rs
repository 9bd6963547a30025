//! `drover secrets`: project secrets that tasks receive as environment variables.

use std::io::Read;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use drover_proto as pb;

use crate::client::{ServerOpt, connect, rpc_error};

/// Arguments of `secrets`.
#[derive(clap::Args)]
pub struct SecretsArgs {
    #[command(subcommand)]
    command: SecretsCommand,
    /// Project the secrets belong to.
    #[arg(long, global = true, default_value = "default")]
    project: String,
    #[command(flatten)]
    server: ServerOpt,
}

#[derive(clap::Subcommand)]
enum SecretsCommand {
    /// Set a secret; the value is read from stdin (one trailing newline is dropped):
    /// `printf %s "$TOKEN" | drover secrets set API_TOKEN`.
    Set {
        /// Name, like DB_PASSWORD (capitals, digits, `_`).
        name: String,
    },
    /// List the names of a project's secrets (values are never shown).
    Ls,
    /// Remove a secret.
    Rm {
        /// Name of the secret.
        name: String,
    },
}

/// `drover secrets ...`.
pub async fn secrets(args: SecretsArgs) -> Result<ExitCode> {
    let mut client = connect(&args.server).await?;
    match args.command {
        SecretsCommand::Set { name } => {
            if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
                eprintln!("reading the value of {name} from stdin; end with Ctrl-D");
            }
            let mut value = String::new();
            std::io::stdin().read_to_string(&mut value).context("cannot read the secret from stdin")?;
            if value.ends_with('\n') {
                value.pop();
                if value.ends_with('\r') {
                    value.pop();
                }
            }
            if value.is_empty() {
                bail!("the value on stdin is empty; nothing was stored");
            }
            let req = pb::SetSecretRequest { project: args.project.clone(), name: name.clone(), value };
            let resp = client.set_secret(req).await.map_err(rpc_error)?.into_inner();
            let verb = if resp.created { "created" } else { "updated" };
            println!("secret {name} {verb} in project {}", args.project);
        }
        SecretsCommand::Ls => {
            let names = crate::pages::collect(None, async |page_size, page_token| {
                let req = pb::ListSecretsRequest { project: args.project.clone(), page_size, page_token };
                let page = client.list_secrets(req).await.map_err(rpc_error)?.into_inner();
                Ok((page.names, page.next_page_token))
            })
            .await?;
            if names.is_empty() {
                eprintln!("project {} has no secrets", args.project);
            }
            for n in names {
                println!("{n}");
            }
        }
        SecretsCommand::Rm { name } => {
            let req = pb::DeleteSecretRequest { project: args.project.clone(), name: name.clone() };
            if !client.delete_secret(req).await.map_err(rpc_error)?.into_inner().deleted {
                bail!("project {} has no secret {name}", args.project);
            }
            println!("secret {name} removed from project {}", args.project);
        }
    }
    Ok(ExitCode::SUCCESS)
}
