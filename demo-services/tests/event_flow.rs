//! The whole event flow, end to end through the sidecars and RabbitMQ: every consumer received
//! every event of every flow exactly once, under the correlation id the flow started with.

mod support;

use demo_services::demo::metrics;
use demo_services::demo::scenario::{
    self, FAILING_CODE, Flow, PASSING_CODE, expected_deliveries, stats,
};
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_consumer_gets_every_event_once_with_its_correlation_id() {
    let t = support::start("127.0.32").await;
    let mesh = &t.mesh;
    let client = support::client();
    let gateway = format!("http://{}", mesh.gateway());

    let lab = scenario::create_lab(&client, mesh, &gateway)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", support::logs(t.dir.path())));
    let mut subs: Vec<Flow> = Vec::new();
    for (user, code, expect) in [(1, PASSING_CODE, "passed"), (2, FAILING_CODE, "failed")] {
        let flow = scenario::submit_and_follow(&client, &gateway, lab.id, user, code, expect)
            .await
            .unwrap_or_else(|e| panic!("{e:#}\n{}", support::logs(t.dir.path())));
        subs.push(flow);
    }
    // Let any duplicate a broken bridge would deliver arrive before counting.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;

    for (instance, target, per_submission) in expected_deliveries() {
        let stats = stats(&client, mesh, instance).await.expect("stats");
        let delivered = &stats["deliveries"][target];
        let flows: Vec<(&Flow, String)> = if per_submission {
            subs.iter()
                .map(|f| (f, format!("submission {}", f.id)))
                .collect()
        } else {
            vec![(&lab, format!("laboratory {}", lab.id))]
        };
        for (flow, subject) in flows {
            let got = &delivered[&flow.correlation_id];
            assert_eq!(
                got["count"], 1,
                "{instance} should have received {target} for {subject} once under correlation id {}; it has {delivered}",
                flow.correlation_id
            );
            assert_eq!(
                got["subject"],
                subject.as_str(),
                "{instance}/{target}: {delivered}"
            );
            // No other correlation id carried this flow's event (ids were not replaced on the way).
            let others: Vec<&String> = delivered
                .as_object()
                .map(|m| {
                    m.iter()
                        .filter(|(corr, v)| {
                            *corr != &flow.correlation_id && v["subject"] == subject.as_str()
                        })
                        .map(|(corr, _)| corr)
                        .collect()
                })
                .unwrap_or_default();
            assert!(
                others.is_empty(),
                "{instance}/{target}: {subject} also arrived as {others:?}"
            );
        }
    }

    // The results and side effects are the right ones.
    for flow in &subs {
        let sub: Value = client
            .get(format!("{gateway}/v1/submissions/{}", flow.id))
            .send()
            .await
            .expect("get submission")
            .json()
            .await
            .expect("json");
        assert_eq!(sub["status"], flow.expect, "{sub}");
        assert_eq!(sub["correlation_id"], flow.correlation_id.as_str(), "{sub}");
        assert_eq!(sub["result"]["total"], 4, "{sub}");
        let stages: Vec<&str> = sub["history"]
            .as_array()
            .map(|h| h.iter().filter_map(|s| s["stage"].as_str()).collect())
            .unwrap_or_default();
        for stage in [
            "queued",
            "submitted",
            "stored",
            "running",
            flow.expect,
            "notified",
        ] {
            assert!(stages.contains(&stage), "stage {stage} missing: {stages:?}");
        }
        assert_eq!(
            stages.iter().filter(|s| **s == "running").count(),
            4,
            "one progress report per test over gRPC: {stages:?}"
        );
        let source = client
            .get(format!("{gateway}/v1/submissions/{}/source", flow.id))
            .send()
            .await
            .expect("source");
        assert_eq!(source.status(), 200);
        let source: Value = source.json().await.expect("json");
        let code = if flow.expect == "passed" {
            PASSING_CODE
        } else {
            FAILING_CODE
        };
        assert_eq!(source["code"], code);
    }
    let outbox: Value = client
        .get(format!(
            "http://{}/v1/outbox",
            mesh.instance("email-worker").expect("worker").app()
        ))
        .send()
        .await
        .expect("outbox")
        .json()
        .await
        .expect("json");
    for (flow, to) in subs
        .iter()
        .zip(["student-1@learning.example", "student-2@learning.example"])
    {
        let mails: Vec<&Value> = outbox
            .as_array()
            .map(|m| m.iter().filter(|m| m["submission_id"] == flow.id).collect())
            .unwrap_or_default();
        assert_eq!(
            mails.len(),
            1,
            "one email for submission {}: {outbox}",
            flow.id
        );
        assert_eq!(mails[0]["to"], to);
        assert!(
            mails[0]["subject"]
                .as_str()
                .is_some_and(|s| s.ends_with(flow.expect)),
            "{}",
            mails[0]
        );
    }

    // The sidecars did the work: mTLS hops counted, events published through the bridge.
    let gw = scenario::scrape(&client, mesh, "gateway")
        .await
        .expect("metrics");
    assert!(
        metrics::sum(
            &gw,
            "outrider_requests_total",
            &[("direction", "outbound"), ("service", "submission-service")]
        ) >= 2.0,
        "the gateway's sidecar counted its calls to submission-service"
    );
    let runner = scenario::scrape(&client, mesh, "runner-service")
        .await
        .expect("metrics");
    assert!(
        metrics::sum(
            &runner,
            "outrider_requests_total",
            &[("direction", "outbound"), ("service", "tester-service")]
        ) >= 2.0,
        "the runner's gRPC calls to tester-service went through its sidecar"
    );
    assert!(
        metrics::sum(
            &runner,
            "outrider_broker_published_total",
            &[("target", "solution.submit")]
        ) >= 2.0,
        "solution.submit was published through the runner's sidecar"
    );

    // The configs wire the Avro schemas and the publish lists: the runner's sidecar refuses a
    // malformed solution.submit (422) and an event the runner may not publish (403).
    let outbound = mesh.instance("runner-service").expect("runner").outbound();
    let via_runner = reqwest::Client::builder()
        .proxy(reqwest::Proxy::http(format!("http://{outbound}")).expect("proxy"))
        .build()
        .expect("client");
    let bad = via_runner
        .post("http://localhost/v1/events/solution.submit")
        .json(&serde_json::json!({ "submission_id": "not a number" }))
        .send()
        .await
        .expect("publish");
    assert_eq!(
        bad.status(),
        422,
        "schemas/solution.submit.avsc is enforced"
    );
    let forbidden = via_runner
        .post("http://localhost/v1/events/test.run")
        .json(&serde_json::json!({ "submission_id": 1, "lab_id": 1, "passed": 1, "total": 1, "outcome": "passed" }))
        .send()
        .await
        .expect("publish");
    assert_eq!(
        forbidden.status(),
        403,
        "runner-service may not publish test.run"
    );
}
