//! Kubernetes pod injection: a pure transformation of manifests (no I/O but in the two front
//! ends at the bottom). Owned by issue 8; this is the interface the CLI calls.

use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;

/// Options shared by `outrider inject` and `outrider injector`.
#[derive(Debug, Clone, clap::Args)]
pub struct CliOptions {
    /// Sidecar image to inject.
    #[arg(long, default_value = "ghcr.io/outrider/outrider:0.1.0")]
    pub image: String,
}

/// `outrider inject [-f FILE]`.
pub fn run_cli(_file: Option<&Path>, _options: &CliOptions) -> ExitCode {
    eprintln!("outrider: inject is not implemented yet");
    ExitCode::from(2)
}

/// `outrider injector --listen ADDR --tls-cert F --tls-key F`.
pub fn run_injector(
    _listen: SocketAddr,
    _cert: &Path,
    _key: &Path,
    _options: &CliOptions,
) -> ExitCode {
    eprintln!("outrider: injector is not implemented yet");
    ExitCode::from(2)
}
