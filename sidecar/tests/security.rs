//! Security end to end (issue 3): caller authorization, certificate and CA rotation without
//! restarts, non-mesh upstreams, and the hardened surface (TLS 1.3 only, handshake timeout,
//! loopback-only `/shutdown`, no secrets in logs, `/config` or error bodies). Real `outrider`
//! processes, real TLS handshakes. Refused client certificates (none, other CA, expired, not yet
//! valid, no SPIFFE SAN, other trust domain) and plaintext/garbage on the inbound port are in
//! `proxy.rs`.

mod support;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use outrider::pb::echo::EchoRequest;
use outrider::pb::echo::echo_client::EchoClient;
use support::{
    BIN, Pair, Pki, Ports, SecretDir, Sidecar, apps, cert_not_after, cert_serial, client,
    eventually, pem_leaf, tls_probe,
};

const WEB_ID: &str = "spiffe://mesh.local/ns/default/sa/web";
const TLS13: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

/// A caller sidecar `service` (in `namespace`) whose only upstream is `user-service` at `addr`.
fn caller(pki: &Pki, service: &str, namespace: &str, upstream: SocketAddr) -> Sidecar {
    let (cert, key) = pki.issue_in(service, namespace);
    Sidecar::start(&format!(
        "service: {service}\nnamespace: {namespace}\napp: 127.0.0.1:9\n\
         tls: {{ ca: {}, cert: {}, key: {} }}\n\
         discovery:\n  services:\n    user-service: {{ endpoints: [\"{upstream}\"], \
         identity: \"spiffe://mesh.local/ns/default/sa/user-service\" }}\n",
        pki.ca().display(),
        cert.display(),
        key.display()
    ))
}

/// One HTTP/1.1 exchange written by hand (no client library normalizing the path); returns the
/// whole response text.
async fn raw_http(addr: SocketAddr, request: String) -> String {
    tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        s.write_all(request.as_bytes()).expect("write");
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).to_string()
    })
    .await
    .expect("join")
}

async fn get_via(
    sidecar: &Sidecar,
    method: reqwest::Method,
    path: &str,
) -> (u16, reqwest::header::HeaderMap, String) {
    let r = client()
        .request(method, format!("{}{path}", sidecar.outbound_url()))
        .header("host", "user-service")
        .send()
        .await
        .expect("request");
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, headers, r.text().await.expect("body"))
}

fn metric(sidecar: &Sidecar, series: &str) -> f64 {
    sidecar.metric(series).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread")]
async fn authorization_by_caller_identity_path_and_method() {
    let pki = Pki::new();
    let app = apps::http_app("users").await;
    let callee = Sidecar::start(&format!(
        "service: user-service\napp: {}\n{}inbound:\n  authorize:\n\
         \x20   - {{ from: [web], path_prefix: /echo }}\n\
         \x20   - {{ from: [\"spiffe://mesh.local/ns/ops/sa/prober\"], methods: [GET] }}\n",
        app.addr,
        pki.tls_yaml("user-service")
    ));
    let inbound = callee.ports.inbound;
    let web = caller(&pki, "web", "default", inbound);
    let intruder = caller(&pki, "intruder", "default", inbound);
    // Same name as an allowed full ID but another namespace: only the exact ID is allowed.
    let prober = caller(&pki, "prober", "ops", inbound);
    let wrong_ns_prober = caller(&pki, "prober", "default", inbound);

    // Allowed: web under /echo, any method; the app learns who called.
    let (status, _, body) = get_via(&web, reqwest::Method::GET, "/echo/a").await;
    assert_eq!(status, 200, "{body}");
    let seen: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(seen["headers"]["x-outrider-peer"], WEB_ID);
    let (status, _, _) = get_via(&web, reqwest::Method::POST, "/echo").await;
    assert_eq!(status, 200);
    // The full-SPIFFE-ID rule allows GET anywhere, nothing else.
    let (status, _, body) = get_via(&prober, reqwest::Method::GET, "/hello").await;
    assert_eq!((status, body.as_str()), (200, "hello from users"));
    let (status, _, _) = get_via(&prober, reqwest::Method::GET, "/echo").await;
    assert_eq!(status, 200);
    let allowed = 4;
    assert_eq!(app.hits(), allowed);

    // Denied: 403, kind `forbidden`, and the app never sees the request.
    let mut denied = Vec::new();
    for (who, sidecar, method, path) in [
        ("intruder", &intruder, reqwest::Method::GET, "/echo"),
        ("web", &web, reqwest::Method::GET, "/hello"),
        ("prober", &prober, reqwest::Method::POST, "/echo"),
        ("prober", &wrong_ns_prober, reqwest::Method::GET, "/hello"),
    ] {
        let (status, headers, body) = get_via(sidecar, method.clone(), path).await;
        assert_eq!(status, 403, "{who} {method} {path}: {body}");
        assert_eq!(headers["x-outrider-error"], "forbidden");
        let body: serde_json::Value = serde_json::from_str(&body).expect("json body");
        assert_eq!(body["kind"], "forbidden");
        denied.push(who);
    }
    // Paths that an app may normalize out of the allowed prefix never match it.
    for sneaky in ["/echo/../hello", "/echo/%2e%2e/hello", "/echo/..%2fhello"] {
        let text = raw_http(
            web.ports.outbound,
            format!("GET {sneaky} HTTP/1.1\r\nHost: user-service\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert!(text.starts_with("HTTP/1.1 403"), "{sneaky}: {text}");
        assert!(text.contains("\"kind\":\"forbidden\""), "{text}");
    }
    assert_eq!(app.hits(), allowed, "no denied request reached the app");

    for (service, count) in [("intruder", 1.0), ("web", 4.0), ("prober", 2.0)] {
        assert_eq!(
            metric(
                &callee,
                &format!(r#"outrider_authz_denied_total{{service="{service}"}}"#)
            ),
            count,
            "{service}: {}",
            callee.metrics()
        );
    }
    assert_eq!(
        metric(
            &callee,
            r#"outrider_requests_total{code="403",direction="inbound",service="web"}"#
        ),
        4.0
    );
    assert!(
        callee
            .logs()
            .contains("request denied by inbound.authorize")
    );
}

async fn grpc_status<T>(
    result: Result<tonic::Response<tonic::Streaming<T>>, tonic::Status>,
) -> Result<usize, tonic::Status> {
    let mut stream = result?.into_inner();
    let mut n = 0;
    while let Some(item) = stream.next().await {
        item?;
        n += 1;
    }
    Ok(n)
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_caller_gets_permission_denied_and_star_allows_any_peer() {
    let pki = Pki::new();
    let grpc = apps::grpc_app().await;
    let pair = Pair::start(
        &pki,
        "echo-service",
        grpc,
        "",
        "inbound:\n  authorize:\n\
         \x20   - { from: [web], path_prefix: /echo.v1.Echo/ }\n\
         \x20   - { from: [\"*\"], path_prefix: /echo.v1.Echo/Unary }\n",
    );
    let intruder = Sidecar::start(&format!(
        "service: intruder\napp: 127.0.0.1:9\n{}discovery:\n  services:\n    echo-service: {{ endpoints: [\"{}\"] }}\n",
        pki.tls_yaml("intruder"),
        pair.callee.ports.inbound
    ));
    let connect = |sidecar: &Sidecar| {
        let url = sidecar.outbound_url();
        async move {
            let channel = tonic::transport::Endpoint::from_shared(url)
                .expect("endpoint")
                .origin("http://echo-service".parse().expect("origin"))
                .connect()
                .await
                .expect("connect");
            EchoClient::new(channel)
        }
    };
    let request = || EchoRequest {
        message: "hi".into(),
        count: 2,
        ..Default::default()
    };

    let mut web = connect(&pair.caller).await;
    let reply = web.unary(request()).await.expect("web unary");
    assert_eq!(reply.get_ref().peer, WEB_ID);
    assert_eq!(
        grpc_status(web.server_stream(request()).await)
            .await
            .expect("web stream"),
        2
    );

    let mut other = connect(&intruder).await;
    let reply = other
        .unary(request())
        .await
        .expect("`*` allows any mesh peer");
    assert_eq!(
        reply.get_ref().peer,
        "spiffe://mesh.local/ns/default/sa/intruder"
    );
    // Denied before the app: HTTP 200, `x-outrider-error` in the headers, PERMISSION_DENIED in
    // the trailers (tonic hands a streaming call's headers over before its status).
    let status = match other.server_stream(request()).await {
        Ok(response) => {
            assert_eq!(
                response.metadata().get("x-outrider-error").expect("kind"),
                "forbidden"
            );
            grpc_status(Ok(response)).await.expect_err("not allowed")
        }
        Err(status) => {
            assert_eq!(
                status.metadata().get("x-outrider-error").expect("kind"),
                "forbidden"
            );
            status
        }
    };
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert_eq!(
        metric(
            &pair.callee,
            r#"outrider_authz_denied_total{service="intruder"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(
            &pair.callee,
            r#"outrider_authz_denied_total{service="web"}"#
        ),
        0.0
    );
}

/// The `tls:` block for files in a secret volume named ca.pem, tls.crt, tls.key.
fn secret_tls_yaml(secret: &SecretDir, extra: &str) -> String {
    format!(
        "tls: {{ ca: {}, cert: {}, key: {}{extra} }}\n",
        secret.path("ca.pem").display(),
        secret.path("tls.crt").display(),
        secret.path("tls.key").display()
    )
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).expect("read")
}

/// Issues a workload certificate valid for `days` into a directory of its own.
fn issue(pki: &Pki, service: &str, days: u32) -> (PathBuf, PathBuf) {
    let out = pki.path().join(format!("issued-{service}-{days}"));
    let paths = outrider::tls::certs::issue(&pki.path().join("ca"), service, "default", days, &out)
        .expect("issue");
    (paths[0].clone(), paths[1].clone())
}

fn secret_files(ca: Vec<u8>, cert: &Path, key: &Path) -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("ca.pem", ca),
        ("tls.crt", read(cert)),
        ("tls.key", read(key)),
    ]
}

async fn presented_serial(addr: SocketAddr, client: (&Path, &Path)) -> Result<Vec<u8>, String> {
    tls_probe(addr, Some(client), TLS13)
        .await
        .map(|p| p.serial())
}

#[tokio::test(flavor = "multi_thread")]
async fn rotated_cert_by_symlink_swap_is_served_without_restart() {
    let pki = Pki::new();
    let app = apps::http_app("users").await;
    let (probe_cert, probe_key) = pki.issue("probe");
    let probe = (probe_cert.as_path(), probe_key.as_path());
    let (cert1, key1) = issue(&pki, "user-service", 30);
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut secret = SecretDir::new(
        &tmp.path().join("secret"),
        &secret_files(read(&pki.ca()), &cert1, &key1),
    );
    let mut callee = Sidecar::start(&format!(
        "service: user-service\napp: {}\n{}",
        app.addr,
        secret_tls_yaml(&secret, "")
    ));
    let web = caller(&pki, "web", "default", callee.ports.inbound);
    let pid = callee.pid();
    let leaf1 = pem_leaf(&cert1);
    assert_eq!(
        presented_serial(callee.ports.inbound, probe).await,
        Ok(cert_serial(&leaf1))
    );
    assert_eq!(
        metric(&callee, "outrider_cert_expiry_timestamp_seconds"),
        cert_not_after(&leaf1) as f64
    );

    let (cert2, key2) = issue(&pki, "user-service", 20);
    let leaf2 = pem_leaf(&cert2);
    assert_ne!(cert_serial(&leaf1), cert_serial(&leaf2));
    secret.update(&secret_files(read(&pki.ca()), &cert2, &key2));

    let mut served = None;
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        served = presented_serial(callee.ports.inbound, probe).await.ok();
        if served.as_deref() == Some(&cert_serial(&leaf2)[..]) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        served,
        Some(cert_serial(&leaf2)),
        "new connections get the new certificate; log:\n{}",
        callee.logs()
    );
    assert_eq!(callee.pid(), pid);
    assert!(
        callee.child.try_wait().expect("status").is_none(),
        "still the same process"
    );
    assert_eq!(
        metric(&callee, r#"outrider_cert_reloads_total{result="ok"}"#),
        1.0
    );
    assert_eq!(
        metric(&callee, "outrider_cert_expiry_timestamp_seconds"),
        cert_not_after(&leaf2) as f64
    );
    assert!(callee.logs().contains("new certificate material in use"));
    let (status, _, _) = get_via(&web, reqwest::Method::GET, "/hello").await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_rereads_certificates_the_watch_cannot_see() {
    let pki = Pki::new();
    let (probe_cert, probe_key) = pki.issue("probe");
    let probe = (probe_cert.as_path(), probe_key.as_path());
    // tls.crt and tls.key are symlinks into a directory the sidecar does not watch: a write
    // there raises no event in the watched directory.
    let tmp = tempfile::tempdir().expect("tempdir");
    let (watched, real) = (tmp.path().join("watched"), tmp.path().join("real"));
    std::fs::create_dir_all(&watched).expect("dir");
    std::fs::create_dir_all(&real).expect("dir");
    let (cert1, key1) = issue(&pki, "user-service", 30);
    std::fs::copy(&cert1, real.join("tls.crt")).expect("copy");
    std::fs::copy(&key1, real.join("tls.key")).expect("copy");
    for name in ["tls.crt", "tls.key"] {
        std::os::unix::fs::symlink(real.join(name), watched.join(name)).expect("link");
    }
    let sidecar = Sidecar::start(&format!(
        "service: user-service\napp: 127.0.0.1:9\ntls: {{ ca: {}, cert: {}, key: {} }}\n",
        pki.ca().display(),
        watched.join("tls.crt").display(),
        watched.join("tls.key").display()
    ));
    let (cert2, key2) = issue(&pki, "user-service", 20);
    std::fs::copy(&key2, real.join("tls.key")).expect("copy");
    std::fs::copy(&cert2, real.join("tls.crt")).expect("copy");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let serial1 = cert_serial(&pem_leaf(&cert1));
    let serial2 = cert_serial(&pem_leaf(&cert2));
    assert_eq!(
        presented_serial(sidecar.ports.inbound, probe).await,
        Ok(serial1),
        "not seen without a signal"
    );
    let pid = sidecar.pid();
    sidecar.signal("HUP");
    let served = eventually(Duration::from_secs(5), || {
        (metric(&sidecar, r#"outrider_cert_reloads_total{result="ok"}"#) == 1.0).then_some(())
    })
    .await;
    assert!(served.is_some(), "{}", sidecar.logs());
    assert_eq!(
        presented_serial(sidecar.ports.inbound, probe).await,
        Ok(serial2)
    );
    assert_eq!(sidecar.pid(), pid);
}

/// Requests through `caller` until `stop`: each round a WebSocket echo (an upgrade gets a
/// connection of its own, so every round is a fresh mTLS handshake between the sidecars) and a
/// pooled GET. Returns (rounds, failures).
async fn traffic(outbound: SocketAddr, stop: Arc<AtomicBool>) -> (usize, Vec<String>) {
    use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};
    let mut rounds = 0;
    let mut failures = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        let mut req = format!("ws://{outbound}/ws")
            .into_client_request()
            .expect("request");
        req.headers_mut()
            .insert("host", "user-service".parse().expect("header"));
        match tokio_tungstenite::connect_async(req).await {
            Ok((mut ws, _)) => {
                let echoed = async {
                    ws.send(Message::Text("ping".into())).await.ok()?;
                    let reply = ws.next().await?.ok()?;
                    let _ = ws.close(None).await;
                    Some(reply.into_text().ok()?.to_string())
                }
                .await;
                if echoed.as_deref() != Some("echo:ping") {
                    failures.push(format!("round {rounds}: websocket echo {echoed:?}"));
                }
            }
            Err(e) => failures.push(format!("round {rounds}: websocket: {e}")),
        }
        match client()
            .get(format!("http://{outbound}/hello"))
            .header("host", "user-service")
            .send()
            .await
        {
            Ok(r) if r.status() == 200 => {}
            Ok(r) => failures.push(format!("round {rounds}: GET {}", r.status())),
            Err(e) => failures.push(format!("round {rounds}: GET {e}")),
        }
        rounds += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (rounds, failures)
}

async fn wait_reloads(sidecar: &Sidecar, result: &str, at_least: f64) {
    let series = format!(r#"outrider_cert_reloads_total{{result="{result}"}}"#);
    let reached = eventually(Duration::from_secs(5), || {
        (metric(sidecar, &series) >= at_least).then_some(())
    })
    .await;
    assert!(
        reached.is_some(),
        "{series} did not reach {at_least}; log:\n{}",
        sidecar.logs()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn ca_rolls_through_an_overlap_bundle_without_a_failed_request() {
    let old = Pki::new();
    let new = Pki::new();
    let app = apps::http_app("users").await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let old_ca = read(&old.ca());
    let new_ca = read(&new.ca());
    let bundle = [old_ca.clone(), new_ca.clone()].concat();

    let (c, k) = issue(&old, "user-service", 30);
    let mut callee_secret = SecretDir::new(
        &tmp.path().join("callee"),
        &secret_files(old_ca.clone(), &c, &k),
    );
    let (c, k) = issue(&old, "web", 30);
    let mut web_secret = SecretDir::new(
        &tmp.path().join("web"),
        &secret_files(old_ca.clone(), &c, &k),
    );
    let callee = Sidecar::start(&format!(
        "service: user-service\napp: {}\n{}",
        app.addr,
        secret_tls_yaml(&callee_secret, "")
    ));
    let web = Sidecar::start(&format!(
        "service: web\napp: 127.0.0.1:9\n{}discovery:\n  services:\n    user-service: {{ endpoints: [\"{}\"] }}\n",
        secret_tls_yaml(&web_secret, ""),
        callee.ports.inbound
    ));

    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(traffic(web.ports.outbound, stop.clone()));
    let pause = || tokio::time::sleep(Duration::from_millis(300));
    pause().await;

    // 1. Both trust old and new roots.
    let (c, k) = issue(&old, "user-service", 30);
    callee_secret.update(&secret_files(bundle.clone(), &c, &k));
    let (wc, wk) = issue(&old, "web", 30);
    web_secret.update(&secret_files(bundle.clone(), &wc, &wk));
    wait_reloads(&callee, "ok", 1.0).await;
    wait_reloads(&web, "ok", 1.0).await;
    pause().await;
    // 2. Workload certificates from the new CA, one side at a time.
    let (new_callee_cert, k) = issue(&new, "user-service", 30);
    callee_secret.update(&secret_files(bundle.clone(), &new_callee_cert, &k));
    wait_reloads(&callee, "ok", 2.0).await;
    pause().await;
    let (c, k) = issue(&new, "web", 30);
    web_secret.update(&secret_files(bundle.clone(), &c, &k));
    wait_reloads(&web, "ok", 2.0).await;
    pause().await;
    // 3. The old root is dropped.
    let (c, k) = issue(&new, "user-service", 29);
    let callee_leaf = pem_leaf(&c);
    callee_secret.update(&secret_files(new_ca.clone(), &c, &k));
    let (c, k) = issue(&new, "web", 29);
    web_secret.update(&secret_files(new_ca.clone(), &c, &k));
    wait_reloads(&callee, "ok", 3.0).await;
    wait_reloads(&web, "ok", 3.0).await;
    pause().await;

    stop.store(true, Ordering::SeqCst);
    let (rounds, failures) = load.await.expect("traffic");
    assert!(failures.is_empty(), "failed during the roll: {failures:#?}");
    assert!(rounds >= 10, "only {rounds} rounds of traffic");
    assert_eq!(
        metric(&callee, r#"outrider_cert_reloads_total{result="rejected"}"#),
        0.0
    );

    // The roll is complete: the new root only.
    let (probe_cert, probe_key) = new.issue("probe");
    assert_eq!(
        presented_serial(callee.ports.inbound, (&probe_cert, &probe_key)).await,
        Ok(cert_serial(&callee_leaf))
    );
    let (old_cert, old_key) = old.issue("probe");
    let refused = tls_probe(callee.ports.inbound, Some((&old_cert, &old_key)), TLS13).await;
    assert!(
        refused.is_err(),
        "a client of the old CA is refused now: {refused:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn broken_new_material_is_refused_and_the_old_stays_in_force() {
    let pki = Pki::new();
    let other = Pki::new();
    let app = apps::http_app("users").await;
    let (probe_cert, probe_key) = pki.issue("probe");
    let probe = (probe_cert.as_path(), probe_key.as_path());
    // Plain files, rewritten in place (as an operator or cert-manager without symlinks would).
    let (cert1, key1) = issue(&pki, "user-service", 30);
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    std::fs::copy(pki.ca(), dir.join("ca.pem")).expect("copy");
    std::fs::copy(&cert1, dir.join("tls.crt")).expect("copy");
    std::fs::copy(&key1, dir.join("tls.key")).expect("copy");
    let callee = Sidecar::start(&format!(
        "service: user-service\napp: {}\ntls: {{ ca: {}, cert: {}, key: {} }}\n",
        app.addr,
        dir.join("ca.pem").display(),
        dir.join("tls.crt").display(),
        dir.join("tls.key").display()
    ));
    let serial1 = cert_serial(&pem_leaf(&cert1));
    let rejected = r#"outrider_cert_reloads_total{result="rejected"}"#;

    let now = time::OffsetDateTime::now_utc();
    let day = time::Duration::days(1);
    let (expired_cert, expired_key) = pki.issue_custom(
        "user-service",
        Some("spiffe://mesh.local/ns/default/sa/user-service"),
        now - day * 10,
        now - day,
    );
    let (foreign_cert, foreign_key) = other.issue("user-service");
    let (other_cert, _) = issue(&pki, "user-service", 10);
    // (what, files written, the reason logged)
    type Case<'a> = (&'a str, Vec<(&'a str, Vec<u8>)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            "unparsable",
            vec![("tls.crt", b"-----BEGIN CERTIFICATE-----\nbroken\n".to_vec())],
            "not a PEM certificate",
        ),
        (
            "key not matching",
            vec![("tls.crt", read(&other_cert))],
            "the key does not match the certificate",
        ),
        (
            "expired",
            vec![
                ("tls.crt", read(&expired_cert)),
                ("tls.key", read(&expired_key)),
            ],
            "the certificate has expired",
        ),
        (
            "another CA",
            vec![
                ("tls.crt", read(&foreign_cert)),
                ("tls.key", read(&foreign_key)),
            ],
            "not issued by the mesh CA",
        ),
        (
            "empty CA bundle",
            vec![("ca.pem", Vec::new())],
            "no certificate in the CA bundle",
        ),
    ];
    for (what, files, reason) in cases {
        let before = metric(&callee, rejected);
        for (name, contents) in &files {
            std::fs::write(dir.join(name), contents).expect("write");
        }
        let counted = eventually(Duration::from_secs(5), || {
            (metric(&callee, rejected) > before).then_some(())
        })
        .await;
        assert!(
            counted.is_some(),
            "{what}: not refused; log:\n{}",
            callee.logs()
        );
        let logs = callee.logs();
        assert!(
            logs.contains(reason),
            "{what}: `{reason}` not logged:\n{logs}"
        );
        assert_eq!(
            presented_serial(callee.ports.inbound, probe).await,
            Ok(serial1.clone()),
            "{what}: the old certificate is still served"
        );
        let status = support::raw_mtls_request(callee.ports.inbound, Some(probe)).await;
        assert_eq!(status.as_deref(), Ok("HTTP/1.1 200 OK"), "{what}");
        // Put the good files back (a no-op reload: same material) for the next case.
        std::fs::copy(pki.ca(), dir.join("ca.pem")).expect("copy");
        std::fs::copy(&cert1, dir.join("tls.crt")).expect("copy");
        std::fs::copy(&key1, dir.join("tls.key")).expect("copy");
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    assert_eq!(
        metric(&callee, r#"outrider_cert_reloads_total{result="ok"}"#),
        0.0
    );
    assert!(callee.logs().contains("the old material stays in force"));

    // The watch still works after refusals: good material is taken.
    let (cert2, key2) = issue(&pki, "user-service", 20);
    std::fs::write(dir.join("tls.key"), read(&key2)).expect("write");
    std::fs::write(dir.join("tls.crt"), read(&cert2)).expect("write");
    let serial2 = cert_serial(&pem_leaf(&cert2));
    let mut served = None;
    for _ in 0..100 {
        served = presented_serial(callee.ports.inbound, probe).await.ok();
        if served.as_ref() == Some(&serial2) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(served, Some(serial2), "log:\n{}", callee.logs());
}

#[tokio::test(flavor = "multi_thread")]
async fn expiry_gauge_and_warning_near_the_end_of_the_lifetime() {
    let pki = Pki::new();
    let now = time::OffsetDateTime::now_utc();
    // 10 days of lifetime, 12 hours left: under 10%.
    let (cert, key) = pki.issue_custom(
        "user-service",
        Some("spiffe://mesh.local/ns/default/sa/user-service"),
        now - time::Duration::hours(228),
        now + time::Duration::hours(12),
    );
    let sidecar = Sidecar::start(&format!(
        "service: user-service\napp: 127.0.0.1:9\ntls: {{ ca: {}, cert: {}, key: {} }}\n",
        pki.ca().display(),
        cert.display(),
        key.display()
    ));
    assert_eq!(
        metric(&sidecar, "outrider_cert_expiry_timestamp_seconds"),
        cert_not_after(&pem_leaf(&cert)) as f64
    );
    let logs = sidecar.logs();
    assert!(
        logs.contains("expires within 10% of its lifetime"),
        "{logs}"
    );

    // A fresh certificate: no warning.
    let fresh = Sidecar::start(&format!(
        "service: user-service\napp: 127.0.0.1:9\n{}",
        pki.tls_yaml("user-service")
    ));
    assert!(!fresh.logs().contains("expires within 10%"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_certificate_for_another_identity_is_warned_about() {
    let pki = Pki::new();
    let (cert, key) = pki.issue("impostor");
    let sidecar = Sidecar::start(&format!(
        "service: user-service\napp: 127.0.0.1:9\ntls: {{ ca: {}, cert: {}, key: {} }}\n",
        pki.ca().display(),
        cert.display(),
        key.display()
    ));
    let logs = sidecar.logs();
    let line = logs
        .lines()
        .find(|l| l.contains("names another identity"))
        .unwrap_or_else(|| panic!("no warning:\n{logs}"));
    let line: serde_json::Value = serde_json::from_str(line).expect("json log");
    assert_eq!(line["level"], "WARN");
    assert_eq!(
        line["certificate"],
        "spiffe://mesh.local/ns/default/sa/impostor"
    );
    assert_eq!(
        line["expected"],
        "spiffe://mesh.local/ns/default/sa/user-service"
    );
    let fine = Sidecar::start(&format!(
        "service: user-service\napp: 127.0.0.1:9\n{}",
        pki.tls_yaml("user-service")
    ));
    assert!(!fine.logs().contains("names another identity"));
}

#[tokio::test(flavor = "multi_thread")]
async fn mtls_false_upstream_is_plain_http_and_marked() {
    let pki = Pki::new();
    let mesh_app = apps::http_app("users").await;
    let outside = apps::http_app("payments").await;
    let pair = Pair::start(
        &pki,
        "user-service",
        mesh_app.addr,
        &format!(
            "    payments-api: {{ endpoints: [\"{}\"], mtls: false }}\n",
            outside.addr
        ),
        "",
    );
    let r = client()
        .get(format!("{}/echo", pair.caller.outbound_url()))
        .header("host", "payments-api")
        .header(
            "x-outrider-peer",
            "spiffe://mesh.local/ns/default/sa/forged",
        )
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 200);
    let seen: serde_json::Value = r.json().await.expect("json");
    assert_eq!(seen["path"], "/echo");
    assert!(
        seen["headers"].get("x-outrider-peer").is_none(),
        "no identity header goes outside the mesh: {seen}"
    );
    let (status, _, body) = get_via(&pair.caller, reqwest::Method::GET, "/hello").await;
    assert_eq!((status, body.as_str()), (200, "hello from users"));

    assert_eq!(
        pair.caller
            .metric(r#"outrider_upstream_mtls{service="payments-api"}"#),
        Some(0.0)
    );
    assert_eq!(
        pair.caller
            .metric(r#"outrider_upstream_mtls{service="user-service"}"#),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &pair.caller,
            r#"outrider_requests_total{code="200",direction="outbound",service="payments-api"}"#
        ),
        1.0
    );
    let logs = pair.caller.logs();
    let marked: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("plain HTTP upstream"))
        .collect();
    assert_eq!(marked.len(), 1, "logged once, on first use:\n{logs}");
    let line: serde_json::Value = serde_json::from_str(marked[0]).expect("json log");
    assert_eq!(line["mtls"], false);
    assert_eq!(line["service"], "payments-api");
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_disabled_works_end_to_end_and_check_warns() {
    let app = apps::http_app("users").await;
    let callee = Sidecar::start(&format!(
        "service: user-service\napp: {}\ntls: {{ mode: disabled }}\n",
        app.addr
    ));
    let web = Sidecar::start(&format!(
        "service: web\napp: 127.0.0.1:9\ntls: {{ mode: disabled }}\ndiscovery:\n  services:\n    user-service: {{ endpoints: [\"{}\"] }}\n",
        callee.ports.inbound
    ));
    let (status, _, body) = get_via(&web, reqwest::Method::GET, "/echo").await;
    assert_eq!(status, 200, "{body}");
    let seen: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert!(
        seen["headers"].get("x-outrider-peer").is_none(),
        "no identity without mTLS: {seen}"
    );
    // The inbound port speaks plain HTTP.
    let text = raw_http(
        callee.ports.inbound,
        "GET /hello HTTP/1.1\r\nHost: user-service\r\nConnection: close\r\n\r\n".into(),
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    // A caller straight at the inbound port cannot name itself either: every value it sends
    // of the identity header is dropped.
    let text = raw_http(
        callee.ports.inbound,
        "GET /echo HTTP/1.1\r\nHost: user-service\r\nx-outrider-peer: spiffe://mesh.local/ns/default/sa/admin\r\nx-outrider-peer: spiffe://mesh.local/ns/default/sa/root\r\nConnection: close\r\n\r\n".into(),
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.contains("\"path\":\"/echo\"") && !text.contains("x-outrider-peer"),
        "{text}"
    );
    assert_eq!(
        web.metric(r#"outrider_upstream_mtls{service="user-service"}"#),
        Some(0.0)
    );
    assert!(web.logs().contains("tls disabled"));
    for sidecar in [&callee, &web] {
        assert!(
            sidecar.logs().contains("mTLS is disabled"),
            "run warns too: {}",
            sidecar.logs()
        );
    }

    let out = std::process::Command::new(BIN)
        .args(["check", "-c"])
        .arg(&callee.config)
        .output()
        .expect("check");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("warning")
            && stderr.contains("tls.mode")
            && stderr.contains("mTLS is disabled"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn only_tls13_on_the_mesh_hop_both_ways() {
    let pki = Pki::new();
    let app = apps::http_app("users").await;
    let callee = Sidecar::start(&format!(
        "service: user-service\napp: {}\n{}",
        app.addr,
        pki.tls_yaml("user-service")
    ));
    let (probe_cert, probe_key) = pki.issue("probe");
    let probe = (probe_cert.as_path(), probe_key.as_path());
    let ok = tls_probe(callee.ports.inbound, Some(probe), TLS13)
        .await
        .expect("TLS 1.3");
    assert_eq!(ok.version, Some(rustls::ProtocolVersion::TLSv1_3));
    let errors = r#"outrider_tls_handshake_errors_total{direction="inbound"}"#;
    assert_eq!(metric(&callee, errors), 0.0);
    let refused = tls_probe(
        callee.ports.inbound,
        Some(probe),
        &[&rustls::version::TLS12],
    )
    .await;
    assert!(refused.is_err(), "a TLS 1.2 client is refused: {refused:?}");
    let counted = eventually(Duration::from_secs(2), || {
        (metric(&callee, errors) == 1.0).then_some(())
    })
    .await;
    assert!(counted.is_some(), "{}", callee.metrics());

    // Outbound: an upstream with the right identity that speaks only TLS 1.2 is not used.
    let (cert, key) = pki.issue("user-service");
    let handshakes = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let tls12_server = {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert)
            .expect("pem")
            .collect::<Result<_, _>>()
            .expect("chain");
        let key = PrivateKeyDer::from_pem_file(&key).expect("key");
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS12])
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (handshakes, failed) = (handshakes.clone(), failed.clone());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                handshakes.fetch_add(1, Ordering::SeqCst);
                if acceptor.accept(tcp).await.is_err() {
                    failed.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
        addr
    };
    let web = caller(&pki, "web", "default", tls12_server);
    let (status, headers, _) = get_via(&web, reqwest::Method::GET, "/hello").await;
    assert_eq!(status, 503);
    assert_eq!(headers["x-outrider-error"], "unavailable");
    assert!(handshakes.load(Ordering::SeqCst) >= 1);
    assert_eq!(
        handshakes.load(Ordering::SeqCst),
        failed.load(Ordering::SeqCst),
        "no handshake with the TLS 1.2 server succeeded"
    );
    assert!(
        metric(
            &web,
            r#"outrider_tls_handshake_errors_total{direction="outbound"}"#
        ) >= 1.0,
        "{}",
        web.metrics()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn stalled_and_truncated_handshakes_are_cut_at_the_handshake_timeout() {
    let pki = Pki::new();
    let app = apps::http_app("users").await;
    let (cert, key) = pki.issue("user-service");
    let callee = Sidecar::start(&format!(
        "service: user-service\napp: {}\ntls: {{ ca: {}, cert: {}, key: {}, handshake_timeout: 1s }}\n",
        app.addr,
        pki.ca().display(),
        cert.display(),
        key.display()
    ));
    let inbound = callee.ports.inbound;
    // Silent: connects and sends nothing. Truncated: a record header announcing a ClientHello
    // of 512 bytes, then only 5 of them.
    let clients = [
        ("silent", Vec::new()),
        (
            "truncated",
            vec![0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03],
        ),
    ]
    .map(|(what, bytes)| {
        tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let mut s = std::net::TcpStream::connect(inbound).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            s.write_all(&bytes).expect("write");
            let mut buf = [0u8; 64];
            let outcome = s.read(&mut buf);
            (what, outcome.map_err(|e| e.kind()), started.elapsed())
        })
    });
    // Meanwhile a real peer is served at once.
    let (probe_cert, probe_key) = pki.issue("probe");
    let started = Instant::now();
    let served = support::raw_mtls_request(inbound, Some((&probe_cert, &probe_key))).await;
    assert_eq!(served.as_deref(), Ok("HTTP/1.1 200 OK"));
    assert!(started.elapsed() < Duration::from_millis(900));
    for client in clients {
        let (what, outcome, elapsed) = client.await.expect("join");
        // Closed by the sidecar: EOF (or a reset), not our 5 s read timeout.
        assert!(
            matches!(outcome, Ok(0) | Err(std::io::ErrorKind::ConnectionReset)),
            "{what}: {outcome:?}"
        );
        assert!(
            elapsed >= Duration::from_millis(900) && elapsed < Duration::from_millis(2500),
            "{what}: closed after {elapsed:?}"
        );
    }
    let counted = eventually(Duration::from_secs(2), || {
        let n = metric(
            &callee,
            r#"outrider_tls_handshake_errors_total{direction="inbound"}"#,
        );
        (n == 2.0).then_some(())
    })
    .await;
    assert!(counted.is_some(), "{}", callee.metrics());
}

/// A non-loopback IPv4 address of this machine, if it has one.
fn non_loopback_ipv4() -> Option<std::net::Ipv4Addr> {
    let out = std::process::Command::new("ip")
        .args(["-4", "-o", "addr", "show", "scope", "global"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|line| {
            let mut words = line.split_whitespace();
            words.find(|w| *w == "inet")?;
            words.next()?.split('/').next()?.parse().ok()
        })
}

fn post_shutdown(addr: SocketAddr, extra_header: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    write!(
        s,
        "POST /shutdown HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n{extra_header}Connection: close\r\n\r\n"
    )
    .expect("write");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_answers_loopback_callers_only() {
    let pki = Pki::new();
    let mut ports = Ports::new();
    ports.admin = SocketAddr::from(([0, 0, 0, 0], ports.admin.port()));
    let mut sidecar = Sidecar::start_with(
        &format!("service: web\napp: 127.0.0.1:9\n{}", pki.tls_yaml("web")),
        ports,
        &[],
    );
    let port = ports.admin.port();
    match non_loopback_ipv4() {
        Some(ip) => {
            // Connecting to our own non-loopback address makes it the source address too.
            let text = post_shutdown(SocketAddr::from((ip, port)), "");
            assert!(text.starts_with("HTTP/1.1 403"), "from {ip}: {text}");
            assert!(text.contains("loopback only"), "{text}");
            assert!(sidecar.logs().contains("shutdown request refused"));
        }
        // The check itself is unit-tested in admin.rs.
        None => eprintln!("no non-loopback IPv4 address: the remote check is not exercised here"),
    }
    let loopback = SocketAddr::from(([127, 0, 0, 1], port));
    let text = post_shutdown(loopback, "Origin: https://evil.example\r\n");
    assert!(text.starts_with("HTTP/1.1 403"), "from a browser: {text}");
    assert!(
        sidecar.child.try_wait().expect("status").is_none(),
        "still running"
    );
    assert_eq!(support::http_get_status(loopback, "/live"), Some(200));

    let text = post_shutdown(loopback, "");
    assert!(text.starts_with("HTTP/1.1 202"), "{text}");
    assert_eq!(sidecar.wait_exit(Duration::from_secs(5)), Some(0));
}

#[test]
fn admin_binds_to_loopback_and_inbound_to_all_by_default() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("c.yaml");
    std::fs::write(&path, "service: web\napp: 127.0.0.1:8080\n").expect("write");
    let loaded =
        outrider::config::load_file(&path, std::iter::empty::<(String, String)>()).expect("valid");
    let addr = |s: &str| s.parse::<SocketAddr>().expect("addr");
    assert_eq!(loaded.config.listen.admin, addr("127.0.0.1:7191"));
    assert_eq!(loaded.config.listen.outbound, addr("127.0.0.1:7140"));
    assert_eq!(loaded.config.listen.inbound, addr("0.0.0.0:7143"));
}

#[tokio::test(flavor = "multi_thread")]
async fn no_key_material_or_credentials_in_logs_config_or_error_bodies() {
    const PASSWORD: &str = "s3cr3t";
    const TOKEN: &str = "tok3n-must-not-leak";
    let pki = Pki::new();
    let app = apps::http_app("users").await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let (cert, key) = pki.issue("user-service");
    let key_copy = tmp.path().join("user-service-key.pem");
    std::fs::copy(&key, &key_copy).expect("copy");
    let key_pem = std::fs::read_to_string(&key_copy).expect("key");
    let callee_yaml = format!(
        "service: user-service\napp: {}\ntls: {{ ca: {}, cert: {}, key: {} }}\n\
         broker: {{ url: \"amqp://guest:{PASSWORD}@127.0.0.1:1/%2f\" }}\n\
         inbound:\n  authorize:\n    - {{ from: [web], path_prefix: /echo }}\n",
        app.addr,
        pki.ca().display(),
        cert.display(),
        key_copy.display()
    );
    let callee = Sidecar::start_debug(&callee_yaml);
    let (web_cert, web_key) = pki.issue("web");
    let web = Sidecar::start_debug(&format!(
        "service: web\napp: 127.0.0.1:9\ntls: {{ ca: {}, cert: {}, key: {} }}\n\
         broker: {{ url: \"amqp://guest:{PASSWORD}@127.0.0.1:1/%2f\" }}\n\
         discovery:\n  services:\n    user-service: {{ endpoints: [\"{}\"] }}\n",
        pki.ca().display(),
        web_cert.display(),
        web_key.display(),
        callee.ports.inbound
    ));

    // Traffic of every kind: allowed, denied, unknown service, with credentials in headers.
    let mut bodies = String::new();
    for (host, path) in [
        ("user-service", "/echo"),
        ("user-service", "/hello"),
        ("nowhere", "/"),
    ] {
        let r = client()
            .get(format!("{}{path}", web.outbound_url()))
            .header("host", host)
            .header("authorization", format!("Bearer {TOKEN}"))
            .send()
            .await
            .expect("request");
        if r.status() != 200 {
            bodies.push_str(&r.text().await.expect("body"));
        }
    }
    assert!(bodies.contains("\"kind\":\"forbidden\"") && bodies.contains("unknown-service"));
    // A refused handshake, a refused key (truncated PEM), a refused config reload.
    let _ = support::raw_mtls_request(callee.ports.inbound, None).await;
    let truncated: String = key_pem.lines().take(3).collect::<Vec<_>>().join("\n");
    std::fs::write(&key_copy, &truncated).expect("write");
    wait_reloads(&callee, "rejected", 1.0).await;
    std::fs::write(
        &callee.config,
        format!(
            "{}{}",
            callee.ports.yaml(),
            callee_yaml.replace("amqp://guest", "http://guest")
        ),
    )
    .expect("rewrite config");
    let reloaded = eventually(Duration::from_secs(5), || {
        (metric(
            &callee,
            r#"outrider_config_reloads_total{result="rejected"}"#,
        ) >= 1.0)
            .then_some(())
    })
    .await;
    assert!(reloaded.is_some(), "{}", callee.logs());
    let check = std::process::Command::new(BIN)
        .args(["check", "-c"])
        .arg(&callee.config)
        .output()
        .expect("check");
    assert_eq!(check.status.code(), Some(1));

    let config = support::http_get_body(callee.ports.admin, "/config").expect("/config");
    let json: serde_json::Value = serde_json::from_str(&config).expect("json");
    assert_eq!(json["broker"]["url"], "amqp://guest:***@127.0.0.1:1/%2f");
    assert_eq!(json["tls"]["key"], key_copy.display().to_string());

    let key_lines: Vec<&str> = key_pem
        .lines()
        .filter(|l| !l.starts_with("-----") && l.len() >= 16)
        .collect();
    assert!(!key_lines.is_empty());
    let check_out = format!(
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let surfaces = [
        ("callee log", callee.logs()),
        ("caller log", web.logs()),
        ("/config", config),
        (
            "caller /config",
            support::http_get_body(web.ports.admin, "/config").expect("config"),
        ),
        ("/metrics", callee.metrics()),
        ("error bodies", bodies),
        ("check output", check_out),
    ];
    for (what, text) in &surfaces {
        assert!(!text.is_empty(), "{what} is empty");
        assert!(
            !text.contains(PASSWORD),
            "the broker password in {what}:\n{text}"
        );
        assert!(
            !text.contains(TOKEN),
            "a request credential in {what}:\n{text}"
        );
        assert!(!text.contains("PRIVATE KEY"), "key PEM in {what}:\n{text}");
        for line in &key_lines {
            assert!(!text.contains(line), "key material in {what}:\n{text}");
        }
    }
    // The debug log did see the events (the test is not vacuous).
    let log = callee.logs();
    assert!(log.contains("\"level\":\"DEBUG\""), "{log}");
    assert!(log.contains("inbound TLS handshake failed"), "{log}");
    assert!(log.contains("new certificate material refused"), "{log}");
    assert!(log.contains("config reload rejected"), "{log}");
    assert!(
        log.contains("guest:***@"),
        "the redacted URL is what gets shown: {log}"
    );
}
