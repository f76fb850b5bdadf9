//! submission-service: the record of every submission and its progress. It hands new
//! submissions to runner-service, then follows them through `solution.submit` (accepted),
//! `solution_update` (stored by file-service), progress reports from the runner and `test.run`
//! (result), after which it enqueues an email for the student on `email_tasks`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::common::{ApiError, Context, Delivery, Mesh, Stats, correlation_id, lock};
use crate::events::{EMAIL_TASKS, EmailTask, SolutionSubmit, SolutionUpdate, TestRun};

#[derive(Clone)]
struct Submissions {
    mesh: Mesh,
    stats: Arc<Stats>,
    all: Arc<Mutex<BTreeMap<u64, Submission>>>,
}

#[derive(Deserialize)]
struct NewSubmission {
    lab_id: u64,
    user_id: u64,
    user_email: String,
    code: String,
}

#[derive(Deserialize)]
struct Progress {
    done: u32,
    total: u32,
    test_name: String,
    passed: bool,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Clone, Serialize)]
struct Submission {
    id: u64,
    lab_id: u64,
    user_id: u64,
    user_email: String,
    /// queued → submitted → running → passed | failed (or error).
    status: String,
    done: u32,
    total: u32,
    /// Where file-service stored the solution, once it has.
    file: Option<String>,
    result: Option<TestRun>,
    /// The student's email was enqueued.
    notified: bool,
    correlation_id: String,
    history: Vec<Step>,
}

#[derive(Clone, Serialize)]
struct Step {
    stage: String,
    detail: String,
    at_ms: u128,
}

impl Submission {
    fn step(&mut self, stage: &str, detail: String) {
        let at_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        self.history.push(Step {
            stage: stage.into(),
            detail,
            at_ms,
        });
    }

    /// Whether a delivered message is about this submission's flow: a message left in a queue by
    /// an earlier run of the platform (same submission id, another correlation id) is not.
    fn belongs(&self, delivery: &Delivery) -> bool {
        let ours = delivery.correlation_id == self.correlation_id;
        if !ours {
            tracing::warn!(submission_id = self.id, correlation_id = %delivery.correlation_id,
                expected = %self.correlation_id, target = %delivery.target, "ignored a message of another flow");
        }
        ours
    }

    fn finished(&self) -> bool {
        self.result.is_some() || self.status == "error"
    }
}

pub fn router(ctx: &Context) -> Router {
    let s = Submissions {
        mesh: ctx.mesh.clone(),
        stats: ctx.stats.clone(),
        all: Arc::default(),
    };
    Router::new()
        .route("/v1/submissions", get(list).post(create))
        .route("/v1/submissions/{id}", get(get_one))
        .route("/v1/submissions/{id}/progress", put(progress))
        .route("/events/solution-submit", post(on_solution_submit))
        .route("/events/test-run", post(on_test_run))
        .route("/tasks/solution-update", post(on_solution_update))
        .with_state(s)
}

async fn create(
    State(s): State<Submissions>,
    headers: HeaderMap,
    Json(new): Json<NewSubmission>,
) -> Result<(StatusCode, Json<Submission>), ApiError> {
    if new.code.trim().is_empty() {
        return Err(ApiError::unprocessable("the solution is empty"));
    }
    let correlation_id = correlation_id(&headers);
    let mut sub = {
        let mut all = lock(&s.all);
        let id = all.keys().next_back().map_or(1, |last| last + 1);
        let mut sub = Submission {
            id,
            lab_id: new.lab_id,
            user_id: new.user_id,
            user_email: new.user_email,
            status: "queued".into(),
            done: 0,
            total: 0,
            file: None,
            result: None,
            notified: false,
            correlation_id: correlation_id.clone(),
            history: Vec::new(),
        };
        sub.step("queued", "received by submission-service".into());
        all.insert(id, sub.clone());
        sub
    };
    let run = json!({ "submission_id": sub.id, "lab_id": sub.lab_id, "user_id": sub.user_id, "code": new.code });
    let res = s
        .mesh
        .call(
            reqwest::Method::POST,
            "runner-service",
            "/v1/runs",
            &correlation_id,
        )
        .json(&run)
        .send()
        .await;
    let refused = match res {
        Ok(r) if r.status().is_success() => None,
        Ok(r) => Some((r.status(), r.text().await.unwrap_or_default())),
        Err(e) => Some((StatusCode::BAD_GATEWAY, e.to_string())),
    };
    if let Some((status, why)) = refused {
        if let Some(stored) = lock(&s.all).get_mut(&sub.id) {
            stored.status = "error".into();
            stored.step(
                "error",
                format!("runner-service refused it: {status} {why}"),
            );
        }
        let status = if status == StatusCode::CONFLICT {
            StatusCode::CONFLICT
        } else {
            StatusCode::BAD_GATEWAY
        };
        return Err(ApiError::new(
            status,
            format!("runner-service refused the submission: {why}"),
        ));
    }
    if let Some(stored) = lock(&s.all).get(&sub.id) {
        sub = stored.clone();
    }
    Ok((StatusCode::CREATED, Json(sub)))
}

async fn list(State(s): State<Submissions>) -> Json<Vec<Submission>> {
    Json(lock(&s.all).values().cloned().collect())
}

async fn get_one(
    State(s): State<Submissions>,
    Path(id): Path<u64>,
) -> Result<Json<Submission>, ApiError> {
    lock(&s.all)
        .get(&id)
        .cloned()
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("submission {id}")))
}

/// The runner reports each finished test.
async fn progress(
    State(s): State<Submissions>,
    Path(id): Path<u64>,
    Json(p): Json<Progress>,
) -> Result<StatusCode, ApiError> {
    let mut all = lock(&s.all);
    let sub = all
        .get_mut(&id)
        .ok_or_else(|| ApiError::not_found(format!("submission {id}")))?;
    if let Some(error) = p.error {
        sub.status = "error".into();
        sub.step("error", error);
        return Ok(StatusCode::NO_CONTENT);
    }
    sub.done = p.done;
    sub.total = p.total;
    if !sub.finished() {
        sub.status = "running".into();
    }
    let verdict = if p.passed { "passed" } else { "failed" };
    sub.step(
        "running",
        format!("test {}/{} `{}` {verdict}", p.done, p.total, p.test_name),
    );
    Ok(StatusCode::NO_CONTENT)
}

async fn on_solution_submit(
    State(s): State<Submissions>,
    delivery: Delivery,
    Json(event): Json<SolutionSubmit>,
) -> StatusCode {
    s.stats
        .record(&delivery, format!("submission {}", event.submission_id));
    if let Some(sub) = lock(&s.all).get_mut(&event.submission_id)
        && sub.belongs(&delivery)
    {
        if sub.status == "queued" {
            sub.status = "submitted".into();
        }
        sub.step("submitted", "accepted by runner-service".into());
    }
    StatusCode::NO_CONTENT
}

async fn on_solution_update(
    State(s): State<Submissions>,
    delivery: Delivery,
    Json(update): Json<SolutionUpdate>,
) -> StatusCode {
    s.stats
        .record(&delivery, format!("submission {}", update.submission_id));
    if let Some(sub) = lock(&s.all).get_mut(&update.submission_id)
        && sub.belongs(&delivery)
    {
        sub.step(
            "stored",
            format!(
                "stored by file-service as {} ({} bytes)",
                update.file, update.size
            ),
        );
        sub.file = Some(update.file);
    }
    StatusCode::NO_CONTENT
}

/// The result: record it, then enqueue the student's email. A failed enqueue answers 503, so
/// the broker delivers the result again; recording it twice changes nothing.
async fn on_test_run(
    State(s): State<Submissions>,
    delivery: Delivery,
    Json(result): Json<TestRun>,
) -> Result<StatusCode, ApiError> {
    s.stats
        .record(&delivery, format!("submission {}", result.submission_id));
    let email = {
        let mut all = lock(&s.all);
        let Some(sub) = all
            .get_mut(&result.submission_id)
            .filter(|sub| sub.belongs(&delivery))
        else {
            return Ok(StatusCode::NO_CONTENT);
        };
        if sub.result.is_none() {
            sub.status = result.outcome.clone();
            sub.step(
                &result.outcome,
                format!("{}/{} tests passed", result.passed, result.total),
            );
            sub.result = Some(result.clone());
        }
        if sub.notified {
            return Ok(StatusCode::NO_CONTENT);
        }
        EmailTask {
            submission_id: sub.id,
            to: sub.user_email.clone(),
            subject: format!("Submission {}: {}", sub.id, result.outcome),
            body: format!(
                "{} of {} tests passed for laboratory {}.",
                result.passed, result.total, result.lab_id
            ),
        }
    };
    s.mesh
        .enqueue(EMAIL_TASKS, &delivery.correlation_id, &email)
        .await?;
    if let Some(sub) = lock(&s.all).get_mut(&result.submission_id) {
        sub.notified = true;
        sub.step("notified", format!("email to {} enqueued", sub.user_email));
    }
    Ok(StatusCode::NO_CONTENT)
}
