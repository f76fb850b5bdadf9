//! Small real apps for tests: an axum HTTP app (h1 and h2c, WebSocket) with a controllable fault
//! backend (`/seq/{key}` answers a scripted sequence of statuses, `Retry-After`s and delays;
//! `/lag` answers after the app's configurable lag), and tonic gRPC echoes (one that fails its
//! first calls on purpose).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::ws::{Message, WebSocketUpgrade};
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use futures_util::StreamExt;

use outrider::pb::echo::echo_server::{Echo, EchoServer};
use outrider::pb::echo::{EchoReply, EchoRequest};

/// A running HTTP app.
#[derive(Clone)]
pub struct App {
    pub addr: SocketAddr,
    /// Requests the app has seen.
    pub hits: Arc<AtomicUsize>,
    pub faults: Arc<Faults>,
}

impl App {
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    /// Scripts the answers of `/seq/{key}`: one step per request, then 200 once used up.
    pub fn script(&self, key: &str, steps: &[Step]) {
        self.faults
            .scripts
            .lock()
            .expect("lock")
            .insert(key.to_string(), steps.iter().cloned().collect());
    }

    /// When `/seq/{key}` was hit.
    pub fn seq_hits(&self, key: &str) -> Vec<Instant> {
        self.faults
            .seen
            .lock()
            .expect("lock")
            .get(key)
            .cloned()
            .unwrap_or_default()
    }

    /// Makes `/lag` answer after this long.
    pub fn set_lag(&self, lag: Duration) {
        self.faults
            .lag_ms
            .store(lag.as_millis() as u64, Ordering::SeqCst);
    }
}

/// One scripted answer of `/seq/{key}`.
#[derive(Debug, Clone, Default)]
pub struct Step {
    pub status: u16,
    pub retry_after: Option<String>,
    pub delay: Duration,
}

impl Step {
    pub fn status(status: u16) -> Self {
        Self {
            status,
            ..Default::default()
        }
    }

    pub fn retry_after(mut self, value: &str) -> Self {
        self.retry_after = Some(value.to_string());
        self
    }

    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }
}

/// The fault backend's state.
#[derive(Default)]
pub struct Faults {
    scripts: Mutex<HashMap<String, VecDeque<Step>>>,
    seen: Mutex<HashMap<String, Vec<Instant>>>,
    lag_ms: AtomicU64,
}

#[derive(Clone)]
struct AppState {
    hits: Arc<AtomicUsize>,
    name: &'static str,
    faults: Arc<Faults>,
}

/// Starts the HTTP app on 127.0.0.1 (any port). `name` is returned by `/hello`.
pub async fn http_app(name: &'static str) -> App {
    http_app_on("127.0.0.1:0".parse().expect("addr"), name).await
}

pub async fn http_app_on(addr: SocketAddr, name: &'static str) -> App {
    let (app, router) = app_router(name);
    let listener = tokio::net::TcpListener::bind(addr).await.expect("bind app");
    let app = App {
        addr: listener.local_addr().expect("addr"),
        ..app
    };
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    app
}

fn app_router(name: &'static str) -> (App, Router) {
    let hits = Arc::new(AtomicUsize::new(0));
    let faults = Arc::new(Faults::default());
    let state = AppState {
        hits: hits.clone(),
        name,
        faults: faults.clone(),
    };
    let router = Router::new()
        .route("/hello", get(hello))
        .route("/echo", any(echo))
        .route("/echo/{*rest}", any(echo))
        .route("/mirror", post(mirror))
        .route("/slow/{ms}", get(slow))
        .route("/status/{code}", any(status))
        .route("/bytes/{n}", get(bytes))
        .route("/head/{n}", get(head))
        .route("/ws", get(ws))
        .route("/seq/{key}", any(seq))
        .route("/lag", any(lag))
        .layer(axum::middleware::from_fn_with_state(state.clone(), count))
        .with_state(state);
    let app = App {
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        hits,
        faults,
    };
    (app, router)
}

/// The HTTP app (HTTP/1.1 only) served connection by connection, so that a test can count the
/// connections it accepts and cut them all, as an app restarting or timing out idle
/// keep-alive connections does.
pub struct ConnectionsApp {
    pub app: App,
    accepted: Arc<AtomicUsize>,
    cut: tokio::sync::watch::Sender<u64>,
}

impl ConnectionsApp {
    pub async fn start(name: &'static str) -> Self {
        let (app, router) = app_router(name);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind app");
        let app = App {
            addr: listener.local_addr().expect("addr"),
            ..app
        };
        let accepted = Arc::new(AtomicUsize::new(0));
        let (cut, _) = tokio::sync::watch::channel(0);
        let (count, cuts) = (accepted.clone(), cut.clone());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let service = hyper_util::service::TowerToHyperService::new(router.clone());
                let mut cut = cuts.subscribe();
                tokio::spawn(async move {
                    let io = hyper_util::rt::TokioIo::new(tcp);
                    let serve = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .with_upgrades();
                    tokio::select! {
                        _ = serve => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Self { app, accepted, cut }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Closes every open connection, idle or not, without a word to the peer.
    pub fn cut_all(&self) {
        self.cut.send_modify(|n| *n += 1);
    }
}

async fn seq(State(state): State<AppState>, Path(key): Path<String>) -> Response {
    state
        .faults
        .seen
        .lock()
        .expect("lock")
        .entry(key.clone())
        .or_default()
        .push(Instant::now());
    let step = state
        .faults
        .scripts
        .lock()
        .expect("lock")
        .get_mut(&key)
        .and_then(VecDeque::pop_front)
        .unwrap_or_else(|| Step::status(200));
    if !step.delay.is_zero() {
        tokio::time::sleep(step.delay).await;
    }
    let code = StatusCode::from_u16(step.status).unwrap_or(StatusCode::BAD_REQUEST);
    let mut response = (code, format!("seq {key}: {}", step.status)).into_response();
    if let Some(after) = step.retry_after
        && let Ok(value) = after.parse()
    {
        response.headers_mut().insert("retry-after", value);
    }
    response
}

async fn lag(State(state): State<AppState>) -> String {
    let ms = state.faults.lag_ms.load(Ordering::SeqCst);
    if ms > 0 {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    state.name.to_string()
}

async fn count(
    State(state): State<AppState>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    state.hits.fetch_add(1, Ordering::SeqCst);
    next.run(req).await
}

async fn hello(State(state): State<AppState>) -> String {
    format!("hello from {}", state.name)
}

async fn echo(req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, 64 << 20)
        .await
        .unwrap_or_default();
    let headers: BTreeMap<String, String> = parts
        .headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    axum::Json(serde_json::json!({
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "version": format!("{:?}", parts.version),
        "headers": headers,
        "body_len": body.len(),
    }))
    .into_response()
}

async fn mirror(req: Request) -> Response {
    Response::new(Body::from_stream(req.into_body().into_data_stream()))
}

async fn slow(Path(ms): Path<u64>) -> &'static str {
    tokio::time::sleep(Duration::from_millis(ms)).await;
    "slow"
}

async fn status(Path(code): Path<u16>) -> Response {
    let code = StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST);
    (code, format!("status {code}")).into_response()
}

async fn bytes(Path(n): Path<usize>) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

/// A response whose head carries an `x-big` header of `n` bytes and two `set-cookie` values.
async fn head(Path(n): Path<usize>) -> Response {
    let mut response = "head".into_response();
    let headers = response.headers_mut();
    if let Ok(big) = axum::http::HeaderValue::from_str(&"h".repeat(n)) {
        headers.insert("x-big", big);
    }
    headers.append("set-cookie", axum::http::HeaderValue::from_static("a=1"));
    headers.append("set-cookie", axum::http::HeaderValue::from_static("b=2"));
    response
}

async fn ws(upgrade: WebSocketUpgrade) -> Response {
    upgrade.on_upgrade(|mut socket| async move {
        while let Some(Ok(msg)) = socket.next().await {
            let reply = match msg {
                Message::Text(t) => Message::Text(format!("echo:{}", t.as_str()).into()),
                Message::Binary(b) => Message::Binary(b),
                Message::Close(_) => break,
                _ => continue,
            };
            if socket.send(reply).await.is_err() {
                break;
            }
        }
    })
}

/// The gRPC echo service.
#[derive(Default)]
pub struct EchoService;

#[tonic::async_trait]
impl Echo for EchoService {
    async fn unary(
        &self,
        request: tonic::Request<EchoRequest>,
    ) -> Result<tonic::Response<EchoReply>, tonic::Status> {
        let peer = request
            .metadata()
            .get("x-outrider-peer")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let req = request.into_inner();
        if req.delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(u64::from(req.delay_ms))).await;
        }
        if req.fail_code != 0 {
            return Err(tonic::Status::new(
                tonic::Code::from(req.fail_code),
                "failed on purpose",
            ));
        }
        Ok(tonic::Response::new(EchoReply {
            message: req.message,
            index: 0,
            peer,
        }))
    }

    type ServerStreamStream = std::pin::Pin<
        Box<dyn futures_util::Stream<Item = Result<EchoReply, tonic::Status>> + Send>,
    >;

    async fn server_stream(
        &self,
        request: tonic::Request<EchoRequest>,
    ) -> Result<tonic::Response<Self::ServerStreamStream>, tonic::Status> {
        let req = request.into_inner();
        let delay = Duration::from_millis(u64::from(req.delay_ms));
        let fail = req.fail_code;
        let stream = futures_util::stream::iter(0..req.count).then(move |i| {
            let message = req.message.clone();
            async move {
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                Ok(EchoReply {
                    message,
                    index: i,
                    peer: String::new(),
                })
            }
        });
        let stream: Self::ServerStreamStream = if fail != 0 {
            Box::pin(stream.chain(futures_util::stream::once(async move {
                Err(tonic::Status::new(
                    tonic::Code::from(fail),
                    "stream failed on purpose",
                ))
            })))
        } else {
            Box::pin(stream)
        };
        Ok(tonic::Response::new(stream))
    }
}

/// Starts the gRPC echo server (h2c) on 127.0.0.1.
pub async fn grpc_app() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(EchoServer::new(EchoService))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
            .await;
    });
    addr
}

/// A gRPC echo that fails its first `fail_first` unary calls with `code`, then answers.
pub struct FlakyEcho {
    pub calls: Arc<AtomicUsize>,
    fail_first: usize,
    code: tonic::Code,
}

#[tonic::async_trait]
impl Echo for FlakyEcho {
    async fn unary(
        &self,
        request: tonic::Request<EchoRequest>,
    ) -> Result<tonic::Response<EchoReply>, tonic::Status> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        if n < self.fail_first {
            return Err(tonic::Status::new(self.code, "flaky on purpose"));
        }
        Ok(tonic::Response::new(EchoReply {
            message: request.into_inner().message,
            index: n as u32,
            peer: String::new(),
        }))
    }

    type ServerStreamStream = <EchoService as Echo>::ServerStreamStream;

    async fn server_stream(
        &self,
        request: tonic::Request<EchoRequest>,
    ) -> Result<tonic::Response<Self::ServerStreamStream>, tonic::Status> {
        EchoService.server_stream(request).await
    }
}

/// Starts a [`FlakyEcho`]; returns its address and its call counter.
pub async fn flaky_grpc_app(
    fail_first: usize,
    code: tonic::Code,
) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let calls = Arc::new(AtomicUsize::new(0));
    let service = FlakyEcho {
        calls: calls.clone(),
        fail_first,
        code,
    };
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(EchoServer::new(service))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
            .await;
    });
    (addr, calls)
}
