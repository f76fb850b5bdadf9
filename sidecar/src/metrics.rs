//! Every metric family of CONTRACT §6, in one registry per sidecar. A leaf: it imports no other
//! module of the crate. Other modules hold an `Arc<Metrics>` and call its typed fields; callers on
//! the hot path cache the labelled handles (`with_label_values` hashes and takes a read lock).

use std::sync::OnceLock;
use std::time::Duration;

use http::StatusCode;
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Request latency buckets, in seconds: fine below 10 ms where sidecar overhead lives.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

pub struct Metrics {
    registry: Registry,
    /// `direction` inbound/outbound; `service` the other side's name; `code` HTTP status.
    pub requests_total: IntCounterVec,
    pub request_duration_seconds: HistogramVec,
    pub retries_total: IntCounterVec,
    /// 0 closed, 1 open, 2 half-open.
    pub circuit_state: IntGaugeVec,
    pub endpoints: IntGaugeVec,
    pub tls_handshake_errors_total: IntCounterVec,
    pub authz_denied_total: IntCounterVec,
    pub rate_limited_total: IntCounter,
    pub broker_published_total: IntCounterVec,
    /// `outcome` acked/retried/dead_lettered/duplicate.
    pub broker_deliveries_total: IntCounterVec,
    /// 1 while connected to the broker.
    pub broker_connected: IntGauge,
    pub config_reloads_total: IntCounterVec,
    pub cert_expiry_timestamp_seconds: Gauge,
    /// `result` ok/rejected: rotated certificate material.
    pub cert_reloads_total: IntCounterVec,
    pub discovery_errors_total: IntCounterVec,
    pub outlier_ejections_total: IntCounterVec,
    /// 1 when a service is reached over mesh mTLS, 0 for plain HTTP (`mtls: false` or tls disabled).
    pub upstream_mtls: IntGaugeVec,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let requests_total = counter_vec(
            "outrider_requests_total",
            "Requests handled, by direction, the other side's service and HTTP status.",
            &["direction", "service", "code"],
        );
        let request_duration_seconds = HistogramVec::new(
            HistogramOpts::new(
                "outrider_request_duration_seconds",
                "Request duration until the response head, by direction and service.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["direction", "service"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(request_duration_seconds.clone()))
            .expect("unique metric");
        let retries_total = counter_vec(
            "outrider_retries_total",
            "Retries sent (attempts after the first).",
            &["service"],
        );
        let circuit_state = gauge_vec(
            "outrider_circuit_state",
            "Circuit breaker state per service: 0 closed, 1 open, 2 half-open.",
            &["service"],
        );
        let endpoints = gauge_vec(
            "outrider_endpoints",
            "Endpoints known now per service.",
            &["service"],
        );
        let tls_handshake_errors_total = counter_vec(
            "outrider_tls_handshake_errors_total",
            "Failed TLS handshakes, by direction.",
            &["direction"],
        );
        let authz_denied_total = counter_vec(
            "outrider_authz_denied_total",
            "Inbound requests refused by authorization, by caller service.",
            &["service"],
        );
        let rate_limited_total = IntCounter::new(
            "outrider_rate_limited_total",
            "Inbound requests refused by the rate limit or concurrency limit.",
        )
        .expect("valid metric");
        registry
            .register(Box::new(rate_limited_total.clone()))
            .expect("unique metric");
        let broker_published_total = counter_vec(
            "outrider_broker_published_total",
            "Messages published and confirmed by the broker, by event or queue.",
            &["target"],
        );
        let broker_deliveries_total = counter_vec(
            "outrider_broker_deliveries_total",
            "Deliveries to the app, by event or queue and outcome.",
            &["target", "outcome"],
        );
        let broker_connected = IntGauge::new(
            "outrider_broker_connected",
            "1 while the sidecar is connected to the broker.",
        )
        .expect("valid metric");
        registry
            .register(Box::new(broker_connected.clone()))
            .expect("unique metric");
        let config_reloads_total = counter_vec(
            "outrider_config_reloads_total",
            "Config reloads, by result (ok/rejected).",
            &["result"],
        );
        let cert_expiry_timestamp_seconds = Gauge::new(
            "outrider_cert_expiry_timestamp_seconds",
            "Unix time at which the workload certificate in use expires.",
        )
        .expect("valid metric");
        registry
            .register(Box::new(cert_expiry_timestamp_seconds.clone()))
            .expect("unique metric");
        let cert_reloads_total = counter_vec(
            "outrider_cert_reloads_total",
            "Certificate material reloads, by result (ok/rejected).",
            &["result"],
        );
        let discovery_errors_total = counter_vec(
            "outrider_discovery_errors_total",
            "Failed endpoint lookups, by service.",
            &["service"],
        );
        let outlier_ejections_total = counter_vec(
            "outrider_outlier_ejections_total",
            "Endpoints ejected for consecutive failures, by service.",
            &["service"],
        );
        let upstream_mtls = gauge_vec(
            "outrider_upstream_mtls",
            "1 when the upstream service is reached over mesh mTLS, 0 for plain HTTP.",
            &["service"],
        );
        Self {
            registry,
            requests_total,
            request_duration_seconds,
            retries_total,
            circuit_state,
            endpoints,
            tls_handshake_errors_total,
            authz_denied_total,
            rate_limited_total,
            broker_published_total,
            broker_deliveries_total,
            broker_connected,
            config_reloads_total,
            cert_expiry_timestamp_seconds,
            cert_reloads_total,
            discovery_errors_total,
            outlier_ejections_total,
            upstream_mtls,
        }
    }

    /// The Prometheus text exposition of every family.
    pub fn render(&self) -> String {
        let mut out = Vec::with_capacity(8 * 1024);
        // Encoding into a Vec cannot fail for the text format.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

/// Status codes whose `requests_total` handle [`RequestMetrics`] keeps once used; others are
/// looked up per request.
const COMMON_CODES: [u16; 12] = [200, 201, 202, 204, 400, 401, 403, 404, 429, 500, 502, 503];

/// `requests_total` and `request_duration_seconds` of one direction and service, with the
/// labelled handles looked up once (per upstream, per inbound connection) rather than per
/// request: each `with_label_values` hashes its labels and takes the family's read lock, about
/// 280 instructions a request each (`bench/callgrind.sh`).
pub struct RequestMetrics {
    direction: &'static str,
    service: String,
    requests_total: IntCounterVec,
    duration: Histogram,
    /// The counters of [`COMMON_CODES`], by index, created on first use: only the codes a
    /// service answers with appear in the exposition.
    by_code: [OnceLock<IntCounter>; COMMON_CODES.len()],
}

impl RequestMetrics {
    pub fn new(metrics: &Metrics, direction: &'static str, service: &str) -> Self {
        Self {
            direction,
            service: service.to_string(),
            requests_total: metrics.requests_total.clone(),
            duration: metrics
                .request_duration_seconds
                .with_label_values(&[direction, service]),
            by_code: Default::default(),
        }
    }

    pub fn service(&self) -> &str {
        &self.service
    }

    /// Counts one request answered with `status` after `elapsed`.
    pub fn record(&self, status: StatusCode, elapsed: Duration) {
        let labels = || [self.direction, self.service.as_str(), status.as_str()];
        match COMMON_CODES.iter().position(|&c| c == status.as_u16()) {
            Some(i) => self.by_code[i]
                .get_or_init(|| self.requests_total.with_label_values(&labels()))
                .inc(),
            None => self.requests_total.with_label_values(&labels()).inc(),
        }
        self.duration.observe(elapsed.as_secs_f64());
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_contract_names() {
        let m = Metrics::new();
        m.requests_total
            .with_label_values(&["outbound", "user-service", "200"])
            .inc();
        m.rate_limited_total.inc();
        let text = m.render();
        assert!(text.contains(
            r#"outrider_requests_total{code="200",direction="outbound",service="user-service"} 1"#
        ));
        assert!(text.contains("outrider_rate_limited_total 1"));
    }

    #[test]
    fn request_metrics_count_common_and_rare_codes() {
        let m = Metrics::new();
        let requests = RequestMetrics::new(&m, "inbound", "course-service");
        requests.record(StatusCode::OK, Duration::from_millis(3));
        requests.record(StatusCode::OK, Duration::from_millis(3));
        requests.record(StatusCode::IM_A_TEAPOT, Duration::from_millis(30));
        let text = m.render();
        for line in [
            r#"outrider_requests_total{code="200",direction="inbound",service="course-service"} 2"#,
            r#"outrider_requests_total{code="418",direction="inbound",service="course-service"} 1"#,
            r#"outrider_request_duration_seconds_count{direction="inbound",service="course-service"} 3"#,
            r#"outrider_request_duration_seconds_bucket{direction="inbound",service="course-service",le="0.005"} 2"#,
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        assert!(
            !text.contains(r#"code="503""#),
            "an unused code is not exposed"
        );
    }
}
