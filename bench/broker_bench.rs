//! Broker bridge benchmark: raw lapin against the same work through the bridge, in one run.
//!
//! 1. publish, raw: one confirm-mode channel, persistent 1 KiB messages, C concurrent publishers
//!    each awaiting its own confirm (C = the HTTP concurrency it is compared with), twice: with a
//!    minimal message, and with the same message the bridge sends (the CONTRACT §5 properties
//!    and `mandatory`), which RabbitMQ confirms more slowly; and fully pipelined (everything
//!    sent, then every confirm awaited: the upper bound);
//! 2. publish through a sidecar's HTTP API (`POST /v1/queues/{q}` on its outbound listener) at 16,
//!    32 and 64 concurrent keep-alive connections, each request answered after its confirm
//!    (`BENCH_HTTP=2`: C streams on one HTTP/2 connection instead);
//! 3. consume + ack, raw, prefetch P, from a backlog of N;
//! 4. delivery through a sidecar to a trivial app (HTTP 200), prefetch P, from a backlog of N.
//!
//! The sidecars are real `outrider` processes (the release binary next to this example's
//! directory), as an app would run them: their runtime, listener and request path are the ones
//! measured, and this process only plays the app and the raw client.
//!
//! Run with `bench/broker.sh` (release build). Needs RabbitMQ on 127.0.0.1:5672 (guest/guest);
//! every queue it makes is named `bench.<random>.*` and deleted at the end.
//! Environment: `BENCH_N` (messages per run, default 20000), `BENCH_PREFETCH` (default 64),
//! `BENCH_ROUNDS` (default 3), `BENCH_AMQP` (default `amqp://guest:guest@127.0.0.1:5672/%2f`),
//! `BENCH_ONLY=publish` or `deliver` to run one half (for profiling it), `BENCH_HTTP=2`.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Empty, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tokio::sync::Notify;

type Error = Box<dyn std::error::Error + Send + Sync>;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let n = env_usize("BENCH_N", 20_000);
    let prefetch = env_usize("BENCH_PREFETCH", 64);
    let amqp = std::env::var("BENCH_AMQP")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let ns = format!("bench.{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let payload = vec![b'x'; 1024];
    println!(
        "broker bench: {n} persistent 1 KiB messages per run, prefetch {prefetch}, namespace {ns}"
    );

    let conn = Connection::connect(
        &amqp,
        ConnectionProperties::default().with_connection_name(format!("{ns} raw").into()),
    )
    .await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let raw_q = format!("{ns}.raw");
    let bridge_q = format!("{ns}.q");
    let work_q = format!("{ns}.work");
    for q in [&raw_q, &bridge_q, &work_q] {
        declare(&ch, q).await?;
    }

    // Each round measures everything once, interleaved, so a busy neighbour skews every
    // figure alike; the medians are reported.
    let rounds = env_usize("BENCH_ROUNDS", 3).max(1);
    let mut m: std::collections::BTreeMap<&str, Vec<f64>> = Default::default();
    let work = std::env::temp_dir().join(format!("outrider-{ns}"));
    std::fs::create_dir_all(&work)?;
    let publisher = Sidecar::start(
        &work,
        "publisher",
        &format!(
            "service: bench\nnamespace: bench\napp: 127.0.0.1:9\ntls: {{ mode: disabled }}\n\
             broker:\n  url: {amqp}\n  exchange: {ns}.x\n  enqueues: [{bridge_q}]\n"
        ),
    )
    .await?;
    let addr = publisher.outbound;
    let app = start_app().await?;
    let subscriber_yaml = format!(
        "service: bench\nnamespace: bench\napp: {}\ntls: {{ mode: disabled }}\n\
         broker:\n  url: {amqp}\n  exchange: {ns}.x\n  subscriptions:\n\
         \x20   - {{ queue: {work_q}, deliver: /work, prefetch: {prefetch} }}\n",
        app.addr
    );
    // (raw minimal message, raw same message as the bridge, through the sidecar, concurrency)
    const KEYS: [(&str, &str, &str, &str); 3] = [
        ("raw16", "same16", "via16", "16"),
        ("raw32", "same32", "via32", "32"),
        ("raw64", "same64", "via64", "64"),
    ];
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let http2 = std::env::var("BENCH_HTTP").is_ok_and(|v| v == "2");
    let (do_publish, do_deliver) = (only != "deliver", only != "publish");
    for round in 1..=rounds {
        if do_publish {
            let full = raw_publish(&ch, &raw_q, n, usize::MAX, &payload).await?;
            purge(&ch, &raw_q).await?;
            m.entry("full").or_default().push(full);
            for (raw_key, same_key, via_key, c) in KEYS {
                let c: usize = c.parse()?;
                let raw = raw_concurrent(&ch, &raw_q, n, c, &payload, RawMessage::Minimal).await?;
                purge(&ch, &raw_q).await?;
                let same =
                    raw_concurrent(&ch, &raw_q, n, c, &payload, RawMessage::AsBridge).await?;
                purge(&ch, &raw_q).await?;
                m.entry(same_key).or_default().push(same);
                let path = format!("/v1/queues/{bridge_q}");
                let via = http_publish(addr, &path, n, c, &payload, http2).await?;
                purge(&ch, &bridge_q).await?;
                m.entry(raw_key).or_default().push(raw);
                m.entry(via_key).or_default().push(via);
            }
        }
        if !do_deliver {
            println!("round {round} done");
            continue;
        }
        fill(&ch, &raw_q, n, &payload).await?;
        let inline = raw_consume(&conn, &raw_q, n, prefetch, false).await?;
        purge(&ch, &raw_q).await?;
        fill(&ch, &raw_q, n, &payload).await?;
        let spawned = raw_consume(&conn, &raw_q, n, prefetch, true).await?;
        purge(&ch, &raw_q).await?;
        fill(&ch, &work_q, n, &payload).await?;
        app.reset();
        let subscriber = Sidecar::start(&work, "subscriber", &subscriber_yaml).await?;
        let deliver = app.rate(n).await?;
        subscriber.stop().await;
        purge(&ch, &work_q).await?;
        m.entry("inline").or_default().push(inline);
        m.entry("spawned").or_default().push(spawned);
        m.entry("deliver").or_default().push(deliver);
        let full = m.get("full").and_then(|v| v.last()).copied().unwrap_or(0.0);
        println!(
            "round {round}: full {full:.0}, consume inline {inline:.0} / spawned {spawned:.0}, deliver {deliver:.0} msg/s"
        );
    }
    publisher.stop().await;
    let _ = std::fs::remove_dir_all(&work);

    let med = |key: &str| -> f64 {
        let mut v = m.get(key).cloned().unwrap_or_default();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    let full = med("full");
    println!("\nmedians of {rounds} rounds, msg/s (1 KiB persistent messages, N = {n}):");
    if do_publish {
        println!("  publish raw, fully pipelined (upper bound)       {full:>8.0}");
        for (raw_key, same_key, via_key, c) in KEYS {
            let (raw, same, via) = (med(raw_key), med(same_key), med(via_key));
            println!(
                "  publish c={c}: raw {raw:>6.0} (same message {same:>6.0})   via sidecar HTTP {via:>6.0}   = {:>3.0} % of raw, {:>3.0} % of raw same message, {:>3.0} % of fully pipelined",
                100.0 * via / raw,
                100.0 * via / same,
                100.0 * via / full
            );
        }
    }
    if do_deliver {
        let (inline, spawned, deliver) = (med("inline"), med("spawned"), med("deliver"));
        println!(
            "  consume+ack raw (prefetch {prefetch}): acks inline {inline:>8.0}, acks spawned {spawned:>8.0}"
        );
        println!(
            "  delivery via sidecar to app (prefetch {prefetch}) {deliver:>8.0}   = {:>3.0} % of inline-ack raw, {:>3.0} % of spawned-ack raw",
            100.0 * deliver / inline,
            100.0 * deliver / spawned
        );
    }

    // Every queue of this run, retry holding queues included.
    let listed = tokio::process::Command::new("rabbitmqctl")
        .args(["list_queues", "name", "-q"])
        .output()
        .await;
    let mut names: Vec<String> = listed
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    names.extend([
        raw_q.clone(),
        bridge_q.clone(),
        work_q.clone(),
        format!("{work_q}.dlq"),
    ]);
    for name in names.iter().filter(|n| n.starts_with(&ns)) {
        let _ = ch
            .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = ch
        .exchange_delete(format!("{ns}.x").as_str().into(), Default::default())
        .await;
    let _ = conn.close(200, "bench done".into()).await;
    Ok(())
}

async fn declare(ch: &Channel, q: &str) -> Result<(), Error> {
    ch.queue_declare(
        q.into(),
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await?;
    Ok(())
}

async fn purge(ch: &Channel, q: &str) -> Result<(), Error> {
    ch.queue_purge(q.into(), Default::default()).await?;
    Ok(())
}

fn props(i: usize) -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_correlation_id(format!("bench-{i}").into())
        .with_content_type("application/octet-stream".into())
}

/// Publishes `n` messages with at most `window` unconfirmed; returns msg/s.
async fn raw_publish(
    ch: &Channel,
    q: &str,
    n: usize,
    window: usize,
    payload: &[u8],
) -> Result<f64, Error> {
    let started = Instant::now();
    let mut pending = VecDeque::new();
    for i in 0..n {
        if pending.len() >= window
            && let Some(confirm) = pending.pop_front()
        {
            let c: lapin::Confirmation = confirm_await(confirm).await?;
            if !c.is_ack() {
                return Err("nack".into());
            }
        }
        let confirm = ch
            .basic_publish(
                "".into(),
                q.into(),
                BasicPublishOptions::default(),
                payload,
                props(i),
            )
            .await?;
        pending.push_back(confirm);
    }
    for confirm in pending {
        if !confirm_await(confirm).await?.is_ack() {
            return Err("nack".into());
        }
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

/// What the raw client publishes.
#[derive(Clone, Copy)]
enum RawMessage {
    /// Persistent, correlation id and content type only: the least a client can send.
    Minimal,
    /// What the bridge sends for `POST /v1/queues/{q}` (CONTRACT §5): the minimal properties
    /// plus `message_id` (a UUID), `timestamp`, `app_id` and `type`, and `mandatory` (so a
    /// deleted work queue is a 503, not a lost message). The like-for-like baseline.
    AsBridge,
}

impl RawMessage {
    fn publish(self, i: usize, queue: &str) -> (BasicPublishOptions, BasicProperties) {
        match self {
            RawMessage::Minimal => (BasicPublishOptions::default(), props(i)),
            RawMessage::AsBridge => (
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                props(i)
                    .with_message_id(uuid::Uuid::new_v4().to_string().into())
                    .with_timestamp(unix_now())
                    .with_app_id("bench".into())
                    .with_type(queue.into()),
            ),
        }
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `concurrency` tasks share the channel, each publishing and awaiting its own confirm in a
/// loop: what the bridge does for concurrent requests, minus HTTP.
async fn raw_concurrent(
    ch: &Channel,
    q: &str,
    n: usize,
    concurrency: usize,
    payload: &[u8],
    message: RawMessage,
) -> Result<f64, Error> {
    let next = Arc::new(AtomicUsize::new(0));
    let payload = Bytes::copy_from_slice(payload);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (ch, next, payload, q) = (ch.clone(), next.clone(), payload.clone(), q.to_string());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return Ok::<(), Error>(());
                }
                let (options, properties) = message.publish(i, &q);
                let confirm = ch
                    .basic_publish("".into(), q.as_str().into(), options, &payload, properties)
                    .await?;
                if !confirm_await(confirm).await?.is_ack() {
                    return Err("nack".into());
                }
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

async fn confirm_await(c: lapin::PublisherConfirm) -> Result<lapin::Confirmation, Error> {
    Ok(c.await?)
}

async fn fill(ch: &Channel, q: &str, n: usize, payload: &[u8]) -> Result<(), Error> {
    raw_publish(ch, q, n, usize::MAX, payload).await.map(|_| ())
}

async fn raw_consume(
    conn: &Connection,
    q: &str,
    n: usize,
    prefetch: usize,
    spawn_acks: bool,
) -> Result<f64, Error> {
    let ch = conn.create_channel().await?;
    ch.basic_qos(
        u16::try_from(prefetch).unwrap_or(u16::MAX),
        BasicQosOptions::default(),
    )
    .await?;
    let mut consumer = ch
        .basic_consume(
            q.into(),
            "bench-raw".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut started = None;
    let mut got = 0;
    while let Some(delivery) = consumer.next().await {
        let delivery = delivery?;
        started.get_or_insert_with(Instant::now);
        if spawn_acks {
            tokio::spawn(async move { delivery.ack(BasicAckOptions::default()).await });
        } else {
            delivery.ack(BasicAckOptions::default()).await?;
        }
        got += 1;
        if got == n {
            break;
        }
    }
    let elapsed = started.map_or(Duration::ZERO, |s| s.elapsed());
    let _ = ch.close(200, "done".into()).await;
    // The first message starts the clock: rate over the other n-1.
    Ok((n.saturating_sub(1)) as f64 / elapsed.as_secs_f64())
}

/// A sidecar process with its own config, on free loopback ports.
struct Sidecar {
    child: tokio::process::Child,
    outbound: SocketAddr,
}

impl Sidecar {
    async fn start(work: &std::path::Path, name: &str, yaml: &str) -> Result<Sidecar, Error> {
        let [outbound, inbound, admin] = [free_port()?, free_port()?, free_port()?];
        let path = work.join(format!("{name}.yaml"));
        std::fs::write(
            &path,
            format!(
                "{yaml}listen: {{ outbound: {outbound}, inbound: {inbound}, admin: {admin} }}\n"
            ),
        )?;
        let bin = std::env::current_exe()?
            .parent()
            .and_then(|examples| examples.parent())
            .ok_or("no target directory")?
            .join("outrider");
        let child = tokio::process::Command::new(&bin)
            .args(["run", "-c"])
            .arg(&path)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(work.join(format!("{name}.log")))?)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("{}: {e} (build it: cargo build --release)", bin.display()))?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ready(admin).await {
            if Instant::now() > deadline {
                return Err(format!("sidecar `{name}` not ready; see {}", work.display()).into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Sidecar { child, outbound })
    }

    /// SIGTERM, as an orchestrator stops it: in-flight deliveries finish and are acked.
    async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = tokio::process::Command::new("kill")
                .arg(pid.to_string())
                .status()
                .await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }
}

fn free_port() -> Result<SocketAddr, Error> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// `GET /ready` on the admin listener answers 200.
async fn ready(admin: SocketAddr) -> bool {
    let Ok(tcp) = tokio::net::TcpStream::connect(admin).await else {
        return false;
    };
    let Ok((mut send, conn)) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await
    else {
        return false;
    };
    tokio::spawn(conn);
    let Ok(req) = http::Request::get("/ready")
        .header("host", "localhost")
        .body(Empty::<Bytes>::new())
    else {
        return false;
    };
    send.send_request(req)
        .await
        .is_ok_and(|r| r.status().is_success())
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

/// `concurrency` keep-alive HTTP/1.1 connections (or, with `http2`, streams on one HTTP/2
/// connection) POSTing until `n` requests got 202.
async fn http_publish(
    addr: SocketAddr,
    path: &str,
    n: usize,
    concurrency: usize,
    payload: &[u8],
    http2: bool,
) -> Result<f64, Error> {
    let next = Arc::new(AtomicUsize::new(0));
    let payload = Bytes::copy_from_slice(payload);
    let started = Instant::now();
    let mut tasks = Vec::new();
    // HTTP/2: one connection, `concurrency` streams on it (as a gRPC-style client does).
    let h2 = if http2 {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let (send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        Some(send)
    } else {
        None
    };
    for _ in 0..concurrency {
        let next = next.clone();
        let payload = payload.clone();
        let path = path.to_string();
        let h2 = h2.clone();
        tasks.push(tokio::spawn(async move {
            let mut send = match h2 {
                Some(send) => Sender::H2(send),
                None => {
                    let tcp = tokio::net::TcpStream::connect(addr).await?;
                    tcp.set_nodelay(true)?;
                    let (send, conn) =
                        hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
                    tokio::spawn(conn);
                    Sender::H1(send)
                }
            };
            while next.fetch_add(1, Ordering::Relaxed) < n {
                let req = http::Request::post(path.as_str())
                    .header("host", "localhost")
                    .header("content-type", "application/octet-stream")
                    .body(Full::new(payload.clone()))?;
                let resp = match &mut send {
                    Sender::H1(s) => s.send_request(req).await?,
                    Sender::H2(s) => s.send_request(req).await?,
                };
                let status = resp.status();
                resp.into_body().collect().await?;
                if status != http::StatusCode::ACCEPTED {
                    return Err::<(), Error>(format!("bridge answered {status}").into());
                }
            }
            Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

/// A trivial app: 200 to everything, counting requests.
struct App {
    addr: SocketAddr,
    count: Arc<AtomicUsize>,
    first: Arc<std::sync::Mutex<Option<Instant>>>,
    changed: Arc<Notify>,
}

async fn start_app() -> Result<App, Error> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let count = Arc::new(AtomicUsize::new(0));
    let first = Arc::new(std::sync::Mutex::new(None));
    let changed = Arc::new(Notify::new());
    let (c, f, ch) = (count.clone(), first.clone(), changed.clone());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let _ = tcp.set_nodelay(true);
            let (c, f, ch) = (c.clone(), f.clone(), ch.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let (c, f, ch) = (c.clone(), f.clone(), ch.clone());
                    async move {
                        let _ = req.into_body().collect().await;
                        if let Ok(mut first) = f.lock() {
                            first.get_or_insert_with(Instant::now);
                        }
                        c.fetch_add(1, Ordering::Relaxed);
                        ch.notify_one();
                        Ok::<_, Infallible>(http::Response::new(Empty::<Bytes>::new()))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    Ok(App {
        addr,
        count,
        first,
        changed,
    })
}

impl App {
    fn reset(&self) {
        self.count.store(0, Ordering::Relaxed);
        if let Ok(mut first) = self.first.lock() {
            *first = None;
        }
    }

    /// Waits for `n` requests; msg/s from the first to the n-th.
    async fn rate(&self, n: usize) -> Result<f64, Error> {
        let deadline = Instant::now() + Duration::from_secs(300);
        while self.count.load(Ordering::Relaxed) < n {
            if Instant::now() > deadline {
                return Err("deliveries stalled".into());
            }
            let _ = tokio::time::timeout(Duration::from_millis(100), self.changed.notified()).await;
        }
        let first = self
            .first
            .lock()
            .map_err(|_| "poisoned")?
            .ok_or("no delivery")?;
        Ok((n.saturating_sub(1)) as f64 / first.elapsed().as_secs_f64())
    }
}
