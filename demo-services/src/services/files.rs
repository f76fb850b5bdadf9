//! file-service: stores each submitted solution (from `solution.submit`) as a file under its
//! data directory, tells submission-service on the `solution_update` queue, and serves the
//! stored solutions. Files outlive a restart of the service.

use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::common::{ApiError, Context, Delivery, Mesh, Stats, correlation_id};
use crate::events::{SOLUTION_UPDATE, SolutionSubmit, SolutionUpdate};

#[derive(Clone)]
struct Files {
    mesh: Mesh,
    stats: Arc<Stats>,
    dir: PathBuf,
}

#[derive(Serialize, Deserialize)]
struct StoredSolution {
    submission_id: u64,
    lab_id: u64,
    user_id: u64,
    code: String,
    size: u64,
}

pub fn router(ctx: &Context) -> anyhow::Result<Router> {
    let dir = ctx.data_dir.join("solutions");
    std::fs::create_dir_all(&dir)?;
    let files = Files {
        mesh: ctx.mesh.clone(),
        stats: ctx.stats.clone(),
        dir,
    };
    Ok(Router::new()
        .route("/v1/solutions", get(list))
        .route("/v1/solutions/{submission_id}", get(get_one))
        .route("/events/solution-submit", post(on_solution_submit))
        .with_state(files))
}

fn file_name(submission_id: u64) -> String {
    format!("solutions/{submission_id}.json")
}

async fn on_solution_submit(
    State(f): State<Files>,
    delivery: Delivery,
    headers: HeaderMap,
    Json(event): Json<SolutionSubmit>,
) -> Result<StatusCode, ApiError> {
    f.stats
        .record(&delivery, format!("submission {}", event.submission_id));
    let stored = StoredSolution {
        submission_id: event.submission_id,
        lab_id: event.lab_id,
        user_id: event.user_id,
        size: event.code.len() as u64,
        code: event.code,
    };
    let bytes = serde_json::to_vec_pretty(&stored)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let path = f.dir.join(format!("{}.json", stored.submission_id));
    tokio::fs::write(&path, bytes).await.map_err(|e| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("cannot store {}: {e}", path.display()),
        )
    })?;
    let update = SolutionUpdate {
        submission_id: stored.submission_id,
        stage: "stored".into(),
        file: file_name(stored.submission_id),
        size: stored.size,
    };
    f.mesh
        .enqueue(SOLUTION_UPDATE, &correlation_id(&headers), &update)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn get_one(
    State(f): State<Files>,
    Path(submission_id): Path<u64>,
) -> Result<Json<StoredSolution>, ApiError> {
    let path = f.dir.join(format!("{submission_id}.json"));
    let bytes = tokio::fs::read(&path)
        .await
        .map_err(|_| ApiError::not_found(format!("solution of submission {submission_id}")))?;
    serde_json::from_slice(&bytes)
        .map(Json)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

async fn list(State(f): State<Files>) -> Result<Json<Vec<u64>>, ApiError> {
    let mut ids = Vec::new();
    let mut entries = tokio::fs::read_dir(&f.dir)
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    while let Ok(Some(entry)) = entries.next_entry().await {
        let name = entry.file_name();
        if let Some(id) = name
            .to_str()
            .and_then(|n| n.strip_suffix(".json"))
            .and_then(|n| n.parse().ok())
        {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    Ok(Json(ids))
}
