//! The load: N keep-alive connections, each sending on a fixed schedule (open loop) or back to
//! back (closed loop). Latency is measured from each request's *intended* send time, so a
//! stalled server is charged for the requests it delayed (coordinated omission corrected, as
//! wrk2 and oha do). HTTP/1.1 has one request in flight per connection; h2c and gRPC send every
//! request on schedule, up to `--max-inflight` streams per connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::future::Either;
use futures_util::stream::FuturesUnordered;
use hdrhistogram::Histogram;
use http::{HeaderValue, Method, Request, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::net::TcpStream;

use crate::grpc;
use crate::pacer::Pacer;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Proto {
    /// HTTP/1.1 with keep-alive
    H1,
    /// HTTP/2 over cleartext, prior knowledge
    H2,
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Target, e.g. http://127.0.0.1:8080/ (plain http; the host must be an IP or resolvable)
    #[arg(long)]
    pub url: String,
    /// Host header (HTTP/1.1) or :authority (h2c) to send instead of the URL's, e.g. a service name
    #[arg(long)]
    pub host: Option<String>,
    /// Protocol
    #[arg(long, value_enum, default_value_t = Proto::H1)]
    pub proto: Proto,
    /// gRPC unary calls to /echo.v1.Echo/Unary (h2c POST, framed EchoRequest); implies --proto h2
    #[arg(long)]
    pub grpc: bool,
    /// Size of the gRPC EchoRequest.message in bytes
    #[arg(long, default_value_t = 16)]
    pub message_bytes: usize,
    /// Requests per second over all connections; 0: closed loop, as fast as the server answers
    #[arg(long, default_value_t = 2000.0)]
    pub rate: f64,
    /// Keep-alive connections
    #[arg(long, short = 'c', default_value_t = 16)]
    pub connections: usize,
    /// h2c/gRPC: most requests in flight per connection (HTTP/1.1 is always 1)
    #[arg(long, default_value_t = 64)]
    pub max_inflight: usize,
    /// Measured seconds
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    /// Seconds of load before the measurement starts (not recorded)
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    /// A label copied into the report
    #[arg(long, default_value = "")]
    pub label: String,
}

struct Target {
    addr: SocketAddr,
    h2: bool,
    method: Method,
    /// origin-form for HTTP/1.1, absolute-form (gives :authority) for h2
    uri: Uri,
    host: HeaderValue,
    grpc_body: Option<Bytes>,
    grpc_message: Vec<u8>,
}

impl Target {
    fn request(&self) -> Request<Full<Bytes>> {
        let mut b = Request::builder()
            .method(self.method.clone())
            .uri(self.uri.clone());
        if !self.h2 {
            b = b.header(header::HOST, self.host.clone());
        }
        let body = match &self.grpc_body {
            Some(body) => {
                b = b
                    .header(header::CONTENT_TYPE, "application/grpc")
                    .header(header::TE, "trailers");
                body.clone()
            }
            None => Bytes::new(),
        };
        b.body(Full::new(body)).expect("valid request")
    }
}

enum Sender {
    H1(http1::SendRequest<Full<Bytes>>),
    H2(http2::SendRequest<Full<Bytes>>),
}

impl Sender {
    async fn connect(t: &Target) -> Result<Self> {
        let tcp = TcpStream::connect(t.addr)
            .await
            .with_context(|| format!("connecting to {}", t.addr))?;
        tcp.set_nodelay(true)?;
        let io = TokioIo::new(tcp);
        Ok(if t.h2 {
            let (s, conn) = http2::Builder::new(TokioExecutor::new())
                .initial_stream_window_size(1 << 20)
                .initial_connection_window_size(4 << 20)
                .handshake(io)
                .await?;
            tokio::spawn(conn);
            Sender::H2(s)
        } else {
            let (s, conn) = http1::handshake(io).await?;
            tokio::spawn(conn);
            Sender::H1(s)
        })
    }

    async fn ready(&mut self) -> hyper::Result<()> {
        match self {
            Sender::H1(s) => s.ready().await,
            Sender::H2(s) => s.ready().await,
        }
    }

    fn is_closed(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_closed(),
            Sender::H2(s) => s.is_closed(),
        }
    }

    fn send(
        &mut self,
        req: Request<Full<Bytes>>,
    ) -> impl Future<Output = hyper::Result<http::Response<hyper::body::Incoming>>> + 'static {
        match self {
            Sender::H1(s) => Either::Left(s.send_request(req)),
            Sender::H2(s) => Either::Right(s.send_request(req)),
        }
    }
}

/// Sends one request and reads the whole answer; `Err` describes what was wrong with it.
async fn exchange(
    fut: impl Future<Output = hyper::Result<http::Response<hyper::body::Incoming>>>,
    expect_grpc: Option<&[u8]>,
) -> Result<(), String> {
    let resp = fut.await.map_err(|e| format!("request: {e}"))?;
    let (parts, body) = resp.into_parts();
    let collected = body.collect().await.map_err(|e| format!("body: {e}"))?;
    if !parts.status.is_success() {
        return Err(format!("status {}", parts.status));
    }
    if let Some(expected) = expect_grpc {
        let status = collected
            .trailers()
            .and_then(|t| t.get("grpc-status"))
            .or_else(|| parts.headers.get("grpc-status"))
            .and_then(|v| v.to_str().ok())
            .unwrap_or("missing")
            .to_string();
        if status != "0" {
            return Err(format!("grpc-status {status}"));
        }
        let body = collected.to_bytes();
        let reply = grpc::unframe(&body).and_then(|m| grpc::bytes_field(m, 1));
        if reply.as_deref() != Some(expected) {
            return Err("gRPC reply does not echo the request".into());
        }
    }
    Ok(())
}

#[derive(Clone, Copy)]
struct Plan {
    connections: usize,
    /// None: closed loop
    rate: Option<f64>,
    start: Instant,
    measure_from: Instant,
    end: Instant,
    hard_stop: Instant,
    max_inflight: usize,
}

impl Plan {
    /// Intended send time of request `i` of connection `c`: the connections take turns, so the
    /// whole load is evenly spaced at 1/rate.
    fn intended(&self, c: usize, i: u64) -> Instant {
        match self.rate {
            Some(rate) => {
                let slot = i as f64 * self.connections as f64 + c as f64;
                self.start + Duration::from_secs_f64(slot / rate)
            }
            None => Instant::now(),
        }
    }
}

struct WorkerResult {
    hist: Histogram<u64>,
    ok: u64,
    /// successful responses including the warm-up (for CPU per request)
    ok_total: u64,
    errors: u64,
    missed: u64,
    first_error: Option<String>,
    last_done: Option<Instant>,
}

async fn worker(c: usize, target: Arc<Target>, plan: Plan, mut sender: Sender) -> WorkerResult {
    let mut r = WorkerResult {
        hist: Histogram::new_with_bounds(1, 120_000_000_000, 3).expect("histogram bounds"),
        ok: 0,
        ok_total: 0,
        errors: 0,
        missed: 0,
        first_error: None,
        last_done: None,
    };
    let mut pacer = match Pacer::new() {
        Ok(p) => p,
        Err(e) => {
            r.errors += 1;
            r.first_error = Some(format!("timerfd: {e}"));
            return r;
        }
    };
    let max_inflight = if target.h2 { plan.max_inflight } else { 1 };
    let expect = target
        .grpc_body
        .as_ref()
        .map(|_| target.grpc_message.clone());
    let mut inflight: FuturesUnordered<_> = FuturesUnordered::new();
    let mut i = 0u64;
    let mut next = plan.intended(c, 0);
    let hard_stop = tokio::time::sleep_until(plan.hard_stop.into());
    tokio::pin!(hard_stop);
    let note_error = |r: &mut WorkerResult, intended: Instant, e: String| {
        if intended >= plan.measure_from {
            r.errors += 1;
            r.first_error.get_or_insert(e);
        }
    };
    loop {
        let open = next < plan.end && (plan.rate.is_some() || Instant::now() < plan.end);
        let can_send = open && inflight.len() < max_inflight;
        if !open && inflight.is_empty() {
            break;
        }
        tokio::select! {
            biased;
            _ = &mut hard_stop => break,
            Some((intended, done, outcome)) = inflight.next(), if !inflight.is_empty() => {
                match outcome {
                    Ok(()) => {
                        r.ok_total += 1;
                        let (intended, done): (Instant, Instant) = (intended, done);
                        if intended >= plan.measure_from {
                            let ns = (done - intended).as_nanos().min(u128::from(u64::MAX)) as u64;
                            r.hist.saturating_record(ns.max(1));
                            r.ok += 1;
                            r.last_done = Some(done);
                        }
                    }
                    Err(e) => note_error(&mut r, intended, e),
                }
            }
            waited = pacer.wait_until(next), if can_send => {
                if let Err(e) = waited {
                    note_error(&mut r, next, format!("timerfd: {e}"));
                    break;
                }
                let intended = if plan.rate.is_some() { next } else { Instant::now() };
                if sender.is_closed() {
                    match Sender::connect(&target).await {
                        Ok(s) => sender = s,
                        Err(e) => {
                            note_error(&mut r, intended, format!("{e:#}"));
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            i += 1;
                            next = plan.intended(c, i);
                            continue;
                        }
                    }
                }
                if let Err(e) = sender.ready().await {
                    note_error(&mut r, intended, format!("connection: {e}"));
                    continue;
                }
                let fut = sender.send(target.request());
                let expect = expect.clone();
                inflight.push(async move {
                    let outcome = exchange(fut, expect.as_deref()).await;
                    (intended, Instant::now(), outcome)
                });
                i += 1;
                next = plan.intended(c, i);
            }
        }
    }
    // Requests scheduled inside the window that never completed before the hard stop.
    if plan.rate.is_some() {
        let unsent = (i..)
            .map(|k| plan.intended(c, k))
            .take_while(|t| *t < plan.end)
            .filter(|t| *t >= plan.measure_from)
            .count() as u64;
        r.missed = unsent + inflight.len() as u64;
    }
    r
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

/// Resolves the URL and builds the request template.
async fn prepare(args: &RunArgs) -> Result<Arc<Target>> {
    let url: Uri = args.url.parse().context("--url")?;
    if url.scheme_str() != Some("http") {
        bail!("--url must be http:// (h2c is plain text; use --proto h2)");
    }
    let authority = url.authority().context("--url needs host:port")?.clone();
    let port = authority.port_u16().unwrap_or(80);
    let addr = tokio::net::lookup_host((authority.host(), port))
        .await?
        .next()
        .context("--url host does not resolve")?;
    let host = args.host.clone().unwrap_or_else(|| authority.to_string());
    let h2 = args.grpc || args.proto == Proto::H2;
    let path = if args.grpc {
        grpc::UNARY_PATH.to_string()
    } else {
        url.path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
            .to_string()
    };
    let uri: Uri = if h2 {
        format!("http://{host}{path}").parse().context("--host")?
    } else {
        path.parse()?
    };
    let grpc_message = vec![b'x'; args.message_bytes];
    let target = Arc::new(Target {
        addr,
        h2,
        method: if args.grpc { Method::POST } else { Method::GET },
        uri,
        host: HeaderValue::from_str(&host).context("--host")?,
        grpc_body: args.grpc.then(|| grpc::echo_request(&grpc_message)),
        grpc_message,
    });
    Ok(target)
}

pub async fn run(args: RunArgs) -> Result<Value> {
    if args.connections == 0 || args.duration <= 0.0 || args.warmup < 0.0 || args.rate < 0.0 {
        bail!("--connections, --duration must be positive, --rate and --warmup not negative");
    }
    let target = prepare(&args).await?;
    let h2 = target.h2;

    // Every connection is open before the clock starts.
    let mut senders = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        senders.push(Sender::connect(&target).await?);
    }
    let start = Instant::now() + Duration::from_millis(20);
    let measure_from = start + Duration::from_secs_f64(args.warmup);
    let end = measure_from + Duration::from_secs_f64(args.duration);
    let plan = Plan {
        connections: args.connections,
        rate: (args.rate > 0.0).then_some(args.rate),
        start,
        measure_from,
        end,
        hard_stop: end + Duration::from_secs_f64(args.duration.max(2.0)),
        max_inflight: args.max_inflight.max(1),
    };
    let tasks: Vec<_> = senders
        .into_iter()
        .enumerate()
        .map(|(c, s)| tokio::spawn(worker(c, target.clone(), plan, s)))
        .collect();
    let mut hist = Histogram::<u64>::new_with_bounds(1, 120_000_000_000, 3)?;
    let (mut ok, mut ok_total, mut errors, mut missed) = (0u64, 0u64, 0u64, 0u64);
    let mut first_error = None;
    let mut last_done = measure_from;
    for t in tasks {
        let r = t.await?;
        hist.add(&r.hist)?;
        ok += r.ok;
        ok_total += r.ok_total;
        errors += r.errors;
        missed += r.missed;
        if first_error.is_none() {
            first_error = r.first_error;
        }
        if let Some(d) = r.last_done {
            last_done = last_done.max(d);
        }
    }
    let elapsed = (last_done - measure_from)
        .max(Duration::from_secs_f64(args.duration))
        .as_secs_f64();
    let achieved = ok as f64 / elapsed;
    let q = |q: f64| ms(hist.value_at_quantile(q));
    // Percentile curve for plots: q = 1 - 10^-x, x = 0, 0.1, ..., 5 (up to 99.999 %).
    let curve: Vec<Value> = (0..=50)
        .map(|k| 1.0 - 10f64.powf(-(k as f64) / 10.0))
        .map(|quantile| json!({ "q": quantile, "ms": q(quantile) }))
        .collect();
    let report = json!({
        "label": args.label,
        "url": args.url,
        "host": target.host.to_str().unwrap_or_default(),
        "protocol": if args.grpc { "grpc" } else if h2 { "h2c" } else { "http/1.1" },
        "mode": if plan.rate.is_some() { "fixed-rate" } else { "closed-loop" },
        "target_rps": args.rate,
        "connections": args.connections,
        "max_inflight": if h2 { plan.max_inflight } else { 1 },
        "warmup_s": args.warmup,
        "duration_s": args.duration,
        "requests": ok,
        "requests_total": ok_total,
        "errors": errors,
        "missed": missed,
        "first_error": first_error,
        "achieved_rps": achieved,
        "latency_ms": {
            "min": ms(hist.min()),
            "mean": hist.mean() / 1e6,
            "p50": q(0.5),
            "p90": q(0.9),
            "p99": q(0.99),
            "p99_9": q(0.999),
            "p99_99": q(0.9999),
            "max": ms(hist.max()),
        },
        "percentiles": curve,
    });
    eprintln!(
        "loadgen {}: {} ok, {} errors, {} missed, {:.0} req/s; latency p50 {:.3} ms, p90 {:.3}, p99 {:.3}, p99.9 {:.3}, max {:.3}",
        if args.label.is_empty() {
            &args.url
        } else {
            &args.label
        },
        ok,
        errors,
        missed,
        achieved,
        q(0.5),
        q(0.9),
        q(0.99),
        q(0.999),
        ms(hist.max()),
    );
    if let Some(e) = &report["first_error"].as_str() {
        eprintln!("loadgen: first error: {e}");
    }
    Ok(report)
}

#[derive(clap::Args, Debug)]
pub struct HoldArgs {
    /// Target, e.g. http://127.0.0.1:8080/
    #[arg(long)]
    pub url: String,
    /// Host header (HTTP/1.1) or :authority (h2c)
    #[arg(long)]
    pub host: Option<String>,
    /// Protocol
    #[arg(long, value_enum, default_value_t = Proto::H1)]
    pub proto: Proto,
    /// Connections to open, each sending one request and then staying idle
    #[arg(long, short = 'c', default_value_t = 1000)]
    pub connections: usize,
    /// Seconds to hold them idle after the last answer
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
}

/// Opens `connections` keep-alive connections one after the other, sends one request on each
/// (so the proxy has seen traffic on every one), prints `ready` on stdout once every answer
/// is in, holds them all idle for `seconds`, then prints a JSON report.
pub async fn hold(args: HoldArgs) -> Result<Value> {
    let run = RunArgs {
        url: args.url.clone(),
        host: args.host.clone(),
        proto: args.proto,
        grpc: false,
        message_bytes: 0,
        rate: 0.0,
        connections: 1,
        max_inflight: 1,
        duration: 1.0,
        warmup: 0.0,
        label: String::new(),
    };
    let target = prepare(&run).await?;
    let mut senders = Vec::with_capacity(args.connections);
    let mut errors = 0u64;
    let mut first_error = None;
    for _ in 0..args.connections {
        let mut sender = Sender::connect(&target).await?;
        let outcome = match sender.ready().await {
            Ok(()) => exchange(sender.send(target.request()), None).await,
            Err(e) => Err(format!("connection: {e}")),
        };
        if let Err(e) = outcome {
            errors += 1;
            first_error.get_or_insert(e);
        }
        senders.push(sender);
    }
    println!("ready");
    tokio::time::sleep(Duration::from_secs_f64(args.seconds)).await;
    let open = senders.iter().filter(|s| !s.is_closed()).count();
    Ok(json!({
        "url": args.url,
        "connections": args.connections,
        "still_open": open,
        "errors": errors,
        "first_error": first_error,
    }))
}
