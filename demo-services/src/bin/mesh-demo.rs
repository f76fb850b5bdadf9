//! `mesh-demo`: two plain apps, each with an `outrider` sidecar, calling each other over mTLS.
//! Mints a CA and workload certificates, starts everything on its own 127.0.0.x address, sends
//! traffic through the gateway, and prints what happened. `--once` exits after the scenario.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use axum::extract::{Path as UrlPath, State};
use axum::routing::get;
use axum::{Json, Router};

struct Sidecar {
    name: &'static str,
    child: Child,
    admin: SocketAddr,
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn outrider_binary() -> Result<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(&root)
        .args([
            "build",
            "--release",
            "-q",
            "-p",
            "outrider",
            "--bin",
            "outrider",
        ])
        .status()
        .context("building the outrider binary")?;
    if !status.success() {
        bail!("cargo build of outrider failed");
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("target"));
    Ok(target.join("release/outrider"))
}

fn start_sidecar(
    bin: &Path,
    dir: &Path,
    name: &'static str,
    ip: &str,
    app: SocketAddr,
    peers: &str,
) -> Result<Sidecar> {
    let certs = dir.join("certs");
    let status = Command::new(bin)
        .args(["certs", "issue", "--ca"])
        .arg(dir.join("ca"))
        .args(["--service", name, "--namespace", "demo", "--out"])
        .arg(&certs)
        .stdout(Stdio::null())
        .status()?;
    if !status.success() {
        bail!("issuing a certificate for {name} failed");
    }
    let admin: SocketAddr = format!("{ip}:7191").parse()?;
    let config = format!(
        "service: {name}\nnamespace: demo\napp: {app}\nlisten: {{ outbound: {ip}:7140, inbound: {ip}:7143, admin: {admin} }}\n\
         tls: {{ ca: {ca}, cert: {cert}, key: {key} }}\ndiscovery:\n  services:\n{peers}",
        ca = dir.join("ca/ca.pem").display(),
        cert = certs.join(format!("{name}.pem")).display(),
        key = certs.join(format!("{name}-key.pem")).display(),
    );
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, config)?;
    let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
    let child = Command::new(bin)
        .args(["run", "-c"])
        .arg(&path)
        .args(["--log-format", "json"])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()?;
    Ok(Sidecar { name, child, admin })
}

async fn wait_ready(client: &reqwest::Client, sidecar: &Sidecar) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if let Ok(r) = client
            .get(format!("http://{}/ready", sidecar.admin))
            .send()
            .await
            && r.status().is_success()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("{} did not become ready", sidecar.name)
}

async fn user(UrlPath(id): UrlPath<u32>) -> Json<serde_json::Value> {
    Json(serde_json::json!({ "id": id, "name": format!("student-{id}") }))
}

/// The gateway calls user-service through its sidecar, as any app would: with HTTP_PROXY.
async fn profile(
    State(client): State<reqwest::Client>,
    UrlPath(id): UrlPath<u32>,
) -> Json<serde_json::Value> {
    let answer = client
        .get(format!("http://user-service/v1/users/{id}"))
        .send()
        .await;
    match answer {
        Ok(r) => {
            let correlation = r
                .headers()
                .get("x-correlation-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let user: serde_json::Value = r.json().await.unwrap_or_default();
            Json(serde_json::json!({ "user": user, "correlation_id": correlation }))
        }
        Err(e) => Json(serde_json::json!({ "error": e.to_string() })),
    }
}

async fn serve(addr: &str, router: Router) -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    Ok(local)
}

#[tokio::main]
async fn main() -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let once = std::env::args().any(|a| a == "--once");
    println!("mesh-demo: building the sidecar...");
    let bin = outrider_binary()?;
    let dir = tempfile_dir()?;
    let status = Command::new(&bin)
        .args(["certs", "ca", "--out"])
        .arg(dir.join("ca"))
        .stdout(Stdio::null())
        .status()?;
    if !status.success() {
        bail!("minting the CA failed");
    }

    let user_app = serve(
        "127.0.0.21:0",
        Router::new().route("/v1/users/{id}", get(user)),
    )
    .await?;
    let gateway_client = reqwest::Client::builder()
        .proxy(reqwest::Proxy::http("http://127.0.0.20:7140")?)
        .build()?;
    let gateway_app = serve(
        "127.0.0.20:0",
        Router::new()
            .route("/v1/profile/{id}", get(profile))
            .with_state(gateway_client),
    )
    .await?;
    let users = start_sidecar(
        &bin,
        &dir,
        "user-service",
        "127.0.0.21",
        user_app,
        "    {}\n",
    )?;
    let gateway = start_sidecar(
        &bin,
        &dir,
        "gateway",
        "127.0.0.20",
        gateway_app,
        "    user-service: { endpoints: [\"127.0.0.21:7143\"] }\n",
    )?;
    let client = reqwest::Client::builder().no_proxy().build()?;
    wait_ready(&client, &users).await?;
    wait_ready(&client, &gateway).await?;
    println!(
        "mesh-demo: gateway and user-service are up, each behind its sidecar (mTLS between them)"
    );

    let mut failures = 0;
    for id in 1..=5 {
        let r = client
            .get(format!("http://{gateway_app}/v1/profile/{id}"))
            .send()
            .await?;
        let body: serde_json::Value = r.json().await?;
        if body.get("error").is_some() {
            failures += 1;
        }
        println!("  GET /v1/profile/{id} -> {body}");
    }
    let metrics = client
        .get(format!("http://{}/metrics", users.admin))
        .send()
        .await?
        .text()
        .await?;
    for line in metrics
        .lines()
        .filter(|l| l.starts_with("outrider_requests_total"))
    {
        println!("  user-service sidecar: {line}");
    }
    println!(
        "mesh-demo: metrics at http://{}/metrics and http://{}/metrics",
        gateway.admin, users.admin
    );
    if failures > 0 {
        bail!("{failures} request(s) failed; logs in {}", dir.display());
    }
    if once {
        println!("mesh-demo: scenario passed");
        return Ok(());
    }
    println!("mesh-demo: running; press Ctrl-C to stop");
    tokio::signal::ctrl_c().await?;
    Ok(())
}

fn tempfile_dir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("outrider-mesh-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
