//! Health check node ports, as kube-proxy serves them
//! (`pkg/proxy/healthcheck/service_health.go`): for every Service with
//! `externalTrafficPolicy: Local` and a `spec.healthCheckNodePort`, an HTTP
//! server on that port that load balancers probe. Any path answers with GET or
//! HEAD: 200 when this node has local endpoints of the Service and the proxy
//! itself is healthy, 503 otherwise, with a JSON body naming the Service, its
//! local endpoint count and the proxy health.
//!
//! [`HealthCheckServers::update`] reconciles the open listeners with the
//! wanted set. Listeners are keyed by port: a port that stays wanted keeps its
//! listener and only its answer (Service, count) changes, so updates never
//! re-bind a port that is already open.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, PoisonError, RwLock};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::runtime::Handle;
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet};

use crate::model::{HealthCheck, ServiceName};

use super::{
    CONNECTION_TIMEOUT, HEADER_READ_TIMEOUT, MAX_CONNECTIONS, method_not_allowed, readable,
    response,
};

/// Whether the proxy itself is healthy (kube-proxy's `/healthz` verdict).
pub type ProxyHealthy = Arc<dyn Fn() -> bool + Send + Sync>;

/// What one port answers for; shared with its serving task.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    service: ServiceName,
    local_endpoints: usize,
}

type SharedTarget = Arc<RwLock<Target>>;

/// One open port: its answer and the task accepting on it. Aborting the task
/// drops the listener and every connection it serves.
struct Server {
    target: SharedTarget,
    task: JoinHandle<()>,
}

/// The set of health check node port servers of this node.
pub struct HealthCheckServers {
    bind_ip: IpAddr,
    proxy_healthy: ProxyHealthy,
    runtime: Handle,
    servers: BTreeMap<u16, Server>,
}

impl std::fmt::Debug for HealthCheckServers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HealthCheckServers")
            .field("bind_ip", &self.bind_ip)
            .field("ports", &self.ports())
            .finish_non_exhaustive()
    }
}

impl HealthCheckServers {
    /// Servers listening on `bind_ip` (`None`: all IPv4 addresses of the
    /// node), answering `serviceProxyHealthy` from `proxy_healthy`.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime: the servers run on the current runtime.
    pub fn new(bind_ip: Option<IpAddr>, proxy_healthy: ProxyHealthy) -> Self {
        Self {
            bind_ip: bind_ip.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            proxy_healthy,
            runtime: Handle::current(),
            servers: BTreeMap::new(),
        }
    }

    /// Serves exactly `wanted`: opens a listener for each new port, closes the
    /// ports no Service wants any more, and updates the answers of the others
    /// in place. Never fails: a port that cannot be bound is logged and tried
    /// again on the next call; when Services share a port, the first by name
    /// gets it and the others are logged.
    pub fn update(&mut self, wanted: &BTreeMap<ServiceName, HealthCheck>) {
        // Port -> its Service; `wanted` iterates in name order.
        let mut claims: BTreeMap<u16, Target> = BTreeMap::new();
        for (service, check) in wanted {
            if let Some(owner) = claims.get(&check.port) {
                tracing::warn!(
                    service = %service,
                    port = check.port,
                    owner = %owner.service,
                    "health check node port already claimed by another service; not serving it"
                );
                continue;
            }
            claims.insert(
                check.port,
                Target {
                    service: service.clone(),
                    local_endpoints: check.local_endpoints,
                },
            );
        }

        // Close the ports nobody wants any more.
        self.servers.retain(|port, server| {
            let keep = claims.contains_key(port);
            if !keep {
                let service = read(&server.target).service;
                tracing::info!(%service, port, "closing health check node port");
                server.task.abort();
            }
            keep
        });

        for (port, target) in claims {
            if let Some(server) = self.servers.get(&port) {
                let mut current = server
                    .target
                    .write()
                    .unwrap_or_else(PoisonError::into_inner);
                if *current != target {
                    tracing::debug!(
                        service = %target.service,
                        port,
                        local_endpoints = target.local_endpoints,
                        "updating health check node port"
                    );
                    *current = target;
                }
                continue;
            }
            let addr = SocketAddr::new(self.bind_ip, port);
            match self.listen(addr) {
                Ok(listener) => {
                    tracing::info!(service = %target.service, %addr, "opened health check node port");
                    let target = Arc::new(RwLock::new(target));
                    let task = self.runtime.spawn(serve(
                        listener,
                        Arc::clone(&target),
                        Arc::clone(&self.proxy_healthy),
                    ));
                    self.servers.insert(port, Server { target, task });
                }
                Err(error) => tracing::warn!(
                    service = %target.service,
                    port,
                    %addr,
                    %error,
                    "cannot open health check node port; will retry on the next update"
                ),
            }
        }
    }

    /// The open ports, ascending.
    pub fn ports(&self) -> Vec<u16> {
        self.servers.keys().copied().collect()
    }

    /// Binds synchronously so `update` knows the outcome at once.
    fn listen(&self, addr: SocketAddr) -> std::io::Result<TcpListener> {
        // The IPv4 wildcard serves both families, as kube-proxy's does.
        let listener = super::listen(addr)?;
        let _guard = self.runtime.enter();
        TcpListener::from_std(listener)
    }
}

impl Drop for HealthCheckServers {
    fn drop(&mut self) {
        for server in self.servers.values() {
            server.task.abort();
        }
    }
}

fn read(target: &SharedTarget) -> Target {
    target
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .clone()
}

/// Accepts on `listener` until aborted; connections live in a [`JoinSet`] so
/// they end with the listener, as kube-proxy closes them with the server.
async fn serve(listener: TcpListener, target: SharedTarget, proxy_healthy: ProxyHealthy) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut connections = JoinSet::new();
    loop {
        // Reap finished connections so the set does not grow.
        while connections.try_join_next().is_some() {}
        let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(error) => {
                tracing::warn!(%error, "health check node port: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let target = Arc::clone(&target);
        let proxy_healthy = Arc::clone(&proxy_healthy);
        connections.spawn(async move {
            let _permit = permit;
            let service = service_fn(move |req: Request<Incoming>| {
                let resp = if readable(req.method()) {
                    answer(&read(&target), proxy_healthy())
                } else {
                    method_not_allowed()
                };
                async move { Ok::<_, std::convert::Infallible>(resp) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(CONNECTION_TIMEOUT, conn).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::debug!(%peer, %error, "health check connection error"),
                Err(_) => tracing::debug!(%peer, "health check connection timed out"),
            }
        });
    }
}

/// kube-proxy's answer: 200 only with local endpoints and a healthy proxy.
fn answer(target: &Target, proxy_healthy: bool) -> Response<Full<Bytes>> {
    let status = if target.local_endpoints > 0 && proxy_healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    // Field order as kube-proxy writes it; names are JSON-escaped.
    let body = format!(
        r#"{{"service":{{"namespace":{},"name":{}}},"localEndpoints":{},"serviceProxyHealthy":{}}}"#,
        serde_json::Value::from(&*target.service.namespace),
        serde_json::Value::from(&*target.service.name),
        target.local_endpoints,
        proxy_healthy,
    );
    response(status, "application/json", body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    fn free_port() -> u16 {
        let listener = std::net::TcpListener::bind((LOCALHOST, 0)).expect("bind :0");
        listener.local_addr().expect("local addr").port()
    }

    fn name(namespace: &str, name: &str) -> ServiceName {
        ServiceName {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    fn wanted(checks: &[(&ServiceName, u16, usize)]) -> BTreeMap<ServiceName, HealthCheck> {
        checks
            .iter()
            .map(|(svc, port, local_endpoints)| {
                (
                    (*svc).clone(),
                    HealthCheck {
                        port: *port,
                        local_endpoints: *local_endpoints,
                    },
                )
            })
            .collect()
    }

    fn servers(healthy: bool) -> (HealthCheckServers, Arc<AtomicBool>) {
        let flag = Arc::new(AtomicBool::new(healthy));
        let read_flag = Arc::clone(&flag);
        let servers = HealthCheckServers::new(
            Some(LOCALHOST),
            Arc::new(move || read_flag.load(Ordering::SeqCst)),
        );
        (servers, flag)
    }

    /// Reads one response (headers, then `Content-Length` bytes of body) from
    /// a keep-alive connection: (status, lower-cased head, body). A response
    /// to HEAD has a `Content-Length` but no body: pass `head_only`.
    async fn read_response_to(stream: &mut TcpStream, head_only: bool) -> (u16, String, String) {
        let mut raw = Vec::new();
        let mut buf = [0u8; 1024];
        let read = async {
            loop {
                if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    let len = if head_only { 0 } else { len };
                    if raw.len() >= end + 4 + len {
                        let body = String::from_utf8_lossy(&raw[end + 4..end + 4 + len]);
                        return (head, body.into_owned());
                    }
                }
                let n = stream.read(&mut buf).await.expect("read");
                assert!(n > 0, "connection closed before a full response");
                raw.extend_from_slice(&buf[..n]);
            }
        };
        let (head, body) = tokio::time::timeout(Duration::from_secs(2), read)
            .await
            .expect("response in time");
        let code = head
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .expect("status code");
        (code, head, body)
    }

    async fn read_response(stream: &mut TcpStream) -> (u16, String, String) {
        read_response_to(stream, false).await
    }

    async fn send(stream: &mut TcpStream, method: &str, path: &str) {
        let req = format!("{method} {path} HTTP/1.1\r\nHost: test\r\n\r\n");
        stream.write_all(req.as_bytes()).await.expect("write");
    }

    async fn connect(port: u16) -> TcpStream {
        tokio::time::timeout(
            Duration::from_secs(2),
            TcpStream::connect((LOCALHOST, port)),
        )
        .await
        .expect("connect in time")
        .expect("connect")
    }

    async fn request(port: u16, method: &str, path: &str) -> (u16, String, String) {
        let mut stream = connect(port).await;
        send(&mut stream, method, path).await;
        read_response_to(&mut stream, method == "HEAD").await
    }

    fn json(body: &str) -> serde_json::Value {
        serde_json::from_str(body).expect("json body")
    }

    /// Waits (bounded) until nothing listens on `port` any more.
    async fn assert_closed(port: u16) {
        let closed = async {
            loop {
                match TcpStream::connect((LOCALHOST, port)).await {
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return,
                    _ => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(2), closed)
            .await
            .expect("port closed in time");
    }

    /// Captures this thread's log output while the guard lives.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("log buffer").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        fn install(&self) -> tracing::subscriber::DefaultGuard {
            let writer = self.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_ansi(false)
                .with_max_level(tracing::Level::INFO)
                .with_writer(move || writer.clone())
                .finish();
            tracing::subscriber::set_default(subscriber)
        }

        fn take(&self) -> String {
            let mut buf = self.0.lock().expect("log buffer");
            String::from_utf8_lossy(&std::mem::take(&mut *buf)).into_owned()
        }
    }

    #[tokio::test]
    async fn healthy_with_local_endpoints() {
        let (mut hcs, _) = servers(true);
        let port = free_port();
        let web = name("ns", "web");
        hcs.update(&wanted(&[(&web, port, 2)]));
        assert_eq!(hcs.ports(), vec![port]);

        let (code, head, body) = request(port, "GET", "/any/path?x=1").await;
        assert_eq!(code, 200);
        assert!(head.contains("content-type: application/json"), "{head}");
        assert!(head.contains("x-content-type-options: nosniff"), "{head}");
        assert_eq!(
            body,
            r#"{"service":{"namespace":"ns","name":"web"},"localEndpoints":2,"serviceProxyHealthy":true}"#
        );
        let (code, _, body) = request(port, "HEAD", "/").await;
        assert_eq!((code, body.as_str()), (200, ""));
        assert_eq!(request(port, "POST", "/").await.0, 405);
    }

    #[tokio::test]
    async fn unavailable_without_local_endpoints() {
        let (mut hcs, _) = servers(true);
        let port = free_port();
        hcs.update(&wanted(&[(&name("ns", "web"), port, 0)]));
        let (code, _, body) = request(port, "GET", "/").await;
        assert_eq!(code, 503);
        let body = json(&body);
        assert_eq!(body["localEndpoints"], 0);
        assert_eq!(body["serviceProxyHealthy"], true);
        assert_eq!(body["service"]["name"], "web");
    }

    #[tokio::test]
    async fn unavailable_while_proxy_unhealthy() {
        let (mut hcs, healthy) = servers(false);
        let port = free_port();
        hcs.update(&wanted(&[(&name("ns", "web"), port, 3)]));
        let (code, _, body) = request(port, "GET", "/").await;
        assert_eq!(code, 503);
        assert_eq!(json(&body)["serviceProxyHealthy"], false);
        assert_eq!(json(&body)["localEndpoints"], 3);

        healthy.store(true, Ordering::SeqCst);
        assert_eq!(request(port, "GET", "/").await.0, 200);
    }

    #[tokio::test]
    async fn count_updates_in_place_without_rebind() {
        let (mut hcs, _) = servers(true);
        let port = free_port();
        let web = name("ns", "web");
        hcs.update(&wanted(&[(&web, port, 1)]));

        // One keep-alive connection across the updates: a re-bind (new
        // listener task) would drop it.
        let mut conn = connect(port).await;
        send(&mut conn, "GET", "/").await;
        let (code, _, body) = read_response(&mut conn).await;
        assert_eq!(
            (code, json(&body)["localEndpoints"].as_u64()),
            (200, Some(1))
        );

        hcs.update(&wanted(&[(&web, port, 0)]));
        send(&mut conn, "GET", "/").await;
        let (code, _, body) = read_response(&mut conn).await;
        assert_eq!(
            (code, json(&body)["localEndpoints"].as_u64()),
            (503, Some(0))
        );

        hcs.update(&wanted(&[(&web, port, 4)]));
        send(&mut conn, "GET", "/").await;
        let (code, _, body) = read_response(&mut conn).await;
        assert_eq!(
            (code, json(&body)["localEndpoints"].as_u64()),
            (200, Some(4))
        );
        assert_eq!(hcs.ports(), vec![port]);
    }

    #[tokio::test]
    async fn removed_or_moved_service_closes_its_port() {
        let (mut hcs, _) = servers(true);
        let (first, second) = (free_port(), free_port());
        let web = name("ns", "web");
        hcs.update(&wanted(&[(&web, first, 1)]));
        assert_eq!(request(first, "GET", "/").await.0, 200);

        // Port changed: old one closed, new one served.
        hcs.update(&wanted(&[(&web, second, 1)]));
        assert_eq!(hcs.ports(), vec![second]);
        assert_closed(first).await;
        assert_eq!(request(second, "GET", "/").await.0, 200);

        // Service gone: its port closed.
        hcs.update(&BTreeMap::new());
        assert!(hcs.ports().is_empty());
        assert_closed(second).await;
    }

    #[tokio::test]
    async fn bind_conflict_is_logged_and_retried() {
        let log = Captured::default();
        let _guard = log.install();
        let (mut hcs, _) = servers(true);
        let blocker = std::net::TcpListener::bind((LOCALHOST, 0)).expect("bind :0");
        let port = blocker.local_addr().expect("local addr").port();
        let checks = wanted(&[(&name("ns", "web"), port, 1)]);

        hcs.update(&checks);
        assert!(hcs.ports().is_empty());
        let out = log.take();
        assert!(out.contains("WARN"), "{out}");
        assert!(out.contains("ns/web"), "{out}");
        assert!(out.contains(&format!("port={port}")), "{out}");

        drop(blocker);
        hcs.update(&checks);
        assert_eq!(hcs.ports(), vec![port]);
        assert_eq!(request(port, "GET", "/").await.0, 200);
    }

    #[tokio::test]
    async fn shared_port_goes_to_first_service_by_name() {
        let log = Captured::default();
        let _guard = log.install();
        let (mut hcs, _) = servers(true);
        let port = free_port();
        let (a, b) = (name("ns", "a"), name("ns", "b"));
        hcs.update(&wanted(&[(&b, port, 0), (&a, port, 1)]));
        assert_eq!(hcs.ports(), vec![port]);
        let (code, _, body) = request(port, "GET", "/").await;
        assert_eq!(
            (code, json(&body)["service"]["name"].as_str()),
            (200, Some("a"))
        );
        let out = log.take();
        assert!(out.contains("WARN") && out.contains("ns/b"), "{out}");

        // Once "a" leaves, "b" takes the port over (same listener).
        hcs.update(&wanted(&[(&b, port, 0)]));
        assert_eq!(hcs.ports(), vec![port]);
        let (code, _, body) = request(port, "GET", "/").await;
        assert_eq!(
            (code, json(&body)["service"]["name"].as_str()),
            (503, Some("b"))
        );
    }

    #[tokio::test]
    async fn names_are_json_escaped() {
        let target = Target {
            service: name("n\"s", "w\\b"),
            local_endpoints: 1,
        };
        let resp = answer(&target, true);
        assert_eq!(resp.status(), StatusCode::OK);
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .expect("body")
            .to_bytes();
        let body = json(std::str::from_utf8(&body).expect("utf-8"));
        assert_eq!(body["service"]["namespace"], "n\"s");
        assert_eq!(body["service"]["name"], "w\\b");
    }
}
