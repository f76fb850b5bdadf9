//! tester-service: prepares a test suite for each `laboratory.created`, runs it when the runner
//! asks over gRPC (`RunTests`, one progress message per test), then publishes `test.run`.
//! A test passes when the solution contains the text the test expects.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::Stream;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use crate::common::{ApiError, Context, Delivery, Mesh, Stats, lock};
use crate::events::{LaboratoryCreated, TEST_RUN, TestCase, TestRun};
use crate::pb::tester_server::{Tester, TesterServer};
use crate::pb::{RunTestsRequest, TestProgress};

/// How long one test "takes", so that progress is visible on the page.
const TEST_DURATION: Duration = Duration::from_millis(150);

#[derive(Clone)]
struct Suites {
    mesh: Mesh,
    stats: Arc<Stats>,
    by_lab: Arc<Mutex<BTreeMap<u64, Vec<TestCase>>>>,
}

pub fn router(ctx: &Context) -> Router {
    let suites = Suites {
        mesh: ctx.mesh.clone(),
        stats: ctx.stats.clone(),
        by_lab: Arc::default(),
    };
    let grpc = tonic::service::Routes::new(TesterServer::new(suites.clone())).into_axum_router();
    Router::new()
        .route("/v1/suites/{lab_id}", get(get_suite))
        .route("/events/laboratory-created", post(on_laboratory_created))
        .with_state(suites)
        .merge(grpc)
}

async fn get_suite(
    State(s): State<Suites>,
    Path(lab_id): Path<u64>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let tests = lock(&s.by_lab)
        .get(&lab_id)
        .cloned()
        .ok_or_else(|| ApiError::not_found(format!("suite of laboratory {lab_id}")))?;
    Ok(Json(
        serde_json::json!({ "lab_id": lab_id, "tests": tests }),
    ))
}

async fn on_laboratory_created(
    State(s): State<Suites>,
    delivery: Delivery,
    Json(lab): Json<LaboratoryCreated>,
) -> StatusCode {
    s.stats
        .record(&delivery, format!("laboratory {}", lab.lab_id));
    lock(&s.by_lab).insert(lab.lab_id, lab.tests);
    StatusCode::NO_CONTENT
}

type ProgressStream = Pin<Box<dyn Stream<Item = Result<TestProgress, Status>> + Send>>;

#[tonic::async_trait]
impl Tester for Suites {
    type RunTestsStream = ProgressStream;

    async fn run_tests(
        &self,
        request: Request<RunTestsRequest>,
    ) -> Result<Response<Self::RunTestsStream>, Status> {
        let correlation_id = request
            .metadata()
            .get("x-correlation-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let run = request.into_inner();
        let tests = lock(&self.by_lab)
            .get(&run.lab_id)
            .cloned()
            .ok_or_else(|| {
                Status::failed_precondition(format!("laboratory {} is not prepared", run.lab_id))
            })?;
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(run_suite(self.clone(), run, tests, correlation_id, tx));
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Runs the tests one by one, streaming progress; publishes `test.run` before the last message.
async fn run_suite(
    s: Suites,
    run: RunTestsRequest,
    tests: Vec<TestCase>,
    correlation_id: String,
    tx: mpsc::Sender<Result<TestProgress, Status>>,
) {
    let total = tests.len() as u32;
    let mut passed_count = 0;
    for (i, test) in tests.iter().enumerate() {
        tokio::time::sleep(TEST_DURATION).await;
        let passed = run.code.contains(&test.expect);
        passed_count += u32::from(passed);
        let done = i as u32 + 1;
        let progress = TestProgress {
            submission_id: run.submission_id,
            done,
            total,
            test_name: test.name.clone(),
            passed,
            finished: done == total,
            passed_count,
        };
        if done == total {
            let result = TestRun {
                submission_id: run.submission_id,
                lab_id: run.lab_id,
                passed: u64::from(passed_count),
                total: u64::from(total),
                outcome: if passed_count == total {
                    "passed"
                } else {
                    "failed"
                }
                .into(),
            };
            if let Err(e) = s.mesh.publish(TEST_RUN, &correlation_id, &result).await {
                let _ = tx.send(Err(Status::unavailable(e.message))).await;
                return;
            }
        }
        if tx.send(Ok(progress)).await.is_err() {
            return; // the runner went away
        }
    }
}
