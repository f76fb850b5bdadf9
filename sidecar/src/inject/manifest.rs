//! `outrider inject` without the I/O: multi-document YAML (and `kind: List`) in, the same
//! documents out with each opted-in pod template patched, plus one report line per resource.
//!
//! Documents are read as untyped JSON values and only the patch touches them, so everything the
//! injection does not own (unknown fields, other kinds, skipped templates) comes out unchanged in
//! meaning. Keys come out sorted, as `kubectl get -o yaml` prints them; comments are not kept.

use k8s_openapi::api::core::v1::PodTemplateSpec;
use serde_json::{Map, Value, json};

use super::{Settings, pod};

/// The CLI's result: the YAML to print and the report lines.
#[derive(Debug)]
pub struct Output {
    pub yaml: String,
    pub reports: Vec<String>,
}

/// Why the input was refused (exit 1); nothing is printed on stdout then.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("not valid YAML: {0}")]
    Yaml(String),
    #[error("document {0}: not a Kubernetes object (a mapping with apiVersion and kind)")]
    NotAnObject(usize),
    #[error("document {doc}: {resource}: {reason}")]
    Resource {
        doc: usize,
        resource: String,
        reason: String,
    },
    #[error("cannot write YAML: {0}")]
    Write(String),
}

/// Injects every opted-in pod template in `text`.
pub fn inject_manifests(text: &str, settings: &Settings) -> Result<Output, InputError> {
    let mut docs: Vec<Value> = serde_saphyr::from_multiple(text)
        .map_err(|e| InputError::Yaml(one_line(&e.to_string())))?;
    let mut reports = Vec::new();
    for (index, doc) in docs.iter_mut().enumerate() {
        visit(doc, index + 1, settings, &mut reports)?;
    }
    let mut yaml = match docs.as_slice() {
        [] => String::new(),
        docs => serde_saphyr::to_string_multiple(docs)
            .map_err(|e| InputError::Write(one_line(&e.to_string())))?,
    };
    if !yaml.is_empty() && !yaml.ends_with('\n') {
        yaml.push('\n');
    }
    Ok(Output { yaml, reports })
}

fn visit(
    doc: &mut Value,
    number: usize,
    settings: &Settings,
    reports: &mut Vec<String>,
) -> Result<(), InputError> {
    let Some(object) = doc.as_object() else {
        return Err(InputError::NotAnObject(number));
    };
    let (Some(api_version), Some(kind)) = (
        object.get("apiVersion").and_then(Value::as_str),
        object.get("kind").and_then(Value::as_str),
    ) else {
        return Err(InputError::NotAnObject(number));
    };
    let resource = resource_name(kind, object);
    let fail = |reason: String| InputError::Resource {
        doc: number,
        resource: resource.clone(),
        reason,
    };
    if kind == "List" || (kind.ends_with("List") && api_version == "v1") {
        let Some(items) = doc.get_mut("items").and_then(Value::as_array_mut) else {
            return Err(fail("a List needs an `items` array".into()));
        };
        for item in items {
            visit(item, number, settings, reports)?;
        }
        return Ok(());
    }
    let Some(pointer) = template_pointer(api_version, kind) else {
        reports.push(format!("{resource}: skipped: {kind} has no pod template"));
        return Ok(());
    };
    let workload_name = object
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .map(str::to_string);
    let Some(target) = doc.pointer_mut(pointer) else {
        reports.push(format!("{resource}: skipped: no pod template at {pointer}"));
        return Ok(());
    };
    let template = typed_template(target).map_err(|e| fail(format!("{pointer}: {e}")))?;
    let workload = pod::Workload {
        name: workload_name.as_deref(),
    };
    match pod::inject(&template, workload, settings) {
        Ok(ops) => {
            let patch: json_patch::Patch = serde_json::from_value(Value::Array(ops))
                .map_err(|e| fail(format!("internal: bad patch: {e}")))?;
            json_patch::patch(target, &patch)
                .map_err(|e| fail(format!("cannot apply the injection: {e}")))?;
            reports.push(format!("{resource}: injected"));
        }
        Err(skip) => reports.push(format!("{resource}: skipped: {skip}")),
    }
    Ok(())
}

/// Where the pod template sits in each workload kind; `""` is the Pod itself.
fn template_pointer(api_version: &str, kind: &str) -> Option<&'static str> {
    let group = api_version.rsplit_once('/').map_or("", |(g, _)| g);
    match (group, kind) {
        ("", "Pod") => Some(""),
        ("", "ReplicationController") => Some("/spec/template"),
        ("apps", "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet") => {
            Some("/spec/template")
        }
        ("batch", "Job") => Some("/spec/template"),
        ("batch", "CronJob") => Some("/spec/jobTemplate/spec/template"),
        _ => None,
    }
}

/// The pod template's typed view: a Pod and a template share `metadata` and `spec`.
fn typed_template(target: &Value) -> Result<PodTemplateSpec, String> {
    if !target.is_object() {
        return Err("not a mapping".into());
    }
    let view = json!({
        "metadata": target.get("metadata").cloned().unwrap_or(Value::Null),
        "spec": target.get("spec").cloned().unwrap_or(Value::Null),
    });
    serde_json::from_value(view).map_err(|e| e.to_string())
}

/// `deployment/web`, as kubectl names resources.
fn resource_name(kind: &str, object: &Map<String, Value>) -> String {
    let metadata = object.get("metadata");
    let field = |key: &str| metadata.and_then(|m| m.get(key)).and_then(Value::as_str);
    let name = field("name")
        .map(str::to_string)
        .or_else(|| field("generateName").map(|g| format!("{g}*")))
        .unwrap_or_else(|| "(unnamed)".into());
    format!("{}/{name}", kind.to_ascii_lowercase())
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
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

    const DEPLOYMENT: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: { name: web }
spec:
  selector: { matchLabels: { app: web } }
  template:
    metadata:
      labels: { app: web }
      annotations: { outrider.io/inject: enabled, outrider.io/app-port: "8080" }
    spec:
      containers: [{ name: app, image: nginx, futureField: { kept: true } }]
"#;

    #[test]
    fn injects_templates_and_reports_each_resource() {
        let input =
            format!("{DEPLOYMENT}---\napiVersion: v1\nkind: Service\nmetadata: {{ name: web }}\n");
        let out = inject_manifests(&input, &settings()).expect("valid");
        assert_eq!(
            out.reports,
            [
                "deployment/web: injected",
                "service/web: skipped: Service has no pod template"
            ]
        );
        let docs: Vec<Value> = serde_saphyr::from_multiple(&out.yaml).expect("yaml");
        assert_eq!(docs.len(), 2);
        let init = &docs[0]["spec"]["template"]["spec"]["initContainers"];
        assert_eq!(init[0]["name"], "outrider");
        // Fields unknown to k8s-openapi survive.
        assert_eq!(
            docs[0]["spec"]["template"]["spec"]["containers"][0]["futureField"]["kept"],
            true
        );
        let again = inject_manifests(&out.yaml, &settings()).expect("valid");
        assert_eq!(again.yaml, out.yaml);
        assert_eq!(
            again.reports[0],
            "deployment/web: skipped: already injected"
        );
    }

    #[test]
    fn bad_input_is_refused_with_a_reason() {
        let cases = [
            ("a: [", "not valid YAML"),
            ("- 1\n- 2\n", "document 1: not a Kubernetes object"),
            ("kind: Pod\n", "document 1: not a Kubernetes object"),
            (
                "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: 3}\n",
                "document 1: pod/p: : ",
            ),
        ];
        for (input, want) in cases {
            let err = inject_manifests(input, &settings())
                .expect_err(input)
                .to_string();
            assert!(err.starts_with(want), "{input:?}: {err}");
        }
    }

    #[test]
    fn empty_input_is_empty_output() {
        let out = inject_manifests("", &settings()).expect("valid");
        assert!(out.yaml.is_empty() && out.reports.is_empty());
    }
}
