//! `loadgen`: the Outrider benchmarks' load generator, for what wrk cannot do — fixed-rate
//! open-loop latency corrected for coordinated omission, over HTTP/1.1, h2c or gRPC unary —
//! plus `loadgen serve`, a minimal h2c/gRPC echo backend. Single-threaded on purpose: the
//! benchmark pins it to one core.

mod echo;
mod grpc;
mod pacer;
mod run;

use std::net::SocketAddr;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "loadgen", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Send load; print a JSON report on stdout and a one-line summary on stderr
    Run(run::RunArgs),
    /// Open many keep-alive connections, one request each, then hold them idle (memory tests)
    Hold(run::HoldArgs),
    /// Serve HTTP/1.1 and h2c: gRPC /echo.v1.Echo/Unary echoes, anything else answers 200 "ok"
    Serve {
        #[arg(long)]
        listen: SocketAddr,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match cli.cmd {
        Cmd::Run(args) => {
            let report = rt.block_on(run::run(args))?;
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        Cmd::Hold(args) => {
            let report = rt.block_on(run::hold(args))?;
            println!("{}", serde_json::to_string(&report)?);
        }
        Cmd::Serve { listen } => rt.block_on(echo::serve(listen))?,
    }
    Ok(())
}
