//! `mesh-demo --once` runs the whole scenario, fault steps included (strict: retries must hide
//! the dead replica, the breaker must open and close again), and must pass.

mod support;

use std::process::Command;

#[test]
fn mesh_demo_once_passes() {
    let _lock = support::exclusive();
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(env!("CARGO_BIN_EXE_mesh-demo"))
        .args([
            "--once",
            "--strict-faults",
            "--ip-prefix",
            "127.0.31",
            "--outrider",
        ])
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
        // The fault steps: a dead replica is retried around, the breaker opens and closes.
        "after: 20/20 lookups answered",
        "circuit open: the sidecar serves the fallback without trying: 503",
        "the solution is served again after",
        "Circuit trips seen: 1",
    ] {
        assert!(
            stdout.contains(expected),
            "mesh-demo's output lacks `{expected}`:\n{stdout}"
        );
    }
    assert!(!stdout.contains("warning:"), "mesh-demo warned:\n{stdout}");
}
