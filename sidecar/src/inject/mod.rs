//! Kubernetes pod injection (CONTRACT §7).
//!
//! One pure function, [`inject`], reads a typed pod template and returns the JSON Patch that
//! adds the sidecar, or why it must not ([`Skip`]). Two front ends use it and are the only code
//! here that does I/O:
//!
//! * `outrider inject` ([`run_cli`]): multi-document YAML in, the same manifests out with every
//!   opted-in pod template patched ([`inject_manifests`]), a one-line report per resource;
//! * `outrider injector` ([`run_injector`]): the same as a mutating admission webhook
//!   ([`review`] turns an AdmissionReview into its answer; `server` is the HTTPS plumbing).
//!
//! `outrider await` ([`run_await`]) is the small helper the pre-1.29 mode's postStart hook runs.
//! The operator guide is `docs/kubernetes.md`.

use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::str::FromStr;

mod manifest;
mod pod;
mod review;
mod server;

pub use manifest::{InputError, Output, inject_manifests};
pub use pod::{Skip, Workload, inject, is_injected};
pub use review::{Answer, ReviewError, review};

/// The annotations a pod template uses to ask for and tune injection.
pub mod annotations {
    /// `enabled` opts the pod template in.
    pub const INJECT: &str = "outrider.io/inject";
    /// The port the app listens on (required).
    pub const APP_PORT: &str = "outrider.io/app-port";
    /// The ConfigMap (key `config.yaml`) with the sidecar's config: discovery, policies, broker.
    pub const CONFIG: &str = "outrider.io/config";
    /// A Secret whose keys become the sidecar's environment, e.g. `OUTRIDER_BROKER_URL`.
    pub const ENV_SECRET: &str = "outrider.io/env-secret";
    /// The mesh name of this workload (default: the `app` label, else the workload's name).
    pub const SERVICE: &str = "outrider.io/service";
    /// The cluster's version for this pod; below 1.29 the sidecar is a regular first container.
    pub const K8S_VERSION: &str = "outrider.io/k8s-version";
    /// Output only: set on injected pods so re-injection changes nothing.
    pub const INJECTED: &str = "outrider.io/injected";
}

/// The sidecar's ports in a pod (CONTRACT §2).
pub mod ports {
    pub const OUTBOUND: u16 = 7140;
    pub const INBOUND: u16 = 7143;
    pub const ADMIN: u16 = 7191;
    pub const INBOUND_NAME: &str = "outrider-in";
    pub const ADMIN_NAME: &str = "outrider-admin";
}

/// Options shared by `outrider inject` and `outrider injector`.
#[derive(Debug, Clone, clap::Args)]
pub struct CliOptions {
    /// Sidecar image to inject.
    #[arg(long, default_value = "ghcr.io/outrider/outrider:0.1.0")]
    pub image: String,
    /// The cluster's Kubernetes version (e.g. 1.28). Below 1.29 the sidecar is injected as the
    /// first regular container instead of a native sidecar. Default: native sidecar.
    #[arg(long, env = "OUTRIDER_K8S_VERSION")]
    pub k8s_version: Option<K8sVersion>,
}

/// What the injection needs from the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub image: String,
    pub k8s_version: Option<K8sVersion>,
}

impl From<&CliOptions> for Settings {
    fn from(options: &CliOptions) -> Self {
        Self {
            image: options.image.clone(),
            k8s_version: options.k8s_version,
        }
    }
}

/// A Kubernetes `major.minor` version; accepts `1.29`, `v1.28.3`, `1.30.1-eks-1234`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct K8sVersion {
    pub major: u32,
    pub minor: u32,
}

#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not a Kubernetes version such as 1.29")]
pub struct VersionError(String);

impl FromStr for K8sVersion {
    type Err = VersionError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = || VersionError(text.to_string());
        let trimmed = text.trim().trim_start_matches('v');
        let mut parts = trimmed.split(['.', '-', '+']);
        let mut number = || {
            parts
                .next()
                .and_then(|p| p.parse::<u32>().ok())
                .ok_or_else(invalid)
        };
        Ok(Self {
            major: number()?,
            minor: number()?,
        })
    }
}

/// `outrider inject [-f FILE]`: manifests from the file (or stdin) to stdout.
pub fn run_cli(file: Option<&Path>, options: &CliOptions) -> ExitCode {
    use std::io::{Read, Write};
    let (source, text) = match file.filter(|f| f.as_os_str() != "-") {
        Some(path) => (path.display().to_string(), std::fs::read_to_string(path)),
        None => {
            let mut text = String::new();
            let read = std::io::stdin().read_to_string(&mut text).map(|_| text);
            ("<stdin>".to_string(), read)
        }
    };
    let text = match text {
        Ok(text) => text,
        Err(e) => {
            eprintln!("outrider: {source}: {e}");
            return ExitCode::from(1);
        }
    };
    match manifest::inject_manifests(&text, &Settings::from(options)) {
        Ok(output) => {
            for line in &output.reports {
                eprintln!("{line}");
            }
            let mut stdout = std::io::stdout().lock();
            if let Err(e) = stdout
                .write_all(output.yaml.as_bytes())
                .and_then(|()| stdout.flush())
            {
                eprintln!("outrider: writing the output: {e}");
                return ExitCode::from(2);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("outrider: {source}: {e}");
            ExitCode::from(1)
        }
    }
}

/// `outrider injector --listen ADDR --tls-cert F --tls-key F`.
pub fn run_injector(listen: SocketAddr, cert: &Path, key: &Path, options: &CliOptions) -> ExitCode {
    server::run(listen, cert, key, Settings::from(options))
}

/// `outrider await`: polls the sidecar's `GET /ready` on `admin` until it answers 200, for at most
/// `timeout_seconds`. Exit 0 when ready, 1 on timeout.
pub fn run_await(admin: SocketAddr, timeout_seconds: u64) -> ExitCode {
    server::await_ready(admin, std::time::Duration::from_secs(timeout_seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_leniently_and_compare() {
        let v = |s: &str| s.parse::<K8sVersion>().expect(s);
        assert_eq!(
            v("1.29"),
            K8sVersion {
                major: 1,
                minor: 29
            }
        );
        assert_eq!(
            v("v1.28.3"),
            K8sVersion {
                major: 1,
                minor: 28
            }
        );
        assert_eq!(
            v("1.30-eks"),
            K8sVersion {
                major: 1,
                minor: 30
            }
        );
        assert!(v("1.28") < v("1.29") && v("1.33") > v("1.29"));
        for bad in ["", "1", "one.two", "1.x"] {
            assert!(bad.parse::<K8sVersion>().is_err(), "{bad}");
        }
    }
}
