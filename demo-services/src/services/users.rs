//! user-service: the student directory. Users 1 to 1000 exist (a fixed directory, so that every
//! replica answers alike); each answer names the replica that served it.

use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use crate::common::{ApiError, Context};

const USERS: u64 = 1000;

#[derive(Serialize)]
struct User {
    id: u64,
    name: String,
    email: String,
    replica: String,
}

pub fn router(ctx: &Context) -> Router {
    Router::new()
        .route("/v1/users/{id}", get(get_user))
        .with_state(ctx.replica.clone())
}

async fn get_user(
    State(replica): State<String>,
    Path(id): Path<u64>,
) -> Result<Json<User>, ApiError> {
    if !(1..=USERS).contains(&id) {
        return Err(ApiError::not_found(format!("user {id}")));
    }
    Ok(Json(User {
        id,
        name: format!("student-{id}"),
        email: format!("student-{id}@learning.example"),
        replica,
    }))
}
