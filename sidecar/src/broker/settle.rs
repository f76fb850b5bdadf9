//! Settling the deliveries of one consumer channel: acks coalesced into `multiple` acks.
//!
//! Every ack is a frame the AMQP connection's I/O thread must be woken for and write; one per
//! message costs more than the rest of the delivery path (bench/broker.sh, profiled). So the
//! deliveries of a channel are settled by one task: it learns of each delivery tag when the
//! consumer receives it, and of each outcome when the app answered. After draining what is
//! queued it sends, in this order:
//!
//! 1. each requeue (`basic.nack`, one tag): it must reach the broker before a `multiple` ack
//!    that would otherwise cover its tag;
//! 2. one `basic.ack` with `multiple` for the highest acked tag below the oldest tag still
//!    being delivered: every tag up to it is settled, so the ack covers only finished messages;
//! 3. one single ack for each acked tag above that oldest tag, so a slow delivery never holds
//!    back the acks of those that finished after it (they would fill the prefetch window).
//!
//! Acks go out on the consumer's own channel, so a tag is never acked on another channel; if
//! the channel dies before a frame is written, the broker redelivers those messages (dedup
//! catches the ones the app had already accepted). Each outcome carries the delivery's
//! in-flight guard, dropped once its frame is written, so a graceful shutdown waits for acks.

use std::collections::BTreeSet;

use futures_util::future::join_all;
use lapin::Channel;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use tokio::sync::mpsc;

use super::link::InFlightGuard;

/// How a delivery leaves the consumer's hands.
pub(crate) enum Settle {
    /// The message is done with (delivered, dead-lettered, retried or a duplicate).
    Ack,
    /// Return the message to its queue (a retry or dead-letter copy could not be stored).
    Requeue,
}

/// What the settling task is told, in the order things happened on the channel.
enum Event {
    /// The consumer received this tag: it is in delivery until settled.
    Received(u64),
    /// The delivery of this tag ended; the guard is its in-flight count.
    Settled(u64, Settle, InFlightGuard),
}

/// The consumer's handle on its channel's settling task. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Settler {
    events: mpsc::UnboundedSender<Event>,
}

impl Settler {
    /// Starts the settling task of `channel`; it ends once every `Settler` clone is gone.
    pub(crate) fn start(channel: Channel, queue: String) -> Settler {
        let (events, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(channel, queue, rx));
        Settler { events }
    }

    /// Called by the consumer for each delivery, before anything can settle it.
    pub(crate) fn received(&self, tag: u64) {
        // The task only ends when every sender is gone, so sending cannot fail here.
        let _ = self.events.send(Event::Received(tag));
    }

    /// Called once the delivery of `tag` ended; `guard` is released once its frame is written.
    pub(crate) fn settle(&self, tag: u64, how: Settle, guard: InFlightGuard) {
        let _ = self.events.send(Event::Settled(tag, how, guard));
    }
}

/// Tags between the consumer and the broker, and what to send for them next.
#[derive(Default)]
struct Pending {
    /// Received and not yet settled.
    in_delivery: BTreeSet<u64>,
    /// Settled as acked, frame not yet sent.
    acked: Vec<u64>,
    /// Settled as requeued, frame not yet sent.
    requeued: Vec<u64>,
}

/// The frames for one flush.
#[derive(Debug, PartialEq, Eq)]
struct Frames {
    requeue: Vec<u64>,
    /// `basic.ack` with `multiple` up to this tag.
    ack_up_to: Option<u64>,
    /// Single acks.
    ack_each: Vec<u64>,
}

impl Pending {
    fn received(&mut self, tag: u64) {
        self.in_delivery.insert(tag);
    }

    fn settled(&mut self, tag: u64, how: &Settle) {
        self.in_delivery.remove(&tag);
        match how {
            Settle::Ack => self.acked.push(tag),
            Settle::Requeue => self.requeued.push(tag),
        }
    }

    /// Takes what is to be sent now.
    fn frames(&mut self) -> Frames {
        let oldest_in_delivery = self.in_delivery.first().copied().unwrap_or(u64::MAX);
        let (below, above): (Vec<u64>, Vec<u64>) = self
            .acked
            .drain(..)
            .partition(|tag| *tag < oldest_in_delivery);
        Frames {
            requeue: std::mem::take(&mut self.requeued),
            ack_up_to: below.into_iter().max(),
            ack_each: above,
        }
    }
}

async fn run(channel: Channel, queue: String, mut rx: mpsc::UnboundedReceiver<Event>) {
    let mut pending = Pending::default();
    let mut guards = Vec::new();
    while let Some(first) = rx.recv().await {
        // Everything queued while the previous frames were written goes into this flush.
        let mut next = Some(first);
        while let Some(event) = next {
            match event {
                Event::Received(tag) => pending.received(tag),
                Event::Settled(tag, how, guard) => {
                    pending.settled(tag, &how);
                    guards.push(guard);
                }
            }
            next = rx.try_recv().ok();
        }
        let frames = pending.frames();
        send(&channel, &queue, frames).await;
        guards.clear();
    }
}

async fn send(channel: &Channel, queue: &str, frames: Frames) {
    let requeue = BasicNackOptions {
        requeue: true,
        multiple: false,
    };
    for tag in frames.requeue {
        if let Err(e) = channel.basic_nack(tag, requeue).await {
            tracing::warn!(queue, "nack failed: {e}");
        }
    }
    // Queued together, so the connection writes them in one go.
    let multiple = frames
        .ack_up_to
        .map(|tag| (tag, BasicAckOptions { multiple: true }));
    let single = frames
        .ack_each
        .into_iter()
        .map(|tag| (tag, BasicAckOptions { multiple: false }));
    let acks = multiple
        .into_iter()
        .chain(single)
        .map(|(tag, options)| channel.basic_ack(tag, options));
    for result in join_all(acks).await {
        if let Err(e) = result {
            // The channel went away: the broker redelivers (dedup catches a success).
            tracing::warn!(queue, "ack failed: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(received: &[u64]) -> Pending {
        let mut p = Pending::default();
        for tag in received {
            p.received(*tag);
        }
        p
    }

    fn settle(p: &mut Pending, acked: &[u64], requeued: &[u64]) {
        for tag in acked {
            p.settled(*tag, &Settle::Ack);
        }
        for tag in requeued {
            p.settled(*tag, &Settle::Requeue);
        }
    }

    #[test]
    fn finished_prefix_is_one_multiple_ack() {
        let mut p = pending(&[1, 2, 3, 4, 5]);
        settle(&mut p, &[3, 1, 2], &[]);
        let frames = p.frames();
        assert_eq!(frames.ack_up_to, Some(3));
        assert!(frames.ack_each.is_empty());
        assert!(frames.requeue.is_empty());
        assert_eq!(p.in_delivery.iter().copied().collect::<Vec<_>>(), [4, 5]);
    }

    #[test]
    fn acks_after_a_slow_delivery_go_out_singly() {
        let mut p = pending(&[1, 2, 3, 4, 5]);
        settle(&mut p, &[1, 3, 5], &[]);
        let frames = p.frames();
        // 2 is still being delivered: a multiple ack past it would ack it unfinished.
        assert_eq!(frames.ack_up_to, Some(1));
        assert_eq!(frames.ack_each, [3, 5]);
        assert!(p.acked.is_empty());
    }

    #[test]
    fn requeues_are_sent_first_and_never_covered_by_the_multiple_ack() {
        let mut p = pending(&[7, 8, 9]);
        settle(&mut p, &[7, 9], &[8]);
        let frames = p.frames();
        assert_eq!(frames.requeue, [8]);
        assert_eq!(frames.ack_up_to, Some(9));
        assert!(p.requeued.is_empty());
    }

    #[test]
    fn nothing_settled_sends_nothing() {
        let mut p = pending(&[1, 2]);
        assert_eq!(
            p.frames(),
            Frames {
                requeue: vec![],
                ack_up_to: None,
                ack_each: vec![]
            }
        );
    }
}
