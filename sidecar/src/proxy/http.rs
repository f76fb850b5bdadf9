//! HTTP plumbing shared by both listeners: the body type, sidecar-made error responses (JSON for
//! HTTP, status in trailers for gRPC), hop-by-hop header handling and correlation ids.

use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full, StreamBody, combinators::UnsyncBoxBody};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type every proxied request and response is converted to.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

pub const CORRELATION_ID: HeaderName = HeaderName::from_static("x-correlation-id");
pub const OUTRIDER_ERROR: HeaderName = HeaderName::from_static("x-outrider-error");
pub const OUTRIDER_PEER: HeaderName = HeaderName::from_static("x-outrider-peer");
/// Set by the outbound sidecar when it carries an HTTP/1.x request over the HTTP/2 connection
/// between sidecars; the inbound sidecar restores that version for the app.
pub const ORIG_PROTO: HeaderName = HeaderName::from_static("x-outrider-orig-proto");
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");
pub const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
pub const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// Converts any body with a boxable error into [`Body`].
pub fn boxed<B>(body: B) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

/// A body that keeps `guard` alive until it ends or is dropped: a concurrency slot, a count of
/// requests in flight.
pub struct Guarded<G> {
    body: Body,
    _guard: G,
}

impl<G> Guarded<G> {
    pub fn new(body: Body, guard: G) -> Self {
        Self {
            body,
            _guard: guard,
        }
    }
}

impl<G: Unpin> http_body::Body for Guarded<G> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// What went wrong, from the sidecar's point of view (CONTRACT §4 error table).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorKind {
    UnknownService,
    Unavailable,
    CircuitOpen,
    Timeout,
    Forbidden,
    RateLimited,
    BadRequest,
    NotFound,
}

impl ErrorKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            ErrorKind::UnknownService => "unknown-service",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::CircuitOpen => "circuit-open",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Forbidden => "forbidden",
            ErrorKind::RateLimited => "rate-limited",
            ErrorKind::BadRequest => "bad-request",
            ErrorKind::NotFound => "not-found",
        }
    }

    fn default_status(&self) -> StatusCode {
        match self {
            ErrorKind::UnknownService => StatusCode::BAD_GATEWAY,
            ErrorKind::Unavailable | ErrorKind::CircuitOpen => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ErrorKind::Forbidden => StatusCode::FORBIDDEN,
            ErrorKind::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ErrorKind::BadRequest => StatusCode::BAD_REQUEST,
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
        }
    }

    /// The gRPC status code for this kind.
    pub fn grpc_code(&self) -> u8 {
        match self {
            ErrorKind::UnknownService | ErrorKind::Unavailable | ErrorKind::CircuitOpen => 14,
            ErrorKind::Timeout => 4,
            ErrorKind::Forbidden => 7,
            ErrorKind::RateLimited => 8,
            ErrorKind::BadRequest => 3,
            ErrorKind::NotFound => 12,
        }
    }
}

/// A response the sidecar makes itself.
#[derive(Debug, Clone)]
pub struct ProxyError {
    pub kind: ErrorKind,
    pub status: StatusCode,
    pub message: String,
    pub retry_after: Option<Duration>,
    /// For `circuit-open`: the configured fallback (status, content type, body).
    pub fallback: Option<(StatusCode, String, Bytes)>,
}

impl ProxyError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            status: kind.default_status(),
            kind,
            message: message.into(),
            retry_after: None,
            fallback: None,
        }
    }

    pub fn with_status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    pub fn with_retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    /// The response for a client; gRPC clients get HTTP 200 with the status in trailers.
    pub fn into_response(self, grpc: bool) -> Response<Body> {
        let kind = HeaderValue::from_static(self.kind.as_str());
        if grpc {
            let mut trailers = HeaderMap::new();
            trailers.insert(
                GRPC_STATUS,
                HeaderValue::from(u16::from(self.kind.grpc_code())),
            );
            // In the trailers too: gRPC libraries surface trailers, not headers, as the status.
            trailers.insert(OUTRIDER_ERROR, kind.clone());
            if let Ok(message) = HeaderValue::from_str(&percent_encode_grpc(&self.message)) {
                trailers.insert(GRPC_MESSAGE, message);
            }
            let frames = futures_util::stream::iter([Ok::<_, BoxError>(
                http_body::Frame::trailers(trailers),
            )]);
            let mut response = Response::new(StreamBody::new(frames).boxed_unsync());
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            headers.insert(OUTRIDER_ERROR, kind);
            if let Some(after) = self.retry_after {
                headers.insert(header::RETRY_AFTER, retry_after_value(after));
            }
            return response;
        }
        let (status, content_type, body) = match self.fallback {
            Some((status, content_type, body)) => (status, content_type, body),
            None => (
                self.status,
                "application/json".to_string(),
                Bytes::from(
                    serde_json::json!({"error": self.message, "kind": self.kind.as_str()})
                        .to_string(),
                ),
            ),
        };
        let mut response = Response::new(full(body));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        if let Ok(ct) = HeaderValue::from_str(&content_type) {
            headers.insert(header::CONTENT_TYPE, ct);
        }
        headers.insert(OUTRIDER_ERROR, kind);
        if let Some(after) = self.retry_after {
            headers.insert(header::RETRY_AFTER, retry_after_value(after));
        }
        response
    }
}

fn retry_after_value(after: Duration) -> HeaderValue {
    // Whole seconds, rounded up: `Retry-After: 0` would invite an immediate retry storm.
    let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
    HeaderValue::from(secs.max(1))
}

/// gRPC `grpc-message` is percent-encoded (only printable ASCII but `%` passes as is).
fn percent_encode_grpc(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for b in message.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// True for gRPC requests (content-type `application/grpc` or `application/grpc+...`).
pub fn is_grpc<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"))
}

/// True for an HTTP/1.1 `Upgrade` request (WebSocket and friends).
pub fn is_upgrade<B>(req: &Request<B>) -> bool {
    is_upgrade_head(req.version(), req.headers())
}

pub fn is_upgrade_head(version: http::Version, headers: &HeaderMap) -> bool {
    version <= http::Version::HTTP_11
        && headers.contains_key(header::UPGRADE)
        && headers
            .get(header::CONNECTION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
}

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// The hop-by-hop headers of RFC 9110 §7.6.1 (and the legacy `Keep-Alive`/`Proxy-Connection`),
/// by bit: `CONNECTION_BIT`, `UPGRADE_BIT` and `TE_BIT` get special handling.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    header::UPGRADE,
    header::TE,
    header::TRANSFER_ENCODING,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
];
const CONNECTION_BIT: u8 = 1 << 0;
const UPGRADE_BIT: u8 = 1 << 1;
const TE_BIT: u8 = 1 << 2;

/// Removes hop-by-hop headers (RFC 9110 §7.6.1), keeping `Upgrade`/`Connection: upgrade` for
/// upgrade requests and `TE: trailers` (gRPC needs it). Runs twice per proxied exchange: one
/// scan of the names finds which are present (standard names compare as enum values), and only
/// those are looked up and removed.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let mut present = 0u8;
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == name) {
            present |= 1 << i;
        }
    }
    if present == 0 && !keep_upgrade {
        return;
    }
    if present & CONNECTION_BIT != 0
        && let Some(connection) = headers.get(header::CONNECTION).cloned()
        && let Ok(listed) = connection.to_str()
    {
        for name in listed.split(',').map(str::trim) {
            if (keep_upgrade && name.eq_ignore_ascii_case("upgrade"))
                || name.eq_ignore_ascii_case("keep-alive")
                || name.eq_ignore_ascii_case("close")
            {
                // `keep-alive` goes with the fixed list; `close` is an option, not a header.
                continue;
            }
            if let Ok(name) = HeaderName::from_bytes(name.as_bytes())
                && name != header::TE
            {
                headers.remove(name);
            }
        }
    }
    let fixed = present & !(CONNECTION_BIT | UPGRADE_BIT | TE_BIT);
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if fixed & (1 << i) != 0 {
            headers.remove(name);
        }
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        if present & CONNECTION_BIT != 0 {
            headers.remove(header::CONNECTION);
        }
        if present & UPGRADE_BIT != 0 {
            headers.remove(header::UPGRADE);
        }
    }
    if present & TE_BIT != 0
        && let Some(te) = headers.get(header::TE)
        && !te.to_str().is_ok_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        })
    {
        headers.remove(header::TE);
    }
}

/// Keeps a valid `x-correlation-id` or generates one (UUID v4); returns it. The header is marked
/// never-indexed (see [`never_indexed`]).
pub fn ensure_correlation_id(headers: &mut HeaderMap) -> HeaderValue {
    if let Some(id) = headers.get_mut(&CORRELATION_ID)
        && !id.is_empty()
        && id.len() <= 256
    {
        // The value is kept twice (request and response). A parsed one is often its own
        // allocation, which a clone would promote to a shared one with a second allocation; a
        // copy into a shared block makes both clones reference counts.
        if let Ok(shared) = HeaderValue::from_maybe_shared(share_small(id.as_bytes())) {
            *id = shared;
        }
        id.set_sensitive(true);
        return id.clone();
    }
    let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let uuid = uuid::Uuid::new_v4().hyphenated();
    let id = HeaderValue::from_maybe_shared(share_small(uuid.encode_lower(&mut text).as_bytes()))
        .unwrap_or(HeaderValue::from_static("invalid"));
    let id = never_indexed(id);
    headers.insert(CORRELATION_ID, id.clone());
    id
}

/// Strings up to this long are cut from a shared block by [`share_small`].
const SMALL: usize = 256;
/// The size of the blocks [`share_small`] cuts from: 2 KiB holds 56 correlation IDs.
const SMALL_BLOCK: usize = 2048;

thread_local! {
    /// What is left of this thread's current block for [`share_small`].
    static SMALL_BLOCK_LEFT: std::cell::RefCell<bytes::BytesMut> =
        std::cell::RefCell::new(bytes::BytesMut::new());
}

/// A copy of a short string that every request makes (a correlation ID, an authority taken
/// from `Host`), cut from a block shared with the copies before it. `Bytes::copy_from_slice`
/// costs an allocation per copy, and another one when the copy is first cloned (its `Vec` is
/// promoted to a shared buffer); here a block of [`SMALL_BLOCK`] bytes costs two allocations for
/// dozens of copies, and clones are reference counts. A block is freed once every copy cut from
/// it is dropped; the copies live as long as their request.
pub fn share_small(src: &[u8]) -> Bytes {
    if src.len() > SMALL {
        return Bytes::copy_from_slice(src);
    }
    SMALL_BLOCK_LEFT.with_borrow_mut(|block| {
        if block.capacity() - block.len() < src.len() {
            *block = bytes::BytesMut::with_capacity(SMALL_BLOCK);
        }
        block.extend_from_slice(src);
        block.split().freeze()
    })
}

/// Marks a value that is new on every request (a correlation ID, `traceparent`, a
/// `grpc-timeout`) so the HTTP/2 leg between sidecars sends it as a never-indexed literal: HPACK
/// would otherwise add each one to both sides' dynamic tables, where it can never be reused and
/// evicts the entries that do repeat (`:authority`, `user-agent`, `content-type`), so those go
/// out as literals again too. On HTTP/1.1 the mark means nothing.
///
/// Their names still go out as Huffman literals. Indexing each connection's first value so the
/// names become indexed was measured (callgrind, 64 connections) and reverted: h2's encoder then
/// finds the name in its table and compares the value on every request. Net of what the
/// decoders saved, the caller ran 850 and the callee 500 more instructions per request.
pub fn never_indexed(mut value: HeaderValue) -> HeaderValue {
    value.set_sensitive(true);
    value
}

/// [`never_indexed`] for the request's `traceparent` (W3C trace context), if it has one.
pub fn never_index_trace_context(headers: &mut HeaderMap) {
    if let Some(value) = headers.get_mut(TRACEPARENT) {
        value.set_sensitive(true);
    }
}

/// Parses `grpc-timeout` (`<digits><unit>`, unit H M S m u n, at most 8 digits).
pub fn parse_grpc_timeout(value: &HeaderValue) -> Option<Duration> {
    let text = value.to_str().ok()?;
    if text.len() < 2 || text.len() > 9 {
        return None;
    }
    let (digits, unit) = text.split_at(text.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Formats a `grpc-timeout` value for the remaining time (milliseconds, rounded down, ≥ 1).
pub fn grpc_timeout_value(remaining: Duration) -> HeaderValue {
    let millis = remaining.as_millis().clamp(1, 99_999_999);
    never_indexed(
        HeaderValue::try_from(format!("{millis}m")).unwrap_or(HeaderValue::from_static("1m")),
    )
}

/// Carries an HTTP/1.x request over HTTP/2 to another sidecar: see [`upgrade_to_h2`]. The
/// authority is the URI's when it is absolute (as the outbound path makes it), else the `Host`.
pub fn h1_to_h2(req: Request<Body>) -> Request<Body> {
    let (mut parts, body) = req.into_parts();
    let from_host = match parts.uri.authority() {
        Some(_) => None,
        None => parts
            .headers
            .get(header::HOST)
            .and_then(authority_from_host),
    };
    upgrade_to_h2(&mut parts);
    if let Some(authority) = from_host {
        set_absolute_uri(&mut parts, authority);
    }
    Request::from_parts(parts, body)
}

/// Gives an HTTP/1.x request the origin-form target (`/path?query`) an HTTP/1.1 connection to an
/// app or upstream wants (hyper writes the URI as it is). Shared bytes: no copy.
pub fn origin_form<B>(req: &mut Request<B>) {
    if req.uri().authority().is_some() {
        *req.uri_mut() = http::Uri::from(path_and_query(req.uri()));
    }
}

/// Gives the request the absolute `http://authority/path` URI HTTP/2 needs (`:authority`),
/// from the parts already parsed (shared bytes: no copy, no parse).
pub fn set_absolute_uri(parts: &mut http::request::Parts, authority: Authority) {
    let mut uri = http::uri::Parts::default();
    uri.scheme = Some(http::uri::Scheme::HTTP);
    uri.authority = Some(authority);
    uri.path_and_query = Some(path_and_query(&parts.uri));
    if let Ok(built) = http::Uri::from_parts(uri) {
        parts.uri = built;
    }
}

/// The URI's path and query, `/` when it has none.
pub fn path_and_query(uri: &http::Uri) -> PathAndQuery {
    uri.path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"))
}

/// When an HTTP/1.x request rides HTTP/2 between sidecars (every one does by default; with
/// `OUTRIDER_MESH_H1_CONNECTIONS`, those that find the pooled HTTP/1.1 connections busy), it is
/// marked with its version so the other side hands it to the app as it arrived. Upgrades
/// always keep HTTP/1.1.
pub fn upgrade_to_h2(parts: &mut http::request::Parts) {
    let orig = match parts.version {
        http::Version::HTTP_11 => "HTTP/1.1",
        http::Version::HTTP_10 => "HTTP/1.0",
        _ => return,
    };
    // The authority travels as `:authority`. Removed before the marker is added, which then
    // takes its place instead of growing a full map (a rehash of every header).
    parts.headers.remove(header::HOST);
    parts
        .headers
        .insert(ORIG_PROTO, HeaderValue::from_static(orig));
    parts.version = http::Version::HTTP_2;
}

/// Undoes [`upgrade_to_h2`] on the inbound side: restores the version and the `Host` header.
/// The marker is only believed on HTTP/2 (where only a sidecar can have set it); elsewhere it
/// is dropped.
pub fn restore_orig_proto(parts: &mut http::request::Parts) {
    let Some(orig) = parts.headers.remove(ORIG_PROTO) else {
        return;
    };
    if parts.version != http::Version::HTTP_2 {
        return;
    }
    parts.version = match orig.as_bytes() {
        b"HTTP/1.0" => http::Version::HTTP_10,
        b"HTTP/1.1" => http::Version::HTTP_11,
        _ => return,
    };
    if !parts.headers.contains_key(header::HOST)
        && let Some(authority) = parts.uri.authority()
        && let Ok(host) = HeaderValue::from_maybe_shared(share_small(authority.as_str().as_bytes()))
    {
        parts.headers.insert(header::HOST, host);
    }
}

/// The authority a `Host` header names, in shared bytes ([`share_small`]): the upstream URI
/// keeps it, and each retry's copy of the request clones it.
pub fn authority_from_host(host: &HeaderValue) -> Option<Authority> {
    Authority::from_maybe_shared(share_small(host.as_bytes())).ok()
}

/// Turns an upstream's (or the app's) response into the client's: hop-by-hop headers removed;
/// a `101 Switching Protocols` answer to an upgrade request splices the two connections.
pub fn relay_response(
    mut response: Response<Body>,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
) -> Response<Body> {
    if response.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(client) = client_upgrade
    {
        let upstream = hyper::upgrade::on(&mut response);
        tokio::spawn(splice(client, upstream));
        let (mut parts, _) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers, true);
        return Response::from_parts(parts, empty());
    }
    strip_hop_by_hop(response.headers_mut(), false);
    response
}

/// Copies bytes both ways between an upgraded client connection and the upstream's.
async fn splice(client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    let (Ok(client), Ok(upstream)) = tokio::join!(client, upstream) else {
        return;
    };
    let mut client = hyper_util::rt::TokioIo::new(client);
    let mut upstream = hyper_util::rt::TokioIo::new(upstream);
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts() {
        let v = |s: &'static str| parse_grpc_timeout(&HeaderValue::from_static(s));
        assert_eq!(v("100m"), Some(Duration::from_millis(100)));
        assert_eq!(v("2S"), Some(Duration::from_secs(2)));
        assert_eq!(v("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(v("123456789m"), None);
        assert_eq!(v("-5m"), None);
        assert_eq!(v("5x"), None);
        assert_eq!(v("m"), None);
    }

    #[test]
    fn per_request_values_are_never_indexed() {
        let mut generated = HeaderMap::new();
        let id = ensure_correlation_id(&mut generated);
        assert_eq!(id.len(), 36);
        assert!(id.is_sensitive());
        assert!(generated[&CORRELATION_ID].is_sensitive());

        let mut given = HeaderMap::new();
        given.insert(CORRELATION_ID, HeaderValue::from_static("order-17"));
        given.insert(
            TRACEPARENT,
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        let id = ensure_correlation_id(&mut given);
        never_index_trace_context(&mut given);
        assert_eq!(id, "order-17");
        assert!(id.is_sensitive() && given[&CORRELATION_ID].is_sensitive());
        assert!(given[&TRACEPARENT].is_sensitive());
        assert!(grpc_timeout_value(Duration::from_millis(250)).is_sensitive());
    }

    #[test]
    fn small_copies_share_a_block_and_outlive_it() {
        let first = share_small(b"4bf92f35-77b3-4da6-a3ce-929d0e0e4736");
        let second = share_small(b"backend.default:8080");
        assert_eq!(first, &b"4bf92f35-77b3-4da6-a3ce-929d0e0e4736"[..]);
        assert_eq!(second, &b"backend.default:8080"[..]);
        // Many more copies than a block holds: each stays whole after new blocks are cut, and
        // all but one in each block follow the one before it in memory.
        let copies: Vec<Bytes> = (0..500)
            .map(|i| share_small(format!("id-{i:04}").as_bytes()))
            .collect();
        drop(first);
        for (i, copy) in copies.iter().enumerate() {
            assert_eq!(copy, format!("id-{i:04}").as_bytes());
        }
        let same_block = copies
            .windows(2)
            .filter(|w| w[0].as_ptr().wrapping_add(w[0].len()) == w[1].as_ptr())
            .count();
        assert!(
            same_block > 450,
            "only {same_block} of 499 copies shared a block"
        );
        // Long strings are plain copies; empty ones work too.
        let long = vec![b'a'; SMALL + 1];
        assert_eq!(share_small(&long), long);
        assert!(share_small(b"").is_empty());
        assert_eq!(second, &b"backend.default:8080"[..]);
    }

    #[test]
    fn a_parsed_correlation_id_is_kept_in_shared_bytes() {
        let mut given = HeaderMap::new();
        given.insert(CORRELATION_ID, HeaderValue::from_str("order-18").unwrap());
        let id = ensure_correlation_id(&mut given);
        assert_eq!(id, "order-18");
        assert_eq!(given[&CORRELATION_ID], "order-18");
        // The request's value and the returned one are the same bytes, not two copies.
        assert_eq!(
            id.as_bytes().as_ptr(),
            given[&CORRELATION_ID].as_bytes().as_ptr()
        );
        let authority = authority_from_host(&HeaderValue::from_static("backend:8080")).unwrap();
        assert_eq!(authority.as_str(), "backend:8080");
        assert!(authority_from_host(&HeaderValue::from_static("bad host")).is_none());
    }

    #[test]
    fn hop_by_hop() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-foo"),
        );
        h.insert("x-foo", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("x-bar", HeaderValue::from_static("2"));
        strip_hop_by_hop(&mut h, false);
        assert!(!h.contains_key("x-foo"));
        assert!(!h.contains_key(header::CONNECTION));
        assert!(h.contains_key(header::TE));
        assert!(h.contains_key("x-bar"));

        // Every fixed hop-by-hop name goes; TE without `trailers` too; end-to-end ones stay.
        let mut h = HeaderMap::new();
        for name in [
            "upgrade",
            "transfer-encoding",
            "proxy-authenticate",
            "proxy-authorization",
            "keep-alive",
            "proxy-connection",
        ] {
            h.insert(name, HeaderValue::from_static("x"));
        }
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key(header::CONTENT_TYPE));

        // An upgrade keeps `Upgrade` and says `Connection: upgrade`, nothing else it listed.
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("Upgrade, x-foo"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-foo", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get(header::CONNECTION).unwrap(), "upgrade");
        assert_eq!(h.get(header::UPGRADE).unwrap(), "websocket");
        assert!(!h.contains_key("x-foo"));

        // Nothing hop-by-hop: nothing changes.
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("backend"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1);
    }
}
