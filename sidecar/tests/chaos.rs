//! Chaos runs with bounded time (issue 10): an upstream that crashes and restarts in a loop
//! under load. No request may hang past its timeout, every failure must be a sidecar-made
//! error, and the success rate must recover once the upstream stays up.
//!
//! The other chaos runs live next to the helpers they need: the broker closing the sidecar's
//! connection again and again under a 10,000-message stream in `broker.rs`
//! (`connection_closed_repeatedly_during_10000_messages_loses_nothing`), the DNS server stopped
//! and restarted under load in `discovery.rs` (`dns_server_stopped_and_restarted_under_load`).
//! `docs/reliability.md` lists them all with their results.

mod support;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use support::{Pair, Pki, client, free_addr};

static MEASURING: AtomicBool = AtomicBool::new(false);

/// A real upstream process that can be killed with SIGKILL: python's threading HTTP server with
/// keep-alive and a listen backlog large enough for the load (the default of 5 drops SYNs).
const BACKEND: &str = r#"
import http.server, sys
class Handler(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args):
        pass
class Server(http.server.ThreadingHTTPServer):
    request_queue_size = 1024
Server(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"#;

fn start_backend(port: u16, dir: &std::path::Path) -> Child {
    Command::new("python3")
        .args(["-c", BACKEND, &port.to_string()])
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("python3 http.server")
}

fn wait_port(addr: std::net::SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(addr).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("backend did not come up on {addr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_crash_loop_under_load() {
    let pki = Pki::new();
    let www = tempfile::tempdir().expect("tempdir");
    std::fs::write(www.path().join("ok.txt"), "ok").expect("write");
    let addr = free_addr();
    let mut backend = start_backend(addr.port(), www.path());
    wait_port(addr);
    let timeout = Duration::from_millis(800);
    let pair = Pair::start(
        &pki,
        "flaky-service",
        addr,
        "policies:\n  default:\n    timeout: 800ms\n    connect_timeout: 200ms\n    circuit_breaker: { open_for: 200ms, max_open_for: 400ms }\n",
        "",
    );
    let url = format!("{}/ok.txt", pair.caller.outbound_url());

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let cut = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..8 {
        let (stop, ok, failed, cut, url) = (
            stop.clone(),
            ok.clone(),
            failed.clone(),
            cut.clone(),
            url.clone(),
        );
        workers.push(tokio::spawn(async move {
            let c = client();
            let mut slowest = Duration::ZERO;
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let r = c.get(&url).header("host", "flaky-service").send().await;
                slowest = slowest.max(started.elapsed());
                match r {
                    Ok(r) if r.status() == 200 => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => {
                        assert!(
                            r.headers().contains_key("x-outrider-error"),
                            "a failure not made by the sidecar: {}",
                            r.status()
                        );
                        if MEASURING.load(Ordering::Relaxed) {
                            eprintln!(
                                "failure after recovery: {} {:?}",
                                r.status(),
                                r.text().await.ok()
                            );
                        }
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                    // An upstream killed mid-response can only be passed on as a cut connection:
                    // allowed while it is being killed, never once it stays up.
                    Err(e) if MEASURING.load(Ordering::Relaxed) => {
                        panic!("the sidecar dropped a request after recovery: {e}")
                    }
                    Err(_) => {
                        cut.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            slowest
        }));
    }

    // Crash and restart the upstream five times while the load runs.
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let _ = backend.kill();
        let _ = backend.wait();
        tokio::time::sleep(Duration::from_millis(300)).await;
        backend = start_backend(addr.port(), www.path());
        wait_port(addr);
    }
    // Let it stay up, then measure recovery on a clean window.
    tokio::time::sleep(Duration::from_millis(500)).await;
    MEASURING.store(true, Ordering::Relaxed);
    let (ok_before, failed_before) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let mut slowest = Duration::ZERO;
    for w in workers {
        slowest = slowest.max(w.await.expect("worker"));
    }
    let _ = backend.kill();
    let _ = backend.wait();

    let recovered_ok = ok.load(Ordering::Relaxed) - ok_before;
    let recovered_failed = failed.load(Ordering::Relaxed) - failed_before;
    assert!(failed_before > 0, "the crashes were felt");
    let cut = cut.load(Ordering::Relaxed);
    assert!(
        cut * 100 <= failed_before + ok_before,
        "{cut} connections cut of {} requests: more than the rare kill mid-response",
        failed_before + ok_before
    );
    assert!(recovered_ok > 0);
    assert_eq!(
        recovered_failed, 0,
        "success rate recovers to 100% once the upstream stays up"
    );
    // Bounded by the timeout plus scheduling slack on a loaded 2-core machine.
    assert!(
        slowest < timeout + Duration::from_secs(2),
        "a request hung for {slowest:?}"
    );
}
