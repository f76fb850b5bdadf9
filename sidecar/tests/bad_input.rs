//! The bad-input matrix (issue 10): each hostile or malformed input gets the contract's answer,
//! and the sidecar serves the next good request. Raw sockets, so nothing is cleaned up by a
//! client library first. The matrix and its results are listed in `docs/reliability.md`.

mod support;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use support::{Pair, Pki, apps, client};

/// Sends raw bytes on a fresh connection, returns what came back before close/timeout.
fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let _ = s.write_all(bytes);
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).to_string()
}

fn status_of(answer: &str) -> Option<u16> {
    answer.split(' ').nth(1)?.parse().ok()
}

async fn still_serves(pair: &Pair) {
    let r = client()
        .get(format!("{}/hello", pair.caller.outbound_url()))
        .header("host", "user-service")
        .send()
        .await
        .expect("the next good request");
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_http1_requests_get_400_and_nothing_reaches_the_app() {
    let pki = Pki::new();
    let app = apps::http_app("users").await;
    let pair = Pair::start(&pki, "user-service", app.addr, "", "");
    let out = pair.caller.ports.outbound;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("garbage request line", b"GARBAGE\r\n\r\n".to_vec()),
        ("bad version", b"GET /hello HTTP/9.9\r\nHost: user-service\r\n\r\n".to_vec()),
        ("header without colon", b"GET /hello HTTP/1.1\r\nHost user-service\r\n\r\n".to_vec()),
        (
            "control character in a header value",
            b"GET /hello HTTP/1.1\r\nHost: user-service\r\nX-Bad: a\x01b\r\n\r\n".to_vec(),
        ),
        (
            "invalid UTF-8 in the path",
            b"GET /caf\xc3\x28 HTTP/1.1\r\nHost: user-service\r\n\r\n".to_vec(),
        ),
        (
            "control character in the authority",
            b"GET /hello HTTP/1.1\r\nHost: user\x07service\r\n\r\n".to_vec(),
        ),
        (
            "conflicting Content-Length",
            b"POST /echo HTTP/1.1\r\nHost: user-service\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!".to_vec(),
        ),
        (
            "negative Content-Length",
            b"POST /echo HTTP/1.1\r\nHost: user-service\r\nContent-Length: -1\r\n\r\n".to_vec(),
        ),
        (
            "bad chunk size",
            b"POST /echo HTTP/1.1\r\nHost: user-service\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\nhello\r\n0\r\n\r\n".to_vec(),
        ),
    ];
    for (what, bytes) in cases {
        let answer = tokio::task::spawn_blocking(move || raw(out, &bytes))
            .await
            .expect("join");
        let status = status_of(&answer);
        assert!(
            status.is_none() || status == Some(400),
            "{what}: expected 400 or a closed connection, got {answer:?}"
        );
        assert!(
            !answer.contains("hello from"),
            "{what} reached the app: {answer}"
        );
    }
    // A bad chunk may be detected after the head was forwarded; nothing else reached the app.
    assert!(app.hits() <= 1, "app hits: {}", app.hits());
    still_serves(&pair).await;
}

/// A body that breaks after its head and first chunk went out over the mesh's HTTP/2 leg: the
/// caller's sidecar resets the stream and answers 400 itself (the client's fault, not the
/// upstream's), and keeps serving.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_body_that_breaks_mid_way_gets_400() {
    let pki = Pki::new();
    let app = apps::http_app("users").await;
    let pair = Pair::start(&pki, "user-service", app.addr, "", "");
    let out = pair.caller.ports.outbound;
    let bytes = b"POST /echo HTTP/1.1\r\nHost: user-service\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nZZ\r\n".to_vec();
    let answer = tokio::task::spawn_blocking(move || raw(out, &bytes))
        .await
        .expect("join");
    assert_eq!(status_of(&answer), Some(400), "{answer:?}");
    assert!(answer.contains("bad-request"), "{answer:?}");
    still_serves(&pair).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn request_smuggling_attempts_are_not_split_into_two_requests() {
    let pki = Pki::new();
    let app = apps::http_app("users").await;
    let pair = Pair::start(&pki, "user-service", app.addr, "", "");
    let out = pair.caller.ports.outbound;
    // CL.TE: a front end honouring Content-Length would see one request, a back end honouring
    // chunked would see a second one starting with "GET /hello".
    let smuggle = b"POST /echo HTTP/1.1\r\nHost: user-service\r\nContent-Length: 43\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /hello HTTP/1.1\r\nHost: user-service\r\n\r\n".to_vec();
    let answer = tokio::task::spawn_blocking(move || raw(out, &smuggle))
        .await
        .expect("join");
    let responses = answer.matches("HTTP/1.1 ").count();
    assert!(
        responses <= 1,
        "one request in, at most one answer out: {answer}"
    );
    assert!(app.hits() <= 1, "app saw {} requests", app.hits());
    still_serves(&pair).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn huge_and_negative_grpc_timeouts_fall_back_to_the_policy() {
    let pki = Pki::new();
    let grpc = apps::grpc_app().await;
    let pair = Pair::start(&pki, "echo-service", grpc, "", "");
    let message = prost::Message::encode_to_vec(&outrider::pb::echo::EchoRequest {
        message: "x".into(),
        ..Default::default()
    });
    for bad in ["999999999S", "-5m", "5x", "", "1000000000000H"] {
        let (status, grpc_status, _) = support::raw_grpc_call(
            pair.caller.ports.outbound,
            "echo-service",
            "/echo.v1.Echo/Unary",
            &message,
            &[("grpc-timeout", bad)],
        )
        .await;
        assert_eq!(status, 200, "grpc-timeout {bad:?}");
        assert_eq!(grpc_status.as_deref(), Some("0"), "grpc-timeout {bad:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn h2_rapid_reset_flood_is_cut_off_and_others_are_served() {
    let pki = Pki::new();
    let app = apps::http_app("users").await;
    let pair = Pair::start(&pki, "user-service", app.addr, "", "");
    let (mut h2, conn) = support::raw_h2(pair.caller.ports.outbound).await;
    let flood = async move {
        let mut sent = 0;
        for _ in 0..5000 {
            let req = http::Request::builder()
                .uri("http://user-service/slow/2000")
                .body(())
                .expect("request");
            let Ok(ready) = h2.clone().ready().await else {
                break;
            };
            h2 = ready;
            match h2.send_request(req, true) {
                Ok((_, mut stream)) => {
                    stream.send_reset(h2::Reason::CANCEL);
                    sent += 1;
                }
                Err(_) => break,
            }
        }
        sent
    };
    // A server that stops accepting streams (back-pressure) also ends the flood.
    let sent = tokio::time::timeout(Duration::from_secs(10), flood)
        .await
        .unwrap_or(0);
    // The server ends the connection (GOAWAY) long before 5000 resets.
    let ended = tokio::time::timeout(Duration::from_secs(5), conn).await;
    assert!(
        ended.is_ok() || sent < 5000,
        "the flooding connection was not cut off"
    );
    still_serves(&pair).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn websocket_upgrade_to_a_plain_http_route_gets_its_answer() {
    let pki = Pki::new();
    let app = apps::http_app("users").await;
    let pair = Pair::start(&pki, "user-service", app.addr, "", "");
    let out = pair.caller.ports.outbound;
    let answer = tokio::task::spawn_blocking(move || {
        raw(
            out,
            b"GET /hello HTTP/1.1\r\nHost: user-service\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        )
    })
    .await
    .expect("join");
    assert_eq!(status_of(&answer), Some(200), "{answer}");
    assert!(answer.contains("hello from users"));
    still_serves(&pair).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_on_the_outbound_and_admin_listeners() {
    let pki = Pki::new();
    let app = apps::http_app("users").await;
    let pair = Pair::start(&pki, "user-service", app.addr, "", "");
    let listeners = [pair.caller.ports.outbound, pair.caller.ports.admin];
    tokio::task::spawn_blocking(move || {
        for addr in listeners {
            for junk in [
                &[0u8; 64][..],
                &[0xff, 0xfe, 0x00, 0x16, 0x03, 0x01][..],
                &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x09garbage!!"[..],
                &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"[..],
            ] {
                let answer = raw(addr, junk);
                assert!(!answer.contains(" 200 "), "{addr}: {answer}");
            }
        }
    })
    .await
    .expect("join");
    still_serves(&pair).await;
    assert_eq!(
        support::http_get_status(pair.caller.ports.admin, "/live"),
        Some(200)
    );
}
