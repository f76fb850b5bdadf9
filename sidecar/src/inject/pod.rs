//! The injection function: reads a typed pod template and answers with the JSON Patch that adds
//! the sidecar, or with the reason it must not be injected.
//!
//! The template is only read. Both front ends apply (CLI) or send (webhook) the same patch to the
//! raw object, so fields this crate's k8s-openapi version does not know survive untouched.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EnvFromSource, EnvVar,
    EnvVarSource, ExecAction, HTTPGetAction, Lifecycle, LifecycleHandler, ObjectFieldSelector,
    PodSpec, PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile, SecretEnvSource,
    SecretVolumeSource, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::{Value, json};

use super::{K8sVersion, Settings, annotations as ann, ports};

/// Name of the injected container; its presence means "already injected".
const SIDECAR_NAME: &str = "outrider";
/// Fixed, non-root UID/GID of the sidecar (no passwd entry needed with a numeric user).
const SIDECAR_UID: i64 = 2102;
const IDENTITY_VOLUME: &str = "outrider-identity";
const CONFIG_VOLUME: &str = "outrider-config";
/// Where the identity Secret (`tls.crt`, `tls.key`, `ca.crt`, as cert-manager writes them) is mounted.
const IDENTITY_DIR: &str = "/var/run/outrider/identity";
/// Where the `outrider.io/config` ConfigMap is mounted; it must hold the key `config.yaml`.
const CONFIG_DIR: &str = "/etc/outrider";
/// The binary's path in the image (see deploy/Dockerfile).
const BINARY: &str = "/usr/local/bin/outrider";
/// How long a sidecar may take to become ready: the startupProbe allows this many 1 s periods.
const STARTUP_SECONDS: i32 = 120;
/// Native sidecars (init containers with `restartPolicy: Always`) are on by default from 1.29.
const NATIVE_SIDECAR_SINCE: K8sVersion = K8sVersion {
    major: 1,
    minor: 29,
};
/// The apps reach other services through the sidecar; local addresses stay direct (including the
/// broker API at `http://127.0.0.1:7140/v1/...`).
const NO_PROXY: &str = "localhost,127.0.0.1,::1";

/// Why a pod template was left alone. The message is the operator-facing reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Skip {
    #[error("{} is not set to \"enabled\"", ann::INJECT)]
    NotEnabled,
    #[error("already injected")]
    AlreadyInjected,
    #[error("hostNetwork pods share the node's ports; the sidecar cannot run in them")]
    HostNetwork,
    #[error("no pod spec")]
    NoSpec,
    #[error("{} is required (the port the app listens on)", ann::APP_PORT)]
    MissingAppPort,
    #[error("{annotation} {0:?} is not a port number (1-65535)", annotation = ann::APP_PORT)]
    InvalidAppPort(String),
    #[error("{annotation} {0} is one of the sidecar's own ports (7140, 7143, 7191)", annotation = ann::APP_PORT)]
    AppPortIsSidecarPort(u16),
    #[error(
        "no service name: set {} or an `app` label, or give the workload a name",
        ann::SERVICE
    )]
    NoServiceName,
    #[error(
        "service name {0:?} is not a DNS label (lowercase letters, digits and `-`, at most 63)"
    )]
    InvalidServiceName(String),
    #[error("{annotation} {0:?} is not a Kubernetes version such as 1.29", annotation = ann::K8S_VERSION)]
    InvalidK8sVersion(String),
    #[error("{annotation} {0:?} is not a ConfigMap name", annotation = ann::CONFIG)]
    InvalidConfigName(String),
    #[error("{annotation} {0:?} is not a Secret name", annotation = ann::ENV_SECRET)]
    InvalidSecretName(String),
    #[error("container {container:?} already uses {what}")]
    Clash { container: String, what: String },
    #[error("a volume named {0:?} already exists")]
    VolumeExists(String),
}

impl Skip {
    /// The pod asked for injection but something is wrong with it: worth a warning to the user.
    pub fn is_misconfiguration(&self) -> bool {
        !matches!(self, Skip::NotEnabled | Skip::AlreadyInjected)
    }
}

/// What the caller knows about the template beyond its own fields.
#[derive(Debug, Clone, Copy, Default)]
pub struct Workload<'a> {
    /// The owning resource's name (Deployment, CronJob, ...), or the Pod's; the last fallback for
    /// the service name.
    pub name: Option<&'a str>,
}

/// Whether the template already carries the sidecar (by marker annotation or container name).
pub fn is_injected(template: &PodTemplateSpec) -> bool {
    let marked = annotations(template).is_some_and(|a| a.contains_key(ann::INJECTED));
    let has_container = template.spec.as_ref().is_some_and(|spec| {
        spec.containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
            .any(|c| c.name == SIDECAR_NAME)
    });
    marked || has_container
}

/// The JSON Patch (RFC 6902, as `serde_json` values) that injects `template`, with paths
/// relative to the pod (or pod template): `/metadata/...` and `/spec/...`.
pub fn inject(
    template: &PodTemplateSpec,
    workload: Workload<'_>,
    settings: &Settings,
) -> Result<Vec<Value>, Skip> {
    if is_injected(template) {
        return Err(Skip::AlreadyInjected);
    }
    let annotations = annotations(template).cloned().unwrap_or_default();
    if annotations.get(ann::INJECT).map(String::as_str) != Some("enabled") {
        return Err(Skip::NotEnabled);
    }
    let spec = template.spec.as_ref().ok_or(Skip::NoSpec)?;
    if spec.host_network == Some(true) {
        return Err(Skip::HostNetwork);
    }
    let app_port = app_port(&annotations)?;
    let service = service_name(template, &annotations, workload)?;
    let native = match annotations.get(ann::K8S_VERSION) {
        Some(text) => text
            .parse::<K8sVersion>()
            .map_err(|_| Skip::InvalidK8sVersion(text.clone()))?,
        None => settings.k8s_version.unwrap_or(NATIVE_SIDECAR_SINCE),
    } >= NATIVE_SIDECAR_SINCE;
    let config = match annotations.get(ann::CONFIG) {
        Some(name) if is_dns_subdomain(name) => Some(name.as_str()),
        Some(name) => return Err(Skip::InvalidConfigName(name.clone())),
        None => None,
    };
    let env_secret = match annotations.get(ann::ENV_SECRET) {
        Some(name) if is_dns_subdomain(name) => Some(name.as_str()),
        Some(name) => return Err(Skip::InvalidSecretName(name.clone())),
        None => None,
    };
    check_clashes(spec)?;

    let mut sidecar = sidecar_container(settings, &service, app_port, config, native);
    // Secrets such as OUTRIDER_BROKER_URL stay out of the ConfigMap.
    sidecar.env_from = env_secret.map(|name| {
        vec![EnvFromSource {
            secret_ref: Some(SecretEnvSource {
                name: name.into(),
                ..Default::default()
            }),
            ..Default::default()
        }]
    });
    let mut ops = Vec::new();
    for (index, container) in spec.containers.iter().enumerate() {
        add_proxy_env(&mut ops, index, container);
    }
    add_volumes(&mut ops, spec, &service, config);
    let sidecar = to_value(&sidecar);
    if native {
        if spec.init_containers.is_none() {
            ops.push(add("/spec/initContainers", json!([])));
        }
        ops.push(add("/spec/initContainers/0", sidecar));
    } else {
        ops.push(add("/spec/containers/0", sidecar));
    }
    add_annotations(&mut ops, template, &annotations, spec);
    Ok(ops)
}

fn annotations(template: &PodTemplateSpec) -> Option<&BTreeMap<String, String>> {
    template.metadata.as_ref()?.annotations.as_ref()
}

fn app_port(annotations: &BTreeMap<String, String>) -> Result<u16, Skip> {
    let text = annotations.get(ann::APP_PORT).ok_or(Skip::MissingAppPort)?;
    let port = text
        .trim()
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| Skip::InvalidAppPort(text.clone()))?;
    if [ports::OUTBOUND, ports::INBOUND, ports::ADMIN].contains(&port) {
        return Err(Skip::AppPortIsSidecarPort(port));
    }
    Ok(port)
}

/// `outrider.io/service`, else the `app` (or `app.kubernetes.io/name`) label, else the workload.
fn service_name(
    template: &PodTemplateSpec,
    annotations: &BTreeMap<String, String>,
    workload: Workload<'_>,
) -> Result<String, Skip> {
    let labels = template.metadata.as_ref().and_then(|m| m.labels.as_ref());
    let label = |key: &str| labels.and_then(|l| l.get(key)).map(String::as_str);
    let name = annotations
        .get(ann::SERVICE)
        .map(String::as_str)
        .or_else(|| label("app"))
        .or_else(|| label("app.kubernetes.io/name"))
        .or(workload.name)
        .ok_or(Skip::NoServiceName)?;
    if is_dns_label(name) {
        Ok(name.to_string())
    } else {
        Err(Skip::InvalidServiceName(name.to_string()))
    }
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// The sidecar's ports, names and volumes must be free in the pod.
fn check_clashes(spec: &PodSpec) -> Result<(), Skip> {
    let ours = [ports::INBOUND, ports::ADMIN];
    let names = [ports::INBOUND_NAME, ports::ADMIN_NAME];
    let containers = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten());
    for container in containers {
        for port in container.ports.iter().flatten() {
            let clash = if u16::try_from(port.container_port).is_ok_and(|p| ours.contains(&p)) {
                Some(format!("port {}", port.container_port))
            } else {
                port.name
                    .as_deref()
                    .filter(|n| names.contains(n))
                    .map(|n| format!("the port name {n:?}"))
            };
            if let Some(what) = clash {
                return Err(Skip::Clash {
                    container: container.name.clone(),
                    what,
                });
            }
        }
    }
    for volume in spec.volumes.iter().flatten() {
        if volume.name == IDENTITY_VOLUME || volume.name == CONFIG_VOLUME {
            return Err(Skip::VolumeExists(volume.name.clone()));
        }
    }
    Ok(())
}

/// The Secret holding a service's identity; `deploy/kubernetes/mint-certs.sh` writes it.
fn identity_secret_name(service: &str) -> String {
    format!("outrider-identity-{service}")
}

fn sidecar_container(
    settings: &Settings,
    service: &str,
    app_port: u16,
    config: Option<&str>,
    native: bool,
) -> Container {
    let http_get = |path: &str| HTTPGetAction {
        path: Some(path.to_string()),
        port: IntOrString::Int(i32::from(ports::ADMIN)),
        ..Default::default()
    };
    let probe = |path: &str, period: i32, failures: i32| Probe {
        http_get: Some(http_get(path)),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(1),
        ..Default::default()
    };
    let config_path = match config {
        Some(_) => format!("{CONFIG_DIR}/config.yaml"),
        // Without a ConfigMap every setting comes from the environment below.
        None => "/dev/null".to_string(),
    };
    let mut volume_mounts = vec![VolumeMount {
        name: IDENTITY_VOLUME.into(),
        mount_path: IDENTITY_DIR.into(),
        read_only: Some(true),
        ..Default::default()
    }];
    if config.is_some() {
        volume_mounts.push(VolumeMount {
            name: CONFIG_VOLUME.into(),
            mount_path: CONFIG_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        });
    }
    let quantities = |pairs: &[(&str, &str)]| {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), Quantity(v.to_string())))
            .collect::<BTreeMap<_, _>>()
    };
    Container {
        name: SIDECAR_NAME.into(),
        image: Some(settings.image.clone()),
        args: Some(vec!["run".into(), "-c".into(), config_path]),
        env: Some(sidecar_env(service, app_port)),
        ports: Some(vec![
            ContainerPort {
                name: Some(ports::INBOUND_NAME.into()),
                container_port: i32::from(ports::INBOUND),
                protocol: Some("TCP".into()),
                ..Default::default()
            },
            ContainerPort {
                name: Some(ports::ADMIN_NAME.into()),
                container_port: i32::from(ports::ADMIN),
                protocol: Some("TCP".into()),
                ..Default::default()
            },
        ]),
        // Native mode: kubelet starts the app only after this passes, and stops the sidecar
        // after the app. Legacy mode: it only holds off liveness checks while starting.
        startup_probe: Some(probe("/ready", 1, STARTUP_SECONDS)),
        readiness_probe: Some(probe("/ready", 5, 3)),
        liveness_probe: Some(probe("/live", 10, 3)),
        restart_policy: native.then(|| "Always".to_string()),
        // Legacy mode: the sidecar is the first container and kubelet does not start the next
        // one until this hook returns, so the app never starts without its proxy.
        lifecycle: (!native).then(|| Lifecycle {
            post_start: Some(LifecycleHandler {
                exec: Some(ExecAction {
                    command: Some(vec![
                        BINARY.into(),
                        "await".into(),
                        "--timeout-seconds".into(),
                        STARTUP_SECONDS.to_string(),
                    ]),
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        resources: Some(ResourceRequirements {
            requests: Some(quantities(&[("cpu", "50m"), ("memory", "32Mi")])),
            limits: Some(quantities(&[("memory", "256Mi")])),
            ..Default::default()
        }),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(SIDECAR_UID),
            run_as_group: Some(SIDECAR_UID),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Default::default()
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        volume_mounts: Some(volume_mounts),
        ..Default::default()
    }
}

/// The sidecar's settings as `OUTRIDER_*` variables: they win over the ConfigMap, so the pod
/// spec (ports, probes, mounts) and the config cannot disagree.
fn sidecar_env(service: &str, app_port: u16) -> Vec<EnvVar> {
    let field = |name: &str, path: &str| EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let value = |name: &str, value: String| EnvVar {
        name: name.into(),
        value: Some(value),
        ..Default::default()
    };
    vec![
        field("POD_NAME", "metadata.name"),
        field("POD_NAMESPACE", "metadata.namespace"),
        field("POD_IP", "status.podIP"),
        value("OUTRIDER_SERVICE", service.into()),
        field("OUTRIDER_NAMESPACE", "metadata.namespace"),
        value("OUTRIDER_APP", format!("127.0.0.1:{app_port}")),
        value(
            "OUTRIDER_LISTEN_OUTBOUND",
            format!("127.0.0.1:{}", ports::OUTBOUND),
        ),
        value(
            "OUTRIDER_LISTEN_INBOUND",
            format!("0.0.0.0:{}", ports::INBOUND),
        ),
        // kubelet probes come from the node, so the admin listener must not be loopback-only.
        value("OUTRIDER_LISTEN_ADMIN", format!("0.0.0.0:{}", ports::ADMIN)),
        value("OUTRIDER_TLS_CA", format!("{IDENTITY_DIR}/ca.crt")),
        value("OUTRIDER_TLS_CERT", format!("{IDENTITY_DIR}/tls.crt")),
        value("OUTRIDER_TLS_KEY", format!("{IDENTITY_DIR}/tls.key")),
    ]
}

/// `HTTP_PROXY`/`NO_PROXY` (both spellings: curl reads only the lower-case `http_proxy`) on an app
/// container, except names the container already sets.
fn add_proxy_env(ops: &mut Vec<Value>, index: usize, container: &Container) {
    let proxy = format!("http://127.0.0.1:{}", ports::OUTBOUND);
    let wanted = [
        ("HTTP_PROXY", proxy.as_str()),
        ("http_proxy", proxy.as_str()),
        ("NO_PROXY", NO_PROXY),
        ("no_proxy", NO_PROXY),
    ];
    let existing = container.env.as_deref().unwrap_or_default();
    let missing: Vec<_> = wanted
        .iter()
        .filter(|(name, _)| !existing.iter().any(|e| e.name == *name))
        .collect();
    if missing.is_empty() {
        return;
    }
    let base = format!("/spec/containers/{index}/env");
    if container.env.is_none() {
        ops.push(add(&base, json!([])));
    }
    for (name, value) in missing {
        ops.push(add(
            &format!("{base}/-"),
            json!({ "name": name, "value": value }),
        ));
    }
}

fn add_volumes(ops: &mut Vec<Value>, spec: &PodSpec, service: &str, config: Option<&str>) {
    if spec.volumes.is_none() {
        ops.push(add("/spec/volumes", json!([])));
    }
    let identity = Volume {
        name: IDENTITY_VOLUME.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(identity_secret_name(service)),
            ..Default::default()
        }),
        ..Default::default()
    };
    ops.push(add("/spec/volumes/-", to_value(&identity)));
    if let Some(name) = config {
        let config = Volume {
            name: CONFIG_VOLUME.into(),
            config_map: Some(ConfigMapVolumeSource {
                name: name.into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        ops.push(add("/spec/volumes/-", to_value(&config)));
    }
}

/// The marker that makes re-injection a no-op, and the default container for `kubectl logs/exec`
/// (otherwise the sidecar, first in legacy mode).
fn add_annotations(
    ops: &mut Vec<Value>,
    template: &PodTemplateSpec,
    annotations: &BTreeMap<String, String>,
    spec: &PodSpec,
) {
    if template.metadata.is_none() {
        ops.push(add("/metadata", json!({})));
    }
    if template
        .metadata
        .as_ref()
        .is_none_or(|m| m.annotations.is_none())
    {
        ops.push(add("/metadata/annotations", json!({})));
    }
    let mut put = |key: &str, value: &str| {
        ops.push(add(
            &format!("/metadata/annotations/{}", escape(key)),
            json!(value),
        ));
    };
    put(ann::INJECTED, "true");
    const DEFAULT_CONTAINER: &str = "kubectl.kubernetes.io/default-container";
    if !annotations.contains_key(DEFAULT_CONTAINER)
        && let Some(first) = spec.containers.first()
    {
        put(DEFAULT_CONTAINER, &first.name);
    }
}

fn add(path: &str, value: Value) -> Value {
    json!({ "op": "add", "path": path, "value": value })
}

/// RFC 6901: `~` → `~0`, `/` → `~1`.
fn escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

fn to_value<T: serde::Serialize>(value: &T) -> Value {
    // k8s-openapi types always serialize to JSON; Null would only hide a bug in a test.
    serde_json::to_value(value).unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(yaml: &str) -> PodTemplateSpec {
        serde_saphyr::from_str(yaml).expect("test template")
    }

    fn settings() -> Settings {
        Settings {
            image: "example/outrider:test".into(),
            k8s_version: None,
        }
    }

    const BASIC: &str = r#"
metadata:
  labels: { app: web }
  annotations: { outrider.io/inject: enabled, outrider.io/app-port: "8080" }
spec:
  containers: [{ name: app, image: nginx }]
"#;

    fn apply(t: &PodTemplateSpec, ops: Vec<Value>) -> PodTemplateSpec {
        let mut doc = serde_json::to_value(t).expect("json");
        let patch: json_patch::Patch = serde_json::from_value(Value::Array(ops)).expect("patch");
        json_patch::patch(&mut doc, &patch).expect("applies");
        serde_json::from_value(doc).expect("typed")
    }

    #[test]
    fn native_sidecar_is_first_init_container_and_marks_the_pod() {
        let t = template(BASIC);
        let out = apply(
            &t,
            inject(&t, Workload::default(), &settings()).expect("injects"),
        );
        let spec = out.spec.as_ref().expect("spec");
        let sidecar = &spec.init_containers.as_ref().expect("init")[0];
        assert_eq!(sidecar.name, SIDECAR_NAME);
        assert_eq!(sidecar.restart_policy.as_deref(), Some("Always"));
        assert!(sidecar.lifecycle.is_none());
        assert_eq!(spec.containers.len(), 1);
        let env = spec.containers[0].env.as_ref().expect("env");
        assert!(
            env.iter()
                .any(|e| e.name == "HTTP_PROXY"
                    && e.value.as_deref() == Some("http://127.0.0.1:7140"))
        );
        let secret = spec.volumes.as_ref().expect("volumes")[0].secret.as_ref();
        assert_eq!(
            secret.and_then(|s| s.secret_name.as_deref()),
            Some("outrider-identity-web")
        );
        assert!(is_injected(&out));
        assert_eq!(
            inject(&out, Workload::default(), &settings()),
            Err(Skip::AlreadyInjected)
        );
    }

    #[test]
    fn before_1_29_the_sidecar_is_the_first_container_with_a_post_start_wait() {
        let t = template(BASIC);
        let old = Settings {
            k8s_version: Some("1.28".parse().expect("version")),
            ..settings()
        };
        let out = apply(&t, inject(&t, Workload::default(), &old).expect("injects"));
        let spec = out.spec.expect("spec");
        assert!(spec.init_containers.unwrap_or_default().is_empty());
        assert_eq!(spec.containers[0].name, SIDECAR_NAME);
        assert!(spec.containers[0].restart_policy.is_none());
        assert!(spec.containers[0].lifecycle.is_some());
        // The app container kept its index-shifted env.
        assert!(spec.containers[1].env.is_some());
    }

    #[test]
    fn annotation_version_wins_over_the_flag() {
        let t = template(&BASIC.replace(
            "outrider.io/app-port: \"8080\"",
            "outrider.io/app-port: \"8080\", outrider.io/k8s-version: v1.27.3",
        ));
        let out = apply(
            &t,
            inject(&t, Workload::default(), &settings()).expect("injects"),
        );
        assert_eq!(out.spec.expect("spec").containers[0].name, SIDECAR_NAME);
    }

    #[test]
    fn skips_say_why() {
        let cases = [
            (BASIC.replace("enabled", "disabled"), Skip::NotEnabled),
            (
                BASIC.replace("outrider.io/app-port: \"8080\"", "x: y"),
                Skip::MissingAppPort,
            ),
            (
                BASIC.replace("\"8080\"", "\"http\""),
                Skip::InvalidAppPort("http".into()),
            ),
            (
                BASIC.replace("\"8080\"", "\"7143\""),
                Skip::AppPortIsSidecarPort(7143),
            ),
            (
                BASIC.replace("spec:", "spec:\n  hostNetwork: true"),
                Skip::HostNetwork,
            ),
            (
                BASIC.replace("app: web", "app: Web_1"),
                Skip::InvalidServiceName("Web_1".into()),
            ),
            (
                BASIC.replace("labels: { app: web }", "labels: {}"),
                Skip::NoServiceName,
            ),
            (
                BASIC.replace(
                    "image: nginx",
                    "image: nginx, ports: [{containerPort: 7191}]",
                ),
                Skip::Clash {
                    container: "app".into(),
                    what: "port 7191".into(),
                },
            ),
        ];
        for (yaml, want) in cases {
            let got = inject(&template(&yaml), Workload::default(), &settings());
            assert_eq!(got, Err(want), "{yaml}");
        }
    }

    #[test]
    fn service_name_falls_back_to_the_workload() {
        let t = template(&BASIC.replace("labels: { app: web }", "labels: {}"));
        let out = apply(
            &t,
            inject(&t, Workload { name: Some("shop") }, &settings()).expect("injects"),
        );
        let env = out.spec.expect("spec").init_containers.expect("init")[0]
            .env
            .clone()
            .expect("env");
        assert!(
            env.iter()
                .any(|e| e.name == "OUTRIDER_SERVICE" && e.value.as_deref() == Some("shop"))
        );
    }

    #[test]
    fn existing_proxy_variables_are_kept() {
        let t = template(&BASIC.replace(
            "image: nginx",
            "image: nginx, env: [{name: HTTP_PROXY, value: http://corp:3128}]",
        ));
        let out = apply(
            &t,
            inject(&t, Workload::default(), &settings()).expect("injects"),
        );
        let env = out.spec.expect("spec").containers[0]
            .env
            .clone()
            .expect("env");
        let proxies: Vec<_> = env.iter().filter(|e| e.name == "HTTP_PROXY").collect();
        assert_eq!(proxies.len(), 1);
        assert_eq!(proxies[0].value.as_deref(), Some("http://corp:3128"));
    }

    #[test]
    fn annotation_keys_are_escaped() {
        assert_eq!(escape("outrider.io/injected"), "outrider.io~1injected");
        assert_eq!(escape("a~b"), "a~0b");
    }
}
