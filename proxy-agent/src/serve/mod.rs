//! The agent's HTTP endpoints, as kube-proxy serves them:
//!
//! - the health server (kube-proxy's `--healthz-bind-address`, port 10256):
//!   `/healthz` and `/livez`, see [`health`];
//! - the metrics server (kube-proxy's `--metrics-bind-address`, port 10249):
//!   `/metrics`, `/proxyMode`, and `/healthz`, which there is the generic
//!   apiserver-library check answering `ok` while the process serves HTTP (not
//!   the proxy health); and our `/debug/services` and `/debug/trace`
//!   ([`debug`]), to loopback clients only unless told otherwise.
//!
//! Binding is split from serving ([`bind`], then [`run_health`] /
//! [`run_metrics`]) so the binary learns about a taken port synchronously and
//! can exit cleanly before spawning anything.

pub mod api_client;
pub mod debug;
pub mod health;
pub mod healthcheck;
pub mod metrics;
pub mod process;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

pub use debug::{DebugAccess, DebugViews};
pub use health::{DEFAULT_HEALTH_TIMEOUT, Health, HealthStatus, Probe};
pub use metrics::{Metrics, Sample, SampleKind};

/// Connections served at once per server; further clients wait in the
/// kernel's accept backlog. Probes and scrapes need only a handful.
pub const MAX_CONNECTIONS: usize = 64;
/// A client must send its request headers within this time (also bounds how
/// long an idle keep-alive connection waits for its next request).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Hard cap on a connection's lifetime, so a client that never reads its
/// response cannot hold a connection slot forever.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Binds `addr`; call before spawning so a taken port fails start-up.
/// The IPv4 wildcard listens on both families ([`listen`]).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, ServeError> {
    listen(addr)
        .and_then(TcpListener::from_std)
        .map_err(|source| ServeError::Bind { addr, source })
}

/// A non-blocking listener on `addr`. `0.0.0.0` means every address of
/// both families, as kube-proxy's (Go's) wildcard listener does: a
/// dual-stack socket on `[::]`, so that probes over IPv6 are answered on
/// an IPv6-only or IPv6-primary node. Where the node has no IPv6, the
/// IPv4 wildcard alone.
pub fn listen(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let open = |domain: Domain, at: SocketAddr, dual: bool| -> std::io::Result<Socket> {
        let socket = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
        if dual {
            socket.set_only_v6(false)?;
        }
        socket.set_reuse_address(true)?;
        socket.bind(&at.into())?;
        socket.listen(1024)?;
        socket.set_nonblocking(true)?;
        Ok(socket)
    };
    let socket = match addr {
        SocketAddr::V4(v4) if v4.ip().is_unspecified() => {
            let both = SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, addr.port()));
            match open(Domain::IPV6, both, true) {
                Ok(socket) => socket,
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EAFNOSUPPORT | libc::EADDRNOTAVAIL | libc::EPROTONOSUPPORT)
                    ) =>
                {
                    open(Domain::IPV4, addr, false)?
                }
                Err(e) => return Err(e),
            }
        }
        _ => open(Domain::for_address(addr), addr, false)?,
    };
    Ok(socket.into())
}

/// Binds and serves kube-proxy's health endpoints. Returns only on bind error.
pub async fn serve_health(addr: SocketAddr, health: Arc<Health>) -> Result<(), ServeError> {
    let listener = bind(addr).await?;
    run_health(listener, health).await;
    Ok(())
}

/// Binds and serves `/metrics`, `/proxyMode` (answering `mode`) and `/healthz`.
/// Returns only on bind error.
pub async fn serve_metrics(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    mode: &'static str,
) -> Result<(), ServeError> {
    let listener = bind(addr).await?;
    run_metrics(listener, metrics, mode, None).await;
    Ok(())
}

/// Serves `/healthz` and `/livez` on `listener` forever.
pub async fn run_health(listener: TcpListener, health: Arc<Health>) {
    run(listener, "health", move |method, uri, _| {
        Reply::Now(health_response(&method, uri.path(), &health))
    })
    .await
}

/// Serves `/metrics`, `/proxyMode` and `/healthz` on `listener` forever,
/// and `/debug/*` from `debug` (with who may ask) when given.
pub async fn run_metrics(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    mode: &'static str,
    debug: Option<(Arc<dyn DebugViews>, DebugAccess)>,
) {
    run(listener, "metrics", move |method, uri, peer| {
        if uri.path().starts_with("/debug/") {
            return match &debug {
                Some((views, access)) => debug::respond(&method, uri, peer, views.clone(), *access),
                None => Reply::Now(not_found()),
            };
        }
        Reply::Now(metrics_response(&method, uri.path(), &metrics, mode))
    })
    .await
}

/// A handler's answer: at once, or after work off the accept loop.
pub(crate) enum Reply {
    Now(Response<Full<Bytes>>),
    Later(std::pin::Pin<Box<dyn Future<Output = Response<Full<Bytes>>> + Send>>),
}

/// Accept loop shared by both servers: one task per connection, at most
/// [`MAX_CONNECTIONS`] at once.
async fn run<H>(listener: TcpListener, server: &'static str, handler: H)
where
    H: Fn(Method, &hyper::Uri, SocketAddr) -> Reply + Send + Sync + 'static,
{
    run_with(listener, server, Limits::DEFAULT, handler).await
}

/// Connection limits; only tests use other values than [`Limits::DEFAULT`].
#[derive(Debug, Clone, Copy)]
struct Limits {
    max_connections: usize,
    header_read_timeout: Duration,
    connection_timeout: Duration,
}

impl Limits {
    const DEFAULT: Limits = Limits {
        max_connections: MAX_CONNECTIONS,
        header_read_timeout: HEADER_READ_TIMEOUT,
        connection_timeout: CONNECTION_TIMEOUT,
    };
}

async fn run_with<H>(listener: TcpListener, server: &'static str, limits: Limits, handler: H)
where
    H: Fn(Method, &hyper::Uri, SocketAddr) -> Reply + Send + Sync + 'static,
{
    let handler = Arc::new(handler);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(server, %addr, "serving HTTP");
    }
    loop {
        // Take a slot before accepting so excess clients queue in the backlog
        // instead of costing us a task each. The semaphore is never closed.
        let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(error) => {
                // Usually transient (EMFILE, ECONNABORTED): back off, keep serving.
                tracing::warn!(server, %error, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let handler = Arc::clone(&handler);
        tokio::spawn(async move {
            let _permit = permit;
            let service = service_fn(move |req: Request<Incoming>| {
                let reply = handler(req.method().clone(), req.uri(), peer);
                async move {
                    Ok::<_, Infallible>(match reply {
                        Reply::Now(response) => response,
                        Reply::Later(future) => future.await,
                    })
                }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(limits.connection_timeout, conn).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::debug!(server, %peer, %error, "connection error"),
                Err(_) => tracing::debug!(server, %peer, "connection timed out"),
            }
        });
    }
}

/// Routes a request of the health server.
fn health_response(method: &Method, path: &str, health: &Health) -> Response<Full<Bytes>> {
    let (ok, body) = match path {
        "/healthz" | "/livez" if !readable(method) => return method_not_allowed(),
        "/healthz" => {
            let status = health.status();
            health.answered(Probe::Healthz, status.healthz_ok());
            (status.healthz_ok(), status.healthz_body())
        }
        "/livez" => {
            let status = health.status();
            health.answered(Probe::Livez, status.livez_ok());
            (status.livez_ok(), status.livez_body())
        }
        _ => return not_found(),
    };
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    response(code, "application/json", body)
}

/// Routes a request of the metrics server.
fn metrics_response(
    method: &Method,
    path: &str,
    metrics: &Metrics,
    mode: &'static str,
) -> Response<Full<Bytes>> {
    if !matches!(path, "/metrics" | "/proxyMode" | "/healthz") {
        return not_found();
    }
    if !readable(method) {
        return method_not_allowed();
    }
    match path {
        "/metrics" => response(StatusCode::OK, metrics::CONTENT_TYPE, metrics.render()),
        "/proxyMode" => response(StatusCode::OK, TEXT, mode),
        _ => response(StatusCode::OK, TEXT, "ok"),
    }
}

pub(crate) const TEXT: &str = "text/plain; charset=utf-8";

pub(crate) fn readable(method: &Method) -> bool {
    method == Method::GET || method == Method::HEAD
}

pub(crate) fn not_found() -> Response<Full<Bytes>> {
    response(StatusCode::NOT_FOUND, TEXT, "404 page not found\n")
}

pub(crate) fn method_not_allowed() -> Response<Full<Bytes>> {
    let mut resp = response(StatusCode::METHOD_NOT_ALLOWED, TEXT, "method not allowed\n");
    resp.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
    resp
}

/// Builds a response without the fallible `Response::builder` (all header
/// values are static), so the request path cannot panic. hyper drops the body
/// of HEAD responses itself.
pub(crate) fn response(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    /// Sends one raw HTTP/1.1 request and returns (status code, headers, body).
    async fn request(addr: SocketAddr, method: &str, path: &str) -> (u16, String, String) {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let req = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
        stream.write_all(req.as_bytes()).await.expect("write");
        let mut raw = String::new();
        tokio::time::timeout(Duration::from_secs(2), stream.read_to_string(&mut raw))
            .await
            .expect("response in time")
            .expect("read");
        let (head, body) = raw.split_once("\r\n\r\n").expect("header terminator");
        let code = head
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .expect("status code");
        (code, head.to_ascii_lowercase(), body.to_owned())
    }

    async fn start_health(health: Arc<Health>) -> SocketAddr {
        let listener = bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("local addr");
        tokio::spawn(run_health(listener, health));
        addr
    }

    #[tokio::test]
    async fn health_round_trip() {
        let health = Arc::new(Health::new(DEFAULT_HEALTH_TIMEOUT));
        let addr = start_health(Arc::clone(&health)).await;

        let (code, head, body) = request(addr, "GET", "/healthz").await;
        assert_eq!(code, 503);
        assert!(head.contains("content-type: application/json"));
        assert!(head.contains("x-content-type-options: nosniff"));
        assert!(body.contains(r#""nodeEligible": true"#), "{body}");

        health.updated();
        let (code, _, body) = request(addr, "GET", "/healthz?verbose").await;
        assert_eq!(code, 200);
        let json: serde_json::Value = serde_json::from_str(&body).expect("json body");
        assert_eq!(json["nodeEligible"], true);

        health.set_node_eligible(false);
        assert_eq!(request(addr, "GET", "/healthz").await.0, 503);
        let (code, _, body) = request(addr, "GET", "/livez").await;
        assert_eq!(code, 200);
        assert!(!body.contains("nodeEligible"));

        let (code, head, body) = request(addr, "HEAD", "/livez").await;
        assert_eq!(code, 200);
        assert!(head.contains("content-length"));
        assert!(body.is_empty());

        // kube-proxy's counters of the answers, by code.
        let counted: Vec<(String, String, f64)> = health
            .answer_samples()
            .into_iter()
            .map(|s| (s.name, s.labels[0].1.clone(), s.value))
            .collect();
        let count = |name: &str, code: &str| {
            counted
                .iter()
                .find(|(n, c, _)| n == name && c == code)
                .map(|(_, _, v)| *v)
        };
        assert_eq!(count("kubeproxy_proxy_healthz_total", "200"), Some(1.0));
        assert_eq!(count("kubeproxy_proxy_healthz_total", "503"), Some(2.0));
        assert_eq!(count("kubeproxy_proxy_livez_total", "200"), Some(2.0));
        assert_eq!(count("kubeproxy_proxy_livez_total", "503"), Some(0.0));
    }

    /// The IPv4 wildcard answers over both families, as kube-proxy's
    /// health server does (where the machine has IPv6 loopback).
    #[tokio::test]
    async fn the_ipv4_wildcard_answers_over_ipv6_too() {
        let listener = bind(SocketAddr::from(([0, 0, 0, 0], 0)))
            .await
            .expect("bind");
        let port = listener.local_addr().expect("local addr").port();
        tokio::spawn(run_health(
            listener,
            Arc::new(Health::new(DEFAULT_HEALTH_TIMEOUT)),
        ));
        assert_eq!(
            request(SocketAddr::from(([127, 0, 0, 1], port)), "GET", "/livez")
                .await
                .0,
            200
        );
        if std::net::TcpListener::bind("[::1]:0").is_ok() {
            let v6 = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port));
            assert_eq!(request(v6, "GET", "/livez").await.0, 200);
        }
        // A specific address stays that address only.
        let listener = bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .expect("bind");
        assert!(listener.local_addr().expect("local addr").is_ipv4());
    }

    #[tokio::test]
    async fn unknown_path_and_bad_method() {
        let addr = start_health(Arc::new(Health::new(DEFAULT_HEALTH_TIMEOUT))).await;
        assert_eq!(request(addr, "GET", "/metrics").await.0, 404);
        assert_eq!(request(addr, "GET", "/healthz/extra").await.0, 404);
        let (code, head, _) = request(addr, "POST", "/healthz").await;
        assert_eq!(code, 405);
        assert!(head.contains("allow: get, head"));
        assert_eq!(request(addr, "DELETE", "/livez").await.0, 405);
    }

    #[tokio::test]
    async fn metrics_round_trip() {
        let metrics = Arc::new(Metrics::new());
        metrics.set_table_size(2, 5);
        let listener = bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("local addr");
        tokio::spawn(run_metrics(listener, metrics, "ebpf", None));

        let (code, head, body) = request(addr, "GET", "/metrics").await;
        assert_eq!(code, 200);
        assert!(head.contains("content-type: text/plain; version=0.0.4; charset=utf-8"));
        assert!(body.contains("proxy_agent_frontends 2\n"));
        assert!(body.contains("proxy_agent_backends 5\n"));

        let (code, _, body) = request(addr, "GET", "/proxyMode").await;
        assert_eq!((code, body.as_str()), (200, "ebpf"));
        let (code, _, body) = request(addr, "GET", "/healthz").await;
        assert_eq!((code, body.as_str()), (200, "ok"));
        assert_eq!(request(addr, "GET", "/livez").await.0, 404);
        assert_eq!(request(addr, "PUT", "/metrics").await.0, 405);
    }

    #[tokio::test]
    async fn bind_error_names_the_address() {
        let taken = bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .expect("bind");
        let addr = taken.local_addr().expect("local addr");
        let err = bind(addr).await.expect_err("port already in use");
        assert!(matches!(err, ServeError::Bind { addr: a, .. } if a == addr));
        assert!(err.to_string().contains(&addr.to_string()), "{err}");
        // serve_* surface the same error instead of spawning anything.
        let err = serve_health(addr, Arc::new(Health::new(DEFAULT_HEALTH_TIMEOUT)))
            .await
            .expect_err("port already in use");
        assert!(matches!(err, ServeError::Bind { .. }));
    }

    #[tokio::test]
    async fn slow_clients_are_cut_off_and_do_not_block_others() {
        let listener = bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let limits = Limits {
            max_connections: 1,
            header_read_timeout: Duration::from_millis(100),
            connection_timeout: Duration::from_secs(1),
        };
        let health = Arc::new(Health::new(DEFAULT_HEALTH_TIMEOUT));
        tokio::spawn(run_with(listener, "test", limits, move |method, uri, _| {
            Reply::Now(health_response(&method, uri.path(), &health))
        }));

        // A client that never finishes its headers holds the only slot...
        let mut slow = TcpStream::connect(addr).await.expect("connect");
        slow.write_all(b"GET /healthz HTTP/1.1\r\n")
            .await
            .expect("write");
        // ...until the header timeout closes it; then the next client is served.
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(1), slow.read_to_end(&mut buf))
            .await
            .expect("server closed the slow connection")
            .expect("read");
        assert_eq!(request(addr, "GET", "/healthz").await.0, 503);
    }
}
