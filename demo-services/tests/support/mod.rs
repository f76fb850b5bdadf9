//! What the demo's tests share: the binaries, a lock so that only one demo mesh runs at a time
//! (they share RabbitMQ's durable queues), and starting a mesh.

#![allow(dead_code)]

use std::fs::File;
use std::path::PathBuf;
use std::process::Command;

use demo_services::demo::{DEFAULT_AMQP_URL, Mesh, Options, repo_root};

/// The `outrider` binary: `$OUTRIDER_BIN`, else the one cargo built next to this test (a
/// workspace test run builds it), else built now with `cargo build -p outrider`.
pub fn outrider() -> PathBuf {
    if let Ok(path) = std::env::var("OUTRIDER_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps");
    let bin = profile_dir.join("outrider");
    if !bin.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .current_dir(repo_root())
            .args(["build", "-q", "-p", "outrider", "--bin", "outrider"])
            .status()
            .expect("running cargo build -p outrider");
        assert!(status.success(), "cargo build -p outrider failed");
    }
    bin
}

pub fn demo_service() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_demo-service"))
}

/// Held while a demo mesh runs.
pub fn exclusive() -> File {
    let path = std::env::temp_dir().join("outrider-demo-mesh.lock");
    let file = File::create(&path).expect("lock file");
    file.lock().expect("locking the demo mesh lock");
    file
}

pub struct TestMesh {
    pub mesh: Mesh,
    pub dir: tempfile::TempDir,
    _lock: File,
}

/// Starts the whole demo mesh on `PREFIX.20` .. `PREFIX.28`.
pub async fn start(ip_prefix: &str) -> TestMesh {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let lock = exclusive();
    let dir = tempfile::tempdir().expect("tempdir");
    let options = Options {
        outrider: outrider(),
        services: demo_service(),
        ip_prefix: ip_prefix.into(),
        work_dir: dir.path().to_path_buf(),
        amqp_url: std::env::var("AMQP_URL").unwrap_or_else(|_| DEFAULT_AMQP_URL.into()),
    };
    let mesh = match Mesh::start(options).await {
        Ok(mesh) => mesh,
        Err(e) => panic!("the demo mesh did not start: {e:#}\n{}", logs(dir.path())),
    };
    TestMesh {
        mesh,
        dir,
        _lock: lock,
    }
}

/// The tail of every log in the work dir, for failure messages.
pub fn logs(dir: &std::path::Path) -> String {
    let mut out = String::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    paths.sort();
    for path in paths
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
    {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = &lines[lines.len().saturating_sub(15)..];
        out.push_str(&format!("--- {}\n{}\n", path.display(), tail.join("\n")));
    }
    out
}

pub fn client() -> reqwest::Client {
    demo_services::demo::plain_client().expect("http client")
}
