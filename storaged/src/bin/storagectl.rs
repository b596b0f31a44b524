//! `storagectl`: command-line client of storaged's admin API.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde_json::json;
use storaged::client::AdminClient;

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
        /// Size, e.g. 500GiB, 2TiB, 1TB (a multiple of 4096 bytes).
        #[arg(long)]
        size: String,
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
        bandwidth_limit: Option<String>,
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
    Resize { name: String, size: String },
    /// Change a volume's tier.
    SetTier { name: String, tier: String },
    /// Set or remove a volume's own limits, online:
    /// `storagectl set-limits db1 --iops 5000 --bandwidth 200MiB`, `--iops none` to go back
    /// to the tier's limit.
    SetLimits {
        name: String,
        /// IOPS limit, or "none".
        #[arg(long)]
        iops: Option<String>,
        /// Bandwidth limit in bytes/s (e.g. 200MiB), or "none".
        #[arg(long)]
        bandwidth: Option<String>,
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
    /// Daemon facts: version, data dir, metrics URL, pool usage.
    Info,
    /// The current key-encryption key and how many volume keys each KEK wraps.
    Keys,
    /// Re-wrap every volume key with the current KEK (after changing the key dir's `current`).
    RotateKeys,
}

fn owner_json(uid: u32, vm_id: Option<&str>) -> serde_json::Value {
    match vm_id {
        Some(id) => json!({ "uid": uid, "vm_id": id }),
        None => json!({ "uid": uid }),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let client = AdminClient::new(&args.socket);
    let (method, target, body) = match &args.command {
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
        } => {
            let mut b = json!({ "name": name, "size": size, "read_only": read_only });
            if let Some(t) = tier {
                b["tier"] = json!(t);
            }
            if let Some(q) = queues {
                b["num_queues"] = json!(q);
            }
            if *preallocate {
                b["preallocate"] = json!(true);
            }
            if let Some(d) = device {
                b["device"] = json!(d);
            }
            if let Some(i) = iops_limit {
                b["iops_limit"] = json!(i);
            }
            if let Some(bw) = bandwidth_limit {
                b["bandwidth_limit"] = json!(bw);
            }
            if let Some(e) = encryption {
                b["encryption"] = json!(e);
            }
            if let Some(uid) = owner_uid {
                b["owner"] = owner_json(*uid, vm_id.as_deref());
            }
            ("POST", "/v1/volumes".to_string(), Some(b))
        }
        Command::List => ("GET", "/v1/volumes".into(), None),
        Command::Get { name } => ("GET", format!("/v1/volumes/{name}"), None),
        Command::Resize { name, size } => (
            "PATCH",
            format!("/v1/volumes/{name}"),
            Some(json!({ "size": size })),
        ),
        Command::SetTier { name, tier } => (
            "PATCH",
            format!("/v1/volumes/{name}"),
            Some(json!({ "tier": tier })),
        ),
        Command::SetLimits {
            name,
            iops,
            bandwidth,
        } => {
            if iops.is_none() && bandwidth.is_none() {
                eprintln!("storagectl: set-limits needs --iops and/or --bandwidth");
                return ExitCode::from(2);
            }
            let mut b = json!({});
            if let Some(i) = iops {
                b["iops_limit"] = match i.as_str() {
                    "none" => serde_json::Value::Null,
                    // Numbers go as numbers; anything else is passed on for the daemon to
                    // refuse with its own message.
                    _ => i.parse::<u64>().map_or_else(|_| json!(i), |n| json!(n)),
                };
            }
            if let Some(bw) = bandwidth {
                b["bandwidth_limit"] = match bw.as_str() {
                    "none" => serde_json::Value::Null,
                    _ => bw.parse::<u64>().map_or_else(|_| json!(bw), |n| json!(n)),
                };
            }
            ("PATCH", format!("/v1/volumes/{name}"), Some(b))
        }
        Command::SetOwner {
            name,
            uid,
            vm_id,
            none,
        } => {
            let owner = match uid {
                Some(uid) if !*none => owner_json(*uid, vm_id.as_deref()),
                _ => serde_json::Value::Null,
            };
            (
                "PATCH",
                format!("/v1/volumes/{name}"),
                Some(json!({ "owner": owner })),
            )
        }
        Command::Delete { name, force } => (
            "DELETE",
            format!(
                "/v1/volumes/{name}{}",
                if *force { "?force=true" } else { "" }
            ),
            None,
        ),
        Command::ClearFailure { name } => {
            ("POST", format!("/v1/volumes/{name}/clear-failure"), None)
        }
        Command::Info => ("GET", "/v1/info".into(), None),
        Command::Keys => ("GET", "/v1/keys".into(), None),
        Command::RotateKeys => ("POST", "/v1/keys/rotate".into(), None),
    };
    let body = body.map(|b| b.to_string());
    match client.request(method, &target, body.as_deref()) {
        Ok(resp) if resp.is_success() => {
            let v = resp.json();
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or(resp.body));
            ExitCode::SUCCESS
        }
        Ok(resp) => {
            let msg = resp.json()["error"]
                .as_str()
                .map(str::to_string)
                .unwrap_or(resp.body);
            eprintln!("storagectl: {} (HTTP {})", msg, resp.status);
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("storagectl: {}", storaged::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
