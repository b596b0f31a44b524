//! `agentctl`: the agent's API from the command line, through its Unix socket.

use std::path::PathBuf;
use std::process::ExitCode;

use agent_api::client::AgentClient;
use agent_api::{ByteSize, CreateVm, CreateVolume, UpdateVolume, VmVolume};
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
    /// VMs: the token's tenant's (the admin names a tenant with --tenant).
    #[command(subcommand)]
    Vm(VmCommand),
    /// The image catalog's files (what a VM's --kernel and --initrd may name).
    Images,
}

#[derive(Subcommand, Debug)]
enum VmCommand {
    /// Creates a VM and starts it (unless --no-start).
    Create {
        /// The VM's id (a new UUID when absent).
        #[arg(long)]
        id: Option<String>,
        /// Kernel: a file of the image catalog.
        #[arg(long)]
        kernel: String,
        #[arg(long)]
        initrd: Option<String>,
        #[arg(long)]
        cmdline: Option<String>,
        #[arg(long, default_value_t = 1)]
        vcpus: u8,
        /// Guest memory: "512MiB" or bytes.
        #[arg(long, default_value = "512MiB")]
        memory: ByteSize,
        /// A volume of the tenant's: NAME, or NAME:ro. Repeat for more.
        #[arg(long = "volume")]
        volumes: Vec<String>,
        /// always, on-failure or never.
        #[arg(long, default_value = "on-failure")]
        restart_policy: String,
        /// Create it stopped.
        #[arg(long)]
        no_start: bool,
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Lists VMs (the admin without --tenant: every tenant's).
    List {
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Shows a VM.
    Show {
        id: String,
        #[arg(long)]
        tenant: Option<String>,
    },
    /// start, stop, kill or restart a VM.
    Action {
        id: String,
        /// start, stop, kill or restart.
        action: String,
        /// stop and restart: seconds the guest has to power off after its power button
        /// [default: the agent's, 10].
        #[arg(long)]
        timeout: Option<u64>,
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Prints the tail of a VM's serial console.
    Console {
        id: String,
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Kills a VM and forgets it (its volumes stay).
    Delete {
        id: String,
        #[arg(long)]
        tenant: Option<String>,
    },
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
        Command::Vm(v) => vm(&client, v)?,
        Command::Images => println!("{}", pretty(&client.images().map_err(err)?)),
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

fn vm(client: &AgentClient, cmd: &VmCommand) -> Result<(), String> {
    let err = |e: agent_api::client::Error| agent::error_chain(&e);
    match cmd {
        VmCommand::Create {
            id,
            kernel,
            initrd,
            cmdline,
            vcpus,
            memory,
            volumes,
            restart_policy,
            no_start,
            tenant,
        } => {
            let restart_policy =
                serde_json::from_value(serde_json::Value::String(restart_policy.clone())).map_err(
                    |_| format!("--restart-policy {restart_policy:?}: always, on-failure or never"),
                )?;
            let req = CreateVm {
                id: id.clone(),
                vcpus: *vcpus,
                memory: *memory,
                kernel: kernel.clone(),
                initrd: initrd.clone(),
                cmdline: cmdline.clone(),
                volumes: volumes
                    .iter()
                    .map(|v| match v.strip_suffix(":ro") {
                        Some(name) => VmVolume {
                            name: name.to_string(),
                            read_only: true,
                        },
                        None => VmVolume {
                            name: v.clone(),
                            read_only: false,
                        },
                    })
                    .collect(),
                restart_policy,
                start: !no_start,
                tenant: tenant.clone(),
            };
            println!("{}", pretty(&client.create_vm(&req).map_err(err)?));
        }
        VmCommand::List { tenant } => {
            println!("{}", pretty(&client.vms(tenant.as_deref()).map_err(err)?))
        }
        VmCommand::Show { id, tenant } => {
            println!(
                "{}",
                pretty(&client.vm(id, tenant.as_deref()).map_err(err)?)
            )
        }
        VmCommand::Action {
            id,
            action,
            timeout,
            tenant,
        } => println!(
            "{}",
            pretty(
                &client
                    .vm_action(id, action, *timeout, tenant.as_deref())
                    .map_err(err)?
            )
        ),
        VmCommand::Console { id, tenant } => {
            print!("{}", client.console(id, tenant.as_deref()).map_err(err)?)
        }
        VmCommand::Delete { id, tenant } => {
            client.delete_vm(id, tenant.as_deref()).map_err(err)?;
            println!("vm {id} deleted");
        }
    }
    Ok(())
}

/// An answer as indented JSON.
fn pretty<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}
