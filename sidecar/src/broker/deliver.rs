//! Delivery of subscriptions to the app.
//!
//! Each subscription consumes its queue on its own channel (confirm mode, `basic.qos` =
//! `prefetch`) and POSTs every message to `http://<app><deliver>`, up to `prefetch` at once, so
//! ordering within a subscription is not promised. The app's answer decides:
//!
//! | answer | action |
//! |---|---|
//! | 2xx | ack |
//! | 429, 5xx, other non-4xx, timeout, connection error | republish to the holding queue `<queue>.retry.<ms>` (TTL dead-letters it back), then ack; after `max_attempts` attempts: to `<queue>.dlq` |
//! | other 4xx | to `<queue>.dlq` at once |
//!
//! A republish is confirmed before the original is acked; if it fails, the original is nacked
//! back to its queue. Attempts are counted in the message header `x-outrider-attempt`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use lapin::message::Delivery;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, Consumer};
use prometheus::IntCounter;
use tracing::Instrument;

use super::dedup::{Admission, Dedup};
use super::link::Shared;
use super::settle::{Settle, Settler};
use super::topology::{self, ATTEMPT_HEADER, FROM_HEADER, REASON_HEADER};
use crate::config::{Backoff, Broker, Config, QueueType, SubscriptionSource};
use crate::metrics::Metrics;

/// One subscription's settings, resolved from the config.
#[derive(Clone, Debug)]
pub(crate) struct SubSettings {
    /// The queue consumed.
    pub(crate) queue: String,
    /// The event or queue name: metric label, `x-event`/`x-queue` value.
    pub(crate) target: String,
    pub(crate) is_event: bool,
    pub(crate) deliver: String,
    pub(crate) prefetch: u16,
    pub(crate) max_attempts: u32,
    pub(crate) backoff: Backoff,
    pub(crate) dedup_window: Duration,
    pub(crate) dedup_capacity: usize,
    pub(crate) delivery_timeout: Duration,
    pub(crate) app: SocketAddr,
}

impl SubSettings {
    pub(crate) fn new(
        config: &Config,
        broker: &Broker,
        sub: &crate::config::Subscription,
    ) -> SubSettings {
        SubSettings {
            queue: sub.queue_name(&config.namespace, &config.service),
            target: sub.target().to_string(),
            is_event: matches!(sub.source, SubscriptionSource::Event(_)),
            deliver: sub.deliver.clone(),
            prefetch: sub.prefetch,
            max_attempts: sub.max_attempts.max(1),
            backoff: sub.retry_backoff,
            dedup_window: broker.dedup_window,
            dedup_capacity: broker.dedup_capacity,
            delivery_timeout: broker.delivery_timeout,
            app: config.app,
        }
    }
}

/// A subscription at run time: lives across reconnections (its dedup memory too).
pub(crate) struct Subscription {
    pub(crate) settings: SubSettings,
    dedup: Dedup,
    client: Client<HttpConnector, Full<Bytes>>,
    uri: http::Uri,
    service: String,
    acked: IntCounter,
    retried: IntCounter,
    dead_lettered: IntCounter,
    duplicate: IntCounter,
}

/// How the app took one delivery.
enum Verdict {
    Delivered,
    /// Worth another attempt.
    Transient(String),
    /// The app refused the message itself (4xx): never retried.
    Poison(String),
}

impl Subscription {
    pub(crate) fn new(settings: SubSettings, metrics: &Metrics, config: &Config) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(settings.delivery_timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(usize::from(settings.prefetch))
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);
        let uri = format!("http://{}{}", settings.app, settings.deliver)
            .parse()
            .unwrap_or_else(|_| http::Uri::from_static("http://127.0.0.1/"));
        let counter = |outcome: &str| {
            metrics
                .broker_deliveries_total
                .with_label_values(&[settings.target.as_str(), outcome])
        };
        Subscription {
            dedup: Dedup::new(settings.dedup_window, settings.dedup_capacity),
            client,
            uri,
            service: config.service.clone(),
            acked: counter("acked"),
            retried: counter("retried"),
            dead_lettered: counter("dead_lettered"),
            duplicate: counter("duplicate"),
            settings,
        }
    }

    pub(crate) async fn declare(
        &self,
        channel: &Channel,
        exchange: &str,
        queue_type: QueueType,
    ) -> Result<(), String> {
        let s = &self.settings;
        let delays = topology::retry_delays(&s.backoff, s.max_attempts);
        let binding = s.is_event.then_some((exchange, s.target.as_str()));
        topology::declare_consumed(channel, &s.queue, binding, queue_type, &delays).await
    }

    pub(crate) async fn consume(
        &self,
        conn: &Connection,
        index: usize,
    ) -> Result<(Channel, Consumer), String> {
        let queue = topology::short(&self.settings.queue)?;
        let channel = conn.create_channel().await.map_err(|e| e.to_string())?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| e.to_string())?;
        channel
            .basic_qos(self.settings.prefetch, BasicQosOptions::default())
            .await
            .map_err(|e| e.to_string())?;
        let tag = format!("outrider-{}-{index}-{}", self.service, std::process::id());
        let consumer = channel
            .basic_consume(
                queue,
                ShortString::try_new(tag).unwrap_or_else(|_| ShortString::from("outrider")),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| e.to_string())?;
        Ok((channel, consumer))
    }

    /// POSTs the message to the app and classifies the answer.
    async fn post(&self, delivery: &Delivery, attempt: u32) -> Verdict {
        let p = &delivery.properties;
        let content_type = p
            .content_type()
            .as_ref()
            .map_or("application/octet-stream", |c| c.as_str());
        let mut req = http::Request::post(self.uri.clone())
            .header(http::header::CONTENT_TYPE, content_type)
            .header("x-delivery-attempt", attempt.to_string());
        req = req.header(
            if self.settings.is_event {
                "x-event"
            } else {
                "x-queue"
            },
            self.settings.target.as_str(),
        );
        if let Some(id) = p.correlation_id() {
            req = req.header("x-correlation-id", id.as_str());
        }
        if let Some(id) = p.message_id() {
            req = req.header("x-message-id", id.as_str());
        }
        if let Some(tp) = header_str(p.headers(), "traceparent") {
            req = req.header("traceparent", tp);
        }
        let req = match req.body(Full::new(Bytes::copy_from_slice(&delivery.data))) {
            Ok(req) => req,
            // A header value the app cannot be given: the message itself is bad.
            Err(e) => return Verdict::Poison(format!("cannot build the request: {e}")),
        };
        let timeout = self.settings.delivery_timeout;
        let exchange = async {
            let resp = self.client.request(req).await?;
            let status = resp.status();
            // Read the body so the connection goes back to the pool.
            let _ = resp.into_body().collect().await;
            Ok::<_, hyper_util::client::legacy::Error>(status)
        };
        match tokio::time::timeout(timeout, exchange).await {
            Err(_) => Verdict::Transient(format!("app did not answer within {timeout:?}")),
            Ok(Err(e)) => Verdict::Transient(format!("app unreachable: {e}")),
            Ok(Ok(status)) if status.is_success() => Verdict::Delivered,
            Ok(Ok(status))
                if status.is_client_error() && status != http::StatusCode::TOO_MANY_REQUESTS =>
            {
                Verdict::Poison(format!("app answered {}", status.as_u16()))
            }
            Ok(Ok(status)) => Verdict::Transient(format!("app answered {}", status.as_u16())),
        }
    }
}

/// Consumes one subscription on one connection until the channel ends or shutdown.
pub(crate) async fn run_consumer(
    shared: Arc<Shared>,
    sub: Arc<Subscription>,
    channel: Channel,
    mut consumer: Consumer,
    generation: u64,
) {
    let mut shutdown = shared.shutdown_signal();
    let settler = Settler::start(channel.clone(), sub.settings.queue.clone());
    loop {
        let next = tokio::select! {
            next = consumer.next() => next,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        match next {
            Some(Ok(delivery)) => {
                let guard = shared.enter();
                let tag = delivery.delivery_tag;
                settler.received(tag);
                let shared = shared.clone();
                let sub = sub.clone();
                let channel = channel.clone();
                let settler = settler.clone();
                tokio::spawn(async move {
                    let how = handle(&shared, &sub, &channel, delivery).await;
                    settler.settle(tag, how, guard);
                });
            }
            Some(Err(e)) => {
                tracing::warn!(queue = %sub.settings.queue, "consumer failed: {e}");
                break;
            }
            None => {
                if !shared.is_shutting_down() {
                    tracing::warn!(queue = %sub.settings.queue, "consumer cancelled");
                }
                break;
            }
        }
    }
    if !shared.is_shutting_down() {
        // Cancelled by the broker (queue deleted?) or channel closed: rebuild everything.
        shared.consumer_stopped(generation);
    }
}

/// One message: dedup, deliver, then retry or dead-letter; says how to settle it.
async fn handle(
    shared: &Shared,
    sub: &Subscription,
    channel: &Channel,
    delivery: Delivery,
) -> Settle {
    let p = &delivery.properties;
    let correlation_id = p
        .correlation_id()
        .as_ref()
        .map(|c| c.as_str().to_string())
        .unwrap_or_default();
    let previous = header_int(p.headers(), ATTEMPT_HEADER).unwrap_or(0);
    let attempt = u32::try_from(previous.max(0))
        .unwrap_or(u32::MAX)
        .saturating_add(1);
    let span = tracing::info_span!(
        "deliver",
        correlation_id = %correlation_id,
        target = %sub.settings.target,
        attempt,
    );
    async {
        let claim = match sub
            .dedup
            .admit(Some(correlation_id.as_str()).filter(|c| !c.is_empty()))
            .await
        {
            Admission::Duplicate => {
                tracing::debug!("duplicate correlation id: acked without delivery");
                sub.duplicate.inc();
                return Settle::Ack;
            }
            Admission::Deliver(claim) => claim,
        };
        match sub.post(&delivery, attempt).await {
            Verdict::Delivered => {
                claim.delivered();
                sub.acked.inc();
                tracing::debug!("delivered");
                Settle::Ack
            }
            Verdict::Transient(why) if attempt < sub.settings.max_attempts => {
                drop(claim);
                let delay = topology::retry_delay(&sub.settings.backoff, attempt);
                let holding = topology::retry_queue_name(&sub.settings.queue, delay);
                tracing::info!(retry_in = ?delay, "delivery failed: {why}; will retry");
                if forward(
                    shared,
                    channel,
                    &delivery,
                    &holding,
                    attempt,
                    None,
                    Some(delay),
                )
                .await
                {
                    sub.retried.inc();
                    Settle::Ack
                } else {
                    Settle::Requeue
                }
            }
            Verdict::Transient(why) | Verdict::Poison(why) => {
                drop(claim);
                let reason = if attempt >= sub.settings.max_attempts {
                    format!("{why} (attempt {attempt} of {})", sub.settings.max_attempts)
                } else {
                    why
                };
                let dlq = topology::dlq_name(&sub.settings.queue);
                tracing::warn!(dlq = %dlq, "dead-lettering: {reason}");
                if forward(
                    shared,
                    channel,
                    &delivery,
                    &dlq,
                    attempt,
                    Some(&reason),
                    None,
                )
                .await
                {
                    sub.dead_lettered.inc();
                    Settle::Ack
                } else {
                    Settle::Requeue
                }
            }
        }
    }
    .instrument(span)
    .await
}

/// Republishes a copy to `queue` (a holding queue or the DLQ) and waits for the confirm.
/// `expiration` is the per-message TTL for a holding queue; `None` for the DLQ.
#[allow(clippy::too_many_arguments)]
async fn forward(
    shared: &Shared,
    channel: &Channel,
    delivery: &Delivery,
    queue: &str,
    attempt: u32,
    reason: Option<&str>,
    expiration: Option<Duration>,
) -> bool {
    let mut headers = delivery.properties.headers().clone().unwrap_or_default();
    headers.insert(
        ATTEMPT_HEADER.into(),
        AMQPValue::LongLongInt(i64::from(attempt)),
    );
    if let Some(reason) = reason {
        headers.insert(
            REASON_HEADER.into(),
            AMQPValue::LongString(LongString::from(reason)),
        );
        headers.insert(
            FROM_HEADER.into(),
            AMQPValue::LongString(LongString::from(delivery.routing_key.as_str())),
        );
    }
    let mut props = copy_properties(&delivery.properties, headers, expiration);
    if props.timestamp().is_none() {
        props = props.with_timestamp(unix_now());
    }
    let Ok(routing_key) = ShortString::try_new(queue) else {
        tracing::error!("queue name `{queue}` is longer than 255 bytes");
        return false;
    };
    let sent = channel
        .basic_publish(
            ShortString::from(""),
            routing_key,
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            &delivery.data,
            props,
        )
        .await;
    let confirm = match sent {
        Ok(confirm) => confirm,
        Err(e) => {
            tracing::warn!("cannot republish to `{queue}`: {e}");
            return false;
        }
    };
    match tokio::time::timeout(super::publish::CONFIRM_TIMEOUT, confirm).await {
        Ok(Ok(c)) if c.is_ack() => match c.take_message() {
            None => true,
            Some(_) => {
                tracing::warn!("`{queue}` does not exist: message returned");
                if let Some(link) = shared.link() {
                    shared.report(&link, "a holding queue is missing", true);
                }
                false
            }
        },
        Ok(Ok(_)) => {
            tracing::warn!("broker refused the republish to `{queue}`");
            false
        }
        Ok(Err(e)) => {
            tracing::warn!("republish to `{queue}` failed: {e}");
            false
        }
        Err(_) => {
            tracing::warn!("no confirm for the republish to `{queue}`");
            false
        }
    }
}

type SetString = fn(BasicProperties, ShortString) -> BasicProperties;

/// The original properties with new headers, persistent, and `expiration` replaced (a copy in
/// the DLQ must never expire).
fn copy_properties(
    p: &BasicProperties,
    headers: FieldTable,
    expiration: Option<Duration>,
) -> BasicProperties {
    let mut out = BasicProperties::default()
        .with_headers(headers)
        .with_delivery_mode(2);
    let strings: [(&Option<ShortString>, SetString); 9] = [
        (p.content_type(), BasicProperties::with_content_type),
        (p.content_encoding(), BasicProperties::with_content_encoding),
        (p.correlation_id(), BasicProperties::with_correlation_id),
        (p.reply_to(), BasicProperties::with_reply_to),
        (p.message_id(), BasicProperties::with_message_id),
        (p.kind(), BasicProperties::with_type),
        (p.user_id(), BasicProperties::with_user_id),
        (p.app_id(), BasicProperties::with_app_id),
        (p.cluster_id(), BasicProperties::with_cluster_id),
    ];
    for (value, set) in strings {
        if let Some(v) = value {
            out = set(out, v.clone());
        }
    }
    if let Some(priority) = p.priority() {
        out = out.with_priority(*priority);
    }
    if let Some(ts) = p.timestamp() {
        out = out.with_timestamp(*ts);
    }
    if let Some(ttl) = expiration {
        out = out.with_expiration(ShortString::from(ttl.as_millis().to_string()));
    }
    out
}

fn header_value<'a>(headers: &'a Option<FieldTable>, name: &str) -> Option<&'a AMQPValue> {
    headers
        .as_ref()?
        .inner()
        .iter()
        .find(|(k, _)| k.as_str() == name)
        .map(|(_, v)| v)
}

fn header_int(headers: &Option<FieldTable>, name: &str) -> Option<i64> {
    match header_value(headers, name)? {
        AMQPValue::ShortShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortShortUInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortUInt(v) => Some(i64::from(*v)),
        AMQPValue::LongInt(v) => Some(i64::from(*v)),
        AMQPValue::LongUInt(v) => Some(i64::from(*v)),
        AMQPValue::LongLongInt(v) => Some(*v),
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok()?.parse().ok(),
        _ => None,
    }
}

fn header_str<'a>(headers: &'a Option<FieldTable>, name: &str) -> Option<&'a str> {
    match header_value(headers, name)? {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str()),
        _ => None,
    }
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
