//! Resilience end to end (issue 4): retries, the retry budget, the circuit breaker, load-aware
//! balancing with outlier ejection, inbound rate and concurrency limits, and live reload of
//! policies. Real sidecars (the `outrider` binary) with mTLS on loopback, in front of a fault
//! backend whose answers each test scripts.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use outrider::pb::echo::EchoRequest;
use outrider::pb::echo::echo_client::EchoClient;
use support::apps::{self, Step};
use support::{Pair, Pki, Ports, Sidecar, client, free_addr};

const SVC: &str = "user-service";

/// Fast backoff so tests do not wait on jitter.
const FAST_BACKOFF: &str = "backoff: { base: 5ms, max: 20ms }";

struct Reply {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: String,
}

async fn send(sidecar: &Sidecar, method: reqwest::Method, path: &str) -> Reply {
    let r = client()
        .request(method, format!("{}{path}", sidecar.outbound_url()))
        .header("host", SVC)
        .send()
        .await
        .expect("request");
    Reply {
        status: r.status().as_u16(),
        headers: r.headers().clone(),
        body: r.text().await.expect("body"),
    }
}

async fn get(sidecar: &Sidecar, path: &str) -> Reply {
    send(sidecar, reqwest::Method::GET, path).await
}

fn retries(sidecar: &Sidecar) -> f64 {
    sidecar
        .metric(&format!("outrider_retries_total{{service=\"{SVC}\"}}"))
        .unwrap_or(0.0)
}

fn circuit_state(sidecar: &Sidecar) -> Option<f64> {
    sidecar.metric(&format!("outrider_circuit_state{{service=\"{SVC}\"}}"))
}

/// Callee sidecars for `SVC`, one per app, and a caller that knows them all as endpoints.
fn mesh(
    pki: &Pki,
    apps: &[SocketAddr],
    caller_extra: &str,
    callee_extra: &str,
) -> (Sidecar, Vec<Sidecar>) {
    let tls = pki.tls_yaml(SVC);
    let callees: Vec<Sidecar> = apps
        .iter()
        .map(|app| {
            Sidecar::start_with(
                &format!("service: {SVC}\napp: {app}\n{tls}{callee_extra}"),
                Ports::new(),
                &[],
            )
        })
        .collect();
    let endpoints: Vec<String> = callees
        .iter()
        .map(|c| format!("\"{}\"", c.ports.inbound))
        .collect();
    let caller = caller_for(pki, &endpoints, caller_extra);
    (caller, callees)
}

fn caller_for(pki: &Pki, endpoints: &[String], extra: &str) -> Sidecar {
    Sidecar::start(&format!(
        "service: web\napp: 127.0.0.1:9\n{}discovery:\n  services:\n    {SVC}: {{ endpoints: [{}] }}\n{extra}",
        pki.tls_yaml("web"),
        endpoints.join(", ")
    ))
}

/// Rewrites a sidecar's config file the way editors do (write a new file, rename over).
fn rewrite_config(sidecar: &Sidecar, edit: impl FnOnce(String) -> String) {
    let text = std::fs::read_to_string(&sidecar.config).expect("read config");
    let tmp = sidecar.config.with_extension("yaml.tmp");
    std::fs::write(&tmp, edit(text)).expect("write config");
    std::fs::rename(&tmp, &sidecar.config).expect("rename config");
}

async fn wait_for(what: &str, within: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what}: not within {within:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn retries_503_503_200_into_one_success_with_two_retries() {
    let pki = Pki::new();
    let app = apps::http_app("users").await;
    let pair = Pair::start(
        &pki,
        SVC,
        app.addr,
        &format!("policies:\n  default:\n    retry: {{ attempts: 3, {FAST_BACKOFF} }}\n"),
        "",
    );
    app.script("a", &[Step::status(503), Step::status(503)]);
    let r = get(&pair.caller, "/seq/a").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(app.seq_hits("a").len(), 3);
    assert_eq!(retries(&pair.caller), 2.0);

    // attempts: 3 means three tries in all: a fourth failure is returned as is.
    app.script(
        "b",
        &[Step::status(503), Step::status(503), Step::status(503)],
    );
    let r = get(&pair.caller, "/seq/b").await;
    assert_eq!(r.status, 503);
    assert_eq!(app.seq_hits("b").len(), 3);
    assert!(
        !r.headers.contains_key("x-outrider-error"),
        "the upstream's own 503 is passed through"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn post_is_not_retried_after_a_503_unless_its_route_names_it() {
    let pki = Pki::new();
    let app = apps::http_app("users").await;
    let pair = Pair::start(
        &pki,
        SVC,
        app.addr,
        &format!(
            "policies:\n  default:\n    retry: {{ attempts: 3, {FAST_BACKOFF} }}\n  routes:\n    - {{ service: {SVC}, method: POST, path_prefix: /seq/idempotent }}\n    - {{ service: {SVC}, path_prefix: /seq/no-retry, retry: {{ attempts: 1 }} }}\n"
        ),
        "",
    );
    app.script("plain", &[Step::status(503)]);
    let r = send(&pair.caller, reqwest::Method::POST, "/seq/plain").await;
    assert_eq!(r.status, 503);
    assert_eq!(
        app.seq_hits("plain").len(),
        1,
        "POST reached the app: no retry"
    );

    app.script("idempotent", &[Step::status(503)]);
    let r = send(&pair.caller, reqwest::Method::POST, "/seq/idempotent").await;
    assert_eq!(r.status, 200, "a route that names POST may retry it");
    assert_eq!(app.seq_hits("idempotent").len(), 2);

    app.script("no-retry", &[Step::status(503)]);
    let r = get(&pair.caller, "/seq/no-retry").await;
    assert_eq!(r.status, 503, "a route with attempts: 1 never retries");
    assert_eq!(app.seq_hits("no-retry").len(), 1);
    assert_eq!(retries(&pair.caller), 1.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn retry_after_is_honoured_when_it_fits_in_the_timeout() {
    let pki = Pki::new();
    let app = apps::http_app("users").await;
    let pair = Pair::start(
        &pki,
        SVC,
        app.addr,
        &format!(
            "policies:\n  default:\n    timeout: 3s\n    retry: {{ attempts: 3, {FAST_BACKOFF} }}\n"
        ),
        "",
    );
    app.script("limited", &[Step::status(429).retry_after("1")]);
    let r = get(&pair.caller, "/seq/limited").await;
    assert_eq!(r.status, 200);
    let hits = app.seq_hits("limited");
    assert_eq!(hits.len(), 2);
    let gap = hits[1] - hits[0];
    assert!(
        gap >= Duration::from_millis(950) && gap < Duration::from_millis(1800),
        "the retry came {gap:?} after the 429 with Retry-After: 1"
    );

    // Retry-After beyond the deadline: the 429 is returned at once.
    app.script("later", &[Step::status(429).retry_after("10")]);
    let started = Instant::now();
    let r = get(&pair.caller, "/seq/later").await;
    assert_eq!(r.status, 429);
    assert_eq!(r.headers["retry-after"], "10");
    assert_eq!(app.seq_hits("later").len(), 1);
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_budget_holds_retries_near_its_ratio_in_an_outage() {
    let pki = Pki::new();
    let app = apps::http_app("users").await;
    let pair = Pair::start(
        &pki,
        SVC,
        app.addr,
        &format!(
            "policies:\n  default:\n    retry: {{ attempts: 3, {FAST_BACKOFF}, budget: {{ ratio: 0.2, min_per_second: 0 }} }}\n    circuit_breaker: {{ consecutive_failures: 1000000 }}\n"
        ),
        "",
    );
    let requests = 100;
    for _ in 0..requests {
        assert_eq!(get(&pair.caller, "/status/503").await.status, 503);
    }
    let hits = app.hits();
    let retried = retries(&pair.caller);
    // Without a budget: 300 hits. With ratio 0.2: about 20 retries.
    assert!(
        (115..=122).contains(&hits),
        "{hits} app hits for {requests} requests"
    );
    assert!((15.0..=22.0).contains(&retried), "{retried} retries");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_breaker_opens_answers_the_fallback_half_opens_doubles_and_closes() {
    let pki = Pki::new();
    let app = apps::http_app("users").await;
    let pair = Pair::start(
        &pki,
        SVC,
        app.addr,
        "policies:\n  default:\n    retry: { attempts: 1 }\n    circuit_breaker:\n      consecutive_failures: 3\n      open_for: 1s\n      max_open_for: 10s\n      fallback: { status: 503, content_type: text/plain, body: 'try later' }\n",
        "",
    );
    let caller = &pair.caller;
    assert_eq!(get(caller, "/status/404").await.status, 404);
    for _ in 0..3 {
        assert_eq!(get(caller, "/status/500").await.status, 500);
    }
    assert_eq!(circuit_state(caller), Some(1.0), "open");
    let before = app.hits();
    let r = get(caller, "/hello").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.headers["x-outrider-error"], "circuit-open");
    assert_eq!(r.headers["content-type"], "text/plain");
    assert_eq!(r.body, "try later");
    assert_eq!(app.hits(), before, "an open circuit sends nothing upstream");

    // After open_for, one probe; it fails: open again, for twice as long.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(get(caller, "/status/503").await.status, 503);
    assert_eq!(app.hits(), before + 1);
    assert_eq!(circuit_state(caller), Some(1.0));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = get(caller, "/hello").await;
    assert_eq!(
        r.headers["x-outrider-error"], "circuit-open",
        "open_for doubled to 2s"
    );
    assert_eq!(app.hits(), before + 1);

    // At 2s: the probe goes through; others keep getting the fallback meanwhile.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let probe = {
        let caller_url = caller.outbound_url();
        tokio::spawn(async move {
            client()
                .get(format!("{caller_url}/slow/600"))
                .header("host", SVC)
                .send()
                .await
                .expect("probe")
                .status()
                .as_u16()
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        circuit_state(caller),
        Some(2.0),
        "half-open during the probe"
    );
    let r = get(caller, "/hello").await;
    assert_eq!(
        r.headers["x-outrider-error"], "circuit-open",
        "one probe at a time"
    );
    assert_eq!(probe.await.expect("join"), 200);
    assert_eq!(
        circuit_state(caller),
        Some(0.0),
        "closed after a good probe"
    );
    assert_eq!(get(caller, "/hello").await.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn breaker_state_survives_a_reload_of_unrelated_keys() {
    let pki = Pki::new();
    let app = apps::http_app("users").await;
    let pair = Pair::start(
        &pki,
        SVC,
        app.addr,
        "policies:\n  default:\n    retry: { attempts: 1 }\n    circuit_breaker: { consecutive_failures: 2, open_for: 1m }\n",
        "",
    );
    let caller = &pair.caller;
    for _ in 0..2 {
        assert_eq!(get(caller, "/status/502").await.status, 502);
    }
    assert_eq!(circuit_state(caller), Some(1.0));
    rewrite_config(caller, |text| format!("{text}access_log: true\n"));
    wait_for("the reload", Duration::from_secs(3), || {
        caller.metric("outrider_config_reloads_total{result=\"ok\"}") == Some(1.0)
    })
    .await;
    let before = app.hits();
    let r = get(caller, "/hello").await;
    assert_eq!(r.headers["x-outrider-error"], "circuit-open");
    assert_eq!(app.hits(), before);
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_unavailable_is_retried() {
    let pki = Pki::new();
    let (grpc, calls) = apps::flaky_grpc_app(2, tonic::Code::Unavailable).await;
    let pair = Pair::start(
        &pki,
        "echo-service",
        grpc,
        &format!("policies:\n  default:\n    retry: {{ attempts: 3, {FAST_BACKOFF} }}\n"),
        "",
    );
    let channel = tonic::transport::Endpoint::from_shared(pair.caller.outbound_url())
        .expect("endpoint")
        .origin("http://echo-service".parse().expect("origin"))
        .connect()
        .await
        .expect("connect");
    let reply = EchoClient::new(channel)
        .unary(EchoRequest {
            message: "again".into(),
            ..Default::default()
        })
        .await
        .expect("retried into a success");
    assert_eq!(reply.get_ref().message, "again");
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 3);
    assert_eq!(
        pair.caller
            .metric("outrider_retries_total{service=\"echo-service\"}"),
        Some(2.0)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_status_in_real_trailers_is_retried_too() {
    // The callee's app is down: the callee sidecar answers gRPC UNAVAILABLE in a trailers
    // frame (not trailers-only); the caller reads that first frame and retries.
    let pki = Pki::new();
    let pair = Pair::start(
        &pki,
        "echo-service",
        free_addr(),
        &format!("policies:\n  default:\n    retry: {{ attempts: 3, {FAST_BACKOFF} }}\n"),
        "",
    );
    let (status, grpc_status, _) = support::raw_grpc_call(
        pair.caller.ports.outbound,
        "echo-service",
        "/echo.v1.Echo/Unary",
        b"",
        &[],
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(grpc_status.as_deref(), Some("14"));
    assert_eq!(
        pair.caller
            .metric("outrider_retries_total{service=\"echo-service\"}"),
        Some(2.0)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn most_requests_go_to_the_faster_endpoint() {
    let pki = Pki::new();
    let fast = apps::http_app("fast").await;
    let slow = apps::http_app("slow").await;
    slow.set_lag(Duration::from_millis(60));
    let (caller, _callees) = mesh(&pki, &[fast.addr, slow.addr], "", "");
    let mut to_fast = 0;
    let n = 60;
    for _ in 0..n {
        let r = get(&caller, "/lag").await;
        assert_eq!(r.status, 200);
        to_fast += usize::from(r.body == "fast");
    }
    assert!(
        to_fast >= n * 8 / 10,
        "{to_fast} of {n} to the fast endpoint"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_endpoint_that_refuses_connections_is_ejected_and_traffic_continues() {
    let pki = Pki::new();
    let app = apps::http_app("users").await;
    let callee = Sidecar::start(&format!(
        "service: {SVC}\napp: {}\n{}",
        app.addr,
        pki.tls_yaml(SVC)
    ));
    let dead = free_addr(); // nothing listens here
    let caller = caller_for(
        &pki,
        &[
            format!("\"{}\"", callee.ports.inbound),
            format!("\"{dead}\""),
        ],
        "policies:\n  default:\n    retry: { attempts: 1 }\n    outlier: { consecutive_failures: 1, eject_for: 1m }\n",
    );
    let mut failed = Vec::new();
    for i in 0..40 {
        let r = get(&caller, "/hello").await;
        if r.status != 200 {
            failed.push(i);
        }
    }
    assert!(failed.len() <= 1, "failed requests: {failed:?}");
    assert!(
        failed.iter().all(|&i| i < 5),
        "failures only at first: {failed:?}"
    );
    assert_eq!(
        caller.metric(&format!(
            "outrider_outlier_ejections_total{{service=\"{SVC}\"}}"
        )),
        Some(f64::from(u8::from(!failed.is_empty()))),
    );

    // With the default retry on connect-error, no request fails at all, POSTs included: a
    // refused connection provably never reached the app.
    let caller = caller_for(
        &pki,
        &[
            format!("\"{dead}\""),
            format!("\"{}\"", callee.ports.inbound),
        ],
        "",
    );
    for i in 0..20 {
        let method = if i % 2 == 0 {
            reqwest::Method::POST
        } else {
            reqwest::Method::GET
        };
        let r = send(&caller, method.clone(), "/echo").await;
        assert_eq!(r.status, 200, "{method} #{i}: {}", r.body);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn inbound_rate_limit_answers_429_with_retry_after() {
    let pki = Pki::new();
    let app = apps::http_app("users").await;
    let pair = Pair::start(
        &pki,
        SVC,
        app.addr,
        "policies:\n  default:\n    retry: { attempts: 1 }\n",
        "inbound:\n  rate_limit: { per_second: 1, burst: 3 }\n",
    );
    let mut statuses = Vec::new();
    let mut limited = None;
    for _ in 0..6 {
        let r = get(&pair.caller, "/hello").await;
        statuses.push(r.status);
        if r.status == 429 {
            limited = Some(r);
        }
    }
    assert_eq!(&statuses[..3], &[200, 200, 200], "{statuses:?}");
    assert!(statuses[3..].iter().all(|&s| s == 429), "{statuses:?}");
    let limited = limited.expect("a 429");
    assert_eq!(limited.headers["x-outrider-error"], "rate-limited");
    let after: u64 = limited.headers["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((1..=2).contains(&after), "Retry-After: {after}");
    assert_eq!(app.hits(), 3);
    assert_eq!(pair.callee.metric("outrider_rate_limited_total"), Some(3.0));

    // gRPC callers get RESOURCE_EXHAUSTED.
    let (status, grpc_status, headers) = support::raw_grpc_call(
        pair.caller.ports.outbound,
        SVC,
        "/echo.v1.Echo/Unary",
        b"",
        &[],
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(grpc_status.as_deref(), Some("8"));
    assert_eq!(headers["x-outrider-error"], "rate-limited");
}

#[tokio::test(flavor = "multi_thread")]
async fn inbound_max_concurrent_answers_429() {
    let pki = Pki::new();
    let app = apps::http_app("users").await;
    let pair = Pair::start(
        &pki,
        SVC,
        app.addr,
        "policies:\n  default:\n    retry: { attempts: 1 }\n",
        "inbound:\n  max_concurrent: 1\n",
    );
    let url = pair.caller.outbound_url();
    let slow = tokio::spawn(async move {
        client()
            .get(format!("{url}/slow/800"))
            .header("host", SVC)
            .send()
            .await
            .expect("slow")
            .status()
            .as_u16()
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = get(&pair.caller, "/hello").await;
    assert_eq!(r.status, 429);
    assert!(r.headers.contains_key("retry-after"));
    assert_eq!(slow.await.expect("join"), 200);
    assert_eq!(
        get(&pair.caller, "/hello").await.status,
        200,
        "the slot is free again"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_timeout_is_reloaded_live_and_an_invalid_config_is_refused() {
    let pki = Pki::new();
    let app = apps::http_app("users").await;
    let pair = Pair::start(
        &pki,
        SVC,
        app.addr,
        "policies:\n  default:\n    timeout: 300ms\n",
        "",
    );
    let caller = &pair.caller;
    let r = get(caller, "/slow/700").await;
    assert_eq!(r.status, 504);
    assert_eq!(r.headers["x-outrider-error"], "timeout");

    rewrite_config(caller, |text| text.replace("timeout: 300ms", "timeout: 3s"));
    let changed = Instant::now();
    loop {
        let r = get(caller, "/slow/700").await;
        if r.status == 200 {
            break;
        }
        assert!(
            changed.elapsed() < Duration::from_secs(3),
            "the new timeout is not in force; log:\n{}",
            caller.logs()
        );
    }
    assert_eq!(
        caller.metric("outrider_config_reloads_total{result=\"ok\"}"),
        Some(1.0)
    );

    rewrite_config(caller, |text| {
        format!("{text}policies: [this is: not valid\n")
    });
    wait_for("the rejection", Duration::from_secs(3), || {
        caller.metric("outrider_config_reloads_total{result=\"rejected\"}") == Some(1.0)
    })
    .await;
    let r = get(caller, "/slow/700").await;
    assert_eq!(r.status, 200, "the old (3s) config still serves");
}
