//! The demo's scenario, as a newcomer would click through it, driven over HTTP from outside the
//! mesh (through the gateway), then checked from each service's `GET /v1/_stats`:
//!
//! 1. create a laboratory → `laboratory.created` → runner and tester prepare;
//! 2. submit solutions → runner → `solution.submit` → file-service stores (→ `solution_update`),
//!    submission-service records; tester runs the tests over gRPC → `test.run` → runner and
//!    submission-service → `email_tasks` → email-worker;
//! 3. check every consumer received every event exactly once, with the flow's correlation id;
//! 4. faults: a user-service replica dies; file-service goes down and comes back.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

use super::metrics::{self, Sample};
use super::{Mesh, plain_client};
use crate::events::{EMAIL_TASKS, LABORATORY_CREATED, SOLUTION_SUBMIT, SOLUTION_UPDATE, TEST_RUN};

/// A solution that passes the sample laboratory, and one that does not.
pub const PASSING_CODE: &str = "fn add(a: i32, b: i32) -> i32 { a + b }\nfn main() { assert_eq!(add(2, 2), 4); println!(\"hello\"); }";
pub const FAILING_CODE: &str = "fn main() { println!(\"hello\"); }";

/// One flow through the mesh: what it created, under which correlation id.
#[derive(Debug, Clone)]
pub struct Flow {
    pub id: u64,
    pub correlation_id: String,
    /// Submissions: `passed` or `failed`.
    pub expect: &'static str,
}

#[derive(Debug, Clone, Default)]
pub struct Settings {
    /// How many solutions to submit (alternately passing and failing).
    pub submissions: usize,
    /// Run the fault steps.
    pub faults: bool,
    /// Fault steps that do not show the expected resilience count as failures (else warnings;
    /// always failures when the sidecar reports circuit states, i.e. has circuit breaking).
    pub strict_faults: bool,
}

/// What happened.
#[derive(Debug, Default)]
pub struct Outcome {
    pub problems: Vec<String>,
    pub warnings: Vec<String>,
    pub lab: Option<Flow>,
    pub submissions: Vec<Flow>,
    /// Times the demo saw file-service's circuit open.
    pub circuit_trips: u32,
    /// Metrics of sidecars the fault steps stopped, scraped just before: a restarted sidecar's
    /// counters start from zero, so the summary adds these.
    pub earlier_metrics: Vec<(String, Vec<Sample>)>,
}

/// Runs the whole scenario, printing progress.
pub async fn run(mesh: &mut Mesh, settings: &Settings) -> Outcome {
    let mut out = Outcome::default();
    let client = match plain_client() {
        Ok(c) => c,
        Err(e) => {
            out.problems.push(e.to_string());
            return out;
        }
    };
    let gateway = format!("http://{}", mesh.gateway());

    step("1. course-service: create a laboratory (→ laboratory.created)");
    let lab = match create_lab(&client, mesh, &gateway).await {
        Ok(lab) => lab,
        Err(e) => {
            out.problems.push(format!("creating the laboratory: {e:#}"));
            return out;
        }
    };
    say(&format!(
        "laboratory {} created; runner-service and tester-service prepared it (correlation id {})",
        lab.id, lab.correlation_id
    ));
    out.lab = Some(lab.clone());

    step("2. gateway → submission-service → runner → tester: submit solutions");
    for n in 0..settings.submissions {
        let (code, expect) = if n % 2 == 0 {
            (PASSING_CODE, "passed")
        } else {
            (FAILING_CODE, "failed")
        };
        match submit_and_follow(&client, &gateway, lab.id, n as u64 + 1, code, expect).await {
            Ok(flow) => out.submissions.push(flow),
            Err(e) => out.problems.push(format!("submission {}: {e:#}", n + 1)),
        }
    }

    step("3. check the event flow (each consumer got each event once, correlation ids intact)");
    let flow_problems = check_event_flow(&client, mesh, &lab, &out.submissions).await;
    if flow_problems.is_empty() {
        say("every event reached every consumer exactly once, with its flow's correlation id");
    }
    out.problems.extend(flow_problems);

    if settings.faults {
        let mut settings = settings.clone();
        let resilient = has_resilience_metrics(&client, mesh).await;
        if resilient {
            settings.strict_faults = true;
        } else if !settings.strict_faults {
            say(
                "(this sidecar reports no circuit state yet: the fault steps only report what they see)",
            );
        }
        let settings = &settings;
        step("4. fault: one user-service replica dies");
        if let Err(e) = fault_user_replica(&client, mesh, &gateway, settings, &mut out).await {
            out.problems.push(format!("user-service fault step: {e:#}"));
        }
        step("5. fault: file-service goes down, then comes back");
        if let Some(sub) = out.submissions.first().cloned()
            && let Err(e) =
                fault_file_service(&client, mesh, &gateway, sub.id, settings, &mut out).await
        {
            out.problems.push(format!("file-service fault step: {e:#}"));
        }
    }
    out
}

fn step(title: &str) {
    println!("\n▶ {title}");
}

fn say(text: &str) {
    println!("  {text}");
}

fn new_correlation_id(what: &str) -> String {
    format!("demo-{what}-{}", uuid::Uuid::new_v4())
}

/// The sample laboratory: four tests, each looking for a piece of the solution.
pub fn sample_lab() -> Value {
    json!({
        "title": "Hello, Rust",
        "tests": [
            { "name": "defines add", "expect": "fn add" },
            { "name": "has a main", "expect": "fn main" },
            { "name": "checks itself", "expect": "assert_eq!" },
            { "name": "greets", "expect": "hello" },
        ]
    })
}

/// Creates the sample laboratory through the gateway and waits until runner and tester have it.
pub async fn create_lab(client: &reqwest::Client, mesh: &Mesh, gateway: &str) -> Result<Flow> {
    let correlation_id = new_correlation_id("lab");
    let res = client
        .post(format!("{gateway}/v1/laboratories"))
        .header("x-correlation-id", &correlation_id)
        .json(&sample_lab())
        .send()
        .await?;
    let status = res.status();
    let body: Value = res.json().await.unwrap_or_default();
    if status != reqwest::StatusCode::CREATED {
        bail!("gateway answered {status}: {body}");
    }
    let id = body
        .get("id")
        .and_then(Value::as_u64)
        .context("no id in the answer")?;
    let runner = mesh.instance("runner-service")?.app();
    let tester = mesh.instance("tester-service")?.app();
    for url in [
        format!("http://{runner}/v1/labs/{id}"),
        format!("http://{tester}/v1/suites/{id}"),
    ] {
        wait_for_200(client, &url, Duration::from_secs(20))
            .await
            .with_context(|| format!("laboratory.created did not arrive ({url})"))?;
    }
    Ok(Flow {
        id,
        correlation_id,
        expect: "created",
    })
}

async fn wait_for_200(client: &reqwest::Client, url: &str, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if client
            .get(url)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("no 200 from {url} within {limit:?}")
}

/// Submits a solution through the gateway, then follows it until it is finished, printing each
/// change of status on one line.
pub async fn submit_and_follow(
    client: &reqwest::Client,
    gateway: &str,
    lab_id: u64,
    user_id: u64,
    code: &str,
    expect: &'static str,
) -> Result<Flow> {
    let correlation_id = new_correlation_id("submission");
    let res = client
        .post(format!("{gateway}/v1/submissions"))
        .header("x-correlation-id", &correlation_id)
        .json(&json!({ "lab_id": lab_id, "user_id": user_id, "code": code }))
        .send()
        .await?;
    let status = res.status();
    let body: Value = res.json().await.unwrap_or_default();
    if status != reqwest::StatusCode::CREATED {
        bail!("gateway answered {status}: {body}");
    }
    let id = body
        .get("id")
        .and_then(Value::as_u64)
        .context("no id in the answer")?;
    if body.get("correlation_id").and_then(Value::as_str) != Some(correlation_id.as_str()) {
        bail!("the correlation id did not survive gateway → submission-service: {body}");
    }
    print!("  submission {id} ({expect} expected): queued");
    let _ = std::io::stdout().flush();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut shown = String::from("queued");
    let last = loop {
        if Instant::now() > deadline {
            println!();
            bail!("submission {id} did not finish within 30s (last status {shown})");
        }
        let sub: Value = client
            .get(format!("{gateway}/v1/submissions/{id}"))
            .send()
            .await?
            .json()
            .await?;
        let status = sub.get("status").and_then(Value::as_str).unwrap_or("?");
        let label = match status {
            "running" => format!(
                "running {}/{}",
                sub.get("done").and_then(Value::as_u64).unwrap_or(0),
                sub.get("total").and_then(Value::as_u64).unwrap_or(0)
            ),
            other => other.to_string(),
        };
        if label != shown {
            print!(" → {label}");
            let _ = std::io::stdout().flush();
            shown = label;
        }
        let notified = sub.get("notified").and_then(Value::as_bool) == Some(true);
        if status == "error" || (notified && matches!(status, "passed" | "failed")) {
            break sub;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!(" → emailed");
    let status = last.get("status").and_then(Value::as_str).unwrap_or("?");
    if status != expect {
        bail!("submission {id} ended {status}, expected {expect}: {last}");
    }
    if last.get("file").and_then(Value::as_str).is_none() {
        // solution_update may still be on its way; give it a moment.
        wait_for_file(client, gateway, id).await?;
    }
    Ok(Flow {
        id,
        correlation_id,
        expect,
    })
}

async fn wait_for_file(client: &reqwest::Client, gateway: &str, id: u64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let sub: Value = client
            .get(format!("{gateway}/v1/submissions/{id}"))
            .send()
            .await?
            .json()
            .await?;
        if sub.get("file").and_then(Value::as_str).is_some() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("submission {id}: file-service's solution_update never arrived")
}

/// Who must have received what: (instance, event or queue, laboratory or submission flows).
pub fn expected_deliveries() -> Vec<(&'static str, &'static str, bool)> {
    // `true`: one delivery per submission; `false`: one for the laboratory.
    vec![
        ("runner-service", LABORATORY_CREATED, false),
        ("tester-service", LABORATORY_CREATED, false),
        ("runner-service", TEST_RUN, true),
        ("submission-service", TEST_RUN, true),
        ("submission-service", SOLUTION_SUBMIT, true),
        ("file-service", SOLUTION_SUBMIT, true),
        ("submission-service", SOLUTION_UPDATE, true),
        ("email-worker", EMAIL_TASKS, true),
    ]
}

/// A service's `GET /v1/_stats`.
pub async fn stats(client: &reqwest::Client, mesh: &Mesh, instance: &str) -> Result<Value> {
    let app = mesh.instance(instance)?.app();
    Ok(client
        .get(format!("http://{app}/v1/_stats"))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?)
}

/// Checks each consumer's counters against the flows: every expected delivery arrived exactly
/// once, under the flow's correlation id and about the right laboratory or submission.
pub async fn check_event_flow(
    client: &reqwest::Client,
    mesh: &Mesh,
    lab: &Flow,
    submissions: &[Flow],
) -> Vec<String> {
    let mut problems = Vec::new();
    for (instance, target, per_submission) in expected_deliveries() {
        let stats = match stats(client, mesh, instance).await {
            Ok(s) => s,
            Err(e) => {
                problems.push(format!("{instance}: cannot read /v1/_stats: {e}"));
                continue;
            }
        };
        let flows: Vec<(String, &Flow)> = if per_submission {
            submissions
                .iter()
                .map(|f| (format!("submission {}", f.id), f))
                .collect()
        } else {
            vec![(format!("laboratory {}", lab.id), lab)]
        };
        for (subject, flow) in flows {
            let got = &stats["deliveries"][target][&flow.correlation_id];
            let count = got.get("count").and_then(Value::as_u64).unwrap_or(0);
            let about = got.get("subject").and_then(Value::as_str).unwrap_or("");
            if count != 1 {
                problems.push(format!(
                    "{instance} received {target} for {subject} {count} times (correlation id {}), expected once",
                    flow.correlation_id
                ));
            } else if about != subject {
                problems.push(format!(
                    "{instance} received {target} with correlation id {} about `{about}`, expected `{subject}`",
                    flow.correlation_id
                ));
            } else {
                say(&format!("✓ {instance:<18} {target:<18} {subject}"));
            }
        }
    }
    problems
}

/// A sidecar's metrics.
pub async fn scrape(client: &reqwest::Client, mesh: &Mesh, instance: &str) -> Result<Vec<Sample>> {
    let admin = mesh.instance(instance)?.admin();
    let text = client
        .get(format!("http://{admin}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    Ok(metrics::parse(&text))
}

/// Two user-service replicas; one is killed. The gateway's sidecar retries on the other and
/// ejects the dead one, so the gateway keeps answering.
async fn fault_user_replica(
    client: &reqwest::Client,
    mesh: &mut Mesh,
    gateway: &str,
    settings: &Settings,
    out: &mut Outcome,
) -> Result<()> {
    let mut answered: BTreeMap<String, u32> = BTreeMap::new();
    for id in 1..=10 {
        let user: Value = client
            .get(format!("{gateway}/v1/users/{id}"))
            .send()
            .await?
            .json()
            .await?;
        if let Some(r) = user.get("replica").and_then(Value::as_str) {
            *answered.entry(r.to_string()).or_default() += 1;
        }
    }
    let shares: Vec<String> = answered.iter().map(|(r, n)| format!("{r} {n}")).collect();
    say(&format!(
        "before: 10 lookups answered by {}",
        shares.join(", ")
    ));
    // Kill the replica that served the most, so that the gateway's sidecar has to react.
    let victim = match answered.iter().max_by_key(|(_, n)| **n) {
        Some((r, _)) if r == "user-service-a" => "user-service-a",
        _ => "user-service-b",
    };
    let retries_before = metrics::sum(
        &scrape(client, mesh, "gateway").await?,
        "outrider_retries_total",
        &[("service", "user-service")],
    );
    remember_metrics(client, mesh, victim, out).await;
    mesh.stop_instance(victim);
    say(&format!("killed {victim} (app and sidecar)"));
    let mut ok = 0;
    let mut failed = Vec::new();
    for id in 1..=20 {
        match client.get(format!("{gateway}/v1/users/{id}")).send().await {
            Ok(r) if r.status().is_success() => ok += 1,
            Ok(r) => failed.push(r.status().as_u16().to_string()),
            Err(e) => failed.push(e.to_string()),
        }
    }
    let retries = metrics::sum(
        &scrape(client, mesh, "gateway").await?,
        "outrider_retries_total",
        &[("service", "user-service")],
    ) - retries_before;
    say(&format!(
        "after: {ok}/20 lookups answered; the gateway's sidecar retried {retries} time(s)"
    ));
    if ok < 20 {
        let msg = format!(
            "with a user-service replica down, {} of 20 gateway lookups failed ({})",
            20 - ok,
            failed.join(", ")
        );
        note(settings, out, msg);
    }
    mesh.start_instance(victim)?;
    mesh.wait_ready(victim).await?;
    say(&format!("{victim} is back"));
    Ok(())
}

/// file-service goes down: the gateway's sidecar answers 503, then opens the circuit and serves
/// the fallback without trying; file-service returns and the circuit closes again.
async fn fault_file_service(
    client: &reqwest::Client,
    mesh: &mut Mesh,
    gateway: &str,
    submission: u64,
    settings: &Settings,
    out: &mut Outcome,
) -> Result<()> {
    let url = format!("{gateway}/v1/submissions/{submission}/source");
    let before = client.get(&url).send().await?.status();
    say(&format!(
        "before: GET /v1/submissions/{submission}/source → {before}"
    ));
    remember_metrics(client, mesh, "file-service", out).await;
    mesh.stop_instance("file-service");
    say("stopped file-service (app and sidecar)");
    let mut seen = Vec::new();
    let mut opened = false;
    let mut gauge_open = false;
    for _ in 0..30 {
        let res = client.get(&url).send().await?;
        let status = res.status().as_u16();
        let kind = res
            .headers()
            .get("x-outrider-error")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let body = res.text().await.unwrap_or_default();
        seen.push(format!(
            "{status}{}",
            if kind.is_empty() {
                String::new()
            } else {
                format!(" {kind}")
            }
        ));
        if kind == "circuit-open" {
            opened = true;
            say(&format!(
                "circuit open: the sidecar serves the fallback without trying: {status} {body}"
            ));
            break;
        }
        if circuit_state(client, mesh).await == Some(1.0) {
            gauge_open = true; // the next answer should be the fallback
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    say(&format!("answers while down: {}", compress(&seen)));
    let state = circuit_state(client, mesh).await;
    opened |= gauge_open;
    if opened {
        out.circuit_trips += 1;
    } else {
        note(
            settings,
            out,
            format!(
                "file-service down: the gateway's circuit did not open (answers: {}; outrider_circuit_state = {state:?})",
                compress(&seen)
            ),
        );
    }
    mesh.start_instance("file-service")?;
    mesh.wait_ready("file-service").await?;
    say("file-service is back");
    let started = Instant::now();
    let mut closed = false;
    while started.elapsed() < Duration::from_secs(40) {
        if client
            .get(&url)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    if closed {
        say(&format!(
            "the solution is served again after {:.1}s (circuit closed: state {:?})",
            started.elapsed().as_secs_f64(),
            circuit_state(client, mesh).await
        ));
    } else {
        out.problems.push(format!(
            "file-service came back but the gateway did not serve submission {submission}'s source within 40s"
        ));
    }
    Ok(())
}

/// Whether the gateway's sidecar has retries and circuit breaking (it reports circuit states
/// for the services it called); then the fault steps must show them working.
async fn has_resilience_metrics(client: &reqwest::Client, mesh: &Mesh) -> bool {
    scrape(client, mesh, "gateway")
        .await
        .is_ok_and(|samples| samples.iter().any(|s| s.name == "outrider_circuit_state"))
}

async fn remember_metrics(
    client: &reqwest::Client,
    mesh: &Mesh,
    instance: &str,
    out: &mut Outcome,
) {
    if let Ok(samples) = scrape(client, mesh, instance).await {
        out.earlier_metrics.push((instance.to_string(), samples));
    }
}

async fn circuit_state(client: &reqwest::Client, mesh: &Mesh) -> Option<f64> {
    let samples = scrape(client, mesh, "gateway").await.ok()?;
    samples
        .iter()
        .find(|s| s.name == "outrider_circuit_state" && s.label("service") == "file-service")
        .map(|s| s.value)
}

fn note(settings: &Settings, out: &mut Outcome, msg: String) {
    if settings.strict_faults {
        say(&format!("✗ {msg}"));
        out.problems.push(msg);
    } else {
        say(&format!(
            "! {msg} (tolerated: run with --strict-faults to fail on it)"
        ));
        out.warnings.push(msg);
    }
}

/// `503, 503, 503` → `3 × 503`.
fn compress(items: &[String]) -> String {
    let mut parts: Vec<(String, usize)> = Vec::new();
    for item in items {
        match parts.last_mut() {
            Some((last, n)) if last == item => *n += 1,
            _ => parts.push((item.clone(), 1)),
        }
    }
    parts
        .into_iter()
        .map(|(item, n)| {
            if n == 1 {
                item
            } else {
                format!("{n} × {item}")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The summary of every sidecar's metrics: requests per hop with p50/p99, retries, circuit
/// trips, events published and delivered.
pub async fn summary(mesh: &Mesh, outcome: &Outcome) -> String {
    let Ok(client) = plain_client() else {
        return String::new();
    };
    let mut hops = Vec::new();
    let mut events = Vec::new();
    let mut retries = Vec::new();
    let trips = outcome.circuit_trips;
    for instance in &mesh.instances {
        let Ok(mut samples) = scrape(&client, mesh, instance.name).await else {
            hops.push(format!("  {:<20} (metrics unavailable)", instance.name));
            continue;
        };
        for (earlier, old) in &outcome.earlier_metrics {
            if earlier == instance.name {
                samples = metrics::merge(samples, old);
            }
        }
        let mut upstreams = BTreeSet::new();
        for s in samples
            .iter()
            .filter(|s| s.name == "outrider_requests_total" && s.label("direction") == "outbound")
        {
            upstreams.insert(s.label("service").to_string());
        }
        for up in upstreams {
            let filter = [("direction", "outbound"), ("service", up.as_str())];
            let total = metrics::sum(&samples, "outrider_requests_total", &filter);
            let errors: f64 = samples
                .iter()
                .filter(|s| {
                    s.name == "outrider_requests_total"
                        && s.label("direction") == "outbound"
                        && s.label("service") == up
                        && !s.label("code").starts_with('2')
                        && s.label("code") != "101"
                })
                .map(|s| s.value)
                .sum();
            let ms = |q| {
                metrics::quantile(&samples, "outrider_request_duration_seconds", &filter, q)
                    .map(|v| format!("{:.1}ms", v * 1000.0))
                    .unwrap_or_else(|| "-".into())
            };
            hops.push(format!(
                "  {:<20} → {:<20} {:>6} requests {:>4} non-2xx   p50 {:>8}  p99 {:>8}",
                instance.name,
                up,
                total as u64,
                errors as u64,
                ms(0.5),
                ms(0.99)
            ));
        }
        for s in samples
            .iter()
            .filter(|s| s.name == "outrider_retries_total" && s.value > 0.0)
        {
            retries.push(format!(
                "  {:<20} → {:<20} {:>6}",
                instance.name,
                s.label("service"),
                s.value as u64
            ));
        }
        for s in samples
            .iter()
            .filter(|s| s.name == "outrider_broker_published_total" && s.value > 0.0)
        {
            events.push(format!(
                "  {:<20} published  {:<18} {:>6}",
                instance.name,
                s.label("target"),
                s.value as u64
            ));
        }
        for s in samples
            .iter()
            .filter(|s| s.name == "outrider_broker_deliveries_total" && s.value > 0.0)
        {
            events.push(format!(
                "  {:<20} delivered  {:<18} {:>6} {}",
                instance.name,
                s.label("target"),
                s.value as u64,
                s.label("outcome")
            ));
        }
    }
    let mut text = String::from("\nRequests per hop (outbound, from each caller's sidecar):\n");
    text.push_str(&hops.join("\n"));
    text.push_str("\n\nRetries:\n");
    text.push_str(&if retries.is_empty() {
        "  none".to_string()
    } else {
        retries.join("\n")
    });
    text.push_str(&format!("\n\nCircuit trips seen: {trips}\n"));
    text.push_str("\nEvents and tasks (the sidecars' RabbitMQ bridge):\n");
    text.push_str(&if events.is_empty() {
        "  none".to_string()
    } else {
        events.join("\n")
    });
    text.push('\n');
    text
}
