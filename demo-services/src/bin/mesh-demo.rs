//! `mesh-demo`: the whole learning platform on this machine, each service behind its own
//! Outrider sidecar, in one command:
//!
//! ```text
//! cargo run --release -p demo-services --bin mesh-demo            # runs until Ctrl-C
//! cargo run --release -p demo-services --bin mesh-demo -- --once  # scenario, then exit (CI)
//! ```
//!
//! It builds the sidecar and the services, mints a CA and certificates, checks RabbitMQ, starts
//! every service with its sidecar on its own 127.0.0.x address, runs the scenario (see
//! `demo_services::demo::scenario`) and prints a summary read from each sidecar's `/metrics`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use demo_services::demo::{self, Mesh, Options, scenario};

#[derive(Parser)]
#[command(about = "Runs the learning platform's services, each behind an Outrider sidecar")]
struct Args {
    /// Run the scenario once and exit: status 0 if everything worked, 1 otherwise.
    #[arg(long)]
    once: bool,
    /// The outrider binary to use (default: build it with cargo).
    #[arg(long)]
    outrider: Option<PathBuf>,
    /// The demo-service binary to use (default: build it with cargo).
    #[arg(long)]
    services: Option<PathBuf>,
    /// The first three octets of every instance's loopback address.
    #[arg(long, default_value = "127.0.0")]
    ip_prefix: String,
    /// Where certificates, logs and data go (default: a new directory under the system temp dir).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// How many solutions the scenario submits.
    #[arg(long, default_value_t = 3)]
    submissions: usize,
    /// Skip the fault steps (replica killed, file-service down).
    #[arg(long)]
    no_faults: bool,
    /// Count a fault step that does not show the expected resilience as a failure (the default
    /// when the sidecar reports circuit states).
    #[arg(long)]
    strict_faults: bool,
    /// RabbitMQ for the sidecars' bridges.
    #[arg(long, env = "AMQP_URL", default_value = demo::DEFAULT_AMQP_URL)]
    amqp_url: String,
}

#[tokio::main]
async fn main() -> ExitCode {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    match run(args).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mesh-demo: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn run(args: Args) -> anyhow::Result<ExitCode> {
    demo::check_rabbitmq(&args.amqp_url)?;
    let (outrider, services) = match (args.outrider, args.services) {
        (Some(o), Some(s)) => (o, s),
        (o, s) => {
            println!("mesh-demo: building the sidecar and the services (cargo build)...");
            let (built_o, built_s) = demo::build_binaries()?;
            (o.unwrap_or(built_o), s.unwrap_or(built_s))
        }
    };
    let work_dir = args.work_dir.unwrap_or_else(|| {
        std::env::temp_dir().join(format!("outrider-mesh-demo-{}", std::process::id()))
    });
    println!(
        "mesh-demo: minting a CA and certificates, starting 9 instances with their sidecars\n  (work dir, certificates and logs: {})",
        work_dir.display()
    );
    let options = Options {
        outrider,
        services,
        ip_prefix: args.ip_prefix,
        work_dir,
        amqp_url: args.amqp_url,
    };
    let mut mesh = Mesh::start(options).await?;
    for i in &mesh.instances {
        println!(
            "  {:<20} app http://{}  sidecar: outbound {} inbound {} (mTLS) admin {}",
            i.name,
            i.app(),
            i.outbound(),
            i.inbound(),
            i.admin()
        );
    }

    let settings = scenario::Settings {
        submissions: args.submissions,
        faults: !args.no_faults,
        strict_faults: args.strict_faults,
    };
    let outcome = scenario::run(&mut mesh, &settings).await;
    println!("{}", scenario::summary(&mesh, &outcome).await);

    println!("Open the live page: http://{}/", mesh.gateway());
    println!("Each sidecar's metrics:");
    for i in &mesh.instances {
        println!("  {:<20} http://{}/metrics", i.name, i.admin());
    }
    for w in &outcome.warnings {
        println!("warning: {w}");
    }
    for p in &outcome.problems {
        println!("FAILED: {p}");
    }
    let logs = mesh.options.work_dir.display().to_string();
    if args.once {
        return Ok(if outcome.problems.is_empty() {
            println!("\nmesh-demo: scenario passed");
            ExitCode::SUCCESS
        } else {
            println!(
                "\nmesh-demo: {} problem(s); logs in {logs}",
                outcome.problems.len()
            );
            ExitCode::from(1)
        });
    }
    println!("\nmesh-demo: running; press Ctrl-C to stop (logs in {logs})");
    tokio::signal::ctrl_c().await?;
    println!("mesh-demo: stopping");
    drop(mesh);
    Ok(ExitCode::SUCCESS)
}
