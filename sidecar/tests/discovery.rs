//! Discovery against a real DNS server: hickory-server, in process, on a loopback port (UDP and
//! TCP), authoritative for `mesh.test.`. Each test has its own server and port.

#[path = "support/ports.rs"]
mod ports;

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use hickory_server::Server;
use hickory_server::net::runtime::TokioRuntimeProvider;
use hickory_server::proto::rr::rdata::{A, AAAA, SOA, SRV};
use hickory_server::proto::rr::{LowerName, Name, RData, Record, RecordType, RrKey};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneHandler, ZoneType};
use outrider::config::{self, Config};
use outrider::discovery::{Discovery, EndpointState, Resolution, ServiceTarget};
use outrider::metrics::Metrics;
use ports::{free_addrs, free_port};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::watch;
use tokio::task::JoinHandle;

const ZONE: &str = "mesh.test.";

type Zone = InMemoryZoneHandler<TokioRuntimeProvider>;

/// An authoritative server for `mesh.test.` whose records a test can change while it runs.
struct DnsServer {
    zone: Arc<Zone>,
    addr: SocketAddr,
    serial: AtomicU32,
    task: Option<JoinHandle<()>>,
    /// Sockets bound but not served yet (a resolver that is down).
    parked: Option<(UdpSocket, TcpListener)>,
}

fn name(text: &str) -> Name {
    Name::from_utf8(text).expect("valid test name")
}

impl DnsServer {
    /// Binds UDP and TCP on one free loopback port, without answering yet.
    async fn bind() -> Self {
        // Bind TCP first on port 0, then UDP on the same port (free for UDP almost always).
        loop {
            let tcp = TcpListener::bind("127.0.0.1:0").await.expect("bind tcp");
            let addr = tcp.local_addr().expect("tcp addr");
            if let Ok(udp) = UdpSocket::bind(addr).await {
                let origin = name(ZONE);
                let mut zone = Zone::empty(origin.clone(), ZoneType::Primary, AxfrPolicy::Deny);
                zone.upsert_mut(
                    Record::from_rdata(
                        origin.clone(),
                        60,
                        RData::SOA(SOA::new(
                            name("ns.mesh.test."),
                            name("admin.mesh.test."),
                            1,
                            60,
                            60,
                            600,
                            1,
                        )),
                    ),
                    1,
                );
                return Self {
                    zone: Arc::new(zone),
                    addr,
                    serial: AtomicU32::new(2),
                    task: None,
                    parked: Some((udp, tcp)),
                };
            }
        }
    }

    /// Binds and serves at once.
    async fn start() -> Self {
        let mut s = Self::bind().await;
        s.serve();
        s
    }

    /// Starts answering on the bound sockets.
    fn serve(&mut self) {
        let Some((udp, tcp)) = self.parked.take() else {
            return;
        };
        let mut catalog = Catalog::new();
        catalog.upsert(
            LowerName::from(name(ZONE)),
            vec![self.zone.clone() as Arc<dyn ZoneHandler>],
        );
        let mut server = Server::new(catalog);
        server.register_socket(udp);
        server.register_listener(tcp, Duration::from_secs(5), 64);
        self.task = Some(tokio::spawn(async move {
            let _ = server.block_until_done().await;
        }));
    }

    /// Stops answering: the sockets close (queries are refused).
    fn stop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        self.parked = None;
    }

    /// Serves again on the same port after [`DnsServer::stop`], with the records it had (and any
    /// changed meanwhile). The old sockets close as the aborted task is dropped: rebinding is
    /// retried for a moment.
    async fn restart(&mut self) {
        self.stop();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            if let Ok(tcp) = TcpListener::bind(self.addr).await
                && let Ok(udp) = UdpSocket::bind(self.addr).await
            {
                self.parked = Some((udp, tcp));
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "cannot bind {} again",
                self.addr
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.serve();
    }

    /// Replaces every record of `owner` and type `rtype` with `rdatas`, at TTL `ttl`.
    async fn set(&self, owner: &str, rtype: RecordType, ttl: u32, rdatas: Vec<RData>) {
        let owner = name(owner);
        self.zone
            .records_mut()
            .await
            .remove(&RrKey::new(LowerName::from(owner.clone()), rtype));
        let serial = self.serial.fetch_add(1, Ordering::Relaxed);
        for rdata in rdatas {
            self.zone
                .upsert(Record::from_rdata(owner.clone(), ttl, rdata), serial)
                .await;
        }
    }

    async fn set_a(&self, owner: &str, ttl: u32, ips: &[[u8; 4]]) {
        let rdatas = ips
            .iter()
            .map(|ip| RData::A(A(Ipv4Addr::from(*ip))))
            .collect();
        self.set(owner, RecordType::A, ttl, rdatas).await;
    }

    async fn remove(&self, owner: &str, rtype: RecordType) {
        self.set(owner, rtype, 0, Vec::new()).await;
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A config with the test server as the only nameserver. `extra` is appended to `discovery:`.
fn config(dns: SocketAddr, stale_for: &str, extra: &str) -> Config {
    let text = format!(
        "service: tester
namespace: demo
app: 127.0.0.1:8080
tls: {{ mode: disabled }}
discovery:
  resolver:
    nameservers: [\"{dns}\"]
    min_ttl: 1s
    max_ttl: 2s
    stale_for: {stale_for}
    timeout: 500ms
{extra}"
    );
    match config::load_str(&text, "test.yaml", Path::new("."), Vec::new()) {
        Ok(loaded) => loaded.config,
        Err(e) => panic!("test config invalid: {:?}", e.lines()),
    }
}

fn addrs(list: &[&str]) -> Vec<SocketAddr> {
    list.iter()
        .map(|a| a.parse().expect("valid test address"))
        .collect()
}

/// Waits until the watch satisfies `ok`, failing the test after `within`.
async fn wait_until(
    rx: &mut watch::Receiver<Resolution>,
    within: Duration,
    what: &str,
    ok: impl Fn(&Resolution) -> bool,
) -> Resolution {
    let result = match tokio::time::timeout(within, rx.wait_for(|r| ok(r))).await {
        Ok(Ok(r)) => Ok(r.clone()),
        Ok(Err(_)) => panic!("{what}: source stopped"),
        Err(_) => Err(()),
    };
    match result {
        Ok(r) => r,
        Err(()) => panic!("{what}: not within {within:?}; last: {:?}", *rx.borrow()),
    }
}

async fn ready(target: &ServiceTarget, within: Duration, want: &[SocketAddr]) {
    let mut rx = target.endpoints();
    wait_until(
        &mut rx,
        within,
        &format!("endpoints {want:?}"),
        |r| matches!(r, Resolution::Ready(e) if &e[..] == want),
    )
    .await;
}

fn gauge(metrics: &Metrics, service: &str) -> Option<i64> {
    let prefix = format!("outrider_endpoints{{service=\"{service}\"}} ");
    metrics
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(&prefix).and_then(|v| v.trim().parse().ok()))
}

/// The gauge is set by a task that follows the watch: give it a moment.
async fn gauge_is(metrics: &Metrics, service: &str, want: Option<i64>) {
    for _ in 0..50 {
        if gauge(metrics, service) == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(gauge(metrics, service), want, "gauge for {service}");
}

const SECOND: Duration = Duration::from_secs(1);

#[tokio::test]
async fn a_and_aaaa_records_give_the_endpoints() {
    let dns = DnsServer::start().await;
    dns.set_a("web.mesh.test.", 30, &[[127, 0, 0, 11], [127, 0, 0, 10]])
        .await;
    dns.set(
        "web.mesh.test.",
        RecordType::AAAA,
        30,
        vec![RData::AAAA(AAAA(Ipv6Addr::LOCALHOST))],
    )
    .await;
    let metrics = Arc::new(Metrics::new());
    let d = Discovery::new(
        &config(
            dns.addr,
            "5s",
            "  services:\n    web: { dns: \"web.mesh.test:8080\" }\n",
        ),
        metrics.clone(),
    );
    let web = d.lookup("web", None).expect("listed");
    assert_eq!(web.describe(), "dns:web.mesh.test:8080");
    // Sorted: IPv4 by address, then IPv6.
    ready(
        &web,
        5 * SECOND,
        &addrs(&["127.0.0.10:8080", "127.0.0.11:8080", "[::1]:8080"]),
    )
    .await;
    gauge_is(&metrics, "web", Some(3)).await;
    let snap = d.snapshot();
    let web_view = snap
        .iter()
        .find(|s| s.service == "web")
        .expect("in snapshot");
    assert_eq!(web_view.state, EndpointState::Ready);
    assert_eq!(web_view.namespace, "demo");
    assert_eq!(web_view.endpoints.len(), 3);
    assert_eq!(web_view.identity, "spiffe://mesh.local/ns/demo/sa/web");
    assert!(web_view.resolved_at.is_some());
    // The snapshot is what `/endpoints` serves.
    let json = serde_json::to_string(&snap).expect("serializable");
    assert!(json.contains("\"state\":\"ready\""), "{json}");
}

#[tokio::test]
async fn srv_gives_host_and_port_from_the_lowest_priority_that_resolves() {
    let dns = DnsServer::start().await;
    let srv = "_http._tcp.api.mesh.test.";
    let record = |priority, weight, port, target: &str| {
        RData::SRV(SRV::new(priority, weight, port, name(target)))
    };
    dns.set(
        srv,
        RecordType::SRV,
        30,
        vec![
            record(10, 50, 7001, "api-0.mesh.test."),
            record(10, 50, 7002, "api-1.mesh.test."),
            record(20, 10, 7003, "backup.mesh.test."),
        ],
    )
    .await;
    dns.set_a("api-0.mesh.test.", 30, &[[127, 0, 0, 20]]).await;
    dns.set_a("api-1.mesh.test.", 30, &[[127, 0, 0, 21]]).await;
    dns.set_a("backup.mesh.test.", 30, &[[127, 0, 0, 29]]).await;
    let metrics = Arc::new(Metrics::new());
    let d = Discovery::new(
        &config(
            dns.addr,
            "5s",
            "  services:\n    api: { srv: \"_http._tcp.api.mesh.test\" }\n",
        ),
        metrics.clone(),
    );
    let api = d.lookup("api", None).expect("listed");
    assert_eq!(api.describe(), "srv:_http._tcp.api.mesh.test");
    ready(
        &api,
        5 * SECOND,
        &addrs(&["127.0.0.20:7001", "127.0.0.21:7002"]),
    )
    .await;
    gauge_is(&metrics, "api", Some(2)).await;

    // The priority-10 targets disappear: the backup group takes over.
    dns.remove("api-0.mesh.test.", RecordType::A).await;
    dns.remove("api-1.mesh.test.", RecordType::A).await;
    dns.set(
        srv,
        RecordType::SRV,
        1,
        vec![
            record(10, 50, 7001, "api-0.mesh.test."),
            record(10, 50, 7002, "api-1.mesh.test."),
            record(20, 10, 7003, "backup.mesh.test."),
        ],
    )
    .await;
    ready(&api, 5 * SECOND, &addrs(&["127.0.0.29:7003"])).await;
    gauge_is(&metrics, "api", Some(1)).await;
}

#[tokio::test]
async fn changed_records_move_the_watch_within_the_ttl() {
    let dns = DnsServer::start().await;
    dns.set_a("web.mesh.test.", 1, &[[127, 0, 0, 10], [127, 0, 0, 11]])
        .await;
    let metrics = Arc::new(Metrics::new());
    let d = Discovery::new(
        &config(
            dns.addr,
            "5s",
            "  services:\n    web: { dns: \"web.mesh.test:8080\" }\n",
        ),
        metrics.clone(),
    );
    let web = d.lookup("web", None).expect("listed");
    ready(
        &web,
        5 * SECOND,
        &addrs(&["127.0.0.10:8080", "127.0.0.11:8080"]),
    )
    .await;
    gauge_is(&metrics, "web", Some(2)).await;

    // One endpoint added, one removed.
    dns.set_a("web.mesh.test.", 1, &[[127, 0, 0, 11], [127, 0, 0, 12]])
        .await;
    let started = tokio::time::Instant::now();
    ready(
        &web,
        4 * SECOND,
        &addrs(&["127.0.0.11:8080", "127.0.0.12:8080"]),
    )
    .await;
    assert!(started.elapsed() <= 3 * SECOND, "{:?}", started.elapsed());
    gauge_is(&metrics, "web", Some(2)).await;

    dns.set_a("web.mesh.test.", 1, &[[127, 0, 0, 13]]).await;
    ready(&web, 4 * SECOND, &addrs(&["127.0.0.13:8080"])).await;
    gauge_is(&metrics, "web", Some(1)).await;
}

#[tokio::test]
async fn nxdomain_after_success_keeps_the_endpoints_then_unavailable() {
    let dns = DnsServer::start().await;
    dns.set_a("web.mesh.test.", 1, &[[127, 0, 0, 10]]).await;
    let metrics = Arc::new(Metrics::new());
    let d = Discovery::new(
        &config(
            dns.addr,
            "3s",
            "  services:\n    web: { dns: \"web.mesh.test:8080\" }\n",
        ),
        metrics.clone(),
    );
    let web = d.lookup("web", None).expect("listed");
    ready(&web, 5 * SECOND, &addrs(&["127.0.0.10:8080"])).await;

    dns.remove("web.mesh.test.", RecordType::A).await;
    // Wait until a failed refresh was seen: the snapshot says stale, endpoints are kept.
    let mut stale = None;
    for _ in 0..100 {
        let view = d.snapshot().into_iter().find(|s| s.service == "web");
        if let Some(v) = view.filter(|v| v.state == EndpointState::Stale) {
            stale = Some(v);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stale = stale.expect("went stale within 5 s");
    assert_eq!(stale.endpoints, addrs(&["127.0.0.10:8080"]));
    assert!(stale.stale_since.is_some());
    let error = stale.last_error.expect("error recorded");
    assert!(error.contains("NXDOMAIN"), "{error}");
    assert_eq!(
        *web.endpoints().borrow(),
        Resolution::Ready(addrs(&["127.0.0.10:8080"]).into())
    );
    gauge_is(&metrics, "web", Some(1)).await;
    let errors = metrics.render();
    assert!(
        errors.lines().any(
            |l| l.starts_with("outrider_discovery_errors_total{service=\"web\"}")
                && !l.ends_with(" 0")
        ),
        "{errors}"
    );

    // After stale_for (3 s), the service is unavailable.
    let mut rx = web.endpoints();
    let r = wait_until(&mut rx, 5 * SECOND, "unavailable after stale_for", |r| {
        matches!(r, Resolution::Unavailable(_))
    })
    .await;
    match r {
        Resolution::Unavailable(reason) => assert!(reason.contains("expired"), "{reason}"),
        other => panic!("{other:?}"),
    }
    gauge_is(&metrics, "web", Some(0)).await;

    // And it comes back when the name does.
    dns.set_a("web.mesh.test.", 1, &[[127, 0, 0, 14]]).await;
    ready(&web, 5 * SECOND, &addrs(&["127.0.0.14:8080"])).await;
    gauge_is(&metrics, "web", Some(1)).await;
}

#[tokio::test]
async fn resolver_down_at_start_is_unavailable_and_recovers() {
    let mut dns = DnsServer::bind().await;
    dns.set_a("web.mesh.test.", 1, &[[127, 0, 0, 10]]).await;
    let metrics = Arc::new(Metrics::new());
    let d = Discovery::new(
        &config(
            dns.addr,
            "5s",
            "  services:\n    web: { dns: \"web.mesh.test:8080\" }\n",
        ),
        metrics.clone(),
    );
    let web = d.lookup("web", None).expect("listed");
    assert_eq!(
        web.resolved(3 * SECOND).await.endpoints(),
        &[] as &[SocketAddr]
    );
    let mut rx = web.endpoints();
    wait_until(&mut rx, 3 * SECOND, "unavailable while down", |r| {
        matches!(r, Resolution::Unavailable(_))
    })
    .await;
    let view = d
        .snapshot()
        .into_iter()
        .find(|s| s.service == "web")
        .expect("in snapshot");
    assert_eq!(view.state, EndpointState::Unavailable);
    gauge_is(&metrics, "web", Some(0)).await;

    dns.serve();
    ready(&web, 5 * SECOND, &addrs(&["127.0.0.10:8080"])).await;
    gauge_is(&metrics, "web", Some(1)).await;
}

#[tokio::test]
async fn resolver_outage_after_success_keeps_the_endpoints() {
    let mut dns = DnsServer::start().await;
    dns.set_a("web.mesh.test.", 1, &[[127, 0, 0, 10]]).await;
    let metrics = Arc::new(Metrics::new());
    let d = Discovery::new(
        &config(
            dns.addr,
            "30s",
            "  services:\n    web: { dns: \"web.mesh.test:8080\" }\n",
        ),
        metrics.clone(),
    );
    let web = d.lookup("web", None).expect("listed");
    ready(&web, 5 * SECOND, &addrs(&["127.0.0.10:8080"])).await;
    dns.stop();
    tokio::time::sleep(3 * SECOND).await;
    assert_eq!(
        *web.endpoints().borrow(),
        Resolution::Ready(addrs(&["127.0.0.10:8080"]).into())
    );
    let view = d
        .snapshot()
        .into_iter()
        .find(|s| s.service == "web")
        .expect("in snapshot");
    assert_eq!(view.state, EndpointState::Stale);
    gauge_is(&metrics, "web", Some(1)).await;
}

#[tokio::test]
async fn default_dns_resolves_unlisted_services_in_our_or_the_named_namespace() {
    let dns = DnsServer::start().await;
    dns.set_a("user-service.demo.svc.mesh.test.", 30, &[[127, 0, 0, 30]])
        .await;
    dns.set_a("user-service.other.svc.mesh.test.", 30, &[[127, 0, 0, 31]])
        .await;
    let metrics = Arc::new(Metrics::new());
    let d = Discovery::new(
        &config(
            dns.addr,
            "5s",
            "  default_dns: \"{service}.{namespace}.svc.mesh.test:7143\"\n",
        ),
        metrics.clone(),
    );

    // `user-service`: this sidecar's namespace.
    let name = outrider::proxy::route::parse_authority("user-service:80").expect("service name");
    let own = d
        .lookup(&name.service, name.namespace.as_deref())
        .expect("default_dns");
    assert_eq!(own.namespace, "demo");
    assert_eq!(own.identity, "spiffe://mesh.local/ns/demo/sa/user-service");
    assert_eq!(
        own.describe(),
        "default_dns:user-service.demo.svc.mesh.test:7143"
    );
    ready(&own, 5 * SECOND, &addrs(&["127.0.0.30:7143"])).await;

    // `user-service.other.svc.cluster.local`: the namespace the authority named.
    let name = outrider::proxy::route::parse_authority("user-service.other.svc.cluster.local")
        .expect("service name");
    let other = d
        .lookup(&name.service, name.namespace.as_deref())
        .expect("default_dns");
    assert_eq!(other.namespace, "other");
    assert_eq!(
        other.identity,
        "spiffe://mesh.local/ns/other/sa/user-service"
    );
    ready(&other, 5 * SECOND, &addrs(&["127.0.0.31:7143"])).await;

    // The same target is handed out again (one resolver task per service and namespace).
    let again = d.lookup("user-service", None).expect("default_dns");
    assert!(Arc::ptr_eq(&own, &again));
    // The gauge counts the service across the namespaces it is called in.
    gauge_is(&metrics, "user-service", Some(2)).await;

    // A name nobody serves: unavailable, never unknown.
    let ghost = d.lookup("ghost", None).expect("default_dns");
    let mut rx = ghost.endpoints();
    wait_until(&mut rx, 5 * SECOND, "ghost unavailable", |r| {
        matches!(r, Resolution::Unavailable(_))
    })
    .await;
}

#[tokio::test]
async fn without_default_dns_an_unlisted_service_is_unknown() {
    let dns = DnsServer::start().await;
    let metrics = Arc::new(Metrics::new());
    let d = Discovery::new(
        &config(
            dns.addr,
            "5s",
            "  services:\n    fixed: { endpoints: [\"127.0.0.2:80\", \"127.0.0.1:80\"] }\n",
        ),
        metrics.clone(),
    );
    assert!(d.lookup("user-service", None).is_none());
    // Static services are known (and counted) before anyone calls them.
    gauge_is(&metrics, "fixed", Some(2)).await;
    let snap = d.snapshot();
    assert_eq!(snap.len(), 1);
    assert_eq!(snap[0].source, "static");
    assert_eq!(snap[0].endpoints, addrs(&["127.0.0.1:80", "127.0.0.2:80"]));
}

#[tokio::test]
async fn reload_replaces_changed_services_and_the_gauge_follows() {
    let dns = DnsServer::start().await;
    dns.set_a("web.mesh.test.", 30, &[[127, 0, 0, 10]]).await;
    let metrics = Arc::new(Metrics::new());
    let first = config(
        dns.addr,
        "5s",
        "  services:\n    fixed: { endpoints: [\"127.0.0.2:80\"] }\n    web: { dns: \"web.mesh.test:8080\" }\n    gone: { endpoints: [\"127.0.0.3:80\"] }\n",
    );
    let d = Discovery::new(&first, metrics.clone());
    let web = d.lookup("web", None).expect("listed");
    ready(&web, 5 * SECOND, &addrs(&["127.0.0.10:8080"])).await;
    gauge_is(&metrics, "gone", Some(1)).await;

    let second = config(
        dns.addr,
        "5s",
        "  services:\n    fixed: { endpoints: [\"127.0.0.2:80\", \"127.0.0.4:80\"] }\n    web: { dns: \"web.mesh.test:8080\" }\n",
    );
    d.reconfigure(&second);
    // Unchanged DNS service: same target, same task.
    let web_again = d.lookup("web", None).expect("listed");
    assert!(Arc::ptr_eq(&web, &web_again));
    gauge_is(&metrics, "fixed", Some(2)).await;
    gauge_is(&metrics, "gone", None).await;
    assert!(d.lookup("gone", None).is_none());
}

#[tokio::test]
async fn dropping_the_target_stops_resolving() {
    let dns = DnsServer::start().await;
    dns.set_a("x.demo.svc.mesh.test.", 1, &[[127, 0, 0, 40]])
        .await;
    let metrics = Arc::new(Metrics::new());
    let d = Discovery::new(
        &config(
            dns.addr,
            "5s",
            "  default_dns: \"{service}.{namespace}.svc.mesh.test:80\"\n",
        ),
        metrics.clone(),
    );
    let x = d.lookup("x", None).expect("default_dns");
    let mut rx = x.endpoints();
    ready(&x, 5 * SECOND, &addrs(&["127.0.0.40:80"])).await;
    // A reload that changes default_dns drops the target; once nobody holds it, its task ends
    // and the watch closes.
    let reloaded = config(
        dns.addr,
        "5s",
        "  default_dns: \"{service}.{namespace}.svc.mesh.test:81\"\n",
    );
    d.reconfigure(&reloaded);
    drop(x);
    let closed =
        tokio::time::timeout(5 * SECOND, async { while rx.changed().await.is_ok() {} }).await;
    assert!(closed.is_ok(), "resolver task still running");
    gauge_is(&metrics, "x", None).await;
}

/// No nameservers configured: the system resolver (`/etc/resolv.conf`, and `/etc/hosts`).
#[tokio::test]
async fn without_nameservers_the_system_resolver_is_used() {
    let text = "service: tester
namespace: demo
app: 127.0.0.1:8080
tls: { mode: disabled }
discovery:
  services:
    local: { dns: \"localhost:8080\" }
";
    let config = match config::load_str(text, "test.yaml", Path::new("."), Vec::new()) {
        Ok(loaded) => loaded.config,
        Err(e) => panic!("test config invalid: {:?}", e.lines()),
    };
    let d = Discovery::new(&config, Arc::new(Metrics::new()));
    let local = d.lookup("local", None).expect("listed");
    let mut rx = local.endpoints();
    let r = wait_until(&mut rx, 5 * SECOND, "localhost resolved", |r| {
        !matches!(r, Resolution::Pending)
    })
    .await;
    let want: SocketAddr = "127.0.0.1:8080".parse().expect("valid");
    assert!(r.endpoints().contains(&want), "{r:?}");
}

/// An HTTP backend on `ip:port` that answers every request with its `name`.
async fn backend(ip: [u8; 4], port: u16, name: &'static str) -> JoinHandle<()> {
    let listener = TcpListener::bind(SocketAddr::from((ip, port)))
        .await
        .expect("bind backend");
    let app = axum::Router::new().fallback(move || async move { name });
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    })
}

/// Stops the in-process sidecar when the test ends, pass or fail.
struct Sidecar(JoinHandle<()>);

impl Drop for Sidecar {
    fn drop(&mut self) {
        self.0.abort();
    }
}

type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Empty<bytes::Bytes>,
>;

/// GET `http://{addr}{path}` with `Host: {host}`: (status, body).
async fn get(client: &Client, addr: SocketAddr, host: &str, path: &str) -> (u16, String) {
    use http_body_util::BodyExt;
    let req = http::Request::get(format!("http://{addr}{path}"))
        .header(http::header::HOST, host)
        .body(http_body_util::Empty::new())
        .expect("valid request");
    match client.request(req).await {
        Ok(resp) => {
            let status = resp.status().as_u16();
            let body = match resp.into_body().collect().await {
                Ok(b) => String::from_utf8_lossy(&b.to_bytes()).into_owned(),
                Err(e) => format!("body error: {e}"),
            };
            (status, body)
        }
        Err(e) => (0, format!("client error: {e}")),
    }
}

/// Through a running sidecar (`outrider run`, in process): DNS moves `web` from one backend to another (TTL 1 s) and
/// traffic follows within a few seconds, with no failed request; `/endpoints` and the gauge
/// tell the truth.
#[tokio::test]
async fn traffic_follows_dns_changes_through_the_proxy_without_failures() {
    let dns = DnsServer::start().await;
    let port = free_port();
    let _a = backend([127, 0, 0, 10], port, "a").await;
    let _b = backend([127, 0, 0, 11], port, "b").await;
    dns.set_a("web.mesh.test.", 1, &[[127, 0, 0, 10]]).await;

    let (_dir, _sidecar, client, admin_addr, out_addr) = dns_sidecar(&dns, port, "10s").await;

    // Steady traffic: every answer must be 200 from a backend.
    let mut seen = Vec::new();
    for _ in 0..10 {
        seen.push(get(&client, out_addr, "web", "/").await);
    }
    assert!(
        seen.iter().all(|r| *r == (200, "a".to_string())),
        "{seen:?}"
    );

    dns.set_a("web.mesh.test.", 1, &[[127, 0, 0, 11]]).await;
    let switched = tokio::time::Instant::now();
    let mut moved = None;
    while switched.elapsed() < 8 * SECOND {
        let r = get(&client, out_addr, "web", "/").await;
        let is_b = r == (200, "b".to_string());
        seen.push(r);
        if is_b && moved.is_none() {
            moved = Some(switched.elapsed());
        }
        if moved.is_some_and(|m| switched.elapsed() > m + SECOND) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let failed: Vec<_> = seen.iter().filter(|(status, _)| *status != 200).collect();
    assert!(failed.is_empty(), "failed requests: {failed:?}");
    let moved = moved.expect("traffic moved to b within 8 s");
    assert!(moved <= 4 * SECOND, "moved after {moved:?}");
    // Once moved, it stays moved.
    let tail: Vec<_> = seen.iter().rev().take(5).collect();
    assert!(tail.iter().all(|r| r.1 == "b"), "{tail:?}");

    let (status, body) = get(&client, admin_addr, "localhost", "/endpoints").await;
    assert_eq!(status, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).expect("json");
    let web = json["services"]
        .as_array()
        .and_then(|s| s.iter().find(|v| v["service"] == "web"))
        .expect("web in /endpoints")
        .clone();
    assert_eq!(web["state"], "ready", "{web}");
    assert_eq!(web["source"], format!("dns:web.mesh.test:{port}"));
    assert_eq!(
        web["endpoints"],
        serde_json::json!([format!("127.0.0.11:{port}")])
    );
    let (_, metrics) = get(&client, admin_addr, "localhost", "/metrics").await;
    assert!(
        metrics.contains("outrider_endpoints{service=\"web\"} 1"),
        "{metrics}"
    );
}

/// One request of the DNS chaos load: when it ended, its status (0: no answer) and body (for a
/// sidecar-made error: `error kind <x-outrider-error>`).
#[derive(Debug, Clone)]
struct Outcome {
    at: tokio::time::Instant,
    status: u16,
    body: String,
}

/// Chaos run (issue 10): the DNS server stopped and restarted while a sidecar (`outrider run`, in
/// process) proxies steady load from 4 clients to a DNS-discovered service (TTL 1 s,
/// `stale_for: 4s`).
///
/// 1. An outage shorter than `stale_for`: every request still succeeds, from the last known
///    endpoints (`/endpoints` says `stale`). The record changes while the server is down; after
///    the restart the change is picked up and traffic moves, still without a failed request.
/// 2. An outage longer than `stale_for`: requests keep succeeding until `stale_for` has passed
///    since the outage began, then fail with the sidecar's own 503 `unavailable` (never a hang or
///    a cut connection); after the restart the service resolves again and every request succeeds.
#[tokio::test(flavor = "multi_thread")]
async fn dns_server_stopped_and_restarted_under_load() {
    let mut dns = DnsServer::start().await;
    let port = free_port();
    let _a = backend([127, 0, 0, 10], port, "a").await;
    let _b = backend([127, 0, 0, 11], port, "b").await;
    dns.set_a("web.mesh.test.", 1, &[[127, 0, 0, 10]]).await;
    let stale_for = 4 * SECOND;

    let (_dir, _sidecar, client, admin_addr, out_addr) = dns_sidecar(&dns, port, "4s").await;
    let state = |client: Client| async move {
        let (_, body) = get(&client, admin_addr, "localhost", "/endpoints").await;
        let json: serde_json::Value = serde_json::from_str(&body).expect("json");
        json["services"]
            .as_array()
            .and_then(|s| s.iter().find(|v| v["service"] == "web"))
            .map(|v| v["state"].as_str().unwrap_or_default().to_string())
            .unwrap_or_default()
    };

    // The load: 4 clients, one request every 10 ms each, every outcome recorded.
    let outcomes: Arc<std::sync::Mutex<Vec<Outcome>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (client, outcomes, stop) = (client.clone(), outcomes.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let req = http::Request::get(format!("http://{out_addr}/"))
                    .header(http::header::HOST, "web")
                    .body(http_body_util::Empty::new())
                    .expect("valid request");
                let answer = tokio::time::timeout(5 * SECOND, client.request(req)).await;
                let (status, body) = match answer {
                    Ok(Ok(resp)) => {
                        let status = resp.status().as_u16();
                        let kind = resp
                            .headers()
                            .get("x-outrider-error")
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_string);
                        let body = http_body_util::BodyExt::collect(resp.into_body())
                            .await
                            .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
                            .unwrap_or_else(|e| format!("body error: {e}"));
                        (status, kind.map_or(body, |k| format!("error kind {k}")))
                    }
                    Ok(Err(e)) => (0, format!("client error: {e}")),
                    Err(_) => (0, "no answer within 5 s".to_string()),
                };
                outcomes.lock().expect("outcomes").push(Outcome {
                    at: tokio::time::Instant::now(),
                    status,
                    body,
                });
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }));
    }
    let snapshot = || outcomes.lock().expect("outcomes").clone();
    let since = |t: tokio::time::Instant| -> Vec<Outcome> {
        snapshot().into_iter().filter(|o| o.at >= t).collect()
    };

    // Phase 1: an outage within stale_for, the record changed meanwhile.
    tokio::time::sleep(SECOND).await;
    dns.stop();
    let stopped = tokio::time::Instant::now();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        state(client.clone()).await,
        "stale",
        "lookups failed meanwhile"
    );
    dns.set_a("web.mesh.test.", 1, &[[127, 0, 0, 11]]).await;
    dns.restart().await;
    let restarted = tokio::time::Instant::now();
    let mut moved = None;
    while restarted.elapsed() < 8 * SECOND {
        if let Some(o) = since(restarted).iter().find(|o| o.body == "b") {
            moved = Some(o.at - restarted);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let moved = moved.expect("the changed record was picked up within 8 s of the restart");
    tokio::time::sleep(SECOND).await;
    let phase1 = snapshot();
    let during_outage = phase1
        .iter()
        .filter(|o| o.at >= stopped && o.at < restarted);
    let failed: Vec<&Outcome> = phase1.iter().filter(|o| o.status != 200).collect();
    assert!(
        failed.is_empty(),
        "failed requests in phase 1: {} e.g. {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    let outage_requests = during_outage.count();
    assert!(
        outage_requests > 50,
        "load ran during the outage: {outage_requests}"
    );
    let tail: Vec<&Outcome> = phase1.iter().rev().take(20).collect();
    assert!(tail.iter().all(|o| o.body == "b"), "stays moved: {tail:?}");
    assert_eq!(state(client.clone()).await, "ready");

    // Phase 2: an outage longer than stale_for.
    dns.stop();
    let stopped2 = tokio::time::Instant::now();
    let mut first_failure = None;
    while stopped2.elapsed() < stale_for + 6 * SECOND {
        if let Some(o) = since(stopped2).iter().find(|o| o.status != 200) {
            first_failure = Some(o.clone());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let first_failure = first_failure.expect("the stale endpoints expired after stale_for");
    // stale_for counts from the first failed lookup, which is after the stop.
    let expired_after = first_failure.at - stopped2;
    assert!(
        expired_after >= stale_for,
        "a request failed {expired_after:?} into the outage, before stale_for ({stale_for:?})"
    );
    tokio::time::sleep(SECOND).await;
    assert_eq!(state(client.clone()).await, "unavailable");
    dns.restart().await;
    let restarted2 = tokio::time::Instant::now();
    let mut recovered = None;
    while restarted2.elapsed() < 8 * SECOND {
        let after = since(restarted2);
        // Recovered: the latest 20 requests all succeeded.
        if after.len() >= 20 && after.iter().rev().take(20).all(|o| o.status == 200) {
            // From the restart to the first success after the last failure.
            let first_good = match after.iter().rposition(|o| o.status != 200) {
                Some(i) => i + 1,
                None => 0,
            };
            recovered = after.get(first_good).map(|o| o.at - restarted2);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let recovered = recovered.expect("requests succeed again within 8 s of the restart");
    tokio::time::sleep(SECOND).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.expect("worker");
    }
    let all = snapshot();
    let phase2_failed: Vec<&Outcome> = all
        .iter()
        .filter(|o| o.at >= stopped2 && o.status != 200)
        .collect();
    // Every failure is the sidecar's own answer: 503 unavailable, never a hang or a dropped
    // connection, and none after the recovery.
    assert!(
        phase2_failed
            .iter()
            .all(|o| o.status == 503 && o.body == "error kind unavailable"),
        "{:?}",
        &phase2_failed[..phase2_failed.len().min(5)]
    );
    let late: Vec<&&Outcome> = phase2_failed
        .iter()
        .filter(|o| o.at >= restarted2 + recovered + Duration::from_millis(1))
        .collect();
    assert!(late.is_empty(), "failures after recovery: {late:?}");
    assert_eq!(state(client.clone()).await, "ready");
    eprintln!(
        "DNS chaos: {} requests; outage 1 (2.5 s < stale_for 4 s): {outage_requests} requests \
         during it, 0 failed, changed record picked up {moved:?} after the restart; outage 2: \
         first failure (503 unavailable) {expired_after:?} after the stop, {} failed in all, \
         recovered {recovered:?} after the restart",
        all.len(),
        phase2_failed.len()
    );
}

/// A sidecar (`outrider run`, in process: a shared target directory may hold another
/// branch's binary) that finds `web` at `web.mesh.test:{port}` through `dns`, ready; with its
/// config directory (keep it: the sidecar watches it), a client and its admin and outbound
/// addresses.
async fn dns_sidecar(
    dns: &DnsServer,
    port: u16,
    stale_for: &str,
) -> (tempfile::TempDir, Sidecar, Client, SocketAddr, SocketAddr) {
    let [outbound, inbound, admin] = free_addrs().map(|a| a.port());
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("outrider.yaml");
    let yaml = format!(
        "service: tester
namespace: demo
app: 127.0.0.1:9
listen: {{ outbound: 127.0.0.1:{outbound}, inbound: 127.0.0.1:{inbound}, admin: 127.0.0.1:{admin} }}
tls: {{ mode: disabled }}
discovery:
  resolver: {{ nameservers: [\"{dns}\"], min_ttl: 1s, max_ttl: 2s, stale_for: {stale_for}, timeout: 500ms }}
  services:
    web: {{ dns: \"web.mesh.test:{port}\" }}
",
        dns = dns.addr
    );
    std::fs::write(&path, yaml).expect("write config");
    let loaded = config::load_file(&path, Vec::new()).expect("valid config");
    let sidecar = Sidecar(tokio::spawn(async move {
        if let Err(e) = outrider::runtime::run(path, loaded.config).await {
            panic!("sidecar failed: {e:?}");
        }
    }));
    let client: Client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let admin_addr = SocketAddr::from(([127, 0, 0, 1], admin));
    let out_addr = SocketAddr::from(([127, 0, 0, 1], outbound));
    let mut up = false;
    for _ in 0..100 {
        if get(&client, admin_addr, "localhost", "/ready").await.0 == 200 {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(up, "sidecar did not become ready");
    (dir, sidecar, client, admin_addr, out_addr)
}
