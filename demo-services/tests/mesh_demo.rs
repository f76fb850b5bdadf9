//! `mesh-demo --once` runs the whole scenario, fault steps included, and must pass.

mod support;

use std::process::Command;

#[test]
fn mesh_demo_once_passes() {
    let _lock = support::exclusive();
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(env!("CARGO_BIN_EXE_mesh-demo"))
        .args(["--once", "--ip-prefix", "127.0.31", "--outrider"])
        .arg(support::outrider())
        .arg("--services")
        .arg(support::demo_service())
        .arg("--work-dir")
        .arg(dir.path())
        .output()
        .expect("running mesh-demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "mesh-demo --once failed ({}):\n{stdout}\n{stderr}\n{}",
        out.status,
        support::logs(dir.path())
    );
    for expected in [
        "scenario passed",
        "every event reached every consumer exactly once",
        "Requests per hop",
        "gateway              → submission-service",
        "Events and tasks",
        "Open the live page: http://127.0.31.20:8080/",
        "http://127.0.31.26:7191/metrics",
    ] {
        assert!(
            stdout.contains(expected),
            "mesh-demo's output lacks `{expected}`:\n{stdout}"
        );
    }
}
