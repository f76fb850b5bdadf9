//! Every sidecar config in `deploy/configs/` passes `outrider check` without warnings, with the
//! values mesh-demo (or the injector) fills in through the environment.

mod support;

use std::process::Command;

use demo_services::demo::repo_root;

#[test]
fn deploy_configs_pass_outrider_check() {
    let outrider = support::outrider();
    let dir = tempfile::tempdir().expect("tempdir");
    let run = |args: &[&str]| {
        let out = Command::new(&outrider)
            .args(args)
            .output()
            .expect("outrider");
        assert!(
            out.status.success(),
            "outrider {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ca = dir.path().join("ca");
    let certs = dir.path().join("certs");
    let (ca, certs) = (ca.to_str().expect("utf-8"), certs.to_str().expect("utf-8"));
    run(&["certs", "ca", "--out", ca]);
    let configs = repo_root().join("deploy/configs");
    let mut checked = 0;
    for service in demo_services::services::ALL {
        run(&[
            "certs",
            "issue",
            "--ca",
            ca,
            "--service",
            service,
            "--namespace",
            "demo",
            "--out",
            certs,
        ]);
        let config = configs.join(format!("{service}.yaml"));
        assert!(config.exists(), "{} is missing", config.display());
        let text = std::fs::read_to_string(&config).expect("config");
        let mut check = Command::new(&outrider);
        check
            .args(["check", "-c"])
            .arg(&config)
            .env("OUTRIDER_TLS_CA", format!("{ca}/ca.pem"))
            .env("OUTRIDER_TLS_CERT", format!("{certs}/{service}.pem"))
            .env("OUTRIDER_TLS_KEY", format!("{certs}/{service}-key.pem"));
        if text.lines().any(|l| l.starts_with("broker:")) {
            check.env("OUTRIDER_BROKER_SCHEMAS", repo_root().join("schemas"));
        }
        let out = check.output().expect("outrider check");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}: {stdout}{stderr}",
            config.display()
        );
        assert!(
            !stderr.to_lowercase().contains("warning")
                && !stdout.to_lowercase().contains("warning"),
            "{}: {stdout}{stderr}",
            config.display()
        );
        checked += 1;
    }
    assert_eq!(checked, 8);
}
