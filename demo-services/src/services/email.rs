//! email-worker: consumes the `email_tasks` work queue and "sends" each mail (keeps it in an
//! outbox, served at `GET /v1/outbox`).

use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};

use crate::common::{Context, Delivery, Stats, lock};
use crate::events::EmailTask;

#[derive(Clone)]
struct Worker {
    stats: Arc<Stats>,
    outbox: Arc<Mutex<Vec<EmailTask>>>,
}

pub fn router(ctx: &Context) -> Router {
    let worker = Worker {
        stats: ctx.stats.clone(),
        outbox: Arc::default(),
    };
    Router::new()
        .route("/tasks/email", post(send_email))
        .route("/v1/outbox", get(outbox))
        .with_state(worker)
}

async fn send_email(
    State(w): State<Worker>,
    delivery: Delivery,
    Json(task): Json<EmailTask>,
) -> StatusCode {
    tracing::info!(to = %task.to, subject = %task.subject, correlation_id = %delivery.correlation_id, "mail sent");
    w.stats
        .record(&delivery, format!("submission {}", task.submission_id));
    lock(&w.outbox).push(task);
    StatusCode::NO_CONTENT
}

async fn outbox(State(w): State<Worker>) -> Json<Vec<EmailTask>> {
    Json(lock(&w.outbox).clone())
}
