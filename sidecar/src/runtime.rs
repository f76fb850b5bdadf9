//! Process wiring for `outrider run`: the tokio runtime, listeners, signals, live reload of the
//! config and of certificate material, and graceful shutdown. Everything here is glue; the
//! behaviour lives in the modules it starts.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

use crate::admin::{Admin, Readiness};
use crate::broker::Bridge;
use crate::config::{self, Config, Tls};
use crate::metrics::Metrics;
use crate::proxy::{LocalApi, Shared, server};
use crate::tls::MeshTls;

/// Why `run` stopped with an error; the exit code follows CONTRACT §1.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Bad config or certificate material: exit 1.
    #[error("{0}")]
    Invalid(String),
    /// A failure of the machine, e.g. a port in use: exit 2.
    #[error("{0}")]
    Runtime(String),
}

impl RunError {
    pub fn exit_code(&self) -> ExitCode {
        match self {
            RunError::Invalid(_) => ExitCode::from(1),
            RunError::Runtime(_) => ExitCode::from(2),
        }
    }
}

/// `outrider run -c FILE`.
pub fn run_cli(path: &Path) -> ExitCode {
    let loaded = match config::load_file(path, std::env::vars()) {
        Ok(loaded) => loaded,
        Err(e) => {
            for line in e.lines() {
                eprintln!("{line}");
            }
            eprintln!("outrider: {e}");
            return ExitCode::from(1);
        }
    };
    let file = path.display().to_string();
    for warning in &loaded.warnings {
        tracing::warn!("{}", warning.render(&file));
    }
    let runtime = match build_runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("outrider: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(path.to_path_buf(), loaded.config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("outrider: {e}");
            e.exit_code()
        }
    }
}

/// A runtime sized to the cores this process may use (its CPU affinity, e.g. a pod's cpuset or
/// `taskset`). On one core, a current-thread runtime: every task, timer and socket is driven by
/// the one thread, so waking a task never crosses threads (a multi-thread runtime with one
/// worker still wakes its driver through an eventfd write, once per request; measured with
/// `PROFILE_RATE=2000 bench/profile.sh`). `OUTRIDER_WORKER_THREADS` overrides the count.
fn build_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let workers = std::env::var("OUTRIDER_WORKER_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| *n > 0)
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2)
        });
    if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()
    }
}

async fn bind(what: &str, addr: std::net::SocketAddr) -> Result<TcpListener, RunError> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| RunError::Runtime(format!("cannot bind the {what} listener on {addr}: {e}")))
}

/// Runs a sidecar until SIGTERM, SIGINT or `POST /shutdown`.
pub async fn run(path: PathBuf, config: Config) -> Result<(), RunError> {
    let metrics = Arc::new(Metrics::new());
    let tls = match &config.tls {
        Tls::Mtls(files) => {
            let tls = MeshTls::new(files)
                .map_err(|e| RunError::Invalid(format!("tls: {e}")))?
                .with_outbound_handshake_errors(
                    metrics
                        .tls_handshake_errors_total
                        .with_label_values(&["outbound"]),
                );
            Some(Arc::new(tls))
        }
        Tls::Disabled => None,
    };
    if let Some(tls) = &tls {
        report_cert(tls, &metrics);
        check_identity(tls, &config.own_identity());
    }
    let outbound = bind("outbound", config.listen.outbound).await?;
    let inbound = bind("inbound", config.listen.inbound).await?;
    let admin_listener = bind("admin", config.listen.admin).await?;

    // The broker bridge connects in the background; `/ready` waits for it.
    let bridge = config
        .broker
        .is_some()
        .then(|| Bridge::start(&config, metrics.clone()));
    let local_api: Option<Arc<dyn LocalApi>> = bridge.clone().map(|b| b as Arc<dyn LocalApi>);
    let grace = config.shutdown_grace;
    let shared = Shared::new(config, metrics.clone(), tls.clone(), local_api);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let readiness = Arc::new(Readiness {
        listeners_bound: AtomicBool::new(false),
        broker: bridge.clone().map(|b| {
            Box::new(move || b.ready()) as Box<dyn Fn() -> Result<(), String> + Send + Sync>
        }),
    });
    let admin = Arc::new(Admin {
        shared: shared.clone(),
        readiness: readiness.clone(),
        shutdown: shutdown_tx.clone(),
    });

    let tasks = vec![
        tokio::spawn(server::serve_outbound(
            outbound,
            shared.clone(),
            shutdown_rx.clone(),
            grace,
        )),
        tokio::spawn(server::serve_inbound(
            inbound,
            shared.clone(),
            shutdown_rx.clone(),
            grace,
        )),
        tokio::spawn(crate::admin::serve(
            admin_listener,
            admin,
            shutdown_rx.clone(),
        )),
    ];
    readiness.listeners_bound.store(true, Ordering::Release);
    {
        let c = shared.config.load();
        tracing::info!(
            service = %c.service,
            namespace = %c.namespace,
            outbound = %c.listen.outbound,
            inbound = %c.listen.inbound,
            admin = %c.listen.admin,
            mtls = tls.is_some(),
            "outrider is ready"
        );
    }

    tokio::spawn(reload_config(path, shared.clone()));
    if let (Some(tls), Tls::Mtls(files)) = (tls.clone(), &shared.config.load().tls) {
        let own_identity = shared.config.load().own_identity();
        tokio::spawn(reload_certs(
            tls,
            files.clone(),
            metrics.clone(),
            own_identity,
        ));
    }

    wait_for_shutdown(shutdown_rx.clone()).await;
    let _ = shutdown_tx.send(true);
    tracing::info!(?grace, "draining");
    // Stop consuming while the listeners drain; in-flight deliveries finish within the grace.
    let bridge_stopped = async {
        if let Some(bridge) = &bridge {
            bridge.shutdown().await;
        }
    };
    let listeners_stopped = async {
        for task in tasks {
            let _ = task.await;
        }
    };
    tokio::join!(bridge_stopped, listeners_stopped);
    tracing::info!("stopped");
    Ok(())
}

async fn wait_for_shutdown(shutdown: watch::Receiver<bool>) {
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        server::signalled(shutdown).await;
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
        () = server::signalled(shutdown) => {}
    }
}

/// Re-reads the config on file changes and SIGHUP; swaps it in when valid.
async fn reload_config(path: PathBuf, shared: Arc<Shared>) {
    let watch = config::reload::watch_files(std::slice::from_ref(&path));
    let (_guard, mut changes) = match watch {
        Ok((guard, rx)) => (Some(guard), rx),
        Err(error) => {
            tracing::warn!(%error, "cannot watch the config file; reload with SIGHUP");
            (None, tokio::sync::mpsc::channel(1).1)
        }
    };
    let mut hup = signal(SignalKind::hangup()).ok();
    let mut last = std::fs::read(&path).ok();
    loop {
        let forced = tokio::select! {
            change = config::reload::next_change(&mut changes) => {
                if change.is_none() { std::future::pending::<()>().await; }
                false
            }
            _ = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
        };
        let current = std::fs::read(&path).ok();
        if !forced && current == last {
            continue;
        }
        last = current;
        apply_reload(&path, &shared);
    }
}

fn apply_reload(path: &Path, shared: &Shared) {
    let metrics = &shared.metrics;
    let file = path.display().to_string();
    let current = shared.config.load_full();
    let outcome = match config::load_file(path, std::env::vars()) {
        Ok(loaded) => {
            let tls_changed = serde_json::to_value(&loaded.config.tls).ok()
                != serde_json::to_value(&current.tls).ok();
            if let Some(key) = current.restart_keys_differ(&loaded.config) {
                Err(vec![format!(
                    "{file}: {key}: changing `{key}` needs a restart; the running config stays in force"
                )])
            } else if tls_changed {
                Err(vec![format!(
                    "{file}: tls: changing the tls section needs a restart (rotated files at the same paths are picked up live)"
                )])
            } else {
                shared.reconfigure(loaded.config);
                Ok(())
            }
        }
        Err(e) => Err(e.lines()),
    };
    match outcome {
        Ok(()) => {
            metrics
                .config_reloads_total
                .with_label_values(&["ok"])
                .inc();
            tracing::info!(file, "config reloaded");
        }
        Err(lines) => {
            metrics
                .config_reloads_total
                .with_label_values(&["rejected"])
                .inc();
            for line in &lines {
                tracing::warn!(problem = %line, "config reload rejected; the old config stays in force");
            }
        }
    }
}

fn report_cert(tls: &MeshTls, metrics: &Metrics) {
    let (not_before, not_after) = tls.validity();
    metrics.cert_expiry_timestamp_seconds.set(not_after as f64);
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let lifetime = (not_after - not_before).max(1);
    if not_after - now < lifetime / 10 {
        tracing::warn!(
            expires_in_seconds = not_after - now,
            "the workload certificate expires within 10% of its lifetime: rotate it"
        );
    }
}

/// A certificate for another identity is allowed (it is valid mesh material), but callers will
/// refuse this sidecar: say so.
fn check_identity(tls: &MeshTls, own_identity: &str) {
    let presented = tls.identity_id();
    if presented != own_identity {
        tracing::warn!(
            certificate = %presented,
            expected = %own_identity,
            "the workload certificate names another identity than this sidecar's service and namespace: callers will refuse it"
        );
    }
}

/// Watches the cert, key and CA files; validated new material is used for new connections.
async fn reload_certs(
    tls: Arc<MeshTls>,
    files: config::MtlsFiles,
    metrics: Arc<Metrics>,
    own_identity: String,
) {
    let paths = [files.ca.clone(), files.cert.clone(), files.key.clone()];
    let (_guard, mut changes) = match config::reload::watch_files(&paths) {
        Ok((guard, rx)) => (Some(guard), rx),
        Err(error) => {
            tracing::warn!(%error, "cannot watch the certificate files");
            (None, tokio::sync::mpsc::channel(1).1)
        }
    };
    let mut hup = signal(SignalKind::hangup()).ok();
    let mut expiry_check = tokio::time::interval(Duration::from_secs(60));
    loop {
        tokio::select! {
            change = config::reload::next_change(&mut changes) => {
                if change.is_none() { std::future::pending::<()>().await; }
            }
            _ = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {}
            _ = expiry_check.tick() => { report_cert(&tls, &metrics); continue; }
        }
        match tls.reload(&files) {
            Ok(true) => {
                metrics.cert_reloads_total.with_label_values(&["ok"]).inc();
                tracing::info!(serial = %tls.serial(), "new certificate material in use");
                report_cert(&tls, &metrics);
                check_identity(&tls, &own_identity);
            }
            Ok(false) => {}
            Err(error) => {
                metrics
                    .cert_reloads_total
                    .with_label_values(&["rejected"])
                    .inc();
                tracing::warn!(%error, "new certificate material refused; the old material stays in force");
            }
        }
    }
}
