//! Runs one of the demo services: `demo-service <NAME> [--listen ADDR] [--outbound ADDR]`.
//! NAME is one of gateway, user-service, course-service, runner-service, tester-service,
//! submission-service, file-service, email-worker.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;
use demo_services::common::{Context, Mesh, serve};

#[derive(Parser)]
#[command(
    about = "Runs one service of the learning platform (a plain app; its sidecar does the rest)"
)]
struct Args {
    /// The service to run, by its mesh name.
    service: String,
    /// Where the app listens (its sidecar forwards inbound requests here).
    #[arg(long, env = "APP_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// In a pod: listen on 0.0.0.0:PORT instead (for the kubelet's probes); overrides --listen.
    #[arg(long, env = "PORT")]
    port: Option<u16>,
    /// The sidecar's outbound listener: calls to other services, events and tasks go there.
    #[arg(long, env = "MESH_OUTBOUND", default_value = "127.0.0.1:7140")]
    outbound: SocketAddr,
    /// user-service: the replica's name, shown in its answers.
    #[arg(long, env = "REPLICA", default_value = "")]
    replica: String,
    /// file-service: where solutions are stored.
    #[arg(long, env = "DATA_DIR", default_value = "data")]
    data_dir: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let mut args = Args::parse();
    if let Some(port) = args.port {
        args.listen = SocketAddr::from(([0, 0, 0, 0], port));
    }
    let Some(service) = demo_services::services::ALL
        .iter()
        .find(|s| **s == args.service)
    else {
        anyhow::bail!(
            "unknown service `{}`; expected one of {}",
            args.service,
            demo_services::services::ALL.join(", ")
        );
    };
    let ctx = Context {
        service,
        mesh: Mesh::new(args.outbound)?,
        stats: Arc::default(),
        replica: args.replica,
        data_dir: args.data_dir,
    };
    let router = demo_services::services::router(service, &ctx)?;
    serve(args.listen, &ctx, router).await
}
