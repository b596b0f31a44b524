//! The VM's API: HTTP/1.1 + JSON under `/v1` on a Unix socket (see `vmm/openapi.yaml`). Runs
//! on a thread of its own with a small tokio runtime; the vCPUs never wait for it.
//!
//! - `GET /v1/vm`: state (not_started, running, paused) and configuration
//! - `PUT /v1/vm/config`, `POST /v1/vm/start`: configure and boot a VM started without
//!   `--kernel` (the checks are the command line's; 409 once it runs)
//! - `POST /v1/vm/pause`, `/v1/vm/resume`: stop and restart every vCPU (409 if already so)
//! - `POST /v1/vm/power-button`: presses the ACPI power button (the guest decides: a Linux
//!   with a power key handler powers off, and vmm ends with 0)
//! - `POST /v1/vm/shutdown`, `/v1/vm/kill`: end the VMM (exit codes 0 and 4)
//! - `GET /v1/vm/counters`: vCPU exits by kind, and per disk the requests the backend completed
//!
//! Every error is a 4xx/5xx with `{"error": "..."}`.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, OnceLock};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use vmm_api::{Counters, Disk, DiskCounters, ErrorBody, Transition, VmInfo, VmState, VmStatus};

use crate::config::{self, VmConfig};
use crate::control::Control;
use crate::devices::PowerButton;
use crate::exit::{Exit, ExitKind};
use crate::threads::{self, ThreadKind};
use crate::vm::MmioBus;

/// Errors starting the API.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("--api-sock {0}: another process serves it")]
    InUse(PathBuf),
    #[error("--api-sock {0}")]
    Bind(PathBuf, #[source] std::io::Error),
    #[error("Cannot start the API thread")]
    Thread(#[source] std::io::Error),
}

/// The configuration as `GET /v1/vm` shows it.
fn vm_info_of(cfg: &VmConfig) -> VmInfo {
    VmInfo {
        kernel: cfg.kernel.clone(),
        initrd: cfg.initrd.clone(),
        cmdline: cfg.cmdline.clone(),
        vcpus: cfg.vcpus,
        memory_bytes: cfg.memory,
        disks: cfg
            .disks
            .iter()
            .map(|d| Disk {
                socket: d.socket.clone(),
                read_only: d.read_only,
            })
            .collect(),
    }
}

/// What main is told before the VM runs.
pub enum Command {
    Start(Box<VmConfig>),
    Stop(Exit),
}

/// The VM once it runs.
struct Running {
    info: VmInfo,
    control: Arc<Control>,
    mmio: Arc<MmioBus>,
    button: Arc<PowerButton>,
}

/// State shared by the API and the VMM, from before the VM starts.
pub struct Shared {
    running: OnceLock<Running>,
    pending: Mutex<Option<VmConfig>>,
    commands: Mutex<Option<Sender<Command>>>,
    /// A shutdown or kill that came while the command line's VM was being set up (before
    /// [`Shared::set_running`]); the VM ends as soon as it runs. The lock also orders a stop
    /// against `set_running`, so that none falls between the two.
    early_stop: Mutex<Option<Exit>>,
    api_sock: PathBuf,
    max_vcpus: usize,
}

impl Shared {
    /// `commands` reaches main while it waits for a configuration (None: it does not wait,
    /// the command line configured the VM).
    pub fn new(api_sock: &Path, max_vcpus: usize, commands: Option<Sender<Command>>) -> Shared {
        Shared {
            running: OnceLock::new(),
            pending: Mutex::new(None),
            commands: Mutex::new(commands),
            early_stop: Mutex::new(None),
            api_sock: api_sock.to_owned(),
            max_vcpus,
        }
    }

    /// Called by the VMM once the devices exist and the vCPUs are about to run.
    pub fn set_running(
        &self,
        cfg: &VmConfig,
        control: Arc<Control>,
        mmio: Arc<MmioBus>,
        button: Arc<PowerButton>,
    ) {
        let mut early = self.early_stop.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(exit) = early.take() {
            control.end(exit);
        }
        let _ = self.running.set(Running {
            info: vm_info_of(cfg),
            control,
            mmio,
            button,
        });
    }

    fn command(&self, c: Command) -> bool {
        match self
            .commands
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            Some(tx) => tx.send(c).is_ok(),
            None => false,
        }
    }
}

type ApiState = Arc<Shared>;

fn not_started() -> ApiError {
    ApiError(StatusCode::CONFLICT, "The VM has not started".into())
}

fn running(s: &Shared) -> Result<&Running, ApiError> {
    s.running.get().ok_or_else(not_started)
}

struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorBody { error: self.1 })).into_response()
    }
}

fn state_of(c: &Control) -> VmState {
    if c.is_paused() {
        VmState::Paused
    } else {
        VmState::Running
    }
}

/// A state change's answer.
fn to(state: VmState) -> Json<Transition> {
    Json(Transition {
        state,
        exit_code: None,
    })
}

async fn vm_info(State(s): State<ApiState>) -> impl IntoResponse {
    match s.running.get() {
        Some(r) => Json(VmStatus {
            state: state_of(&r.control),
            config: Some(r.info.clone()),
        }),
        None => {
            let pending = s.pending.lock().unwrap_or_else(|p| p.into_inner());
            Json(VmStatus {
                state: VmState::NotStarted,
                config: pending.as_ref().map(vm_info_of),
            })
        }
    }
}

async fn put_config(State(s): State<ApiState>, body: Bytes) -> Result<impl IntoResponse, ApiError> {
    if s.running.get().is_some() {
        return Err(ApiError(
            StatusCode::CONFLICT,
            "The VM is already running".into(),
        ));
    }
    let bad = |m: String| ApiError(StatusCode::BAD_REQUEST, m);
    let b: vmm_api::VmConfig =
        serde_json::from_slice(&body).map_err(|e| bad(format!("Invalid request body: {e}")))?;
    let memory = b.memory.bytes().to_string();
    let serial_log_max = b.serial_log_max.map(|m| m.bytes().to_string());
    let args = config::Args {
        kernel: &b.kernel,
        initrd: b.initrd.as_deref(),
        cmdline: &b.cmdline,
        vcpus: b.vcpus,
        memory: &memory,
        serial: &b.serial,
        serial_log_max: serial_log_max.as_deref(),
        disks: config::DiskArgs::Api(&b.disks),
        api_sock: Some(&s.api_sock),
    };
    let cfg = VmConfig::new(&args, s.max_vcpus).map_err(|e| bad(crate::error_chain(&e)))?;
    let info = vm_info_of(&cfg);
    *s.pending.lock().unwrap_or_else(|p| p.into_inner()) = Some(cfg);
    Ok(Json(VmStatus {
        state: VmState::NotStarted,
        config: Some(info),
    }))
}

async fn start(State(s): State<ApiState>) -> Result<impl IntoResponse, ApiError> {
    if s.running.get().is_some() {
        return Err(ApiError(
            StatusCode::CONFLICT,
            "The VM is already running".into(),
        ));
    }
    let Some(cfg) = s.pending.lock().unwrap_or_else(|p| p.into_inner()).take() else {
        return Err(ApiError(
            StatusCode::CONFLICT,
            "No configuration: PUT /v1/vm/config first".into(),
        ));
    };
    if !s.command(Command::Start(Box::new(cfg))) {
        return Err(ApiError(
            StatusCode::CONFLICT,
            "The VM was configured on the command line".into(),
        ));
    }
    Ok(to(VmState::Starting))
}

async fn pause(State(s): State<ApiState>) -> Result<impl IntoResponse, ApiError> {
    let r = running(&s)?;
    if r.control.is_paused() {
        return Err(ApiError(
            StatusCode::CONFLICT,
            "The VM is already paused".into(),
        ));
    }
    let c = r.control.clone();
    let all = tokio::task::spawn_blocking(move || c.pause())
        .await
        .unwrap_or(false);
    if !all {
        return Err(ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Not every vCPU stopped within a second".into(),
        ));
    }
    tracing::info!("VM paused");
    Ok(to(VmState::Paused))
}

async fn resume(State(s): State<ApiState>) -> Result<impl IntoResponse, ApiError> {
    let r = running(&s)?;
    if !r.control.is_paused() {
        return Err(ApiError(
            StatusCode::CONFLICT,
            "The VM is not paused".into(),
        ));
    }
    r.control.resume();
    tracing::info!("VM resumed");
    Ok(to(VmState::Running))
}

/// Ends the VM, or main's wait for one.
fn stop(s: &Shared, e: Exit) -> Json<Transition> {
    let code = e.code();
    let mut early = s.early_stop.lock().unwrap_or_else(|p| p.into_inner());
    match s.running.get() {
        Some(r) => r.control.end(e),
        // main waits for a configuration: it ends the process; else the command line's VM
        // is being set up, and ends as soon as it runs.
        None => {
            if !s.command(Command::Stop(e.clone())) {
                *early = Some(e);
            }
        }
    }
    drop(early);
    Json(Transition {
        state: VmState::Stopping,
        exit_code: Some(code),
    })
}

async fn power_button(State(s): State<ApiState>) -> Result<impl IntoResponse, ApiError> {
    let r = running(&s)?;
    r.button.press().map_err(|e| {
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("Cannot raise the power button's interrupt: {e}"),
        )
    })?;
    tracing::info!("power button pressed");
    let state = if r.control.is_paused() {
        VmState::Paused
    } else {
        VmState::Running
    };
    Ok(to(state))
}

async fn shutdown(State(s): State<ApiState>) -> impl IntoResponse {
    stop(&s, Exit::ApiShutdown)
}

async fn kill(State(s): State<ApiState>) -> impl IntoResponse {
    stop(&s, Exit::ApiKill)
}

async fn counters(State(s): State<ApiState>) -> Result<impl IntoResponse, ApiError> {
    let r = running(&s)?;
    let vcpu_exits = ExitKind::ALL
        .iter()
        .map(|k| (*k, r.control.exits(*k)))
        .collect();
    let disks = r
        .mmio
        .disks
        .iter()
        .map(|d| {
            let d = d.lock().unwrap_or_else(|p| p.into_inner());
            DiskCounters {
                socket: d.socket().to_owned(),
                active: d.is_active(),
                completed_requests_mod_65536: d.completed(&r.mmio.mem),
                notifications_through_vmm: d.notifies,
            }
        })
        .collect();
    Ok(Json(Counters { vcpu_exits, disks }))
}

async fn not_found() -> ApiError {
    ApiError(StatusCode::NOT_FOUND, "No such endpoint".into())
}

async fn method_not_allowed() -> ApiError {
    ApiError(
        StatusCode::METHOD_NOT_ALLOWED,
        "Method not allowed on this endpoint".into(),
    )
}

/// Routes; each is described in vmm/openapi.yaml.
pub const ROUTES: [&str; 9] = [
    "/v1/vm",
    "/v1/vm/config",
    "/v1/vm/start",
    "/v1/vm/pause",
    "/v1/vm/resume",
    "/v1/vm/power-button",
    "/v1/vm/shutdown",
    "/v1/vm/kill",
    "/v1/vm/counters",
];

fn router(state: ApiState) -> Router {
    Router::new()
        .route("/v1/vm", get(vm_info))
        .route("/v1/vm/config", put(put_config))
        .route("/v1/vm/start", post(start))
        .route("/v1/vm/pause", post(pause))
        .route("/v1/vm/resume", post(resume))
        .route("/v1/vm/power-button", post(power_button))
        .route("/v1/vm/shutdown", post(shutdown))
        .route("/v1/vm/kill", post(kill))
        .route("/v1/vm/counters", get(counters))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// The API server; [`Api::close`] lets the requests being answered finish (a kill's answer
/// reaches its client before the process ends), then removes the socket.
pub struct Api {
    path: PathBuf,
    stop: tokio::sync::watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Api {
    pub fn close(mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds the socket (refusing one another process serves; replacing a stale one) and serves
/// it from a thread of its own.
pub fn serve(path: &Path, state: Arc<Shared>) -> Result<Api, Error> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(Error::InUse(path.to_owned()));
            }
            let _ = std::fs::remove_file(path);
        }
    }
    let listener = std::os::unix::net::UnixListener::bind(path)
        .map_err(|e| Error::Bind(path.to_owned(), e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::Bind(path.to_owned(), e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::Bind(path.to_owned(), e))?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let thread = threads::spawn(ThreadKind::Api, "api", move || {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!("API runtime: {e}");
                return;
            }
        };
        rt.block_on(async move {
            match tokio::net::UnixListener::from_std(listener) {
                Ok(l) => {
                    let mut graceful = stopped.clone();
                    let mut hard = stopped;
                    let serve = axum::serve(l, router(state)).with_graceful_shutdown(async move {
                        let _ = graceful.wait_for(|s| *s).await;
                    });
                    // Once stopping, requests being answered get a second to finish.
                    let deadline = async move {
                        let _ = hard.wait_for(|s| *s).await;
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    };
                    tokio::select! {
                        r = serve => {
                            if let Err(e) = r {
                                tracing::error!("API failed: {e}");
                            }
                        }
                        _ = deadline => {}
                    }
                }
                Err(e) => tracing::error!("API socket: {e}"),
            }
        });
    })
    .map_err(Error::Thread)?;
    tracing::info!(socket = %path.display(), "API listening");
    Ok(Api {
        path: path.to_owned(),
        stop,
        thread: Some(thread),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn openapi_file_describes_every_route() {
        let spec = include_str!("../openapi.yaml");
        for route in super::ROUTES {
            assert!(
                spec.lines().any(|l| l == format!("  {route}:")),
                "openapi.yaml lacks {route}"
            );
        }
        let documented = spec
            .lines()
            .filter(|l| l.starts_with("  /") && l.ends_with(':'))
            .count();
        assert_eq!(documented, super::ROUTES.len());
    }
}
