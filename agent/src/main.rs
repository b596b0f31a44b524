//! `agent`: the node's tenant API for VMs and volumes.

use std::path::PathBuf;
use std::process::ExitCode;

use agent::config::Config;
use clap::Parser;

/// The node agent: a tenant-authenticated HTTP + JSON API.
///
/// `agent --data-dir DIR` is enough to start: the API then answers on http://127.0.0.1:9571/v1
/// and on DIR/agent.sock, every call with a bearer token. The admin token is in
/// DIR/admin.token (created on first start, mode 0600); `agentctl tenant create NAME` with it
/// makes a tenant and prints the tenant's token, once.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Args {
    /// Data directory: state database, admin token, API socket (created if missing).
    #[arg(long, env = "AGENT_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// TOML configuration file; every key has a default (see agent.example.toml).
    #[arg(long, env = "AGENT_CONFIG")]
    config: Option<PathBuf>,
    /// The API's TCP address, IP:PORT, or "off" [default: 127.0.0.1:9571].
    #[arg(long)]
    listen: Option<String>,
    /// storaged's admin socket [default: $STORAGED_ADMIN_SOCKET, else /var/lib/storaged/admin.sock].
    #[arg(long)]
    storaged_socket: Option<PathBuf>,
    /// The image catalog: the files VMs may boot [default: DATA_DIR/images].
    #[arg(long)]
    images_dir: Option<PathBuf>,
    /// The first of the jailed vmms' uids [default: 2000000000].
    #[arg(long)]
    jail_uid_base: Option<u32>,
    /// Log filter, e.g. "info" or "agent=debug,audit=info" (RUST_LOG also works).
    #[arg(long, default_value = "info")]
    log: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let filter = std::env::var("RUST_LOG").unwrap_or(args.log.clone());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let mut config = match &args.config {
        Some(path) => match Config::load(path) {
            Ok(c) => c,
            Err(e) => return fail(&e),
        },
        None => Config::default(),
    };
    if args.data_dir.is_some() {
        config.data_dir.clone_from(&args.data_dir);
    }
    if args.listen.is_some() {
        config.listen.clone_from(&args.listen);
    }
    if args.images_dir.is_some() {
        config.images_dir.clone_from(&args.images_dir);
    }
    if args.storaged_socket.is_some() {
        config.storaged_socket.clone_from(&args.storaged_socket);
    }
    if args.jail_uid_base.is_some() {
        config.jail_uid_base = args.jail_uid_base;
    }
    match agent::daemon::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

fn fail(e: &dyn std::error::Error) -> ExitCode {
    let msg = agent::error_chain(e);
    tracing::error!("{msg}");
    eprintln!("agent: {msg}");
    ExitCode::FAILURE
}
