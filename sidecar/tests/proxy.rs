//! The proxy core end to end: real sidecars (the `outrider` binary) on loopback with mTLS, real
//! HTTP/1.1, h2c, gRPC (tonic) and WebSocket (tokio-tungstenite) clients and apps.

mod support;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use outrider::pb::echo::EchoRequest;
use outrider::pb::echo::echo_client::EchoClient;
use support::{Pair, Pki, Ports, Sidecar, apps, client, h2_client, h2_client_resolving, raw_h2};

const WEB_ID: &str = "spiffe://mesh.local/ns/default/sa/web";

#[tokio::test(flavor = "multi_thread")]
async fn routes_by_host_header_proxy_form_and_h2_authority() {
    let pki = Pki::new();
    let app = apps::http_app("users").await;
    let pair = Pair::start(&pki, "user-service", app.addr, "", "");
    let out = pair.caller.outbound_url();

    for host in [
        "user-service",
        "user-service:80",
        "user-service.default",
        "user-service.default.svc.cluster.local",
        "user-service.default.svc.cluster.local:7143",
    ] {
        let r = client()
            .get(format!("{out}/hello"))
            .header("host", host)
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), 200, "Host: {host}");
        assert_eq!(r.text().await.expect("body"), "hello from users");
    }

    let proxied = reqwest::Client::builder()
        .proxy(reqwest::Proxy::http(&out).expect("proxy"))
        .build()
        .expect("client");
    let r = proxied
        .get("http://user-service/echo")
        .send()
        .await
        .expect("proxy-form request");
    assert_eq!(r.status(), 200);
    let seen: serde_json::Value = r.json().await.expect("json");
    assert_eq!(seen["path"], "/echo");
    assert_eq!(seen["version"], "HTTP/1.1");

    let h2 = h2_client_resolving("user-service", pair.caller.ports.outbound);
    let r = h2
        .get(format!(
            "http://user-service:{}/echo",
            pair.caller.ports.outbound.port()
        ))
        .send()
        .await
        .expect("h2 request");
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.status(), 200);
    let seen: serde_json::Value = r.json().await.expect("json");
    assert_eq!(
        seen["version"], "HTTP/2.0",
        "an h2 request reaches the app as h2"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn connect_tunnel_speaks_http_inside() {
    let pki = Pki::new();
    let app = apps::http_app("users").await;
    let pair = Pair::start(&pki, "user-service", app.addr, "", "");
    let outbound = pair.caller.ports.outbound;
    let text = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(outbound).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        s.write_all(b"CONNECT user-service:80 HTTP/1.1\r\nHost: user-service:80\r\n\r\n")
            .expect("write");
        let mut head = [0u8; 256];
        let n = s.read(&mut head).expect("read");
        let head = String::from_utf8_lossy(&head[..n]).to_string();
        assert!(head.starts_with("HTTP/1.1 200"), "CONNECT answer: {head}");
        s.write_all(b"GET /hello HTTP/1.1\r\nHost: user-service\r\nConnection: close\r\n\r\n")
            .expect("write");
        let mut rest = String::new();
        s.read_to_string(&mut rest).expect("read");
        rest
    })
    .await
    .expect("join");
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.ends_with("hello from users"), "{text}");
}

/// HTTP/2 CONNECT (RFC 9113 §8.5): the tunnel is the request's stream.
#[tokio::test(flavor = "multi_thread")]
async fn connect_tunnel_over_http2_speaks_http_inside() {
    let pki = Pki::new();
    let app = apps::http_app("users").await;
    let pair = Pair::start(&pki, "user-service", app.addr, "", "");
    let (mut sender, _connection) = raw_h2(pair.caller.ports.outbound).await;
    let connect = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri("user-service:80")
        .body(())
        .expect("request");
    let (response, mut tunnel_out) = sender.send_request(connect, false).expect("send");
    let response = tokio::time::timeout(Duration::from_secs(5), response)
        .await
        .expect("answered in time")
        .expect("response");
    assert_eq!(response.status(), 200);
    tunnel_out
        .send_data(
            bytes::Bytes::from_static(
                b"GET /hello HTTP/1.1\r\nHost: user-service\r\nConnection: close\r\n\r\n",
            ),
            false,
        )
        .expect("write into the tunnel");
    let mut tunnel_in = response.into_body();
    let mut text = Vec::new();
    let read = async {
        while let Some(chunk) = tunnel_in.data().await {
            let chunk = chunk.expect("tunnel data");
            let _ = tunnel_in.flow_control().release_capacity(chunk.len());
            text.extend_from_slice(&chunk);
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .expect("the tunnel closes after the answer");
    let text = String::from_utf8_lossy(&text);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.ends_with("hello from users"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn connect_to_unknown_service_is_refused() {
    let pki = Pki::new();
    let app = apps::http_app("users").await;
    let pair = Pair::start(&pki, "user-service", app.addr, "", "");
    let outbound = pair.caller.ports.outbound;
    let head = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(outbound).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        s.write_all(b"CONNECT nowhere:80 HTTP/1.1\r\nHost: nowhere:80\r\n\r\n")
            .expect("write");
        let mut head = [0u8; 512];
        let n = s.read(&mut head).expect("read");
        String::from_utf8_lossy(&head[..n]).to_string()
    })
    .await
    .expect("join");
    assert!(head.starts_with("HTTP/1.1 502"), "{head}");
    assert!(head.contains("x-outrider-error: unknown-service"), "{head}");
}

#[tokio::test(flavor = "multi_thread")]
async fn headers_correlation_trace_and_peer_identity() {
    let pki = Pki::new();
    let app = apps::http_app("users").await;
    let pair = Pair::start(&pki, "user-service", app.addr, "", "");
    let out = pair.caller.outbound_url();

    let r = client()
        .get(format!("{out}/echo"))
        .header("host", "user-service")
        .header("x-outrider-peer", "spiffe://mesh.local/ns/default/sa/admin")
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .send()
        .await
        .expect("request");
    let generated = r
        .headers()
        .get("x-correlation-id")
        .expect("a correlation id is returned")
        .to_str()
        .expect("ascii")
        .to_string();
    assert!(uuid::Uuid::parse_str(&generated).is_ok(), "{generated}");
    let seen: serde_json::Value = r.json().await.expect("json");
    assert_eq!(seen["headers"]["x-correlation-id"], generated.as_str());
    assert_eq!(
        seen["headers"]["x-outrider-peer"], WEB_ID,
        "spoofed peer header replaced"
    );
    assert_eq!(
        seen["headers"]["traceparent"],
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    );

    let r = client()
        .get(format!("{out}/echo"))
        .header("host", "user-service")
        .header("x-correlation-id", "order-42")
        .send()
        .await
        .expect("request");
    assert_eq!(r.headers()["x-correlation-id"], "order-42");
    let seen: serde_json::Value = r.json().await.expect("json");
    assert_eq!(seen["headers"]["x-correlation-id"], "order-42");
}

#[tokio::test(flavor = "multi_thread")]
async fn one_mebibyte_bodies_stream_both_ways_over_h1_and_h2() {
    let pki = Pki::new();
    let app = apps::http_app("files").await;
    let pair = Pair::start(&pki, "file-service", app.addr, "", "");
    let payload: Vec<u8> = (0..(1 << 20)).map(|i| (i % 253) as u8).collect();

    let r = client()
        .post(format!("{}/mirror", pair.caller.outbound_url()))
        .header("host", "file-service")
        .body(payload.clone())
        .send()
        .await
        .expect("h1 request");
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.expect("body").as_ref(), payload.as_slice());

    let h2 = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .resolve("file-service", pair.caller.ports.outbound)
        .build()
        .expect("client");
    let stream = futures_util::stream::iter(
        payload
            .chunks(16 * 1024)
            .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
            .collect::<Vec<_>>(),
    );
    let r = h2
        .post(format!(
            "http://file-service:{}/mirror",
            pair.caller.ports.outbound.port()
        ))
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .expect("h2 request");
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.expect("body").as_ref(), payload.as_slice());

    let r = client()
        .get(format!("{}/bytes/1048576", pair.caller.outbound_url()))
        .header("host", "file-service")
        .send()
        .await
        .expect("download");
    let body = r.bytes().await.expect("body");
    assert_eq!(body.len(), 1 << 20);
    assert!(
        body.iter()
            .enumerate()
            .all(|(i, b)| usize::from(*b) == i % 251),
        "the download arrived changed"
    );
}

/// Response heads from the app are read into a bounded buffer (`UPSTREAM_READ_BUFFER`, 20 KiB):
/// a 12 KB head passes whole, with repeated headers in order; a 30 KB one is refused as an
/// unusable answer (heads above 16 KiB never passed: the HTTP/2 leg between sidecars takes
/// 16 KiB of response headers), and the sidecar keeps serving.
#[tokio::test(flavor = "multi_thread")]
async fn app_response_heads_pass_whole_up_to_the_read_buffer() {
    let pki = Pki::new();
    let app = apps::http_app("users").await;
    let pair = Pair::start(&pki, "user-service", app.addr, "", "");
    let get = |path: &'static str| {
        client()
            .get(format!("{}{path}", pair.caller.outbound_url()))
            .header("host", "user-service")
            .send()
    };
    let r = get("/head/12000").await.expect("12 KB head");
    assert_eq!(r.status(), 200);
    let big = r.headers().get("x-big").expect("x-big");
    assert_eq!(big.as_bytes(), "h".repeat(12000).as_bytes());
    let cookies: Vec<_> = r.headers().get_all("set-cookie").iter().collect();
    assert_eq!(cookies, ["a=1", "b=2"]);
    assert_eq!(r.text().await.expect("body"), "head");

    let r = get("/head/30000").await.expect("30 KB head");
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["x-outrider-error"], "unavailable");

    let r = get("/hello").await.expect("hello");
    assert_eq!(r.status(), 200);
}

async fn echo_client(pair: &Pair, service: &str) -> EchoClient<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(pair.caller.outbound_url())
        .expect("endpoint")
        .origin(format!("http://{service}").parse().expect("origin"))
        .connect()
        .await
        .expect("connect");
    EchoClient::new(channel)
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_unary_streaming_and_status_in_trailers() {
    let pki = Pki::new();
    let grpc = apps::grpc_app().await;
    let pair = Pair::start(&pki, "echo-service", grpc, "", "");
    let mut echo = echo_client(&pair, "echo-service").await;

    let reply = echo
        .unary(EchoRequest {
            message: "hi".into(),
            ..Default::default()
        })
        .await
        .expect("unary");
    assert_eq!(reply.get_ref().message, "hi");
    assert_eq!(reply.get_ref().peer, WEB_ID);

    let mut stream = echo
        .server_stream(EchoRequest {
            message: "tick".into(),
            count: 5,
            ..Default::default()
        })
        .await
        .expect("stream")
        .into_inner();
    let mut indexes = Vec::new();
    while let Some(item) = stream.next().await {
        indexes.push(item.expect("item").index);
    }
    assert_eq!(indexes, vec![0, 1, 2, 3, 4]);

    let status = echo
        .unary(EchoRequest {
            fail_code: 9,
            ..Default::default()
        })
        .await
        .expect_err("fails");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert_eq!(status.message(), "failed on purpose");

    let mut stream = echo
        .server_stream(EchoRequest {
            message: "x".into(),
            count: 2,
            fail_code: 10,
            ..Default::default()
        })
        .await
        .expect("stream")
        .into_inner();
    assert!(stream.next().await.expect("first").is_ok());
    assert!(stream.next().await.expect("second").is_ok());
    let end = stream.next().await.expect("trailers").expect_err("status");
    assert_eq!(
        end.code(),
        tonic::Code::Aborted,
        "grpc-status from trailers"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_errors_made_by_the_sidecar() {
    let pki = Pki::new();
    let grpc = apps::grpc_app().await;
    let pair = Pair::start(
        &pki,
        "echo-service",
        grpc,
        "policies:\n  default:\n    timeout: 5s\n",
        "",
    );
    let mut unknown = echo_client(&pair, "nope").await;
    let status = unknown
        .unary(EchoRequest::default())
        .await
        .expect_err("unknown");
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert_eq!(
        status.metadata().get("x-outrider-error").expect("kind"),
        "unknown-service"
    );

    // A raw h2 call: tonic clients enforce grpc-timeout themselves; here the sidecar must.
    let request = prost::Message::encode_to_vec(&EchoRequest {
        delay_ms: 3000,
        ..Default::default()
    });
    let started = Instant::now();
    let (http_status, grpc_status, headers) = support::raw_grpc_call(
        pair.caller.ports.outbound,
        "echo-service",
        "/echo.v1.Echo/Unary",
        &request,
        &[("grpc-timeout", "200m")],
    )
    .await;
    assert_eq!(http_status, 200);
    assert_eq!(grpc_status.as_deref(), Some("4"), "DEADLINE_EXCEEDED");
    assert_eq!(headers["x-outrider-error"], "timeout");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn websocket_echo_through_the_pair() {
    use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};
    let pki = Pki::new();
    let app = apps::http_app("gateway").await;
    let pair = Pair::start(&pki, "gateway", app.addr, "", "");
    let mut req = format!("ws://{}/ws", pair.caller.ports.outbound)
        .into_client_request()
        .expect("request");
    req.headers_mut()
        .insert("host", "gateway".parse().expect("header"));
    let (mut ws, response) = tokio_tungstenite::connect_async(req)
        .await
        .expect("upgrade");
    assert_eq!(response.status(), 101);
    for text in ["hello", "world"] {
        ws.send(Message::Text(text.into())).await.expect("send");
        let reply = ws.next().await.expect("reply").expect("message");
        assert_eq!(
            reply.into_text().expect("text").as_str(),
            format!("echo:{text}")
        );
    }
    ws.send(Message::Binary(vec![1u8, 2, 3].into()))
        .await
        .expect("send");
    let reply = ws.next().await.expect("reply").expect("message");
    assert_eq!(reply.into_data().as_ref(), &[1u8, 2, 3]);
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_service_and_timeout_errors() {
    let pki = Pki::new();
    let app = apps::http_app("slow").await;
    let pair = Pair::start(
        &pki,
        "slow-service",
        app.addr,
        "policies:\n  default:\n    timeout: 300ms\n",
        "",
    );
    let out = pair.caller.outbound_url();
    let r = client()
        .get(format!("{out}/hello"))
        .header("host", "missing-service")
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 502);
    assert_eq!(r.headers()["x-outrider-error"], "unknown-service");
    let body: serde_json::Value = r.json().await.expect("json");
    assert_eq!(body["kind"], "unknown-service");
    assert!(
        body["error"]
            .as_str()
            .expect("error")
            .contains("missing-service")
    );

    let started = Instant::now();
    let r = client()
        .get(format!("{out}/slow/3000"))
        .header("host", "slow-service")
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 504);
    assert_eq!(r.headers()["x-outrider-error"], "timeout");
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
    let body: serde_json::Value = r.json().await.expect("json");
    assert_eq!(body["kind"], "timeout");

    let metrics = pair.caller.metrics();
    assert!(
        metrics.contains(
            r#"outrider_requests_total{code="504",direction="outbound",service="slow-service"} 1"#
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"outrider_endpoints{service="slow-service"} 1"#),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_with_the_wrong_identity_is_never_used() {
    let pki = Pki::new();
    let app = apps::http_app("users").await;
    // The callee runs with another service's certificate.
    let callee_ports = Ports::new();
    let (cert, key) = pki.issue("impostor");
    let callee = Sidecar::start_with(
        &format!(
            "service: user-service\napp: {}\ntls: {{ ca: {}, cert: {}, key: {} }}\n",
            app.addr,
            pki.ca().display(),
            cert.display(),
            key.display()
        ),
        callee_ports,
        &[],
    );
    let caller = Sidecar::start(&format!(
        "service: web\napp: 127.0.0.1:9\n{}discovery:\n  services:\n    user-service: {{ endpoints: [\"{}\"] }}\n",
        pki.tls_yaml("web"),
        callee.ports.inbound
    ));
    let r = client()
        .get(format!("{}/hello", caller.outbound_url()))
        .header("host", "user-service")
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["x-outrider-error"], "unavailable");
    assert_eq!(app.hits(), 0, "the app never saw the request");
}

#[tokio::test(flavor = "multi_thread")]
async fn inbound_refuses_clients_without_a_mesh_certificate() {
    let pki = Pki::new();
    let other = Pki::new();
    let app = apps::http_app("users").await;
    let callee = Sidecar::start(&format!(
        "service: user-service\napp: {}\n{}",
        app.addr,
        pki.tls_yaml("user-service")
    ));
    let inbound = callee.ports.inbound;
    let now = time::OffsetDateTime::now_utc();
    let day = time::Duration::days(1);

    let (good_cert, good_key) = pki.issue("web");
    let ok = support::raw_mtls_request(inbound, Some((&good_cert, &good_key))).await;
    assert_eq!(ok.as_deref(), Ok("HTTP/1.1 200 OK"));

    let (foreign_cert, foreign_key) = other.issue("web");
    let (expired_cert, expired_key) = pki.issue_custom(
        "expired",
        Some("spiffe://mesh.local/ns/default/sa/expired"),
        now - 10 * day,
        now - day,
    );
    let (future_cert, future_key) = pki.issue_custom(
        "future",
        Some("spiffe://mesh.local/ns/default/sa/future"),
        now + day,
        now + 10 * day,
    );
    let (nospiffe_cert, nospiffe_key) = pki.issue_custom("plain", None, now - day, now + day);
    let (otherdomain_cert, otherdomain_key) = pki.issue_custom(
        "elsewhere",
        Some("spiffe://elsewhere.local/ns/default/sa/web"),
        now - day,
        now + day,
    );
    let refused = [
        ("no client certificate", None),
        (
            "another CA",
            Some((foreign_cert.as_path(), foreign_key.as_path())),
        ),
        (
            "expired",
            Some((expired_cert.as_path(), expired_key.as_path())),
        ),
        (
            "not yet valid",
            Some((future_cert.as_path(), future_key.as_path())),
        ),
        (
            "no SPIFFE SAN",
            Some((nospiffe_cert.as_path(), nospiffe_key.as_path())),
        ),
        (
            "other trust domain",
            Some((otherdomain_cert.as_path(), otherdomain_key.as_path())),
        ),
    ];
    for (what, cert) in refused {
        let result = support::raw_mtls_request(inbound, cert).await;
        assert!(result.is_err(), "{what}: {result:?}");
    }
    assert_eq!(app.hits(), 1, "only the good client reached the app");
    let errors = callee
        .metric(r#"outrider_tls_handshake_errors_total{direction="inbound"}"#)
        .expect("metric");
    assert!(errors >= 6.0, "{errors}");
    // Still serving.
    let ok = support::raw_mtls_request(inbound, Some((&good_cert, &good_key))).await;
    assert_eq!(ok.as_deref(), Ok("HTTP/1.1 200 OK"));
}

#[tokio::test(flavor = "multi_thread")]
async fn plaintext_and_garbage_on_the_inbound_port_are_dropped() {
    let pki = Pki::new();
    let app = apps::http_app("users").await;
    let callee = Sidecar::start(&format!(
        "service: user-service\napp: {}\n{}",
        app.addr,
        pki.tls_yaml("user-service")
    ));
    let inbound = callee.ports.inbound;
    tokio::task::spawn_blocking(move || {
        for junk in [
            &b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            &[0x16, 0x03, 0x01, 0x00, 0x05, 1, 2][..],
            &[0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0, 0xff, 0xff][..],
        ] {
            let mut s = std::net::TcpStream::connect(inbound).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(15)))
                .expect("timeout");
            let _ = s.write_all(junk);
            let _ = s.shutdown(std::net::Shutdown::Write);
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf);
            assert!(!String::from_utf8_lossy(&buf).contains("HTTP/1.1 200"));
        }
    })
    .await
    .expect("join");
    assert_eq!(app.hits(), 0);
    let (cert, key) = pki.issue("web");
    let ok = support::raw_mtls_request(inbound, Some((&cert, &key))).await;
    assert_eq!(ok.as_deref(), Ok("HTTP/1.1 200 OK"), "still serving");
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_heads_get_431_and_the_sidecar_keeps_serving() {
    let pki = Pki::new();
    let app = apps::http_app("users").await;
    let pair = Pair::start(
        &pki,
        "user-service",
        app.addr,
        "limits: { max_header_bytes: 8KiB }\n",
        "",
    );
    let out = pair.caller.outbound_url();
    for size in [9 * 1024, 200 * 1024] {
        let r = client()
            .get(format!("{out}/hello"))
            .header("host", "user-service")
            .header("x-big", "a".repeat(size))
            .send()
            .await;
        match r {
            Ok(r) => assert_eq!(r.status(), 431, "head of {size} bytes"),
            // hyper may close the connection while the client still writes a huge head.
            Err(e) => assert!(size > 64 * 1024, "{size}: {e}"),
        }
    }
    // Over h2c the same limit bounds the header list; the connection keeps serving.
    let h2 = h2_client_resolving("user-service", pair.caller.ports.outbound);
    let url = format!(
        "http://user-service:{}/hello",
        pair.caller.ports.outbound.port()
    );
    let big = h2
        .get(&url)
        .header("x-big", "a".repeat(9 * 1024))
        .send()
        .await
        .expect("h2 request");
    assert_eq!(big.status(), 431, "an HTTP/2 head over the limit");
    let r = h2.get(&url).send().await.expect("h2 request");
    assert_eq!(r.status(), 200, "the same HTTP/2 connection still serves");
    let r = client()
        .get(format!("{out}/hello"))
        .header("host", "user-service")
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 200);
    assert_eq!(app.hits(), 2);
}

/// A request head to the users app.
const WHOLE_HEAD: &[u8] = b"GET /hello HTTP/1.1\r\nHost: user-service\r\n\r\n";
/// The same head without its final empty line: unfinished.
const PARTIAL_HEAD: &[u8] = b"GET /hello HTTP/1.1\r\nHost: user-service\r\n";

/// The users app behind a pair whose caller gives clients 1 s to send a request head.
async fn users_behind_1s_head_timeout(pki: &Pki) -> (apps::App, Pair) {
    let app = apps::http_app("users").await;
    let pair = Pair::start(
        pki,
        "user-service",
        app.addr,
        "limits: { header_read_timeout: 1s }\n",
        "",
    );
    (app, pair)
}

/// A blocking client connection whose reads give up after 10 s.
fn raw_connection(to: std::net::SocketAddr) -> std::net::TcpStream {
    let s = std::net::TcpStream::connect(to).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s
}

#[tokio::test(flavor = "multi_thread")]
async fn slowloris_is_cut_off_while_others_are_served() {
    let pki = Pki::new();
    let (_app, pair) = users_behind_1s_head_timeout(&pki).await;
    let outbound = pair.caller.ports.outbound;
    let slow = std::thread::spawn(move || {
        let mut s = raw_connection(outbound);
        s.write_all(PARTIAL_HEAD).expect("write");
        let started = Instant::now();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        (started.elapsed(), String::from_utf8_lossy(&buf).to_string())
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let r = client()
        .get(format!("{}/hello", pair.caller.outbound_url()))
        .header("host", "user-service")
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 200);
    assert!(started.elapsed() < Duration::from_millis(900));
    let (held, answer) = tokio::task::spawn_blocking(move || slow.join().expect("join"))
        .await
        .expect("join");
    assert!(
        held < Duration::from_secs(5),
        "slow client held for {held:?}"
    );
    assert!(!answer.contains("200 OK"), "{answer}");
}

/// The head timeout also holds for a keep-alive connection's later requests, for a client that
/// trickles its head (each byte a read, so the connection never looks idle) and across the
/// pauses in which the sidecar parks the connection with part of a head read.
#[tokio::test(flavor = "multi_thread")]
async fn a_later_head_sent_slowly_is_cut_off_too() {
    let pki = Pki::new();
    let (_app, pair) = users_behind_1s_head_timeout(&pki).await;
    let outbound = pair.caller.ports.outbound;
    let trickle = move |pause: Duration| {
        let mut s = raw_connection(outbound);
        s.write_all(WHOLE_HEAD).expect("write");
        let mut first = [0u8; 512];
        let n = s.read(&mut first).expect("first response");
        let first = String::from_utf8_lossy(&first[..n]).to_string();
        assert!(first.starts_with("HTTP/1.1 200"), "{first}");
        let started = Instant::now();
        s.write_all(PARTIAL_HEAD).expect("write");
        // One header byte per pause, for up to 6 s: far longer than the timeout.
        for byte in b"x-slow: "
            .iter()
            .cycle()
            .take(6_000 / pause.as_millis() as usize)
        {
            std::thread::sleep(pause);
            if s.write_all(std::slice::from_ref(byte)).is_err() {
                break;
            }
        }
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        (
            started.elapsed(),
            String::from_utf8_lossy(&rest).to_string(),
        )
    };
    // 50 ms pauses keep the connection busy; 300 ms pauses let it park between bytes.
    for pause in [50, 300] {
        let pause = Duration::from_millis(pause);
        let (held, answer) = tokio::task::spawn_blocking(move || trickle(pause))
            .await
            .expect("join");
        assert!(
            held < Duration::from_millis(2_500),
            "a client trickling its second head every {pause:?} was held for {held:?}"
        );
        assert!(!answer.contains("200 OK"), "{answer}");
    }
    // A client that keeps sending whole requests is served as long as it likes. Off the
    // runtime's workers, which also serve the app.
    tokio::task::spawn_blocking(move || {
        let mut s = raw_connection(outbound);
        for _ in 0..6 {
            s.write_all(WHOLE_HEAD).expect("write");
            let mut answer = [0u8; 512];
            let n = s.read(&mut answer).expect("response");
            assert!(answer[..n].starts_with(b"HTTP/1.1 200"));
            std::thread::sleep(Duration::from_millis(400));
        }
    })
    .await
    .expect("a client sending whole requests 400 ms apart is served");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_in_flight_requests_finish() {
    let pki = Pki::new();
    let app = apps::http_app("slow").await;
    let mut pair = Pair::start(&pki, "slow-service", app.addr, "shutdown_grace: 5s\n", "");
    let url = format!("{}/slow/1000", pair.caller.outbound_url());
    let in_flight = tokio::spawn(async move {
        client()
            .get(url)
            .header("host", "slow-service")
            .send()
            .await
            .map(|r| r.status().as_u16())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    pair.caller.signal("TERM");
    let status = in_flight.await.expect("join").expect("request completes");
    assert_eq!(status, 200);
    let code = tokio::task::spawn_blocking(move || pair.caller.wait_exit(Duration::from_secs(8)))
        .await
        .expect("join");
    assert_eq!(code, Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn h2_to_http1_app_is_refused_cleanly_when_app_is_down() {
    let pki = Pki::new();
    // No app listens at this address.
    let dead = support::free_addr();
    let pair = Pair::start(&pki, "ghost-service", dead, "", "");
    let r = h2_client()
        .get(format!("{}/hello", pair.caller.outbound_url()))
        .header("host", "ghost-service")
        .send()
        .await;
    // reqwest over h2 sets :authority from the URL; use the Host form over h1 instead.
    drop(r);
    let r = client()
        .get(format!("{}/hello", pair.caller.outbound_url()))
        .header("host", "ghost-service")
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["x-outrider-error"], "unavailable");
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_endpoints_and_access_log() {
    let pki = Pki::new();
    let app = apps::http_app("users").await;
    let pair = Pair::start(&pki, "user-service", app.addr, "access_log: true\n", "");
    let r = client()
        .get(format!("{}/hello?x=1", pair.caller.outbound_url()))
        .header("host", "user-service")
        .header("x-correlation-id", "trace-me-7")
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 200);

    let c = client();
    assert_eq!(
        c.get(pair.caller.admin_url("/live"))
            .send()
            .await
            .expect("live")
            .status(),
        200
    );
    assert_eq!(
        c.get(pair.caller.admin_url("/ready"))
            .send()
            .await
            .expect("ready")
            .status(),
        200
    );
    let config: serde_json::Value = c
        .get(pair.caller.admin_url("/config"))
        .send()
        .await
        .expect("config")
        .json()
        .await
        .expect("json");
    assert_eq!(config["service"], "web");
    assert_eq!(config["policies"]["default"]["timeout"], "2s");
    let text = config.to_string();
    assert!(!text.contains("PRIVATE KEY"), "no key material in /config");
    let endpoints: serde_json::Value = c
        .get(pair.caller.admin_url("/endpoints"))
        .send()
        .await
        .expect("endpoints")
        .json()
        .await
        .expect("json");
    assert_eq!(endpoints["services"][0]["service"], "user-service");
    assert_eq!(
        endpoints["services"][0]["endpoints"][0],
        pair.callee.ports.inbound.to_string()
    );
    let denied = c
        .get(pair.caller.admin_url("/shutdown"))
        .send()
        .await
        .expect("shutdown");
    assert_eq!(denied.status(), 405, "shutdown needs POST");

    // The access log line carries the correlation id, method, authority, path, status, upstream.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let logs = pair.caller.logs();
    let line = logs
        .lines()
        .find(|l| l.contains("trace-me-7"))
        .unwrap_or_else(|| panic!("no access log line in:\n{logs}"));
    let entry: serde_json::Value = serde_json::from_str(line).expect("json log line");
    assert_eq!(entry["method"], "GET");
    assert_eq!(entry["authority"], "user-service");
    assert_eq!(entry["path"], "/hello");
    assert_eq!(entry["status"], 200);
    assert_eq!(entry["upstream"], pair.callee.ports.inbound.to_string());
    assert!(
        !pair.callee.logs().contains("trace-me-7"),
        "callee has no access log"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn post_shutdown_drains_and_exits() {
    let pki = Pki::new();
    let app = apps::http_app("users").await;
    let mut pair = Pair::start(&pki, "user-service", app.addr, "", "");
    let r = client()
        .post(pair.caller.admin_url("/shutdown"))
        .send()
        .await
        .expect("shutdown");
    assert_eq!(r.status(), 202);
    let code = tokio::task::spawn_blocking(move || pair.caller.wait_exit(Duration::from_secs(8)))
        .await
        .expect("join");
    assert_eq!(code, Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn environment_overrides_apply_at_run() {
    let pki = Pki::new();
    let app = apps::http_app("users").await;
    let callee_ports = Ports::new();
    // The file names another app and service; the environment wins.
    let callee = Sidecar::start_with(
        &format!(
            "service: wrong-name\napp: 127.0.0.1:9\n{}",
            pki.tls_yaml("user-service")
        ),
        callee_ports,
        &[
            ("OUTRIDER_SERVICE", "user-service"),
            ("OUTRIDER_APP", &app.addr.to_string()),
        ],
    );
    let caller = Sidecar::start(&format!(
        "service: web\napp: 127.0.0.1:9\n{}discovery:\n  services:\n    user-service: {{ endpoints: [\"{}\"] }}\n",
        pki.tls_yaml("web"),
        callee.ports.inbound
    ));
    let r = client()
        .get(format!("{}/hello", caller.outbound_url()))
        .header("host", "user-service")
        .send()
        .await
        .expect("request");
    assert_eq!(r.text().await.expect("body"), "hello from users");
}

/// `OUTRIDER_MESH_H1_CONNECTIONS=2`: HTTP/1.1 requests between the sidecars use at most two
/// pooled HTTP/1.1 connections; the rest ride the one HTTP/2 connection and still reach the app
/// as HTTP/1.1, with their bodies, in any mix.
#[tokio::test(flavor = "multi_thread")]
async fn pooled_http1_between_sidecars_overflows_to_http2() {
    let pki = Pki::new();
    let app = apps::http_app("users").await;
    let callee_ports = Ports::new();
    let _callee = Sidecar::start_with(
        &format!(
            "service: user-service\napp: {}\n{}",
            app.addr,
            pki.tls_yaml("user-service")
        ),
        callee_ports,
        &[],
    );
    let caller = Sidecar::start_with(
        &format!(
            "service: web\napp: 127.0.0.1:9\n{}discovery:\n  services:\n    user-service: {{ endpoints: [\"{}\"] }}\n",
            pki.tls_yaml("web"),
            callee_ports.inbound
        ),
        Ports::new(),
        &[("OUTRIDER_MESH_H1_CONNECTIONS", "2")],
    );
    let out = caller.outbound_url();
    let client = client();
    let mut calls = Vec::new();
    for i in 0..24 {
        let client = client.clone();
        let out = out.clone();
        calls.push(tokio::spawn(async move {
            if i % 2 == 0 {
                let r = client
                    .get(format!("{out}/slow/400"))
                    .header("host", "user-service")
                    .send()
                    .await
                    .expect("slow request");
                assert_eq!(r.status(), 200);
                assert_eq!(r.text().await.expect("body"), "slow");
            } else {
                let body = format!("payload {i}");
                let r = client
                    .post(format!("{out}/echo"))
                    .header("host", "user-service")
                    .body(body.clone())
                    .send()
                    .await
                    .expect("echo request");
                assert_eq!(r.status(), 200);
                let seen: serde_json::Value = r.json().await.expect("json");
                assert_eq!(seen["version"], "HTTP/1.1", "{seen}");
                assert_eq!(seen["body_len"], body.len(), "{seen}");
                assert!(seen["headers"].get("x-outrider-orig-proto").is_none());
            }
        }));
    }
    // While the slow requests hold the pooled connections: two HTTP/1.1 connections and one
    // HTTP/2 connection from the caller to the callee's inbound port.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let connections = established_to(callee_ports.inbound.port());
    for call in calls {
        call.await.expect("call");
    }
    assert_eq!(connections, 3, "2 pooled HTTP/1.1 + 1 HTTP/2 connection");
}

/// Established TCP connections to `port` on loopback (the client ends, counted once).
fn established_to(port: u16) -> usize {
    let out = std::process::Command::new("ss")
        .args(["-Htn", "state", "established", &format!("dport = :{port}")])
        .output()
        .expect("ss");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count()
}

/// Reads one HTTP/1.1 response (head and body, by Content-Length or chunked) from `s`.
fn read_response(s: &mut std::net::TcpStream) -> (String, Vec<u8>) {
    fn byte(s: &mut std::net::TcpStream) -> u8 {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).expect("response byte");
        b[0]
    }
    fn line(s: &mut std::net::TcpStream) -> String {
        let mut l = Vec::new();
        while !l.ends_with(b"\r\n") {
            l.push(byte(s));
        }
        String::from_utf8_lossy(&l[..l.len() - 2]).to_string()
    }
    let mut head = String::new();
    loop {
        let l = line(s);
        if l.is_empty() {
            break;
        }
        head.push_str(&l.to_ascii_lowercase());
        head.push('\n');
    }
    let mut body = Vec::new();
    if let Some(len) = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
    {
        body.resize(len.trim().parse().expect("length"), 0);
        s.read_exact(&mut body).expect("body");
    } else if head.contains("transfer-encoding: chunked") {
        loop {
            let size = usize::from_str_radix(line(s).trim(), 16).expect("chunk size");
            let start = body.len();
            body.resize(start + size, 0);
            s.read_exact(&mut body[start..]).expect("chunk");
            assert_eq!(line(s), "", "chunk end");
            if size == 0 {
                break;
            }
        }
    }
    (head, body)
}

fn rss_anon_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("status")
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("RssAnon")
}

/// Between requests an outbound HTTP/1.1 connection holds no HTTP buffers (it is parked), and
/// nothing the client sent is lost on the way: a pipelined request's first half, a request body
/// sent in two parts, a long response the client reads slowly; keep-alive survives all of them.
#[tokio::test(flavor = "multi_thread")]
async fn idle_keep_alive_connections_are_parked_without_losing_bytes() {
    let pki = Pki::new();
    let app = apps::http_app("users").await;
    let pair = Pair::start(&pki, "user-service", app.addr, "", "");
    let outbound = pair.caller.ports.outbound;
    let pid = pair.caller.pid();
    tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(outbound).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let hello = "GET /hello HTTP/1.1\r\nHost: user-service\r\n\r\n";
        // A whole request and the first half of the next one, then a pause while idle.
        let echo = "GET /echo/parked HTTP/1.1\r\nHost: user-service\r\nX-Part: two\r\n\r\n";
        let (first, second) = echo.split_at(30);
        s.write_all(format!("{hello}{first}").as_bytes())
            .expect("write");
        let (head, body) = read_response(&mut s);
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert_eq!(body, b"hello from users");
        std::thread::sleep(Duration::from_millis(300));
        s.write_all(second.as_bytes()).expect("write");
        let (head, body) = read_response(&mut s);
        assert!(head.starts_with("http/1.1 200"), "{head}");
        let seen: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(seen["path"], "/echo/parked");

        // A body in two parts with a pause between: the request is in flight, not idle.
        s.write_all(
            b"POST /mirror HTTP/1.1\r\nHost: user-service\r\nContent-Length: 10\r\n\r\nhello",
        )
        .expect("write");
        std::thread::sleep(Duration::from_millis(300));
        s.write_all(b"world").expect("write");
        let (head, body) = read_response(&mut s);
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert_eq!(body, b"helloworld");

        // A long response read slowly, then two pipelined requests in one write.
        s.write_all(b"GET /bytes/4000000 HTTP/1.1\r\nHost: user-service\r\n\r\n")
            .expect("write");
        std::thread::sleep(Duration::from_millis(300));
        let (head, body) = read_response(&mut s);
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert_eq!(body.len(), 4_000_000);
        assert!(body.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8));
        s.write_all(format!("{hello}{hello}").as_bytes())
            .expect("write");
        for _ in 0..2 {
            let (head, body) = read_response(&mut s);
            assert!(head.starts_with("http/1.1 200"), "{head}");
            assert!(!head.contains("connection: close"), "{head}");
            assert_eq!(body, b"hello from users");
        }

        // Memory: 400 connections, each after one request, cost what a parked socket costs, not
        // hyper's two 8 KiB buffers (about 15 KiB per connection before parking).
        let open = |n: usize| {
            (0..n)
                .map(|_| {
                    let mut c = std::net::TcpStream::connect(outbound).expect("connect");
                    c.set_read_timeout(Some(Duration::from_secs(10)))
                        .expect("timeout");
                    c.write_all(hello.as_bytes()).expect("write");
                    let (head, _) = read_response(&mut c);
                    assert!(head.starts_with("http/1.1 200"), "{head}");
                    c
                })
                .collect::<Vec<_>>()
        };
        let warm = open(100);
        let before = rss_anon_kib(pid);
        let held = open(400);
        std::thread::sleep(Duration::from_millis(200));
        let per_connection = (rss_anon_kib(pid).saturating_sub(before)) as f64 / 400.0;
        eprintln!("{per_connection:.1} KiB of anonymous memory per idle connection");
        assert!(
            per_connection < 8.0,
            "{per_connection:.1} KiB of anonymous memory per idle connection"
        );
        drop((warm, held));
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\ncaller log:\n{}", pair.caller.logs()));
}

/// The callee drives its HTTP/1.1 connections to the app from the requests themselves and
/// pools them between requests (`proxy::http1`): sequential requests of every shape (small,
/// large and streamed bodies, 204 and HEAD without one, uploads) share one app connection; a
/// pooled connection the app has cut is replaced without failing the request that finds it;
/// a client that drops a response half-way costs that connection only, as does an app that
/// answers an upload early without reading it.
#[tokio::test(flavor = "multi_thread")]
async fn app_connections_are_reused_and_a_cut_one_is_replaced() {
    let pki = Pki::new();
    let app = apps::ConnectionsApp::start("users").await;
    let pair = Pair::start(&pki, "user-service", app.app.addr, "", "");
    let out = pair.caller.outbound_url();
    let http = client();
    let request = |method: reqwest::Method, path: &str| {
        http.request(method, format!("{out}{path}"))
            .header("host", "user-service")
    };
    let hello = || async {
        let r = request(reqwest::Method::GET, "/hello")
            .send()
            .await
            .expect("hello");
        let status = r.status();
        let body = r.text().await.expect("body");
        assert_eq!(status, 200, "{body} ({} app connections)", app.accepted());
        assert_eq!(body, "hello from users");
    };
    let upload: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
    for _ in 0..5 {
        hello().await;
        let r = request(reqwest::Method::GET, "/bytes/300000")
            .send()
            .await
            .expect("download");
        let body = r.bytes().await.expect("body");
        assert_eq!(body.len(), 300_000);
        assert!(
            body.iter()
                .enumerate()
                .all(|(i, b)| usize::from(*b) == i % 251)
        );
        let r = request(reqwest::Method::GET, "/status/204")
            .send()
            .await
            .expect("204");
        assert_eq!(r.status(), 204);
        let r = request(reqwest::Method::HEAD, "/hello")
            .send()
            .await
            .expect("HEAD");
        assert_eq!(r.status(), 200);
        assert!(r.bytes().await.expect("body").is_empty());
        let r = request(reqwest::Method::POST, "/mirror")
            .body(upload.clone())
            .send()
            .await
            .expect("mirror");
        assert_eq!(r.bytes().await.expect("body").as_ref(), upload.as_slice());
        let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
            upload.chunks(7_000).map(|c| Ok(c.to_vec())).collect();
        let r = request(reqwest::Method::POST, "/echo")
            .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
                chunks,
            )))
            .send()
            .await
            .expect("chunked upload");
        let seen: serde_json::Value = r.json().await.expect("json");
        assert_eq!(seen["body_len"], 200_000);
    }
    assert_eq!(
        app.accepted(),
        1,
        "30 sequential requests share one app connection"
    );

    app.cut_all();
    tokio::time::sleep(Duration::from_millis(200)).await;
    for _ in 0..3 {
        hello().await;
    }
    assert_eq!(app.accepted(), 2, "the cut connection is replaced once");

    // 16 MB cannot fit in the windows and socket buffers on the way: the download is cut
    // while the callee is still reading it from the app.
    let mut r = request(reqwest::Method::GET, "/bytes/16000000")
        .send()
        .await
        .expect("download");
    assert!(r.chunk().await.expect("first chunk").is_some());
    drop(r);
    for _ in 0..3 {
        hello().await;
    }
    assert_eq!(
        app.accepted(),
        3,
        "only the dropped download's connection is replaced"
    );

    // A client of its own: a connection whose request body was not read is closed after the
    // answer, and a client may race to reuse it (hyper's IncompleteMessage).
    let r = client()
        .post(format!("{out}/status/413"))
        .header("host", "user-service")
        .body(vec![0u8; 1 << 20])
        .send()
        .await
        .expect("early answer");
    // The app closes the connection with most of the upload unread, so its kernel resets the
    // connection, and the reset can destroy the 413 before the sidecar reads it. The sidecar
    // then answers 503 `unavailable` itself, as Envoy does. Either way it keeps serving.
    let status = r.status().as_u16();
    let body = r.text().await.expect("body");
    assert!(
        status == 413 || (status == 503 && body.contains("unavailable")),
        "{status} {body}"
    );
    let together = (0..40).map(|_| hello());
    futures_util::future::join_all(together).await;
    assert!(
        app.accepted() <= 3 + 1 + 40,
        "{} app connections",
        app.accepted()
    );

    // Idle connections the app closes are closed on the sidecar's side too, by the pool's
    // sweep (every 5 s), even when no request comes to take them.
    const ESTABLISHED: &str = "01";
    const CLOSE_WAIT: &str = "08";
    assert!(
        sockets_to(app.app.addr, ESTABLISHED) > 0,
        "the pool holds idle connections"
    );
    app.cut_all();
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        sockets_to(app.app.addr, CLOSE_WAIT),
        0,
        "closed by the sweep"
    );
}

/// Sockets on this host towards `addr` in a TCP state (`/proc/net/tcp`'s hex code: 01
/// established, 08 `CLOSE_WAIT`, closed by that peer and not yet by ours).
fn sockets_to(addr: std::net::SocketAddr, state: &str) -> usize {
    let remote = format!(":{:04X}", addr.port());
    std::fs::read_to_string("/proc/net/tcp")
        .expect("/proc/net/tcp")
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.len() > 3 && fields[2].ends_with(&remote) && fields[3] == state
        })
        .count()
}
