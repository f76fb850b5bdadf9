//! Queue names and the declarations of the exchange and queues (see `docs/broker.md`).
//!
//! Every declaration is idempotent and deterministic from the config, so a publisher and a
//! consumer of the same work queue declare it with the same arguments.

use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, ExchangeKind};

use crate::config::{Backoff, QueueType};

/// Message header counting the delivery attempts already made; survives the retry-queue hop.
pub(crate) const ATTEMPT_HEADER: &str = "x-outrider-attempt";
/// Message header saying why a message was dead-lettered.
pub(crate) const REASON_HEADER: &str = "x-outrider-dead-letter-reason";
/// Message header naming the queue a dead-lettered message came from.
pub(crate) const FROM_HEADER: &str = "x-outrider-dead-lettered-from";

pub(crate) fn dlq_name(queue: &str) -> String {
    format!("{queue}.dlq")
}

/// The holding queue for messages that wait `delay` before going back to `queue`.
pub(crate) fn retry_queue_name(queue: &str, delay: Duration) -> String {
    format!("{queue}.retry.{}ms", delay_ms(delay))
}

fn delay_ms(delay: Duration) -> u64 {
    u64::try_from(delay.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// The wait after failed attempt `attempt` (1-based): `base * 2^(attempt-1)`, capped at `max`.
pub(crate) fn retry_delay(backoff: &Backoff, attempt: u32) -> Duration {
    let exp = attempt.saturating_sub(1).min(31);
    let delay = backoff.base.saturating_mul(1u32 << exp);
    let delay = delay.min(backoff.max).max(Duration::from_millis(1));
    // Whole milliseconds: the queue name and its TTL use them.
    Duration::from_millis(delay_ms(delay))
}

/// Every distinct retry delay a subscription can use (one holding queue each).
pub(crate) fn retry_delays(backoff: &Backoff, max_attempts: u32) -> Vec<Duration> {
    let mut delays: Vec<Duration> = Vec::new();
    for attempt in 1..max_attempts {
        let d = retry_delay(backoff, attempt);
        if delays.last() == Some(&d) {
            break; // capped: every later attempt waits the same
        }
        delays.push(d);
    }
    delays
}

/// An AMQP name (at most 255 bytes): long namespace, service and event names can exceed it.
pub(crate) fn short(name: &str) -> Result<ShortString, String> {
    ShortString::try_new(name)
        .map_err(|_| format!("`{name}` is longer than the 255 bytes AMQP allows for a name"))
}

fn queue_args(queue_type: QueueType) -> FieldTable {
    let mut args = FieldTable::default();
    if queue_type == QueueType::Quorum {
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(LongString::from("quorum")),
        );
    }
    args
}

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    }
}

pub(crate) async fn declare_exchange(channel: &Channel, exchange: &str) -> Result<(), String> {
    channel
        .exchange_declare(
            short(exchange)?,
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| format!("declare exchange `{exchange}`: {e}"))
}

/// A plain durable queue: work queues (both sides), consumed queues and dead-letter queues.
pub(crate) async fn declare_queue(
    channel: &Channel,
    queue: &str,
    queue_type: QueueType,
) -> Result<(), String> {
    channel
        .queue_declare(short(queue)?, durable(), queue_args(queue_type))
        .await
        .map(|_| ())
        .map_err(|e| format!("declare queue `{queue}`: {e}"))
}

/// Everything a consumed queue needs: itself, its `.dlq`, its retry holding queues, and for an
/// event its binding to the exchange.
pub(crate) async fn declare_consumed(
    channel: &Channel,
    queue: &str,
    binding: Option<(&str, &str)>,
    queue_type: QueueType,
    retry_delays: &[Duration],
) -> Result<(), String> {
    declare_queue(channel, queue, queue_type).await?;
    declare_queue(channel, &dlq_name(queue), queue_type).await?;
    for delay in retry_delays {
        let mut args = queue_args(queue_type);
        args.insert(
            "x-message-ttl".into(),
            AMQPValue::LongLongInt(i64::try_from(delay_ms(*delay)).unwrap_or(i64::MAX)),
        );
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(LongString::from("")),
        );
        args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(LongString::from(queue)),
        );
        if queue_type == QueueType::Quorum {
            // Quorum queues dead-letter at-most-once unless told otherwise.
            args.insert(
                "x-dead-letter-strategy".into(),
                AMQPValue::LongString(LongString::from("at-least-once")),
            );
            args.insert(
                "x-overflow".into(),
                AMQPValue::LongString(LongString::from("reject-publish")),
            );
        }
        let holding = retry_queue_name(queue, *delay);
        channel
            .queue_declare(short(&holding)?, durable(), args)
            .await
            .map_err(|e| format!("declare queue `{holding}`: {e}"))?;
    }
    if let Some((exchange, routing_key)) = binding {
        channel
            .queue_bind(
                short(queue)?,
                short(exchange)?,
                short(routing_key)?,
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| format!("bind queue `{queue}` to `{exchange}`: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_and_cap() {
        let b = Backoff {
            base: Duration::from_millis(100),
            max: Duration::from_millis(500),
        };
        assert_eq!(retry_delay(&b, 1), Duration::from_millis(100));
        assert_eq!(retry_delay(&b, 2), Duration::from_millis(200));
        assert_eq!(retry_delay(&b, 3), Duration::from_millis(400));
        assert_eq!(retry_delay(&b, 4), Duration::from_millis(500));
        assert_eq!(retry_delay(&b, 1000), Duration::from_millis(500));
        let all: Vec<u128> = retry_delays(&b, 10).iter().map(|d| d.as_millis()).collect();
        assert_eq!(all, vec![100, 200, 400, 500]);
        assert!(retry_delays(&b, 1).is_empty());
        assert_eq!(
            retry_queue_name("q", Duration::from_millis(200)),
            "q.retry.200ms"
        );
    }
}
