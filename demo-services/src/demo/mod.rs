//! mesh-demo's machinery: it mints a CA and one workload certificate per service with
//! `outrider certs`, then starts every service (`demo-service NAME`) with its own `outrider`
//! sidecar on its own loopback address, using the sidecar configs of `deploy/configs/` with the
//! addresses filled in through `OUTRIDER_*` environment variables (as Kubernetes would).
//!
//! Each instance gets the address `PREFIX.HOST` (e.g. 127.0.0.20): the app on port 8080, the
//! sidecar's outbound listener on 7140, inbound on 7143 and admin on 7191.

pub mod metrics;
pub mod scenario;

use std::collections::BTreeMap;
use std::fs::File;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

/// The RabbitMQ the sidecars' bridges use (override with `AMQP_URL`).
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// One running copy of a service: the app and its sidecar.
#[derive(Debug, Clone)]
pub struct Instance {
    /// e.g. `user-service-b`; the same as `service` for single-replica services.
    pub name: &'static str,
    /// The mesh name (and certificate identity), e.g. `user-service`.
    pub service: &'static str,
    pub ip: String,
}

impl Instance {
    pub fn app(&self) -> SocketAddr {
        self.addr(8080)
    }
    pub fn outbound(&self) -> SocketAddr {
        self.addr(7140)
    }
    pub fn inbound(&self) -> SocketAddr {
        self.addr(7143)
    }
    pub fn admin(&self) -> SocketAddr {
        self.addr(7191)
    }
    fn addr(&self, port: u16) -> SocketAddr {
        format!("{}:{port}", self.ip)
            .parse()
            .unwrap_or(SocketAddr::from(([127, 0, 0, 1], port)))
    }
}

/// The instances of the demo, with their host numbers: user-service has two replicas.
pub const LAYOUT: &[(&str, &str, u8)] = &[
    ("gateway", "gateway", 20),
    ("user-service-a", "user-service", 21),
    ("user-service-b", "user-service", 22),
    ("course-service", "course-service", 23),
    ("runner-service", "runner-service", 24),
    ("tester-service", "tester-service", 25),
    ("submission-service", "submission-service", 26),
    ("file-service", "file-service", 27),
    ("email-worker", "email-worker", 28),
];

/// What `Mesh::start` needs.
#[derive(Debug, Clone)]
pub struct Options {
    /// The `outrider` binary.
    pub outrider: PathBuf,
    /// The `demo-service` binary.
    pub services: PathBuf,
    /// The first three octets of every address, e.g. `127.0.0`.
    pub ip_prefix: String,
    /// Where certificates, rendered logs and file-service's data go.
    pub work_dir: PathBuf,
    pub amqp_url: String,
}

/// The repository's root (for `deploy/configs/` and `schemas/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Builds `outrider` and `demo-service` with cargo, in the profile this binary was built with,
/// and returns their paths.
pub fn build_binaries() -> Result<(PathBuf, PathBuf)> {
    let release = !cfg!(debug_assertions);
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(repo_root()).args([
        "build",
        "-q",
        "-p",
        "outrider",
        "--bin",
        "outrider",
        "-p",
        "demo-services",
        "--bin",
        "demo-service",
    ]);
    if release {
        cmd.arg("--release");
    }
    let status = cmd.status().context("running cargo build")?;
    if !status.success() {
        bail!("cargo build of outrider and demo-service failed");
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo_root().join("target"))
        .join(if release { "release" } else { "debug" });
    Ok((target.join("outrider"), target.join("demo-service")))
}

/// Fails with instructions when nothing answers on RabbitMQ's port.
pub fn check_rabbitmq(amqp_url: &str) -> Result<()> {
    let host = amqp_url
        .split('@')
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .unwrap_or("127.0.0.1:5672");
    let reachable = std::net::ToSocketAddrs::to_socket_addrs(host)
        .ok()
        .and_then(|mut addrs| addrs.next())
        .is_some_and(|addr| TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok());
    if !reachable {
        bail!(
            "RabbitMQ is not reachable at {host}.\n  The demo's events and work queues go through it. Start it with:\n      rabbitmq-server -detached && rabbitmqctl await_startup\n  (Debian: apt-get install rabbitmq-server), or point AMQP_URL at another broker."
        );
    }
    Ok(())
}

/// The running demo: every instance's app and sidecar. Dropping it stops them all.
pub struct Mesh {
    pub options: Options,
    pub instances: Vec<Instance>,
    running: BTreeMap<&'static str, Running>,
}

struct Running {
    app: Child,
    sidecar: Child,
}

impl Drop for Running {
    fn drop(&mut self) {
        for child in [&mut self.sidecar, &mut self.app] {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Mesh {
    /// Mints the certificates and starts every instance; returns once all are ready.
    pub async fn start(options: Options) -> Result<Mesh> {
        check_rabbitmq(&options.amqp_url)?;
        std::fs::create_dir_all(&options.work_dir)?;
        let instances = LAYOUT
            .iter()
            .map(|(name, service, host)| Instance {
                name,
                service,
                ip: format!("{}.{host}", options.ip_prefix),
            })
            .collect();
        let mut mesh = Mesh {
            options,
            instances,
            running: BTreeMap::new(),
        };
        mesh.mint_certificates()?;
        let names: Vec<&'static str> = mesh.instances.iter().map(|i| i.name).collect();
        for name in &names {
            mesh.start_instance(name)?;
        }
        for name in &names {
            mesh.wait_ready(name).await?;
        }
        Ok(mesh)
    }

    pub fn instance(&self, name: &str) -> Result<&Instance> {
        self.instances
            .iter()
            .find(|i| i.name == name)
            .with_context(|| format!("no instance called {name}"))
    }

    /// The gateway's public address (where browsers and the scenario go).
    pub fn gateway(&self) -> SocketAddr {
        self.instance("gateway")
            .map(Instance::app)
            .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 8080)))
    }

    fn run_outrider(&self, args: &[&str]) -> Result<()> {
        let out = Command::new(&self.options.outrider)
            .args(args)
            .output()
            .with_context(|| format!("running {}", self.options.outrider.display()))?;
        if !out.status.success() {
            bail!(
                "outrider {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    fn mint_certificates(&self) -> Result<()> {
        let dir = &self.options.work_dir;
        let ca = dir.join("ca");
        let certs = dir.join("certs");
        self.run_outrider(&["certs", "ca", "--out", path_str(&ca)?])?;
        let mut services: Vec<&str> = self.instances.iter().map(|i| i.service).collect();
        services.dedup();
        for service in services {
            self.run_outrider(&[
                "certs",
                "issue",
                "--ca",
                path_str(&ca)?,
                "--service",
                service,
                "--namespace",
                "demo",
                "--out",
                path_str(&certs)?,
            ])?;
        }
        Ok(())
    }

    /// Where each service's sidecar finds the others: every instance, by its inbound address.
    fn discovery_yaml(&self) -> String {
        let mut by_service: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for i in &self.instances {
            by_service
                .entry(i.service)
                .or_default()
                .push(format!("\"{}\"", i.inbound()));
        }
        let entries: Vec<String> = by_service
            .iter()
            .map(|(service, eps)| format!("{service}: {{ endpoints: [{}] }}", eps.join(", ")))
            .collect();
        format!("{{ {} }}", entries.join(", "))
    }

    /// Starts an instance's app and sidecar (again, after [`Mesh::stop_instance`]).
    pub fn start_instance(&mut self, name: &str) -> Result<()> {
        let instance = self.instance(name)?.clone();
        let dir = &self.options.work_dir;
        let config = repo_root()
            .join("deploy/configs")
            .join(format!("{}.yaml", instance.service));
        let config_text = std::fs::read_to_string(&config)
            .with_context(|| format!("reading {}", config.display()))?;
        let certs = dir.join("certs");
        let log = |suffix: &str| File::create(dir.join(format!("{}.{suffix}.log", instance.name)));

        let app = Command::new(&self.options.services)
            .arg(instance.service)
            .env("APP_LISTEN", instance.app().to_string())
            .env("MESH_OUTBOUND", instance.outbound().to_string())
            .env("REPLICA", instance.name)
            .env("DATA_DIR", dir.join(format!("{}-data", instance.name)))
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(log("app")?)
            .spawn()
            .with_context(|| format!("starting {}", self.options.services.display()))?;

        let mut sidecar = Command::new(&self.options.outrider);
        sidecar
            .args(["run", "-c"])
            .arg(&config)
            .args(["--log-format", "text"])
            .env("OUTRIDER_APP", instance.app().to_string())
            .env("OUTRIDER_LISTEN_OUTBOUND", instance.outbound().to_string())
            .env("OUTRIDER_LISTEN_INBOUND", instance.inbound().to_string())
            .env("OUTRIDER_LISTEN_ADMIN", instance.admin().to_string())
            .env("OUTRIDER_TLS_CA", dir.join("ca/ca.pem"))
            .env(
                "OUTRIDER_TLS_CERT",
                certs.join(format!("{}.pem", instance.service)),
            )
            .env(
                "OUTRIDER_TLS_KEY",
                certs.join(format!("{}-key.pem", instance.service)),
            )
            .env("OUTRIDER_DISCOVERY_SERVICES", self.discovery_yaml())
            .stdout(Stdio::null())
            .stderr(log("sidecar")?);
        if config_text.lines().any(|l| l.starts_with("broker:")) {
            sidecar
                .env("OUTRIDER_BROKER_URL", &self.options.amqp_url)
                .env("OUTRIDER_BROKER_SCHEMAS", repo_root().join("schemas"));
        }
        let sidecar = sidecar
            .spawn()
            .with_context(|| format!("starting {}", self.options.outrider.display()))?;
        self.running.insert(instance.name, Running { app, sidecar });
        Ok(())
    }

    /// Kills an instance's app and sidecar, as when its pod dies.
    pub fn stop_instance(&mut self, name: &str) {
        self.running.remove(name);
    }

    /// Waits until the sidecar's `/ready` and the app's `/v1/health` answer 200.
    pub async fn wait_ready(&mut self, name: &str) -> Result<()> {
        let instance = self.instance(name)?.clone();
        let client = plain_client()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let urls = [
            format!("http://{}/ready", instance.admin()),
            format!("http://{}/v1/health", instance.app()),
        ];
        let mut last = String::new();
        while Instant::now() < deadline {
            if let Some(running) = self.running.get_mut(name) {
                for (what, child) in [("app", &mut running.app), ("sidecar", &mut running.sidecar)]
                {
                    if let Ok(Some(status)) = child.try_wait() {
                        bail!(
                            "{name}'s {what} exited ({status}); see {}",
                            self.options
                                .work_dir
                                .join(format!("{name}.{what}.log"))
                                .display()
                        );
                    }
                }
            }
            let mut ready = true;
            for url in &urls {
                match client.get(url).send().await {
                    Ok(r) if r.status().is_success() => {}
                    Ok(r) => {
                        ready = false;
                        last = format!(
                            "{url}: {} {}",
                            r.status(),
                            r.text().await.unwrap_or_default()
                        );
                    }
                    Err(e) => {
                        ready = false;
                        last = format!("{url}: {e}");
                    }
                }
            }
            if ready {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("{name} did not become ready in 30s ({last})")
    }
}

/// An HTTP client that never uses a proxy (the scenario is outside the mesh).
pub fn plain_client() -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()?)
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .with_context(|| format!("path {} is not UTF-8", p.display()))
}
