//! Broker bridge benchmark: raw lapin against the same work through the bridge, in one run.
//!
//! 1. publish, raw: one confirm-mode channel, persistent 1 KiB messages, C concurrent publishers
//!    each awaiting its own confirm (C = the HTTP concurrency it is compared with), and fully
//!    pipelined (everything sent, then every confirm awaited: the upper bound);
//! 2. publish through the bridge's HTTP API (`POST /v1/queues/{q}`) at 16, 32 and 64 concurrent
//!    keep-alive connections, each request answered after its confirm;
//! 3. consume + ack, raw, prefetch P, from a backlog of N;
//! 4. delivery through the bridge to a trivial app (HTTP 200), prefetch P, from a backlog of N.
//!
//! Run with `bench/broker.sh` (release build). Needs RabbitMQ on 127.0.0.1:5672 (guest/guest);
//! every queue it makes is named `bench.<random>.*` and deleted at the end.
//! Environment: `BENCH_N` (messages per run, default 20000), `BENCH_PREFETCH` (default 64),
//! `BENCH_AMQP` (default `amqp://guest:guest@127.0.0.1:5672/%2f`).

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
use outrider::broker::Bridge;
use outrider::metrics::Metrics;
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

    // 1 + 2: publish.
    let mut rows = Vec::new();
    let full = raw_publish(&ch, &raw_q, n, usize::MAX, &payload).await?;
    purge(&ch, &raw_q).await?;
    println!("publish raw, fully pipelined            {full:>9.0} msg/s");
    let app = start_app().await?;
    let yaml = format!(
        "service: bench\nnamespace: bench\napp: {}\ntls: {{ mode: disabled }}\n\
         broker:\n  url: {amqp}\n  exchange: {ns}.x\n  enqueues: [{bridge_q}]\n",
        app.addr
    );
    let cfg = outrider::config::load_str(&yaml, "bench.yaml", &std::env::temp_dir(), Vec::new())
        .map_err(|e| e.to_string())?
        .config;
    let bridge = Bridge::start(&cfg, Arc::new(Metrics::new()));
    wait_ready(&bridge).await?;
    let addr = serve_bridge(bridge.clone()).await?;
    for concurrency in [16, 32, 64] {
        let raw = raw_concurrent(&ch, &raw_q, n, concurrency, &payload).await?;
        purge(&ch, &raw_q).await?;
        let via = http_publish(
            addr,
            &format!("/v1/queues/{bridge_q}"),
            n,
            concurrency,
            &payload,
        )
        .await?;
        purge(&ch, &bridge_q).await?;
        println!(
            "publish raw, {concurrency:>2} concurrent publishers  {raw:>9.0} msg/s\n\
             publish via bridge HTTP, {concurrency:>2} concurrent    {via:>9.0} msg/s   ratio {:.2} (vs fully pipelined {:.2})",
            via / raw,
            via / full
        );
        rows.push((format!("publish c={concurrency}"), raw, via));
    }
    bridge.shutdown().await;

    // 3: raw consume + ack: each ack awaited before the next delivery (the usual loop), and
    // acks sent from spawned tasks (the best a consumer can do with per-message acks).
    fill(&ch, &raw_q, n, &payload).await?;
    let raw_inline = raw_consume(&conn, &raw_q, n, prefetch, false).await?;
    println!("consume+ack raw, prefetch {prefetch}, inline   {raw_inline:>9.0} msg/s");
    fill(&ch, &raw_q, n, &payload).await?;
    let raw = raw_consume(&conn, &raw_q, n, prefetch, true).await?;
    println!("consume+ack raw, prefetch {prefetch}, spawned  {raw:>9.0} msg/s");

    // 4: delivery through the bridge to a trivial app.
    fill(&ch, &work_q, n, &payload).await?;
    let app = start_app().await?;
    let yaml = format!(
        "service: bench\nnamespace: bench\napp: {}\ntls: {{ mode: disabled }}\n\
         broker:\n  url: {amqp}\n  exchange: {ns}.x\n  subscriptions:\n\
         \x20   - {{ queue: {work_q}, deliver: /work, prefetch: {prefetch} }}\n",
        app.addr
    );
    let cfg = outrider::config::load_str(&yaml, "bench.yaml", &std::env::temp_dir(), Vec::new())
        .map_err(|e| e.to_string())?
        .config;
    let bridge = Bridge::start(&cfg, Arc::new(Metrics::new()));
    let via = app.rate(n).await?;
    bridge.shutdown().await;
    println!(
        "delivery via bridge to app, prefetch {prefetch} {via:>9.0} msg/s   ratio {:.2} (vs inline acks {:.2})",
        via / raw,
        via / raw_inline
    );
    rows.push(("deliver/inline".into(), raw_inline, via));
    rows.push(("deliver/spawned".into(), raw, via));

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
    println!("\nsummary (through bridge / raw):");
    for (what, raw, via) in rows {
        println!(
            "  {what:<14} {via:>8.0} / {raw:>8.0} msg/s = {:>4.0} %",
            100.0 * via / raw
        );
    }
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

/// `concurrency` tasks share the channel, each publishing and awaiting its own confirm in a
/// loop: what the bridge does for concurrent requests, minus HTTP.
async fn raw_concurrent(
    ch: &Channel,
    q: &str,
    n: usize,
    concurrency: usize,
    payload: &[u8],
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
                let confirm = ch
                    .basic_publish(
                        "".into(),
                        q.as_str().into(),
                        BasicPublishOptions::default(),
                        &payload,
                        props(i),
                    )
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

async fn wait_ready(bridge: &Bridge) -> Result<(), Error> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(why) = bridge.ready() {
        if Instant::now() > deadline {
            return Err(why.into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

async fn serve_bridge(bridge: Arc<Bridge>) -> Result<SocketAddr, Error> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let _ = tcp.set_nodelay(true);
            let bridge = bridge.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let bridge = bridge.clone();
                    async move { Ok::<_, Infallible>(bridge.handle(req).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

/// `concurrency` keep-alive HTTP/1.1 connections POSTing until `n` requests got 202.
async fn http_publish(
    addr: SocketAddr,
    path: &str,
    n: usize,
    concurrency: usize,
    payload: &[u8],
) -> Result<f64, Error> {
    let next = Arc::new(AtomicUsize::new(0));
    let payload = Bytes::copy_from_slice(payload);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let next = next.clone();
        let payload = payload.clone();
        let path = path.to_string();
        tasks.push(tokio::spawn(async move {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
            tokio::spawn(conn);
            while next.fetch_add(1, Ordering::Relaxed) < n {
                let req = http::Request::post(path.as_str())
                    .header("host", "localhost")
                    .header("content-type", "application/octet-stream")
                    .body(Full::new(payload.clone()))?;
                let resp = send.send_request(req).await?;
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
