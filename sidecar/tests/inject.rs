//! `outrider inject` and `outrider injector` from the outside: golden files for the CLI, the
//! webhook over real HTTPS on loopback, and the two front ends agreeing on the same pod.
//!
//! Golden files live in `tests/golden/inject/`: `CASE.yaml` is the input, `CASE.args` extra
//! flags, `CASE.out.yaml` the expected stdout and `CASE.report` the expected stderr.
//! `UPDATE_GOLDEN=1 cargo test -p outrider --test inject` rewrites the expectations.

#[path = "support/ports.rs"]
mod ports;

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use ports::{free_addrs, free_port};
use serde_json::{Value, json};

const IMAGE: &str = "ghcr.io/outrider/outrider:0.1.0";

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/inject")
}

/// A private copy of the binary, taken once per test process: the target dir may be shared with
/// builds of other branches, which would otherwise swap the binary out in the middle of a run.
fn outrider() -> Command {
    static COPY: std::sync::OnceLock<(tempfile::TempDir, PathBuf)> = std::sync::OnceLock::new();
    let (_, path) = COPY.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("outrider");
        std::fs::copy(env!("CARGO_BIN_EXE_outrider"), &path).expect("copy the binary");
        let ours = Command::new(&path)
            .args(["await", "--help"])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            ours,
            "{} is another branch's build (no `await`); rebuild and rerun",
            env!("CARGO_BIN_EXE_outrider")
        );
        (dir, path)
    });
    Command::new(path)
}

/// Runs `outrider inject --image IMAGE ARGS` with `input` on stdin.
fn inject(input: &str, args: &[&str]) -> Output {
    let mut child = outrider()
        .args(["inject", "--image", IMAGE])
        .args(args)
        .env_remove("OUTRIDER_K8S_VERSION")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn outrider inject");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write stdin");
    child.wait_with_output().expect("outrider inject")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).expect("utf-8 output")
}

fn cases() -> Vec<(String, PathBuf)> {
    let mut cases: Vec<_> = std::fs::read_dir(golden_dir())
        .expect("golden dir")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter_map(|p| {
            let name = p.file_name()?.to_str()?.to_string();
            let case = name.strip_suffix(".yaml")?;
            (!case.ends_with(".out")).then(|| (case.to_string(), p.clone()))
        })
        .collect();
    cases.sort();
    cases
}

fn case_args(case: &str) -> Vec<String> {
    std::fs::read_to_string(golden_dir().join(format!("{case}.args")))
        .map(|s| s.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

#[test]
fn golden_files() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let cases = cases();
    assert!(cases.len() >= 15, "golden cases missing: {cases:?}");
    let mut failures = Vec::new();
    for (case, path) in cases {
        let input = std::fs::read_to_string(&path).expect("input");
        let args = case_args(&case);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let output = inject(&input, &args);
        assert!(
            output.status.success(),
            "{case}: exit {:?}: {}",
            output.status,
            text(&output.stderr)
        );
        let stdout = text(&output.stdout);
        let stderr = text(&output.stderr);
        let out_path = golden_dir().join(format!("{case}.out.yaml"));
        let report_path = golden_dir().join(format!("{case}.report"));
        if update {
            std::fs::write(&out_path, &stdout).expect("write golden");
            std::fs::write(&report_path, &stderr).expect("write golden");
            continue;
        }
        let want_out = std::fs::read_to_string(&out_path).unwrap_or_default();
        let want_report = std::fs::read_to_string(&report_path).unwrap_or_default();
        if stdout != want_out {
            failures.push(format!(
                "{case}: stdout differs from {}",
                out_path.display()
            ));
        }
        if stderr != want_report {
            failures.push(format!(
                "{case}: report differs:\n--- want\n{want_report}--- got\n{stderr}"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{}\n(UPDATE_GOLDEN=1 rewrites them after review)",
        failures.join("\n")
    );
}

fn docs(yaml: &str) -> Vec<Value> {
    serde_saphyr::from_multiple(yaml).expect("YAML")
}

/// Pod templates of a parsed document (through Lists), as `(pointer, template)`.
fn templates(doc: &Value) -> Vec<Value> {
    if let Some(items) = doc.get("items").and_then(Value::as_array) {
        return items.iter().flat_map(templates).collect();
    }
    let pointer = match doc["kind"].as_str() {
        Some("Pod") => "",
        Some("CronJob") => "/spec/jobTemplate/spec/template",
        Some("Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job") => "/spec/template",
        _ => return Vec::new(),
    };
    doc.pointer(pointer).cloned().into_iter().collect()
}

fn sidecar_of(template: &Value) -> Option<(Value, bool)> {
    let spec = &template["spec"];
    let find = |list: &Value| {
        list.as_array()
            .and_then(|l| l.iter().find(|c| c["name"] == "outrider").cloned())
    };
    find(&spec["initContainers"])
        .map(|c| (c, true))
        .or_else(|| find(&spec["containers"]).map(|c| (c, false)))
}

fn env(container: &Value, name: &str) -> Option<Value> {
    container["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)
        .cloned()
}

/// Every injected template in the golden outputs has what §7 and the issue ask for.
#[test]
fn injected_templates_have_the_promised_shape() {
    let mut injected = 0;
    for (case, _) in cases() {
        let out = std::fs::read_to_string(golden_dir().join(format!("{case}.out.yaml")))
            .expect("golden output (run with UPDATE_GOLDEN=1 once)");
        for template in docs(&out).iter().flat_map(templates) {
            let annotations = &template["metadata"]["annotations"];
            if annotations["outrider.io/injected"] != "true" {
                continue;
            }
            injected += 1;
            let (sidecar, native) = sidecar_of(&template).expect("sidecar container");
            let legacy_case = case.starts_with("legacy-") || case == "version-annotation";
            assert_eq!(native, !legacy_case, "{case}: native sidecar?");
            let spec = &template["spec"];
            if native {
                assert_eq!(sidecar["restartPolicy"], "Always", "{case}");
                assert_eq!(
                    spec["initContainers"][0]["name"], "outrider",
                    "{case}: first"
                );
                assert!(sidecar.get("lifecycle").is_none(), "{case}");
            } else {
                assert_eq!(spec["containers"][0]["name"], "outrider", "{case}: first");
                let hook = &sidecar["lifecycle"]["postStart"]["exec"]["command"];
                assert_eq!(hook[1], "await", "{case}");
                assert!(sidecar.get("restartPolicy").is_none(), "{case}");
            }
            assert_eq!(
                sidecar["startupProbe"]["httpGet"]["path"], "/ready",
                "{case}"
            );
            assert_eq!(
                sidecar["readinessProbe"]["httpGet"]["path"], "/ready",
                "{case}"
            );
            assert_eq!(
                sidecar["livenessProbe"]["httpGet"]["path"], "/live",
                "{case}"
            );
            assert_eq!(sidecar["startupProbe"]["httpGet"]["port"], 7191, "{case}");
            let sc = &sidecar["securityContext"];
            assert_eq!(sc["runAsNonRoot"], true, "{case}");
            assert_eq!(sc["runAsUser"], 2102, "{case}");
            assert_eq!(sc["readOnlyRootFilesystem"], true, "{case}");
            assert_eq!(sc["allowPrivilegeEscalation"], false, "{case}");
            assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]), "{case}");
            assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault", "{case}");
            let ports: Vec<_> = sidecar["ports"]
                .as_array()
                .expect("ports")
                .iter()
                .map(|p| (p["name"].clone(), p["containerPort"].clone()))
                .collect();
            assert_eq!(
                ports,
                [
                    (json!("outrider-in"), json!(7143)),
                    (json!("outrider-admin"), json!(7191))
                ],
                "{case}"
            );
            // Identity Secret, read-only.
            let service = env(&sidecar, "OUTRIDER_SERVICE").expect("OUTRIDER_SERVICE")["value"]
                .as_str()
                .expect("service")
                .to_string();
            let volumes = spec["volumes"].as_array().expect("volumes");
            let identity = volumes
                .iter()
                .find(|v| v["name"] == "outrider-identity")
                .expect("identity volume");
            assert_eq!(
                identity["secret"]["secretName"],
                format!("outrider-identity-{service}"),
                "{case}"
            );
            let mounts = sidecar["volumeMounts"].as_array().expect("mounts");
            assert!(
                mounts
                    .iter()
                    .any(|m| m["name"] == "outrider-identity" && m["readOnly"] == true),
                "{case}"
            );
            // Config from the ConfigMap, when named.
            match annotations.get("outrider.io/config") {
                Some(name) => {
                    assert!(
                        volumes.iter().any(|v| v["configMap"]["name"] == *name),
                        "{case}"
                    );
                    assert_eq!(
                        sidecar["args"],
                        json!(["run", "-c", "/etc/outrider/config.yaml"])
                    );
                }
                None => assert_eq!(sidecar["args"], json!(["run", "-c", "/dev/null"])),
            }
            match annotations.get("outrider.io/env-secret") {
                Some(name) => assert_eq!(sidecar["envFrom"][0]["secretRef"]["name"], *name),
                None => assert!(sidecar.get("envFrom").is_none(), "{case}"),
            }
            // Downward API and settings.
            for name in ["POD_NAME", "POD_NAMESPACE", "POD_IP", "OUTRIDER_NAMESPACE"] {
                let var = env(&sidecar, name).unwrap_or_else(|| panic!("{case}: {name}"));
                assert!(
                    var["valueFrom"]["fieldRef"]["fieldPath"].is_string(),
                    "{case}"
                );
            }
            let port = annotations["outrider.io/app-port"].as_str().expect("port");
            assert_eq!(
                env(&sidecar, "OUTRIDER_APP").expect("app")["value"],
                format!("127.0.0.1:{port}")
            );
            for (name, file) in [
                ("OUTRIDER_TLS_CA", "ca.crt"),
                ("OUTRIDER_TLS_CERT", "tls.crt"),
                ("OUTRIDER_TLS_KEY", "tls.key"),
            ] {
                assert_eq!(
                    env(&sidecar, name).expect("tls env")["value"],
                    format!("/var/run/outrider/identity/{file}")
                );
            }
            // Every app container reaches other services through the sidecar.
            for app in spec["containers"].as_array().expect("containers") {
                if app["name"] == "outrider" {
                    continue;
                }
                assert!(env(app, "HTTP_PROXY").is_some(), "{case}: {}", app["name"]);
                assert!(env(app, "NO_PROXY").is_some(), "{case}: {}", app["name"]);
            }
        }
    }
    assert!(
        injected >= 12,
        "only {injected} injected templates in the golden outputs"
    );
}

/// Running the CLI over its own output changes nothing, for every case.
#[test]
fn the_cli_is_idempotent() {
    for (case, _) in cases() {
        let out = std::fs::read_to_string(golden_dir().join(format!("{case}.out.yaml")))
            .expect("golden output");
        let args = case_args(&case);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let again = inject(&out, &args);
        assert!(again.status.success(), "{case}");
        assert_eq!(
            text(&again.stdout),
            out,
            "{case}: second run changed the output"
        );
        assert!(
            !text(&again.stderr).contains(": injected"),
            "{case}: injected again:\n{}",
            text(&again.stderr)
        );
    }
}

#[test]
fn reads_a_file_and_stdin_alike() {
    let path = golden_dir().join("pod.yaml");
    let from_file = outrider()
        .args(["inject", "--image", IMAGE, "-f"])
        .arg(&path)
        .env_remove("OUTRIDER_K8S_VERSION")
        .output()
        .expect("run");
    let from_stdin = inject(
        &std::fs::read_to_string(&path).expect("input"),
        &["-f", "-"],
    );
    assert!(from_file.status.success());
    assert_eq!(from_file.stdout, from_stdin.stdout);
    assert!(!from_file.stdout.is_empty());
}

#[test]
fn invalid_input_exits_1_with_one_line() {
    let cases = [
        ("kind: [", "not valid YAML"),
        ("just a string\n", "not a Kubernetes object"),
        (
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\nspec:\n  template:\n    spec: {containers: [{name: 3}]}\n",
            "deployment/d",
        ),
        (
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p, annotations: {outrider.io/app-port: 8080}}\nspec: {containers: []}\n",
            "pod/p",
        ),
    ];
    for (input, want) in cases {
        let output = inject(input, &[]);
        let stderr = text(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{input:?}: {stderr}");
        assert!(output.stdout.is_empty(), "{input:?}");
        assert_eq!(stderr.lines().count(), 1, "{input:?}: {stderr}");
        assert!(stderr.contains(want), "{input:?}: {stderr}");
    }
    let missing = outrider()
        .args(["inject", "-f", "/nonexistent/x.yaml"])
        .output()
        .expect("run");
    assert_eq!(missing.status.code(), Some(1));
    let bad_flag = inject("", &["--k8s-version", "one"]);
    assert_eq!(bad_flag.status.code(), Some(1));
}

// ---------------------------------------------------------------------------------------------
// The webhook over HTTPS.

struct Injector {
    child: Child,
    addr: SocketAddr,
    client: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Drop for Injector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const WEBHOOK_HOST: &str = "outrider-injector.outrider-system.svc";

fn certs(dir: &Path) -> (PathBuf, PathBuf, Vec<u8>) {
    let ca = dir.join("ca");
    let run = |args: &[&str]| {
        let out = outrider().args(args).output().expect("outrider certs");
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
    };
    run(&["certs", "ca", "--out", ca.to_str().expect("path")]);
    let out = dir.join("tls");
    run(&[
        "certs",
        "issue",
        "--ca",
        ca.to_str().expect("path"),
        "--service",
        "outrider-injector",
        "--namespace",
        "outrider-system",
        "--out",
        out.to_str().expect("path"),
    ]);
    let ca_pem = std::fs::read(ca.join("ca.pem")).expect("ca.pem");
    (
        out.join("outrider-injector.pem"),
        out.join("outrider-injector-key.pem"),
        ca_pem,
    )
}

async fn start_injector(extra: &[&str]) -> Injector {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key, ca_pem) = certs(dir.path());
    let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let child = outrider()
        .args(["injector", "--listen", &addr.to_string(), "--image", IMAGE])
        .arg("--tls-cert")
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key)
        .args(extra)
        .env_remove("OUTRIDER_K8S_VERSION")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn injector");

    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::pem::PemObject::pem_slice_iter(&ca_pem) {
        roots.add(cert.expect("ca cert")).expect("root");
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("tls versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let client = reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .resolve(WEBHOOK_HOST, addr)
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client");
    let injector = Injector {
        child,
        addr,
        client,
        _dir: dir,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = injector.client.get(injector.url("/healthz")).send().await
            && r.status() == 200
        {
            return injector;
        }
        assert!(Instant::now() < deadline, "injector did not come up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl Injector {
    fn url(&self, path: &str) -> String {
        format!("https://{WEBHOOK_HOST}:{}{path}", self.addr.port())
    }

    async fn post(&self, body: impl Into<reqwest::Body>) -> (u16, String) {
        let response = self
            .client
            .post(self.url("/inject"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("POST /inject");
        let status = response.status().as_u16();
        (status, response.text().await.expect("body"))
    }

    async fn review(&self, review: &Value) -> Value {
        let (status, body) = self.post(review.to_string()).await;
        assert_eq!(status, 200, "{body}");
        let answer: Value = serde_json::from_str(&body).expect("JSON answer");
        assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(answer["kind"], "AdmissionReview");
        assert_eq!(answer["response"]["uid"], review["request"]["uid"]);
        assert_eq!(answer["response"]["allowed"], true);
        answer["response"].clone()
    }
}

fn admission_review(uid: &str, object: &Value) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "demo",
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": object,
            "oldObject": null,
            "dryRun": false,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        }
    })
}

/// Decodes the base64 patch of a response and applies it to `object`.
fn apply(response: &Value, object: &Value) -> Value {
    assert_eq!(response["patchType"], "JSONPatch");
    let encoded = response["patch"]
        .as_str()
        .expect("patch is a base64 string");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .expect("base64");
    let patch: json_patch::Patch = serde_json::from_slice(&bytes).expect("a JSON Patch");
    let mut patched = object.clone();
    json_patch::patch(&mut patched, &patch).expect("the patch applies");
    patched
}

fn fixture(name: &str) -> Value {
    let path = golden_dir().join("admission").join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).expect("fixture")).expect("JSON fixture")
}

/// For each Pod in the golden cases, the webhook's patch gives exactly the CLI's output, and a
/// second review of the patched pod (reinvocation) gives no patch.
#[tokio::test]
async fn webhook_and_cli_agree_on_the_same_pod() {
    let injector = start_injector(&[]).await;
    let mut compared = 0;
    for case in [
        "pod",
        "legacy-annotation-pod",
        "misconfigured",
        "already-injected",
    ] {
        let path = golden_dir().join(format!("{case}.yaml"));
        let Ok(input) = std::fs::read_to_string(&path) else {
            continue;
        };
        let cli_out = inject(&input, &[]);
        assert!(cli_out.status.success());
        let expected = docs(&text(&cli_out.stdout));
        for (index, pod) in docs(&input).into_iter().enumerate() {
            let uid = format!("{case}-{index}");
            let response = injector.review(&admission_review(&uid, &pod)).await;
            let result = if response.get("patch").is_some() {
                apply(&response, &pod)
            } else {
                assert!(
                    response.get("patchType").is_none(),
                    "{uid}: patchType without patch"
                );
                pod.clone()
            };
            assert_eq!(result, expected[index], "{uid}: webhook and CLI differ");
            compared += 1;

            let again = injector.review(&admission_review(&uid, &result)).await;
            assert!(
                again.get("patch").is_none(),
                "{uid}: reinvocation patched again"
            );
        }
    }
    assert!(compared >= 5, "compared {compared} pods");
}

#[tokio::test]
async fn webhook_fixtures() {
    let injector = start_injector(&["--k8s-version", "1.28"]).await;

    // A Deployment's pod: only generateName, service from the app label; pre-1.29 mode.
    let review = fixture("replicaset-pod.json");
    let object = review["request"]["object"].clone();
    let response = injector.review(&review).await;
    let patched = apply(&response, &object);
    assert_eq!(patched["spec"]["containers"][0]["name"], "outrider");
    assert_eq!(patched["spec"]["containers"][1]["name"], "app");
    assert!(patched["spec"].get("initContainers").is_none());
    let sidecar = &patched["spec"]["containers"][0];
    assert_eq!(
        env(sidecar, "OUTRIDER_SERVICE").expect("service")["value"],
        "submission-service"
    );
    // The same pod through the CLI with the same flag.
    let yaml = serde_saphyr::to_string(&object).expect("yaml");
    let cli = inject(&yaml, &["--k8s-version", "1.28"]);
    assert_eq!(docs(&text(&cli.stdout))[0], patched);

    // Not a Pod, not a CREATE, kube-system, dry run: allowed, and only the dry run is patched.
    for (name, patched) in [
        ("service.json", false),
        ("pod-update.json", false),
        ("kube-system-pod.json", false),
        ("dry-run-pod.json", true),
    ] {
        let response = injector.review(&fixture(name)).await;
        assert_eq!(response.get("patch").is_some(), patched, "{name}");
        assert_eq!(response.get("patchType").is_some(), patched, "{name}");
    }

    // Opted in but misconfigured: allowed, no patch, and a warning for kubectl.
    let response = injector.review(&fixture("no-app-port-pod.json")).await;
    assert!(response.get("patch").is_none());
    let warning = response["warnings"][0].as_str().expect("a warning");
    assert!(warning.contains("outrider.io/app-port"), "{warning}");
}

#[tokio::test]
async fn malformed_reviews_get_400_and_other_routes_404() {
    let injector = start_injector(&[]).await;
    for body in [
        "not json".to_string(),
        "{}".to_string(),
        json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}).to_string(),
        json!({"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview",
               "request": fixture("dry-run-pod.json")["request"]})
        .to_string(),
        fixture("malformed-pod.json").to_string(),
    ] {
        let (status, reason) = injector.post(body.clone()).await;
        assert_eq!(status, 400, "{body}: {reason}");
        assert!(!reason.is_empty());
    }
    let missing = injector
        .client
        .get(injector.url("/other"))
        .send()
        .await
        .expect("GET");
    assert_eq!(missing.status(), 404);
    let wrong_method = injector
        .client
        .get(injector.url("/inject"))
        .send()
        .await
        .expect("GET");
    assert_eq!(wrong_method.status(), 405);
}

#[test]
fn injector_refuses_a_missing_certificate() {
    let out = outrider()
        .args([
            "injector",
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            "/nonexistent/cert.pem",
            "--tls-key",
            "/nonexistent/key.pem",
        ])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("/nonexistent/cert.pem"));
}

#[test]
fn await_times_out_when_nothing_is_ready() {
    let port = free_port();
    let started = Instant::now();
    let out = outrider()
        .args([
            "await",
            "--admin",
            &format!("127.0.0.1:{port}"),
            "--timeout-seconds",
            "1",
        ])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("not ready"));
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn await_returns_once_ready() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = std::thread::spawn(move || {
        use std::io::Read;
        // First a 503, then a 200: await keeps polling through the 503.
        for status in ["503 Service Unavailable", "200 OK"] {
            let (mut stream, _) = listener.accept().expect("accept");
            let mut buf = [0u8; 256];
            let _ = stream.read(&mut buf);
            let _ = write!(stream, "HTTP/1.0 {status}\r\ncontent-length: 0\r\n\r\n");
        }
    });
    let out = outrider()
        .args([
            "await",
            "--admin",
            &addr.to_string(),
            "--timeout-seconds",
            "10",
        ])
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", text(&out.stderr));
    server.join().expect("server");
}

// ---------------------------------------------------------------------------------------------
// Schema validation of the golden outputs (deploy/validate.sh does the same, and deploy/).

fn kubernetes_validate() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("KUBERNETES_VALIDATE") {
        return Some(path.into());
    }
    let home_venv = std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".cache/outrider/venv/bin/kubernetes-validate"));
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("kubernetes-validate"))
            .find(|p| p.is_file())
    });
    on_path.or(home_venv.filter(|p| p.is_file()))
}

#[test]
fn golden_outputs_pass_kubernetes_validate() {
    let Some(tool) = kubernetes_validate() else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "kubernetes-validate is missing in CI: run deploy/validate.sh (it installs it)"
        );
        eprintln!("skipped: kubernetes-validate not installed (deploy/validate.sh installs it)");
        return;
    };
    let validate = |version: &str, files: &[PathBuf]| {
        Command::new(&tool)
            .args(["--strict", "--quiet", "-k", version])
            .args(files)
            .output()
            .expect("kubernetes-validate")
    };
    let mut all = Vec::new();
    let mut pre_1_29 = Vec::new();
    for (case, _) in cases() {
        let path = golden_dir().join(format!("{case}.out.yaml"));
        let content = std::fs::read_to_string(&path).expect("golden");
        if !content.contains("restartPolicy: Always") {
            pre_1_29.push(path.clone());
        }
        all.push(path);
    }
    for version in ["1.29.0", "1.33.0"] {
        let out = validate(version, &all);
        assert!(
            out.status.success(),
            "{version}: {}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
    }
    assert!(pre_1_29.len() >= 3, "{pre_1_29:?}");
    for version in ["1.27.0", "1.28.0"] {
        let out = validate(version, &pre_1_29);
        assert!(
            out.status.success(),
            "{version}: {}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
    }
    // The check can fail: a native sidecar is not valid before 1.28.
    let native = validate("1.27.0", &[golden_dir().join("deployment.out.yaml")]);
    assert!(!native.status.success(), "1.27 accepted a native sidecar");
}

// ---------------------------------------------------------------------------------------------
// The injected container really starts: the real sidecar, run with exactly the args and
// environment the injection wrote (paths and ports moved to a temp dir and free ports).

/// The sidecar container and its pod's ConfigMap text (if any), from a golden output.
fn injected_sidecar(case: &str, configmap: Option<&str>) -> (Value, Option<String>) {
    let out = std::fs::read_to_string(golden_dir().join(format!("{case}.out.yaml")))
        .expect("golden output");
    let docs = docs(&out);
    let template = docs
        .iter()
        .flat_map(templates)
        .find(|t| t["metadata"]["annotations"]["outrider.io/injected"] == "true")
        .expect("an injected template");
    let (sidecar, _) = sidecar_of(&template).expect("sidecar");
    let config = configmap.and_then(|name| {
        docs.iter()
            .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == name)
            .and_then(|d| d["data"]["config.yaml"].as_str().map(str::to_string))
    });
    (sidecar, config)
}

fn http_get(addr: SocketAddr, path: &str) -> String {
    use std::io::Read;
    let mut stream = std::net::TcpStream::connect(addr).expect("connect admin");
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").expect("write");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("read");
    answer
}

fn run_injected_sidecar(case: &str, configmap: Option<&str>) -> String {
    let (sidecar, config) = injected_sidecar(case, configmap);
    let dir = tempfile::tempdir().expect("tempdir");
    let identity = dir.path().join("identity");
    let config_dir = dir.path().join("config");
    std::fs::create_dir_all(&config_dir).expect("config dir");
    if let Some(config) = &config {
        std::fs::write(config_dir.join("config.yaml"), config).expect("config");
    }
    let service = env(&sidecar, "OUTRIDER_SERVICE").expect("service")["value"]
        .as_str()
        .expect("service")
        .to_string();
    // The Secret's layout, as mint-certs.sh writes it.
    let (cert, key, ca_pem) = {
        let ca = dir.path().join("ca");
        let run = |args: &[&str]| {
            let out = outrider().args(args).output().expect("outrider certs");
            assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
        };
        run(&["certs", "ca", "--out", ca.to_str().expect("path")]);
        let issued = dir.path().join("issued");
        run(&[
            "certs",
            "issue",
            "--ca",
            ca.to_str().expect("path"),
            "--service",
            &service,
            "--namespace",
            "demo",
            "--out",
            issued.to_str().expect("path"),
        ]);
        (
            issued.join(format!("{service}.pem")),
            issued.join(format!("{service}-key.pem")),
            ca.join("ca.pem"),
        )
    };
    std::fs::create_dir_all(&identity).expect("identity dir");
    std::fs::copy(ca_pem, identity.join("ca.crt")).expect("ca.crt");
    std::fs::copy(cert, identity.join("tls.crt")).expect("tls.crt");
    std::fs::copy(key, identity.join("tls.key")).expect("tls.key");

    let names = [
        "OUTRIDER_LISTEN_OUTBOUND",
        "OUTRIDER_LISTEN_INBOUND",
        "OUTRIDER_LISTEN_ADMIN",
    ];
    let listen: std::collections::HashMap<_, _> =
        names.into_iter().zip(free_addrs::<3>()).collect();
    let admin = listen["OUTRIDER_LISTEN_ADMIN"];
    let mut command = outrider();
    let moved = |s: &str| {
        s.replace(
            "/var/run/outrider/identity",
            identity.to_str().expect("path"),
        )
        .replace("/etc/outrider", config_dir.to_str().expect("path"))
    };
    for arg in sidecar["args"].as_array().expect("args") {
        command.arg(moved(arg.as_str().expect("arg")));
    }
    command
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default());
    for var in sidecar["env"].as_array().expect("env") {
        let name = var["name"].as_str().expect("name");
        let value = match (&var["value"], listen.get(name)) {
            (_, Some(addr)) => addr.to_string(),
            (Value::String(v), None) => moved(v),
            _ => match var["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                Some("metadata.namespace") => "demo".into(),
                Some("status.podIP") => "127.0.0.1".into(),
                _ => "pod-0".into(),
            },
        };
        command.env(name, value);
    }
    let mut child = command
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sidecar");
    // What the pre-1.29 postStart hook runs; in native mode the startupProbe asks the same.
    let waited = outrider()
        .args([
            "await",
            "--admin",
            &admin.to_string(),
            "--timeout-seconds",
            "30",
        ])
        .output()
        .expect("await");
    let config_json = if waited.status.success() {
        http_get(admin, "/config")
    } else {
        String::new()
    };
    let _ = child.kill();
    let output = child.wait_with_output().expect("sidecar output");
    assert!(
        waited.status.success(),
        "{case}: the injected sidecar never became ready: {}\nsidecar log:\n{}",
        text(&waited.stderr),
        text(&output.stderr)
    );
    assert!(config_json.starts_with("HTTP/1.0 200") || config_json.starts_with("HTTP/1.1 200"));
    assert!(
        config_json.contains(&format!("\"service\":\"{service}\"")),
        "{config_json}"
    );
    assert!(
        config_json.contains("\"namespace\":\"demo\""),
        "{config_json}"
    );
    config_json
}

#[test]
fn the_injected_sidecar_starts_from_its_environment_alone() {
    let config = run_injected_sidecar("replicaset", None);
    assert!(config.contains("\"app\":\"127.0.0.1:6380\""), "{config}");
}

#[test]
fn the_injected_sidecar_starts_with_its_configmap() {
    let config = run_injected_sidecar("multi-document", Some("course-service-outrider"));
    assert!(
        config.contains("{service}.{namespace}.svc.cluster.local:7143"),
        "the ConfigMap's default_dns is in force: {config}"
    );
}
