//! Each service's `docs/swagger.yaml` against the running service: every documented operation is
//! served, its example request gets a documented 2xx answer whose JSON has the documented
//! required fields, an unknown id gets the documented 404, and the WebSocket operation upgrades.

mod support;

use std::time::Duration;

use demo_services::demo::repo_root;
use futures_util::StreamExt;
use serde_json::Value;

const METHODS: &[&str] = &["get", "post", "put", "patch", "delete"];

fn load(service: &str) -> Value {
    let path = repo_root().join(format!("demo-services/{service}/docs/swagger.yaml"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let doc: Value = serde_saphyr::from_str(&text)
        .unwrap_or_else(|e| panic!("{}: not valid YAML: {e}", path.display()));
    assert!(
        doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")),
        "{}: not OpenAPI 3",
        path.display()
    );
    doc
}

/// Follows a local `$ref`.
fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(r) => r
            .trim_start_matches("#/")
            .split('/')
            .fold(doc, |node, key| &node[key]),
        None => schema,
    }
}

/// The required properties of a response schema are present (first item of an array).
fn check_required(doc: &Value, schema: &Value, body: &Value, what: &str) -> Result<(), String> {
    let schema = resolve(doc, schema);
    if schema["type"] == "array" {
        return match body.as_array() {
            Some(items) => match items.first() {
                Some(first) => check_required(doc, &schema["items"], first, what),
                None => Ok(()),
            },
            None => Err(format!("{what}: expected an array, got {body}")),
        };
    }
    for key in schema["required"].as_array().into_iter().flatten() {
        let key = key.as_str().unwrap_or_default();
        if body.get(key).is_none() {
            return Err(format!("{what}: required field `{key}` missing in {body}"));
        }
    }
    Ok(())
}

struct Operation {
    method: reqwest::Method,
    path: String,
    op: Value,
}

fn operations(doc: &Value) -> Vec<Operation> {
    let mut ops = Vec::new();
    for (path, item) in doc["paths"].as_object().into_iter().flatten() {
        for method in METHODS {
            if let Some(op) = item.get(*method) {
                ops.push(Operation {
                    method: method.to_uppercase().parse().expect("method"),
                    path: path.clone(),
                    op: op.clone(),
                });
            }
        }
    }
    ops
}

/// The path with its parameters replaced: by their examples, or by `unknown` for every id.
fn fill_path(op: &Operation, unknown: Option<&str>) -> String {
    let mut path = op.path.clone();
    for p in op.op["parameters"].as_array().into_iter().flatten() {
        if p["in"] == "path" {
            let name = p["name"].as_str().unwrap_or_default();
            let value = match unknown {
                Some(u) => u.to_string(),
                None => match &p["example"] {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                },
            };
            path = path.replace(&format!("{{{name}}}"), &value);
        }
    }
    path
}

async fn check_service(
    client: &reqwest::Client,
    service: &str,
    app: std::net::SocketAddr,
) -> Vec<String> {
    let doc = load(service);
    let mut problems = Vec::new();
    let ops = operations(&doc);
    assert!(!ops.is_empty(), "{service}: no operations documented");
    for op in &ops {
        let what = format!("{service} {} {}", op.method, op.path);
        let responses = op.op["responses"].as_object().cloned().unwrap_or_default();
        if responses.contains_key("101") {
            // A WebSocket: it upgrades and pushes JSON.
            let url = format!("ws://{app}{}", fill_path(op, None));
            match tokio_tungstenite::connect_async(url).await {
                Ok((mut ws, _)) => {
                    let first = tokio::time::timeout(Duration::from_secs(10), ws.next()).await;
                    let text = match first {
                        Ok(Some(Ok(msg))) => {
                            msg.into_text().map(|t| t.to_string()).unwrap_or_default()
                        }
                        other => format!("{other:?}"),
                    };
                    if serde_json::from_str::<Value>(&text)
                        .map(|v| v.get("id").is_none())
                        .unwrap_or(true)
                    {
                        problems.push(format!(
                            "{what}: first WebSocket message is not a submission: {text}"
                        ));
                    }
                }
                Err(e) => problems.push(format!("{what}: WebSocket upgrade failed: {e}")),
            }
            continue;
        }
        let mut req = client.request(
            op.method.clone(),
            format!("http://{app}{}", fill_path(op, None)),
        );
        for p in op.op["parameters"].as_array().into_iter().flatten() {
            if p["in"] == "header" {
                let value = match &p["example"] {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                req = req.header(p["name"].as_str().unwrap_or_default(), value);
            }
        }
        let example = &op.op["requestBody"]["content"]["application/json"]["example"];
        if !example.is_null() {
            req = req.json(example);
        }
        let res = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                problems.push(format!("{what}: {e}"));
                continue;
            }
        };
        let status = res.status().as_u16().to_string();
        let body = res.text().await.unwrap_or_default();
        let Some(documented) = responses.get(&status) else {
            problems.push(format!(
                "{what}: answered {status}, which is not documented ({body})"
            ));
            continue;
        };
        if !status.starts_with('2') {
            problems.push(format!(
                "{what}: the documented example got {status}: {body}"
            ));
            continue;
        }
        let json_schema = &documented["content"]["application/json"]["schema"];
        if !json_schema.is_null() {
            match serde_json::from_str::<Value>(&body) {
                Ok(v) => {
                    if let Err(e) = check_required(&doc, json_schema, &v, &what) {
                        problems.push(e);
                    }
                }
                Err(_) => problems.push(format!("{what}: documented as JSON, got {body}")),
            }
        }
        // An unknown id: the documented 404.
        if responses.contains_key("404") && op.path.contains('{') {
            let url = format!("http://{app}{}", fill_path(op, Some("999999")));
            let mut req = client.request(op.method.clone(), url);
            if !example.is_null() {
                req = req.json(example);
            }
            match req.send().await {
                Ok(r) if r.status() == 404 => {}
                Ok(r) => problems.push(format!(
                    "{what} with an unknown id: {} instead of 404",
                    r.status()
                )),
                Err(e) => problems.push(format!("{what} with an unknown id: {e}")),
            }
        }
    }
    problems
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_swagger_matches_its_running_service() {
    let t = support::start("127.0.34").await;
    let client = support::client();
    let gateway = format!("http://{}", t.mesh.gateway());
    // Data for the examples: laboratory 1 and submission 1.
    let lab = demo_services::demo::scenario::create_lab(&client, &t.mesh, &gateway)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", support::logs(t.dir.path())));
    demo_services::demo::scenario::submit_and_follow(
        &client,
        &gateway,
        lab.id,
        1,
        demo_services::demo::scenario::PASSING_CODE,
        "passed",
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", support::logs(t.dir.path())));

    let mut problems = Vec::new();
    for service in demo_services::services::ALL {
        let instance = if *service == "user-service" {
            "user-service-a"
        } else {
            service
        };
        let app = t.mesh.instance(instance).expect("instance").app();
        problems.extend(check_service(&client, service, app).await);
    }
    assert!(
        problems.is_empty(),
        "swagger mismatches:\n{}",
        problems.join("\n")
    );
}
