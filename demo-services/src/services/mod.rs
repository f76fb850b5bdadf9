//! One module per service; each builds the axum router of a plain app.

pub mod courses;
pub mod email;
pub mod files;
pub mod gateway;
pub mod runner;
pub mod submissions;
pub mod tester;
pub mod users;

/// Every service `demo-service` can run, by its mesh name.
pub const ALL: &[&str] = &[
    "gateway",
    "user-service",
    "course-service",
    "runner-service",
    "tester-service",
    "submission-service",
    "file-service",
    "email-worker",
];

/// The router of the service called `name`.
pub fn router(name: &str, ctx: &crate::common::Context) -> anyhow::Result<axum::Router> {
    Ok(match name {
        "gateway" => gateway::router(ctx),
        "user-service" => users::router(ctx),
        "course-service" => courses::router(ctx),
        "runner-service" => runner::router(ctx)?,
        "tester-service" => tester::router(ctx),
        "submission-service" => submissions::router(ctx),
        "file-service" => files::router(ctx)?,
        "email-worker" => email::router(ctx),
        other => anyhow::bail!(
            "unknown service `{other}`; expected one of {}",
            ALL.join(", ")
        ),
    })
}
