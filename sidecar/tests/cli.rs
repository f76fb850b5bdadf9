//! The command line: `check`, `certs`, exit codes (CONTRACT §1).

mod support;

use std::process::Command;

use support::BIN;

fn write(dir: &std::path::Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    path
}

#[test]
fn check_lists_every_problem_with_its_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write(
        dir.path(),
        "bad.yaml",
        "service: runner-service\napp: 127.0.0.1:99999\npolicies:\n  default:\n    timeout: 2 parsecs\n    retries: 3\nlimits:\n  max_api_body: lots\n",
    );
    let out = Command::new(BIN)
        .args(["check", "-c"])
        .arg(&config)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let file = config.display().to_string();
    for expected in [
        format!("{file}:2:6: app:"),
        format!("{file}:5:14: policies.default.timeout:"),
        format!("{file}:6:5: policies.default.retries: unknown key"),
        format!("{file}:8:17: limits.max_api_body:"),
    ] {
        assert!(
            stderr.contains(&expected),
            "missing `{expected}` in:\n{stderr}"
        );
    }
}

#[test]
fn check_accepts_a_minimal_config_and_warns_without_tls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write(dir.path(), "ok.yaml", "service: web\napp: 127.0.0.1:8080\n");
    let out = Command::new(BIN)
        .args(["check", "-c"])
        .arg(&config)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("warning"));
}

#[test]
fn check_reports_yaml_syntax_errors_with_position() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write(dir.path(), "broken.yaml", "service: web\napp: [unclosed\n");
    let out = Command::new(BIN)
        .args(["check", "-c"])
        .arg(&config)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("{}:", config.display())),
        "{stderr}"
    );
}

#[test]
fn environment_variables_override_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write(
        dir.path(),
        "env.yaml",
        "service: web\napp: 127.0.0.1:8080\n",
    );
    let out = Command::new(BIN)
        .args(["check", "-c"])
        .arg(&config)
        .env("OUTRIDER_APP", "not-an-address")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("OUTRIDER_APP"));
}

#[test]
fn certs_commands_mint_a_ca_and_workload_certs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("ca");
    let ok = Command::new(BIN)
        .args(["certs", "ca", "--out"])
        .arg(&ca)
        .args(["--trust-domain", "example.org"])
        .status()
        .expect("run");
    assert!(ok.success());
    let out = dir.path().join("out");
    let ok = Command::new(BIN)
        .args(["certs", "issue", "--ca"])
        .arg(&ca)
        .args([
            "--service",
            "runner-service",
            "--namespace",
            "demo",
            "--out",
        ])
        .arg(&out)
        .status()
        .expect("run");
    assert!(ok.success());
    let pem = std::fs::read(out.join("runner-service.pem")).expect("cert");
    let der = rustls::pki_types::CertificateDer::from(
        x509_parser::pem::parse_x509_pem(&pem)
            .expect("pem")
            .1
            .contents,
    );
    assert_eq!(
        outrider::tls::spiffe::workload_id(&der).as_deref(),
        Some("spiffe://example.org/ns/demo/sa/runner-service")
    );
    assert!(out.join("runner-service-key.pem").exists());
    let missing = Command::new(BIN)
        .args([
            "certs",
            "issue",
            "--ca",
            "/nonexistent",
            "--service",
            "x",
            "--out",
        ])
        .arg(&out)
        .status()
        .expect("run");
    assert_eq!(missing.code(), Some(1));
}

#[test]
fn run_exits_2_when_a_port_is_taken_and_1_on_bad_certs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let config = write(
        dir.path(),
        "taken.yaml",
        &format!(
            "service: web\napp: 127.0.0.1:8080\nlisten: {{ outbound: {}, inbound: 127.0.0.1:0, admin: 127.0.0.1:0 }}\ntls: {{ mode: disabled }}\n",
            taken.local_addr().expect("addr")
        ),
    );
    let out = Command::new(BIN)
        .args(["run", "-c"])
        .arg(&config)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot bind"));

    let bad = write(dir.path(), "garbage.pem", "not a certificate");
    let config = write(
        dir.path(),
        "badcert.yaml",
        &format!(
            "service: web\napp: 127.0.0.1:8080\nlisten: {{ outbound: 127.0.0.1:0, inbound: 127.0.0.1:0, admin: 127.0.0.1:0 }}\ntls: {{ ca: {0}, cert: {0}, key: {0} }}\n",
            bad.display()
        ),
    );
    let out = Command::new(BIN)
        .args(["run", "-c"])
        .arg(&config)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("garbage.pem"));
}
