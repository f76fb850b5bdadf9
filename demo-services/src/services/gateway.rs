//! gateway: the platform's edge. Browsers and the scenario talk to it directly (they are outside
//! the mesh, with no workload certificate); every call it makes to the services goes through its
//! sidecar. It serves the live page at `/` and `GET /v1/submissions/{id}/live`, a WebSocket that
//! pushes the submission each time it changes.

use std::time::Duration;

use axum::body::Body;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use reqwest::Method;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::common::{ApiError, Context, Mesh, correlation_id};

/// How often the live view asks submission-service for news.
const LIVE_POLL: Duration = Duration::from_millis(100);
/// A live view ends after this long even if the submission never finishes.
const LIVE_MAX: Duration = Duration::from_secs(120);

const PAGE: &str = include_str!("../web/index.html");

#[derive(Clone)]
struct Gateway {
    mesh: Mesh,
}

pub fn router(ctx: &Context) -> Router {
    let gw = Gateway {
        mesh: ctx.mesh.clone(),
    };
    Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .route("/v1/users/{id}", get(get_user))
        .route("/v1/laboratories", get(list_labs).post(create_lab))
        .route("/v1/laboratories/{id}", get(get_lab))
        .route("/v1/submissions", post(submit))
        .route("/v1/submissions/{id}", get(get_submission))
        .route("/v1/submissions/{id}/source", get(get_source))
        .route("/v1/submissions/{id}/live", get(live))
        .with_state(gw)
}

/// Answers with what the upstream answered: status, JSON body, and `x-outrider-error` when the
/// sidecar itself answered (e.g. the circuit breaker's fallback).
async fn forward(res: Result<reqwest::Response, reqwest::Error>) -> Response {
    let res = match res {
        Ok(res) => res,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let status = res.status();
    let sidecar_error = res.headers().get("x-outrider-error").cloned();
    let content_type = res
        .headers()
        .get(header::CONTENT_TYPE)
        .cloned()
        .unwrap_or(header::HeaderValue::from_static("application/json"));
    let body = match res.bytes().await {
        Ok(body) => body,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let mut out = Response::new(Body::from(body));
    *out.status_mut() = status;
    out.headers_mut().insert(header::CONTENT_TYPE, content_type);
    if let Some(kind) = sidecar_error {
        out.headers_mut().insert("x-outrider-error", kind);
    }
    out
}

async fn get_user(State(gw): State<Gateway>, headers: HeaderMap, Path(id): Path<u64>) -> Response {
    let path = format!("/v1/users/{id}");
    let call = gw.mesh.call(
        Method::GET,
        "user-service",
        &path,
        &correlation_id(&headers),
    );
    forward(call.send().await).await
}

async fn list_labs(State(gw): State<Gateway>, headers: HeaderMap) -> Response {
    let call = gw.mesh.call(
        Method::GET,
        "course-service",
        "/v1/laboratories",
        &correlation_id(&headers),
    );
    forward(call.send().await).await
}

async fn create_lab(
    State(gw): State<Gateway>,
    headers: HeaderMap,
    Json(lab): Json<Value>,
) -> Response {
    let call = gw.mesh.call(
        Method::POST,
        "course-service",
        "/v1/laboratories",
        &correlation_id(&headers),
    );
    forward(call.json(&lab).send().await).await
}

async fn get_lab(State(gw): State<Gateway>, headers: HeaderMap, Path(id): Path<u64>) -> Response {
    let path = format!("/v1/laboratories/{id}");
    let call = gw.mesh.call(
        Method::GET,
        "course-service",
        &path,
        &correlation_id(&headers),
    );
    forward(call.send().await).await
}

#[derive(Deserialize)]
struct NewSubmission {
    lab_id: u64,
    user_id: u64,
    code: String,
}

/// Looks the student up in user-service, then hands the submission to submission-service.
async fn submit(
    State(gw): State<Gateway>,
    headers: HeaderMap,
    Json(new): Json<NewSubmission>,
) -> Result<Response, ApiError> {
    let correlation_id = correlation_id(&headers);
    let path = format!("/v1/users/{}", new.user_id);
    let user = gw
        .mesh
        .call(Method::GET, "user-service", &path, &correlation_id)
        .send()
        .await?;
    if user.status() == StatusCode::NOT_FOUND {
        return Err(ApiError::unprocessable(format!(
            "unknown user {}",
            new.user_id
        )));
    }
    if !user.status().is_success() {
        return Err(ApiError::upstream(format!(
            "user-service answered {}",
            user.status()
        )));
    }
    let user: Value = user.json().await?;
    let email = user
        .get("email")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let submission = json!({
        "lab_id": new.lab_id,
        "user_id": new.user_id,
        "user_email": email,
        "code": new.code,
    });
    let call = gw.mesh.call(
        Method::POST,
        "submission-service",
        "/v1/submissions",
        &correlation_id,
    );
    Ok(forward(call.json(&submission).send().await).await)
}

async fn get_submission(
    State(gw): State<Gateway>,
    headers: HeaderMap,
    Path(id): Path<u64>,
) -> Response {
    let path = format!("/v1/submissions/{id}");
    let call = gw.mesh.call(
        Method::GET,
        "submission-service",
        &path,
        &correlation_id(&headers),
    );
    forward(call.send().await).await
}

/// The stored solution, from file-service. When file-service is down, the caller sees what the
/// sidecar answered: 503, and once the circuit is open the configured fallback.
async fn get_source(
    State(gw): State<Gateway>,
    headers: HeaderMap,
    Path(id): Path<u64>,
) -> Response {
    let path = format!("/v1/solutions/{id}");
    let call = gw.mesh.call(
        Method::GET,
        "file-service",
        &path,
        &correlation_id(&headers),
    );
    forward(call.send().await).await
}

async fn live(
    State(gw): State<Gateway>,
    headers: HeaderMap,
    Path(id): Path<u64>,
    ws: WebSocketUpgrade,
) -> Response {
    let correlation_id = correlation_id(&headers);
    ws.on_upgrade(move |socket| push_updates(gw, id, correlation_id, socket))
}

/// Sends the submission as JSON each time it changes, until it is finished (result known and the
/// student notified, or an error), the browser leaves, or [`LIVE_MAX`] passes.
async fn push_updates(gw: Gateway, id: u64, correlation_id: String, mut socket: WebSocket) {
    let path = format!("/v1/submissions/{id}");
    let deadline = tokio::time::Instant::now() + LIVE_MAX;
    let mut last_sent = String::new();
    while tokio::time::Instant::now() < deadline {
        let call = gw
            .mesh
            .call(Method::GET, "submission-service", &path, &correlation_id);
        let (text, done) = match call.send().await {
            Ok(res) if res.status().is_success() => {
                let text = res.text().await.unwrap_or_default();
                let done = serde_json::from_str::<Value>(&text)
                    .map(|s| is_finished(&s))
                    .unwrap_or(false);
                (text, done)
            }
            Ok(res) if res.status() == StatusCode::NOT_FOUND => (
                json!({ "error": format!("submission {id} not found") }).to_string(),
                true,
            ),
            Ok(res) => (
                json!({ "error": format!("submission-service answered {}", res.status()) })
                    .to_string(),
                false,
            ),
            Err(e) => (json!({ "error": e.to_string() }).to_string(), false),
        };
        if text != last_sent {
            if socket
                .send(Message::Text(text.clone().into()))
                .await
                .is_err()
            {
                return;
            }
            last_sent = text;
        }
        if done {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(LIVE_POLL) => {}
            msg = socket.recv() => match msg {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            },
        }
    }
    let _ = socket.send(Message::Close(None)).await;
}

fn is_finished(submission: &Value) -> bool {
    let status = submission.get("status").and_then(Value::as_str);
    let notified = submission.get("notified").and_then(Value::as_bool) == Some(true);
    status == Some("error") || (notified && matches!(status, Some("passed" | "failed")))
}
