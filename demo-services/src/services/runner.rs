//! runner-service: accepts solutions for testing. For each it publishes `solution.submit`, then
//! asks tester-service over gRPC (`RunTests`, server streaming) to run the laboratory's tests and
//! passes each progress message on to submission-service. It learns laboratories from
//! `laboratory.created` and final results from `test.run`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::common::{ApiError, Context, Delivery, Mesh, Stats, correlation_id, lock};
use crate::events::{LaboratoryCreated, SOLUTION_SUBMIT, SolutionSubmit, TestRun};
use crate::pb::RunTestsRequest;
use crate::pb::tester_client::TesterClient;

#[derive(Clone)]
struct Runner {
    mesh: Mesh,
    stats: Arc<Stats>,
    tester: TesterClient<tonic::transport::Channel>,
    labs: Arc<Mutex<BTreeMap<u64, LaboratoryCreated>>>,
    runs: Arc<Mutex<BTreeMap<u64, Run>>>,
}

#[derive(Deserialize)]
struct NewRun {
    submission_id: u64,
    lab_id: u64,
    user_id: u64,
    code: String,
}

#[derive(Clone, Serialize)]
struct Run {
    submission_id: u64,
    lab_id: u64,
    /// `running`, `done` (test.run received) or `error`.
    status: String,
    done: u32,
    total: u32,
    result: Option<TestRun>,
    correlation_id: String,
}

pub fn router(ctx: &Context) -> anyhow::Result<Router> {
    let runner = Runner {
        mesh: ctx.mesh.clone(),
        stats: ctx.stats.clone(),
        tester: TesterClient::new(ctx.mesh.grpc("tester-service")?),
        labs: Arc::default(),
        runs: Arc::default(),
    };
    Ok(Router::new()
        .route("/v1/runs", post(start_run))
        .route("/v1/runs/{submission_id}", get(get_run))
        .route("/v1/labs/{lab_id}", get(get_lab))
        .route("/events/laboratory-created", post(on_laboratory_created))
        .route("/events/test-run", post(on_test_run))
        .with_state(runner))
}

async fn start_run(
    State(r): State<Runner>,
    headers: HeaderMap,
    Json(new): Json<NewRun>,
) -> Result<(StatusCode, Json<Run>), ApiError> {
    if !lock(&r.labs).contains_key(&new.lab_id) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("laboratory {} is not prepared here", new.lab_id),
        ));
    }
    let correlation_id = correlation_id(&headers);
    let event = SolutionSubmit {
        submission_id: new.submission_id,
        lab_id: new.lab_id,
        user_id: new.user_id,
        code: new.code.clone(),
    };
    r.mesh
        .publish(SOLUTION_SUBMIT, &correlation_id, &event)
        .await?;
    let run = Run {
        submission_id: new.submission_id,
        lab_id: new.lab_id,
        status: "running".into(),
        done: 0,
        total: 0,
        result: None,
        correlation_id: correlation_id.clone(),
    };
    lock(&r.runs).insert(new.submission_id, run.clone());
    tokio::spawn(run_tests(r, new, correlation_id));
    Ok((StatusCode::ACCEPTED, Json(run)))
}

/// Streams the tester's progress and reports each step to submission-service.
async fn run_tests(r: Runner, new: NewRun, correlation_id: String) {
    if let Err(e) = stream_progress(&r, &new, &correlation_id).await {
        tracing::warn!(submission_id = new.submission_id, %correlation_id, "test run failed: {e}");
        if let Some(run) = lock(&r.runs).get_mut(&new.submission_id) {
            run.status = "error".into();
        }
        let report = json!({ "done": 0, "total": 0, "test_name": "", "passed": false, "error": e.to_string() });
        let _ = report_progress(&r, new.submission_id, &correlation_id, &report).await;
    }
}

async fn stream_progress(r: &Runner, new: &NewRun, correlation_id: &str) -> anyhow::Result<()> {
    let mut request = tonic::Request::new(RunTestsRequest {
        submission_id: new.submission_id,
        lab_id: new.lab_id,
        code: new.code.clone(),
    });
    request
        .metadata_mut()
        .insert("x-correlation-id", correlation_id.parse()?);
    let mut stream = r.tester.clone().run_tests(request).await?.into_inner();
    while let Some(progress) = stream.message().await? {
        if let Some(run) = lock(&r.runs).get_mut(&new.submission_id) {
            run.done = progress.done;
            run.total = progress.total;
        }
        let report = json!({
            "done": progress.done,
            "total": progress.total,
            "test_name": progress.test_name,
            "passed": progress.passed,
        });
        report_progress(r, new.submission_id, correlation_id, &report).await?;
    }
    Ok(())
}

async fn report_progress(
    r: &Runner,
    submission_id: u64,
    correlation_id: &str,
    report: &serde_json::Value,
) -> anyhow::Result<()> {
    let path = format!("/v1/submissions/{submission_id}/progress");
    let res = r
        .mesh
        .call(
            reqwest::Method::PUT,
            "submission-service",
            &path,
            correlation_id,
        )
        .json(report)
        .send()
        .await?;
    anyhow::ensure!(
        res.status().is_success(),
        "submission-service answered {}",
        res.status()
    );
    Ok(())
}

async fn get_run(
    State(r): State<Runner>,
    Path(submission_id): Path<u64>,
) -> Result<Json<Run>, ApiError> {
    lock(&r.runs)
        .get(&submission_id)
        .cloned()
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("run of submission {submission_id}")))
}

async fn get_lab(
    State(r): State<Runner>,
    Path(lab_id): Path<u64>,
) -> Result<Json<LaboratoryCreated>, ApiError> {
    lock(&r.labs)
        .get(&lab_id)
        .cloned()
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("laboratory {lab_id}")))
}

async fn on_laboratory_created(
    State(r): State<Runner>,
    delivery: Delivery,
    Json(lab): Json<LaboratoryCreated>,
) -> StatusCode {
    r.stats
        .record(&delivery, format!("laboratory {}", lab.lab_id));
    lock(&r.labs).insert(lab.lab_id, lab);
    StatusCode::NO_CONTENT
}

async fn on_test_run(
    State(r): State<Runner>,
    delivery: Delivery,
    Json(result): Json<TestRun>,
) -> StatusCode {
    r.stats
        .record(&delivery, format!("submission {}", result.submission_id));
    if let Some(run) = lock(&r.runs).get_mut(&result.submission_id)
        && run.correlation_id == delivery.correlation_id
    {
        run.status = "done".into();
        run.result = Some(result);
    }
    StatusCode::NO_CONTENT
}
