//! `storagectl`: command-line client of storaged's admin API.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde::Serialize;
use storaged_api::client::{AdminClient, Error};
use storaged_api::{
    ByteSize, CreateVolume, Keep, Owner, ReplicationMode, StartReplication, UpdateVolume,
};

/// Manage the volumes of a running storaged through its admin socket.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Admin socket of storaged.
    #[arg(
        long,
        env = "STORAGED_ADMIN_SOCKET",
        default_value = "/var/lib/storaged/admin.sock"
    )]
    socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create a volume: `storagectl create db1 --size 2TiB --tier premium`.
    Create {
        name: String,
        /// Size, e.g. 500GiB, 2TiB, 1TB (a multiple of 4096 bytes; TB is 10^12 bytes, TiB 2^40).
        #[arg(long)]
        size: ByteSize,
        /// essential, standard, premium, enterprise, ultra or mass [default: from config].
        #[arg(long)]
        tier: Option<String>,
        /// Serve the volume read-only.
        #[arg(long)]
        read_only: bool,
        /// Number of virtqueues [default: from config].
        #[arg(long)]
        queues: Option<u16>,
        /// Allocate the whole backing file now.
        #[arg(long)]
        preallocate: bool,
        /// Serve this existing block device instead of a file in the data dir.
        #[arg(long)]
        device: Option<PathBuf>,
        /// IOPS limit replacing the tier's [default: tier rate x size, at least the floor].
        #[arg(long)]
        iops_limit: Option<u64>,
        /// Bandwidth limit in bytes/s, e.g. 200MiB [default: none].
        #[arg(long)]
        bandwidth_limit: Option<ByteSize>,
        /// aes-xts-plain64 or none [default: aes-xts-plain64].
        #[arg(long)]
        encryption: Option<String>,
        /// Serve the volume only to frontends of this uid (its socket becomes the uid's).
        #[arg(long)]
        owner_uid: Option<u32>,
        /// The VM the volume is assigned to (kept and shown, not checked); needs --owner-uid.
        #[arg(long, requires = "owner_uid")]
        vm_id: Option<String>,
    },
    /// List volumes.
    List,
    /// Show one volume.
    Get { name: String },
    /// Grow a volume online: `storagectl resize db1 3TiB`.
    Resize { name: String, size: ByteSize },
    /// Change a volume's tier.
    SetTier { name: String, tier: String },
    /// Set or remove a volume's own limits, online:
    /// `storagectl set-limits db1 --iops 5000 --bandwidth 200MiB`, `--iops none` to go back
    /// to the tier's limit.
    SetLimits {
        name: String,
        /// IOPS limit, or "none".
        #[arg(long, value_parser = limit::<u64>)]
        iops: Option<Limit<u64>>,
        /// Bandwidth limit in bytes/s (e.g. 200MiB), or "none".
        #[arg(long, value_parser = limit::<ByteSize>)]
        bandwidth: Option<Limit<ByteSize>>,
    },
    /// Assign a volume to a uid (and VM), or make it anyone's again with --none:
    /// `storagectl set-owner db1 --uid 1234 --vm-id vm-7`. A change drops the connected
    /// frontend.
    SetOwner {
        name: String,
        /// The only uid served.
        #[arg(long, required_unless_present = "none")]
        uid: Option<u32>,
        /// The VM the volume is assigned to.
        #[arg(long, requires = "uid")]
        vm_id: Option<String>,
        /// Remove the owner: every process that can open the socket is served.
        #[arg(long, conflicts_with_all = ["uid", "vm_id"])]
        none: bool,
    },
    /// Delete a volume: its wrapped key, then its backing file (a device is left as it is).
    /// Prints what was done and what that does not protect against.
    Delete {
        name: String,
        /// Delete even while a frontend is attached (disconnects it).
        #[arg(long)]
        force: bool,
    },
    /// Clear the failure a failed FLUSH left on a volume, once the storage and the guest's data
    /// have been dealt with: FLUSH and writes are served again.
    ClearFailure { name: String },
    /// Start replicating a volume to a peer storaged: the peer creates the secondary (same
    /// name, id, size, tier, block size, encryption and key) and this volume becomes its
    /// primary.
    Replicate {
        name: String,
        /// The peer's replication address, HOST:PORT (its `[replication] listen`); its
        /// certificate must name HOST.
        #[arg(long)]
        peer: String,
        /// async: a write is answered after the local write; sync: once the peer has it too.
        #[arg(long, default_value = "async", value_parser = ["async", "sync"])]
        mode: String,
        /// How far behind the secondary may fall before the relationship says rpo_exceeded.
        #[arg(long, default_value_t = 5)]
        rpo_seconds: u32,
    },
    /// A volume's replication as this side sees it: role, peer, state, consistency, lag.
    Replication { name: String },
    /// Failover: make this secondary the primary (writable at its socket) from its last
    /// consistent image, while its primary is gone.
    Promote {
        name: String,
        /// Promote even with no consistent image (the initial sync never completed): the
        /// data is whatever part of it arrived.
        #[arg(long)]
        force: bool,
    },
    /// Failback: make this primary, superseded by its promoted peer, the peer's secondary
    /// (its writes since the two were level are overwritten; only the regions that differ
    /// are sent).
    Demote { name: String },
    /// Planned swap of roles, on the primary: fence its writes, drain to the secondary,
    /// promote it and become its secondary, with no write lost.
    Switchover { name: String },
    /// End a split brain (both sides were written as primaries), keeping one side's data.
    Resolve {
        name: String,
        /// local: this side's data wins; peer: the peer's does and this side becomes its
        /// secondary.
        #[arg(long, value_parser = ["local", "peer"])]
        keep: String,
    },
    /// End a volume's relationship, here and on the peer if it can be reached; both
    /// volumes keep their data.
    Unreplicate { name: String },
    /// Daemon facts: version, data dir, metrics URL, pool usage.
    Info,
    /// The current key-encryption key and how many volume keys each KEK wraps.
    Keys,
    /// Re-wrap every volume key with the current KEK (after changing the key dir's `current`).
    RotateKeys,
}

/// A limit on the command line: a value, or "none" (`Limit(None)`) to remove it.
#[derive(Clone, Debug)]
struct Limit<T>(Option<T>);

fn limit<T: std::str::FromStr>(s: &str) -> Result<Limit<T>, String>
where
    T::Err: std::fmt::Display,
{
    match s {
        "none" => Ok(Limit(None)),
        _ => s
            .parse::<T>()
            .map(|v| Limit(Some(v)))
            .map_err(|e| e.to_string()),
    }
}

/// Prints an answer as indented JSON.
fn print(v: &impl Serialize) {
    match serde_json::to_string_pretty(v) {
        Ok(text) => println!("{text}"),
        Err(e) => eprintln!("storagectl: cannot print the answer: {e}"),
    }
}

/// Sends the command's request and prints the answer.
fn run(client: &AdminClient, command: Command) -> Result<(), Error> {
    match command {
        Command::Create {
            name,
            size,
            tier,
            read_only,
            queues,
            preallocate,
            device,
            iops_limit,
            bandwidth_limit,
            encryption,
            owner_uid,
            vm_id,
        } => print(&client.create_volume(&CreateVolume {
            name,
            size,
            tier,
            read_only,
            num_queues: queues,
            preallocate: preallocate.then_some(true),
            device,
            iops_limit,
            bandwidth_limit,
            encryption,
            owner: owner_uid.map(|uid| Owner { uid, vm_id }),
        })?),
        Command::List => print(&client.list_volumes()?),
        Command::Get { name } => print(&client.volume(&name)?),
        Command::Resize { name, size } => print(&client.update_volume(
            &name,
            &UpdateVolume {
                size: Some(size),
                ..UpdateVolume::default()
            },
        )?),
        Command::SetTier { name, tier } => print(&client.update_volume(
            &name,
            &UpdateVolume {
                tier: Some(tier),
                ..UpdateVolume::default()
            },
        )?),
        Command::SetLimits {
            name,
            iops,
            bandwidth,
        } => print(&client.update_volume(
            &name,
            &UpdateVolume {
                iops_limit: iops.map(|l| l.0),
                bandwidth_limit: bandwidth.map(|l| l.0),
                ..UpdateVolume::default()
            },
        )?),
        Command::SetOwner {
            name,
            uid,
            vm_id,
            none,
        } => print(&client.update_volume(
            &name,
            &UpdateVolume {
                owner: Some(uid.filter(|_| !none).map(|uid| Owner { uid, vm_id })),
                ..UpdateVolume::default()
            },
        )?),
        Command::Delete { name, force } => print(&client.delete_volume(&name, force)?),
        Command::ClearFailure { name } => print(&client.clear_failure(&name)?),
        Command::Replicate {
            name,
            peer,
            mode,
            rpo_seconds,
        } => print(&client.start_replication(
            &name,
            &StartReplication {
                peer,
                mode: if mode == "sync" {
                    ReplicationMode::Sync
                } else {
                    ReplicationMode::Async
                },
                rpo_seconds,
            },
        )?),
        Command::Replication { name } => print(&client.replication(&name)?),
        Command::Promote { name, force } => print(&client.promote(&name, force)?),
        Command::Demote { name } => print(&client.demote(&name)?),
        Command::Switchover { name } => print(&client.switchover(&name)?),
        Command::Resolve { name, keep } => print(&client.resolve(
            &name,
            if keep == "local" {
                Keep::Local
            } else {
                Keep::Peer
            },
        )?),
        Command::Unreplicate { name } => print(&client.unreplicate(&name)?),
        Command::Info => print(&client.info()?),
        Command::Keys => print(&client.key_status()?),
        Command::RotateKeys => print(&client.rotate_keys()?),
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Command::SetLimits {
        iops: None,
        bandwidth: None,
        ..
    } = args.command
    {
        eprintln!("storagectl: set-limits needs --iops and/or --bandwidth");
        return ExitCode::from(2);
    }
    let client = AdminClient::new(&args.socket);
    match run(&client, args.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("storagectl: {}", storaged::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
