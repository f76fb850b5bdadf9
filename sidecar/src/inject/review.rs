//! AdmissionReview v1 in, AdmissionReview v1 out, without the I/O.
//!
//! Own serde structs rather than kube-core's: kube-core 5 writes `patch` as an array of bytes,
//! while the API server wants base64 (K8S.md §1.6). Only Pod CREATE requests are injected;
//! everything else, and every skip, is `allowed: true` with no patch.

use base64::Engine;
use k8s_openapi::api::core::v1::PodTemplateSpec;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{Settings, pod};

const API_VERSION: &str = "admission.k8s.io/v1";

/// A request the webhook cannot answer: HTTP 400 with this message.
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    #[error("not an AdmissionReview: {0}")]
    Json(String),
    #[error("expected apiVersion {API_VERSION} and kind AdmissionReview, got {0} {1}")]
    WrongType(String, String),
    #[error("the AdmissionReview has no request")]
    NoRequest,
    #[error("the request has no uid")]
    NoUid,
    #[error("a Pod CREATE request without an object")]
    NoObject,
    #[error("the object is not a valid Pod: {0}")]
    NotAPod(String),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ReviewIn {
    api_version: String,
    kind: String,
    request: Option<RequestIn>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RequestIn {
    uid: String,
    kind: GroupVersionKind,
    #[serde(default)]
    namespace: Option<String>,
    operation: String,
    #[serde(default)]
    object: Option<Value>,
}

#[derive(Deserialize)]
struct GroupVersionKind {
    #[serde(default)]
    group: String,
    kind: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ReviewOut<'a> {
    api_version: &'static str,
    kind: &'static str,
    response: ResponseOut<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ResponseOut<'a> {
    uid: &'a str,
    allowed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    patch_type: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    patch: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    warnings: Vec<String>,
}

/// The answer to one review: the JSON body, and a line for the log.
#[derive(Debug)]
pub struct Answer {
    pub body: Vec<u8>,
    pub summary: String,
}

/// Namespaces never injected, whatever the webhook's namespaceSelector says.
const IGNORED_NAMESPACES: &[&str] = &["kube-system", "kube-public", "kube-node-lease"];

/// Answers an AdmissionReview body.
pub fn review(body: &[u8], settings: &Settings) -> Result<Answer, ReviewError> {
    let review: ReviewIn =
        serde_json::from_slice(body).map_err(|e| ReviewError::Json(e.to_string()))?;
    if review.api_version != API_VERSION || review.kind != "AdmissionReview" {
        return Err(ReviewError::WrongType(review.api_version, review.kind));
    }
    let request = review.request.ok_or(ReviewError::NoRequest)?;
    if request.uid.is_empty() {
        return Err(ReviewError::NoUid);
    }
    let outcome = decide(&request, settings)?;
    let (patch, warnings, summary) = match outcome {
        Ok(ops) => {
            let bytes = serde_json::to_vec(&ops).map_err(|e| ReviewError::Json(e.to_string()))?;
            let patch = base64::engine::general_purpose::STANDARD.encode(bytes);
            (Some(patch), Vec::new(), "injected".to_string())
        }
        Err(skip) => {
            let warnings = match &skip {
                Skip::Pod(s) if s.is_misconfiguration() => {
                    vec![format!("outrider: sidecar not injected: {s}")]
                }
                _ => Vec::new(),
            };
            (None, warnings, format!("skipped: {skip}"))
        }
    };
    let out = ReviewOut {
        api_version: API_VERSION,
        kind: "AdmissionReview",
        response: ResponseOut {
            uid: &request.uid,
            allowed: true,
            patch_type: patch.is_some().then_some("JSONPatch"),
            patch,
            warnings,
        },
    };
    let body = serde_json::to_vec(&out).map_err(|e| ReviewError::Json(e.to_string()))?;
    let summary = format!(
        "{} {}/{}: {summary}",
        request.uid,
        request.namespace.as_deref().unwrap_or("-"),
        pod_name(request.object.as_ref()),
    );
    Ok(Answer { body, summary })
}

#[derive(Debug, thiserror::Error)]
enum Skip {
    #[error("not a Pod CREATE ({0} {1})")]
    NotPodCreate(String, String),
    #[error("namespace {0} is never injected")]
    IgnoredNamespace(String),
    #[error("{0}")]
    Pod(pod::Skip),
}

fn decide(
    request: &RequestIn,
    settings: &Settings,
) -> Result<Result<Vec<Value>, Skip>, ReviewError> {
    if !request.kind.group.is_empty() || request.kind.kind != "Pod" || request.operation != "CREATE"
    {
        return Ok(Err(Skip::NotPodCreate(
            request.operation.clone(),
            request.kind.kind.clone(),
        )));
    }
    if let Some(ns) = request
        .namespace
        .as_deref()
        .filter(|ns| IGNORED_NAMESPACES.contains(ns))
    {
        return Ok(Err(Skip::IgnoredNamespace(ns.to_string())));
    }
    let object = request.object.as_ref().ok_or(ReviewError::NoObject)?;
    if !object.is_object() {
        return Err(ReviewError::NotAPod("not a mapping".into()));
    }
    let view = json!({
        "metadata": object.get("metadata").cloned().unwrap_or(Value::Null),
        "spec": object.get("spec").cloned().unwrap_or(Value::Null),
    });
    let template: PodTemplateSpec =
        serde_json::from_value(view).map_err(|e| ReviewError::NotAPod(e.to_string()))?;
    let name = workload_name(&template);
    let workload = pod::Workload {
        name: name.as_deref(),
    };
    Ok(pod::inject(&template, workload, settings).map_err(Skip::Pod))
}

/// A controller's pod has only `generateName` (`web-7d4b9c-`); its workload is `web` when the
/// ReplicaSet's `pod-template-hash` label tells us the suffix.
fn workload_name(template: &PodTemplateSpec) -> Option<String> {
    let metadata = template.metadata.as_ref()?;
    if let Some(name) = &metadata.name {
        return Some(name.clone());
    }
    let base = metadata.generate_name.as_deref()?.trim_end_matches('-');
    let hash = metadata
        .labels
        .as_ref()
        .and_then(|l| l.get("pod-template-hash"));
    let base = match hash {
        Some(hash) => base
            .strip_suffix(hash.as_str())
            .map(|b| b.trim_end_matches('-'))
            .unwrap_or(base),
        None => base,
    };
    (!base.is_empty()).then(|| base.to_string())
}

fn pod_name(object: Option<&Value>) -> String {
    let metadata = object.and_then(|o| o.get("metadata"));
    let field = |key: &str| metadata.and_then(|m| m.get(key)).and_then(Value::as_str);
    field("name")
        .map(str::to_string)
        .or_else(|| field("generateName").map(|g| format!("{g}*")))
        .unwrap_or_else(|| "-".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            image: "example/outrider:test".into(),
            k8s_version: None,
        }
    }

    fn request(object: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "apiVersion": API_VERSION, "kind": "AdmissionReview",
            "request": {
                "uid": "u-1", "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": "shop", "operation": "CREATE", "object": object,
            }
        }))
        .expect("json")
    }

    fn pod(annotations: Value) -> Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"generateName": "web-7d4b9c-", "labels": {"pod-template-hash": "7d4b9c"},
                         "annotations": annotations},
            "spec": {"containers": [{"name": "app", "image": "nginx"}]},
        })
    }

    fn response(answer: &Answer) -> Value {
        serde_json::from_slice::<Value>(&answer.body).expect("json")["response"].clone()
    }

    #[test]
    fn injects_with_a_base64_json_patch() {
        let object = pod(json!({"outrider.io/inject": "enabled", "outrider.io/app-port": "8080"}));
        let answer = review(&request(object.clone()), &settings()).expect("answer");
        let response = response(&answer);
        assert_eq!(response["uid"], "u-1");
        assert_eq!(response["allowed"], true);
        assert_eq!(response["patchType"], "JSONPatch");
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(response["patch"].as_str().expect("a base64 string"))
            .expect("base64");
        let patch: json_patch::Patch = serde_json::from_slice(&bytes).expect("patch");
        let mut patched = object;
        json_patch::patch(&mut patched, &patch).expect("applies");
        let sidecar = &patched["spec"]["initContainers"][0];
        // The service name came from generateName minus the pod-template-hash.
        let env = sidecar["env"].as_array().expect("env");
        assert!(env.contains(&json!({"name": "OUTRIDER_SERVICE", "value": "web"})));
        assert_eq!(
            patched["metadata"]["annotations"]["outrider.io/injected"],
            "true"
        );

        let again = review(&request(patched), &settings()).expect("answer");
        let response = self::response(&again);
        assert_eq!(response["allowed"], true);
        assert!(response.get("patch").is_none() && response.get("patchType").is_none());
    }

    #[test]
    fn skips_are_allowed_without_a_patch_and_misconfigurations_warn() {
        let answer = review(&request(pod(json!({}))), &settings()).expect("answer");
        let r = response(&answer);
        assert_eq!(r["allowed"], true);
        assert!(r.get("patch").is_none() && r.get("warnings").is_none());

        let answer = review(
            &request(pod(json!({"outrider.io/inject": "enabled"}))),
            &settings(),
        )
        .expect("answer");
        let r = response(&answer);
        assert!(r.get("patch").is_none());
        assert!(
            r["warnings"][0]
                .as_str()
                .expect("warning")
                .contains("app-port")
        );
    }

    #[test]
    fn malformed_reviews_are_errors() {
        let bad: [&[u8]; 4] = [
            b"{",
            br#"{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview","request":{}}"#,
            br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#,
            br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"u","kind":{"group":"","version":"v1","kind":"Pod"},"operation":"CREATE","object":{"spec":{"containers":"x"}}}}"#,
        ];
        for body in bad {
            assert!(
                review(body, &settings()).is_err(),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }
}
