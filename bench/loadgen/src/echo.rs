//! `loadgen serve`: the backend of the HTTP/2 comparison. HTTP/1.1 and h2c (prior knowledge) on
//! one port: `POST /echo.v1.Echo/Unary` answers a gRPC `EchoReply` carrying the request's
//! message with `grpc-status: 0` in trailers; any other request gets 200 `ok`.

use std::convert::Infallible;
use std::net::SocketAddr;

use anyhow::{Context, Result};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, header};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use crate::grpc;

type Frames = std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>;
type Body = StreamBody<futures_util::stream::Iter<Frames>>;

fn body(frames: Vec<Frame<Bytes>>) -> Body {
    StreamBody::new(futures_util::stream::iter(
        frames.into_iter().map(Ok).collect::<Vec<_>>(),
    ))
}

async fn handle(req: Request<Incoming>) -> Result<Response<Body>, hyper::Error> {
    let is_grpc = req.uri().path() == grpc::UNARY_PATH;
    let received = req.into_body().collect().await?.to_bytes();
    if !is_grpc {
        let mut resp = Response::new(body(vec![Frame::data(Bytes::from_static(b"ok"))]));
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        return Ok(resp);
    }
    let message = grpc::unframe(&received).and_then(|m| grpc::bytes_field(m, 1));
    let mut trailers = HeaderMap::new();
    let mut frames = Vec::with_capacity(2);
    match message {
        Some(message) => {
            frames.push(Frame::data(grpc::frame(&grpc::encode_bytes_field(
                1, &message,
            ))));
            trailers.insert("grpc-status", HeaderValue::from_static("0"));
        }
        None => {
            trailers.insert("grpc-status", HeaderValue::from_static("3"));
            trailers.insert(
                "grpc-message",
                HeaderValue::from_static("malformed EchoRequest"),
            );
        }
    }
    frames.push(Frame::trailers(trailers));
    let mut resp = Response::new(body(frames));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    Ok(resp)
}

pub async fn serve(listen: SocketAddr) -> Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    eprintln!("loadgen serve: listening on {listen} (HTTP/1.1 and h2c)");
    loop {
        let (tcp, _) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        tokio::spawn(async move {
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), service_fn(handle))
                .await;
        });
    }
}
