//! `storaged`: serves dedicated block volumes to VMs over vhost-user-blk.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use storaged::config::Config;
use storaged::log_writer::LogWriter;

/// Block-storage target daemon: dedicated volumes over vhost-user-blk, I/O on io_uring.
///
/// `storaged --data-dir DIR` is enough to start: volumes are then created through the admin API
/// on DIR/admin.sock (see `storagectl --help`), each served on DIR/sockets/NAME.sock, with
/// Prometheus metrics on http://127.0.0.1:9563/metrics.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Args {
    /// Data directory: catalog, backing files, sockets (created if missing).
    #[arg(long, env = "STORAGED_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// TOML configuration file; every key has a default (see storaged.example.toml).
    #[arg(long, env = "STORAGED_CONFIG")]
    config: Option<PathBuf>,
    /// Admin API socket [default: DATA_DIR/admin.sock].
    #[arg(long)]
    admin_socket: Option<PathBuf>,
    /// Prometheus listen address, IP:PORT, or "off" [default: 127.0.0.1:9563].
    #[arg(long)]
    metrics_addr: Option<String>,
    /// Log filter, e.g. "info" or "storaged=debug" (RUST_LOG also works).
    #[arg(long, default_value = "info")]
    log: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let filter = std::env::var("RUST_LOG").unwrap_or(args.log.clone());
    // Logging never waits for stderr: a stalled reader costs log lines, not I/O.
    let log = match LogWriter::start(std::io::stderr()) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("storaged: cannot start the log thread: {e}");
            return ExitCode::FAILURE;
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(log.clone())
        .with_ansi(false)
        .init();
    disable_core_dumps();
    let code = run(&args);
    log.drain(std::time::Duration::from_secs(2));
    code
}

fn run(args: &Args) -> ExitCode {
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
    if args.admin_socket.is_some() {
        config.admin_socket.clone_from(&args.admin_socket);
    }
    if args.metrics_addr.is_some() {
        config.metrics_addr.clone_from(&args.metrics_addr);
    }
    match storaged::daemon::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

fn fail(e: &dyn std::error::Error) -> ExitCode {
    let msg = storaged::error_chain(e);
    tracing::error!("{msg}");
    eprintln!("storaged: {msg}");
    ExitCode::FAILURE
}

/// Guest data passes through this process: keep it out of core files.
fn disable_core_dumps() {
    let zero = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit reads one rlimit struct through a pointer to a live local.
    unsafe { libc::setrlimit(libc::RLIMIT_CORE, &zero) };
}
