//! The payloads of the event catalog and the work queues, as JSON. Each has an Avro schema in
//! `schemas/<name>.avsc`, which the sidecar checks before publishing (`broker.schemas`).

use serde::{Deserialize, Serialize};

/// Event names (routing keys on the topic exchange) and work queue names.
pub const LABORATORY_CREATED: &str = "laboratory.created";
pub const SOLUTION_SUBMIT: &str = "solution.submit";
pub const TEST_RUN: &str = "test.run";
pub const SOLUTION_UPDATE: &str = "solution_update";
pub const EMAIL_TASKS: &str = "email_tasks";

/// One test of a laboratory: it passes when the solution contains `expect`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TestCase {
    pub name: String,
    pub expect: String,
}

/// course-service → runner-service, tester-service: a new laboratory to prepare for.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LaboratoryCreated {
    pub lab_id: u64,
    pub title: String,
    pub tests: Vec<TestCase>,
}

/// runner-service → file-service, submission-service: a solution was accepted for testing.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SolutionSubmit {
    pub submission_id: u64,
    pub lab_id: u64,
    pub user_id: u64,
    pub code: String,
}

/// tester-service → runner-service, submission-service: the result of a solution's test run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TestRun {
    pub submission_id: u64,
    pub lab_id: u64,
    pub passed: u64,
    pub total: u64,
    /// `passed` or `failed`.
    pub outcome: String,
}

/// Work queue `solution_update`, file-service → submission-service: the solution is stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SolutionUpdate {
    pub submission_id: u64,
    pub stage: String,
    pub file: String,
    pub size: u64,
}

/// Work queue `email_tasks`, submission-service → email-worker.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EmailTask {
    pub submission_id: u64,
    pub to: String,
    pub subject: String,
    pub body: String,
}
