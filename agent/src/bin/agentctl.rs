//! `agentctl`: the agent's API from the command line, through its Unix socket.

use std::path::PathBuf;
use std::process::ExitCode;

use agent_api::client::AgentClient;
use agent_api::{ByteSize, CreateVolume, UpdateVolume};
use clap::{Parser, Subcommand};

/// Call the node agent's API through its Unix socket.
///
/// The token is --token, or AGENT_TOKEN, or the first line of --token-file (by default the
/// admin token beside the default socket).
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Args {
    /// The agent's API socket.
    #[arg(
        long,
        env = "AGENT_SOCKET",
        default_value = "/var/lib/agent/agent.sock"
    )]
    socket: PathBuf,
    /// Bearer token (the admin's or a tenant's).
    #[arg(long, env = "AGENT_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// File whose first line is the token, when --token is not given.
    #[arg(
        long,
        env = "AGENT_TOKEN_FILE",
        default_value = "/var/lib/agent/admin.token"
    )]
    token_file: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Who the token is: the admin or a tenant.
    Whoami,
    /// The node's tenants (admin).
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// Volumes: the token's tenant's (the admin names a tenant with --tenant).
    #[command(subcommand)]
    Volume(VolumeCommand),
}

#[derive(Subcommand, Debug)]
enum VolumeCommand {
    /// Creates a volume in storaged.
    Create {
        name: String,
        /// Size: "10GiB", "1TB" or bytes.
        #[arg(long)]
        size: ByteSize,
        /// Performance tier: essential, standard, premium, enterprise, ultra, mass.
        #[arg(long)]
        tier: Option<String>,
        /// "aes-xts-plain64" (the default) or "none".
        #[arg(long)]
        encryption: Option<String>,
        #[arg(long)]
        iops_limit: Option<u64>,
        /// Bytes/s: "100MiB" or bytes.
        #[arg(long)]
        bandwidth_limit: Option<ByteSize>,
        /// Whose volume (the admin's calls).
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Lists volumes (the admin without --tenant: every tenant's).
    List {
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Shows a volume.
    Show {
        name: String,
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Changes a volume (it only grows).
    Update {
        name: String,
        #[arg(long)]
        size: Option<ByteSize>,
        #[arg(long)]
        tier: Option<String>,
        #[arg(long)]
        iops_limit: Option<u64>,
        #[arg(long)]
        bandwidth_limit: Option<ByteSize>,
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Deletes a volume, its data with it.
    Delete {
        name: String,
        #[arg(long)]
        tenant: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum TenantCommand {
    /// Creates a tenant and prints its token (shown this once).
    Create { name: String },
    /// Lists the tenants.
    List,
    /// Revokes a tenant's token.
    Delete { name: String },
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("agentctl: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<(), String> {
    let token = match &args.token {
        Some(t) => t.clone(),
        None => std::fs::read_to_string(&args.token_file)
            .map_err(|e| {
                format!(
                    "no --token, and cannot read {}: {e}",
                    args.token_file.display()
                )
            })?
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .to_string(),
    };
    let client = AgentClient::new(&args.socket, &token);
    let err = |e: agent_api::client::Error| agent::error_chain(&e);
    match &args.command {
        Command::Whoami => println!("{}", pretty(&client.whoami().map_err(err)?)),
        Command::Tenant(TenantCommand::Create { name }) => {
            println!("{}", pretty(&client.create_tenant(name).map_err(err)?))
        }
        Command::Tenant(TenantCommand::List) => {
            println!("{}", pretty(&client.tenants().map_err(err)?))
        }
        Command::Tenant(TenantCommand::Delete { name }) => {
            client.delete_tenant(name).map_err(err)?;
            println!("tenant {name} revoked");
        }
        Command::Volume(v) => volume(&client, v).map_err(err)?,
    }
    Ok(())
}

fn volume(client: &AgentClient, cmd: &VolumeCommand) -> Result<(), agent_api::client::Error> {
    match cmd {
        VolumeCommand::Create {
            name,
            size,
            tier,
            encryption,
            iops_limit,
            bandwidth_limit,
            tenant,
        } => {
            let req = CreateVolume {
                name: name.clone(),
                size: *size,
                tier: tier.clone(),
                encryption: encryption.clone(),
                iops_limit: *iops_limit,
                bandwidth_limit: *bandwidth_limit,
                preallocate: None,
                tenant: tenant.clone(),
            };
            println!("{}", pretty(&client.create_volume(&req)?));
        }
        VolumeCommand::List { tenant } => {
            println!("{}", pretty(&client.volumes(tenant.as_deref())?))
        }
        VolumeCommand::Show { name, tenant } => {
            println!("{}", pretty(&client.volume(name, tenant.as_deref())?))
        }
        VolumeCommand::Update {
            name,
            size,
            tier,
            iops_limit,
            bandwidth_limit,
            tenant,
        } => {
            let req = UpdateVolume {
                size: *size,
                tier: tier.clone(),
                iops_limit: *iops_limit,
                bandwidth_limit: *bandwidth_limit,
            };
            println!(
                "{}",
                pretty(&client.update_volume(name, tenant.as_deref(), &req)?)
            );
        }
        VolumeCommand::Delete { name, tenant } => {
            client.delete_volume(name, tenant.as_deref())?;
            println!("volume {name} deleted");
        }
    }
    Ok(())
}

/// An answer as indented JSON.
fn pretty<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}
