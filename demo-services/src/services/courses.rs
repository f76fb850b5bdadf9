//! course-service: laboratories. Creating one publishes `laboratory.created`, so that the runner
//! and the tester prepare for it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::common::{ApiError, Context, Mesh, correlation_id, lock};
use crate::events::{LABORATORY_CREATED, LaboratoryCreated, TestCase};

#[derive(Clone)]
struct Courses {
    mesh: Mesh,
    next_id: Arc<AtomicU64>,
    labs: Arc<Mutex<BTreeMap<u64, Laboratory>>>,
}

#[derive(Deserialize)]
struct NewLaboratory {
    title: String,
    tests: Vec<TestCase>,
}

#[derive(Clone, Serialize)]
struct Laboratory {
    id: u64,
    title: String,
    tests: Vec<TestCase>,
    correlation_id: String,
}

pub fn router(ctx: &Context) -> Router {
    let courses = Courses {
        mesh: ctx.mesh.clone(),
        next_id: Arc::new(AtomicU64::new(1)),
        labs: Arc::default(),
    };
    Router::new()
        .route("/v1/laboratories", get(list).post(create))
        .route("/v1/laboratories/{id}", get(get_one))
        .with_state(courses)
}

async fn create(
    State(c): State<Courses>,
    headers: HeaderMap,
    Json(new): Json<NewLaboratory>,
) -> Result<(StatusCode, Json<Laboratory>), ApiError> {
    if new.title.trim().is_empty() || new.tests.is_empty() {
        return Err(ApiError::unprocessable(
            "a laboratory needs a title and at least one test",
        ));
    }
    let correlation_id = correlation_id(&headers);
    let lab = Laboratory {
        id: c.next_id.fetch_add(1, Ordering::Relaxed),
        title: new.title,
        tests: new.tests,
        correlation_id: correlation_id.clone(),
    };
    let event = LaboratoryCreated {
        lab_id: lab.id,
        title: lab.title.clone(),
        tests: lab.tests.clone(),
    };
    c.mesh
        .publish(LABORATORY_CREATED, &correlation_id, &event)
        .await?;
    lock(&c.labs).insert(lab.id, lab.clone());
    Ok((StatusCode::CREATED, Json(lab)))
}

async fn list(State(c): State<Courses>) -> Json<Vec<Laboratory>> {
    Json(lock(&c.labs).values().cloned().collect())
}

async fn get_one(
    State(c): State<Courses>,
    Path(id): Path<u64>,
) -> Result<Json<Laboratory>, ApiError> {
    lock(&c.labs)
        .get(&id)
        .cloned()
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("laboratory {id}")))
}
