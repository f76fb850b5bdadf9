//! The connection manager: one AMQP connection per sidecar, kept up with heartbeats and
//! reconnection, with the topology re-declared and the consumers restarted on each connection.
//!
//! State lives in [`Shared`]. While connected it holds a [`Link`]: the connection, the
//! publisher channel (confirm mode, shared by every publish so confirms pipeline) and the
//! consumer channels. Anyone who sees the link fail marks it broken and wakes the manager,
//! which closes it and reconnects with backoff (100 ms doubling to 5 s).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use futures_util::StreamExt;
use lapin::options::{BasicCancelOptions, ConfirmSelectOptions};
use lapin::types::ShortString;
use lapin::uri::AMQPUri;
use lapin::{Channel, Connection, ConnectionProperties, Event};
use prometheus::IntCounter;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use super::Settings;
use super::deliver::{self, Subscription};
use super::topology;
use crate::config::Config;
use crate::metrics::Metrics;

const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(5);
/// Heartbeat asked for unless the URL sets `?heartbeat=`: a dead peer is noticed in ~2x this.
const DEFAULT_HEARTBEAT_SECS: u16 = 5;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const HEALTH_CHECK_EVERY: Duration = Duration::from_millis(500);

pub(crate) struct Shared {
    pub(crate) settings: Settings,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) subscriptions: Vec<Arc<Subscription>>,
    link: ArcSwapOption<Link>,
    /// Why we are not connected (shown by `/ready`).
    down_reason: Mutex<String>,
    /// Asks the manager to look at the link now.
    wake: Notify,
    shutdown_tx: watch::Sender<bool>,
    in_flight: InFlight,
    /// Bumped on every connection; consumers report failures only for their own.
    generation: AtomicU64,
    manager: Mutex<Option<JoinHandle<()>>>,
    /// `outrider_broker_published_total{target}` handles, by event or queue name.
    published: HashMap<String, IntCounter>,
}

/// One live connection and its channels.
pub(crate) struct Link {
    conn: Connection,
    pub(crate) publisher: Channel,
    consumers: Vec<(Channel, ShortString)>,
    broken: Mutex<Option<String>>,
    generation: u64,
}

impl Link {
    fn health(&self) -> Result<(), String> {
        if let Some(why) = self
            .broken
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
        {
            return Err(why);
        }
        if !self.conn.status().connected() {
            return Err("connection lost".into());
        }
        if !self.publisher.status().connected() {
            return Err("publisher channel closed".into());
        }
        if self.consumers.iter().any(|(c, _)| !c.status().connected()) {
            return Err("consumer channel closed".into());
        }
        Ok(())
    }
}

impl Shared {
    pub(crate) fn start(settings: Settings, metrics: Arc<Metrics>, config: &Config) -> Arc<Self> {
        let subscriptions = settings
            .subscriptions
            .iter()
            .map(|s| Arc::new(Subscription::new(s.clone(), &metrics, config)))
            .collect();
        let published = settings
            .publishes
            .iter()
            .chain(settings.enqueues.iter())
            .map(|name| {
                let counter = metrics
                    .broker_published_total
                    .with_label_values(&[name.as_str()]);
                (name.clone(), counter)
            })
            .collect();
        let (shutdown_tx, _) = watch::channel(false);
        metrics.broker_connected.set(0);
        let shared = Arc::new(Shared {
            settings,
            metrics,
            subscriptions,
            link: ArcSwapOption::empty(),
            down_reason: Mutex::new("connecting to the broker".into()),
            wake: Notify::new(),
            shutdown_tx,
            in_flight: InFlight::default(),
            generation: AtomicU64::new(0),
            manager: Mutex::new(None),
            published,
        });
        let handle = tokio::spawn(manage(shared.clone()));
        *shared
            .manager
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(handle);
        shared
    }

    /// The live link, if connected.
    pub(crate) fn link(&self) -> Option<Arc<Link>> {
        self.link.load_full()
    }

    /// Counts one confirmed publish.
    pub(crate) fn published(&self, target: &str) {
        if let Some(counter) = self.published.get(target) {
            counter.inc();
        }
    }

    /// Why the bridge cannot publish now.
    pub(crate) fn down_reason(&self) -> String {
        self.down_reason
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set_down(&self, reason: String) {
        *self
            .down_reason
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = reason;
    }

    /// Reports a failure seen while using `link`; the manager reconnects if it is really gone.
    pub(crate) fn report(&self, link: &Link, why: &str, fatal: bool) {
        if fatal {
            let mut broken = link.broken.lock().unwrap_or_else(PoisonError::into_inner);
            if broken.is_none() {
                *broken = Some(why.to_string());
            }
        }
        self.wake.notify_one();
    }

    pub(crate) fn ready(&self) -> Result<(), String> {
        if self.is_shutting_down() {
            return Err("broker bridge shutting down".into());
        }
        match self.link() {
            Some(link) => link
                .health()
                .map_err(|why| format!("broker {}: {why}", self.settings.redacted_url)),
            None => Err(format!(
                "broker {}: {}",
                self.settings.redacted_url,
                self.down_reason()
            )),
        }
    }

    /// Counts a delivery as in progress until the guard drops (taken before it is spawned, so
    /// shutdown never misses one).
    pub(crate) fn enter(self: &Arc<Self>) -> InFlightGuard {
        self.in_flight.count.fetch_add(1, Ordering::SeqCst);
        InFlightGuard(self.clone())
    }

    /// A consumer of connection `generation` stopped: rebuild, if that is still the live one.
    pub(crate) fn consumer_stopped(&self, generation: u64) {
        if let Some(link) = self.link()
            && link.generation == generation
        {
            self.report(&link, "a consumer stopped", true);
        }
    }

    pub(crate) fn is_shutting_down(&self) -> bool {
        *self.shutdown_tx.borrow()
    }

    pub(crate) fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown_tx.subscribe()
    }

    pub(crate) async fn shutdown(&self) {
        self.shutdown_tx.send_replace(true);
        self.wake.notify_one();
        let handle = self
            .manager
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(handle) = handle {
            let bound = self.settings.shutdown_grace + Duration::from_secs(2);
            if tokio::time::timeout(bound, handle).await.is_err() {
                tracing::warn!("broker bridge did not stop within {bound:?}");
            }
        }
    }
}

/// Counts deliveries in progress so shutdown can wait for them.
#[derive(Default)]
pub(crate) struct InFlight {
    count: AtomicUsize,
    idle: Notify,
}

/// One delivery in progress; dropping it ends it.
pub(crate) struct InFlightGuard(Arc<Shared>);

impl InFlight {
    async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.count.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        let in_flight = &self.0.in_flight;
        if in_flight.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            in_flight.idle.notify_waiters();
        }
    }
}

/// The manager task: connect, serve, notice the loss, reconnect; until shutdown.
async fn manage(shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown_signal();
    let mut delay = RECONNECT_MIN;
    loop {
        if shared.is_shutting_down() {
            break;
        }
        let attempt = tokio::select! {
            attempt = connect(&shared) => attempt,
            _ = shutdown.wait_for(|s| *s) => break,
        };
        match attempt {
            Ok((link, events)) => {
                delay = RECONNECT_MIN;
                tracing::info!(
                    broker = %shared.settings.redacted_url,
                    "connected to the broker"
                );
                shared.link.store(Some(link.clone()));
                shared.metrics.broker_connected.set(1);
                let why = watch_link(&shared, &link, events).await;
                shared.link.store(None);
                shared.metrics.broker_connected.set(0);
                if shared.is_shutting_down() {
                    shared.set_down("broker bridge shutting down".into());
                    drain_and_close(&shared, &link).await;
                    break;
                }
                tracing::warn!(
                    broker = %shared.settings.redacted_url,
                    "broker connection lost: {why}; reconnecting"
                );
                shared.set_down(format!("connection lost: {why}; reconnecting"));
                // Unacked deliveries go back to their queues when the connection closes.
                let _ = tokio::time::timeout(
                    Duration::from_secs(1),
                    link.conn
                        .close(320, ShortString::from("outrider reconnecting")),
                )
                .await;
            }
            Err(why) => {
                tracing::warn!(
                    broker = %shared.settings.redacted_url,
                    retry_in = ?delay,
                    "cannot connect to the broker: {why}"
                );
                shared.set_down(why);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.wait_for(|s| *s) => {}
        }
        delay = (delay * 2).min(RECONNECT_MAX);
    }
    shared.metrics.broker_connected.set(0);
}

type Events = futures_util::stream::BoxStream<'static, Event>;

async fn connect(shared: &Arc<Shared>) -> Result<(Arc<Link>, Events), String> {
    let s = &shared.settings;
    let mut uri: AMQPUri = s
        .url
        .parse()
        .map_err(|e: String| format!("invalid broker URL {}: {e}", s.redacted_url))?;
    if uri.query.heartbeat.is_none() {
        uri.query.heartbeat = Some(DEFAULT_HEARTBEAT_SECS);
    }
    if uri.query.connection_timeout.is_none() {
        uri.query.connection_timeout = Some(5_000);
    }
    let props = ConnectionProperties::default()
        .with_connection_name(s.connection_name.as_str().into())
        .with_client_property("product".into(), "outrider".into());
    let conn = tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect_uri(uri, props))
        .await
        .map_err(|_| format!("connect timed out after {CONNECT_TIMEOUT:?}"))?
        .map_err(|e| format!("connect: {e}"))?;
    let events = conn.events_listener().boxed();
    let generation = shared.generation.fetch_add(1, Ordering::SeqCst) + 1;
    match setup(shared, &conn, generation).await {
        Ok((publisher, consumers)) => Ok((
            Arc::new(Link {
                conn,
                publisher,
                consumers,
                broken: Mutex::new(None),
                generation,
            }),
            events,
        )),
        Err(e) => {
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                conn.close(320, ShortString::from("outrider setup failed")),
            )
            .await;
            Err(e)
        }
    }
}

/// Declares the topology, opens the publisher channel and starts the consumers.
async fn setup(
    shared: &Arc<Shared>,
    conn: &Connection,
    generation: u64,
) -> Result<(Channel, Vec<(Channel, ShortString)>), String> {
    let s = &shared.settings;
    let ch = conn
        .create_channel()
        .await
        .map_err(|e| format!("open channel: {e}"))?;
    topology::declare_exchange(&ch, &s.exchange).await?;
    let mut enqueues: Vec<&String> = s.enqueues.iter().collect();
    enqueues.sort();
    for queue in enqueues {
        topology::declare_queue(&ch, queue, s.queue_type).await?;
    }
    for sub in &shared.subscriptions {
        sub.declare(&ch, &s.exchange, s.queue_type).await?;
    }
    let _ = ch.close(200, ShortString::from("topology declared")).await;

    let publisher = conn
        .create_channel()
        .await
        .map_err(|e| format!("open publisher channel: {e}"))?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| format!("confirm.select: {e}"))?;

    let mut consumers = Vec::with_capacity(shared.subscriptions.len());
    for (index, sub) in shared.subscriptions.iter().enumerate() {
        let (channel, consumer) = sub
            .consume(conn, index)
            .await
            .map_err(|e| format!("consume `{}`: {e}", sub.settings.queue))?;
        consumers.push((channel.clone(), consumer.tag()));
        tokio::spawn(deliver::run_consumer(
            shared.clone(),
            sub.clone(),
            channel,
            consumer,
            generation,
        ));
    }
    Ok((publisher, consumers))
}

/// Waits until the link fails or shutdown is asked; returns why.
async fn watch_link(shared: &Arc<Shared>, link: &Arc<Link>, mut events: Events) -> String {
    let mut shutdown = shared.shutdown_signal();
    let mut tick = tokio::time::interval(HEALTH_CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            event = events.next() => match event {
                Some(Event::Error(e)) => return e.to_string(),
                Some(Event::ConnectionBlocked(reason)) => {
                    tracing::warn!("broker blocked this connection: {reason}");
                }
                Some(Event::ConnectionUnblocked) => tracing::info!("broker unblocked this connection"),
                Some(_) => {}
                None => {
                    if let Err(why) = link.health() {
                        return why;
                    }
                    // No more events from this connection: fall back to polling.
                    events = futures_util::stream::pending().boxed();
                }
            },
            _ = shared.wake.notified() => {}
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|s| *s) => return "shutting down".into(),
        }
        if let Err(why) = link.health() {
            return why;
        }
    }
}

/// Shutdown: stop consuming, wait for in-flight deliveries (bounded), close the connection.
async fn drain_and_close(shared: &Arc<Shared>, link: &Arc<Link>) {
    for (channel, tag) in &link.consumers {
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            channel.basic_cancel(tag.clone(), BasicCancelOptions::default()),
        )
        .await;
    }
    let grace = shared.settings.shutdown_grace;
    if tokio::time::timeout(grace, shared.in_flight.wait_idle())
        .await
        .is_err()
    {
        tracing::warn!("deliveries still in flight after {grace:?}; they return to their queues");
    }
    let _ = tokio::time::timeout(
        Duration::from_secs(2),
        link.conn
            .close(200, ShortString::from("outrider shutting down")),
    )
    .await;
    tracing::info!("broker bridge stopped");
}
