//! The `outrider` command line (CONTRACT §1). Exit codes: 0 success, 1 invalid config or input,
//! 2 runtime failure, each failure with a one-line reason on stderr.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// mimalloc instead of the system allocator, with
/// `cargo build --release -p outrider --features mimalloc` (measured against glibc malloc in
/// docs/performance.md).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "outrider",
    version,
    about = "A sidecar proxy for service meshes"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Shorthand for `outrider run -c FILE`.
    #[arg(short = 'c', long = "config", global = false)]
    config: Option<PathBuf>,
    #[command(flatten)]
    log: LogArgs,
}

#[derive(Args, Clone)]
struct LogArgs {
    /// Log format (default: text on a terminal, json otherwise).
    #[arg(long, global = true, env = "OUTRIDER_LOG_FORMAT")]
    log_format: Option<LogFormat>,
    /// Log level or tracing filter, e.g. `info` or `outrider=debug`.
    #[arg(
        long,
        global = true,
        env = "OUTRIDER_LOG_LEVEL",
        default_value = "info"
    )]
    log_level: String,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Json,
    Text,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sidecar with a config file.
    Run {
        #[arg(short = 'c', long = "config", env = "OUTRIDER_CONFIG")]
        config: PathBuf,
    },
    /// Validate a config without binding anything.
    Check {
        #[arg(short = 'c', long = "config", env = "OUTRIDER_CONFIG")]
        config: PathBuf,
    },
    /// Mint a mesh CA or issue workload certificates.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Print Kubernetes manifests with the sidecar added to every pod template that opts in.
    Inject {
        /// Input file (`-` or absent: standard input).
        #[arg(short = 'f', long = "file")]
        file: Option<PathBuf>,
        #[command(flatten)]
        options: outrider::inject::CliOptions,
    },
    /// Run the mutating admission webhook (AdmissionReview v1, `POST /inject`).
    Injector {
        #[arg(long)]
        listen: std::net::SocketAddr,
        #[arg(long)]
        tls_cert: PathBuf,
        #[arg(long)]
        tls_key: PathBuf,
        #[command(flatten)]
        options: outrider::inject::CliOptions,
    },
    /// Wait until the local sidecar is ready (the pre-1.29 injection's postStart hook).
    Await {
        /// The sidecar's admin listener.
        #[arg(long, default_value = "127.0.0.1:7191")]
        admin: std::net::SocketAddr,
        #[arg(long, default_value_t = 120)]
        timeout_seconds: u64,
    },
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Mint a mesh CA: DIR/ca.pem and DIR/ca-key.pem.
    Ca {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = outrider::config::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        /// Validity in days.
        #[arg(long, default_value_t = 3650)]
        days: u32,
    },
    /// Issue a workload certificate: DIR2/NAME.pem and DIR2/NAME-key.pem.
    Issue {
        /// Directory holding ca.pem and ca-key.pem.
        #[arg(long)]
        ca: PathBuf,
        #[arg(long)]
        service: String,
        #[arg(long, default_value = "default")]
        namespace: String,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => 0,
                _ => 1,
            };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let command = match (cli.command, cli.config) {
        (Some(command), None) => command,
        (None, Some(config)) => Command::Run { config },
        (Some(_), Some(_)) => {
            eprintln!("outrider: give -c after the subcommand, e.g. `outrider run -c FILE`");
            return ExitCode::from(1);
        }
        (None, None) => {
            eprintln!("outrider: nothing to do: try `outrider run -c FILE` or `outrider --help`");
            return ExitCode::from(1);
        }
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    match command {
        Command::Run { config } => {
            init_logging(&cli.log);
            outrider::runtime::run_cli(&config)
        }
        Command::Check { config } => check(&config),
        Command::Certs { command } => certs(command),
        Command::Inject { file, options } => outrider::inject::run_cli(file.as_deref(), &options),
        Command::Injector {
            listen,
            tls_cert,
            tls_key,
            options,
        } => {
            init_logging(&cli.log);
            outrider::inject::run_injector(listen, &tls_cert, &tls_key, &options)
        }
        Command::Await {
            admin,
            timeout_seconds,
        } => outrider::inject::run_await(admin, timeout_seconds),
    }
}

fn init_logging(log: &LogArgs) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_new(&log.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let json = match log.log_format {
        Some(LogFormat::Json) => true,
        Some(LogFormat::Text) => false,
        None => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    let file = path.display().to_string();
    match outrider::config::load_file(path, std::env::vars()) {
        Ok(loaded) => {
            for warning in &loaded.warnings {
                eprintln!("warning: {}", warning.render(&file));
            }
            let mut problems = Vec::new();
            if let outrider::config::Tls::Mtls(files) = &loaded.config.tls
                && let Err(e) = outrider::tls::Identity::load(files)
            {
                problems.push(format!("{file}: tls: {e}"));
            }
            if problems.is_empty() {
                println!("{file}: ok");
                ExitCode::SUCCESS
            } else {
                report_problems(&problems);
                ExitCode::from(1)
            }
        }
        Err(e) => {
            report_problems(&e.lines());
            eprintln!("outrider: {e}");
            ExitCode::from(1)
        }
    }
}

fn certs(command: CertsCommand) -> ExitCode {
    let result = match command {
        CertsCommand::Ca {
            out,
            trust_domain,
            days,
        } => outrider::tls::certs::mint_ca(&out, &trust_domain, days).map(|paths| {
            for p in paths {
                println!("wrote {}", p.display());
            }
        }),
        CertsCommand::Issue {
            ca,
            service,
            namespace,
            days,
            out,
        } => outrider::tls::certs::issue(&ca, &service, &namespace, days, &out).map(|paths| {
            for p in paths {
                println!("wrote {}", p.display());
            }
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("outrider: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// Problems go to stderr; when stdout is not a terminal (CI, scripts) they are repeated there, so
/// a caller that reads either stream sees them all.
fn report_problems(lines: &[String]) {
    use std::io::IsTerminal;
    for line in lines {
        eprintln!("{line}");
    }
    if !std::io::stdout().is_terminal() {
        for line in lines {
            println!("{line}");
        }
    }
}
