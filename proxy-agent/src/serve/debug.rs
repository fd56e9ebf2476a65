//! `/debug/services` and `/debug/trace?from=IP[:PORT]&to=IP:PORT[/PROTO]`
//! on the metrics server: the JSON of `proxy-agent list` and `trace`,
//! answered by the agent, which knows the desired table. What answers
//! them is behind [`DebugViews`]; reading the kernel takes a while at tens
//! of thousands of frontends, so it runs on a blocking thread, one request
//! at a time.
use std::{net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Response, StatusCode, Uri};

use super::{Reply, TEXT, method_not_allowed, not_found, readable, response};

/// Who may ask the debug endpoints (`--debug-endpoints`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum DebugAccess {
    /// Clients on loopback only: the views name every Service and
    /// endpoint of the node, which a metrics scraper need not see.
    #[default]
    Loopback,
    /// Every client that reaches the metrics address.
    Any,
    /// Not served.
    Off,
}

/// A debug request that could not be answered.
#[derive(Debug)]
pub enum DebugError {
    /// The request is wrong (400), with why.
    BadRequest(String),
    /// Reading failed (500), with why.
    Failed(String),
}

/// What answers the debug endpoints: JSON bodies.
pub trait DebugViews: Send + Sync + 'static {
    /// `/debug/services`.
    fn services(&self) -> Result<String, DebugError>;
    /// `/debug/trace` with the request's query string.
    fn trace(&self, query: &str) -> Result<String, DebugError>;
}

/// One request at a time: each reads the whole kernel state.
static BUSY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub(super) fn respond(
    method: &Method,
    uri: &Uri,
    peer: SocketAddr,
    views: Arc<dyn DebugViews>,
    access: DebugAccess,
) -> Reply {
    let path = uri.path();
    if !matches!(path, "/debug/services" | "/debug/trace") || access == DebugAccess::Off {
        return Reply::Now(not_found());
    }
    if !readable(method) {
        return Reply::Now(method_not_allowed());
    }
    // A dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d.
    let loopback = match peer.ip() {
        std::net::IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(v6.is_loopback(), |v4| v4.is_loopback()),
        ip => ip.is_loopback(),
    };
    if access == DebugAccess::Loopback && !loopback {
        return Reply::Now(response(
            StatusCode::FORBIDDEN,
            TEXT,
            "the debug endpoints answer clients on loopback only (--debug-endpoints=any allows \
             others)\n",
        ));
    }
    let trace = path == "/debug/trace";
    let query = uri.query().unwrap_or("").to_string();
    Reply::Later(Box::pin(async move {
        let _one = BUSY.lock().await;
        let answer = tokio::task::spawn_blocking(move || {
            if trace {
                views.trace(&query)
            } else {
                views.services()
            }
        })
        .await
        .unwrap_or_else(|e| Err(DebugError::Failed(format!("the reader panicked: {e}"))));
        json_or_error(answer)
    }))
}

fn json_or_error(answer: Result<String, DebugError>) -> Response<Full<Bytes>> {
    match answer {
        Ok(body) => response(StatusCode::OK, "application/json", body),
        Err(DebugError::BadRequest(why)) => {
            response(StatusCode::BAD_REQUEST, TEXT, format!("{why}\n"))
        }
        Err(DebugError::Failed(why)) => {
            response(StatusCode::INTERNAL_SERVER_ERROR, TEXT, format!("{why}\n"))
        }
    }
}

/// The value of `name` in a query string, percent-decoded.
pub fn query_value(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == name).then(|| percent_decode(v))
    })
}

/// Percent-encodes what a query value cannot hold as is ([`query_value`]
/// decodes it).
pub fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::{Metrics, bind, run_metrics};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct Fixed;
    impl DebugViews for Fixed {
        fn services(&self) -> Result<String, DebugError> {
            Ok("{\"frontends\":[]}".into())
        }
        fn trace(&self, query: &str) -> Result<String, DebugError> {
            match query_value(query, "to") {
                Some(to) => Ok(format!("{{\"to\":\"{to}\"}}")),
                None => Err(DebugError::BadRequest("to= is missing".into())),
            }
        }
    }

    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
        stream.write_all(req.as_bytes()).await.unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).await.unwrap();
        let code = text[9..12].parse().unwrap();
        let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
        (code, body)
    }

    async fn start(access: DebugAccess) -> SocketAddr {
        let listener = bind(SocketAddr::from(([127, 0, 0, 1], 0))).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let views: Arc<dyn DebugViews> = Arc::new(Fixed);
        tokio::spawn(run_metrics(
            listener,
            Arc::new(Metrics::new()),
            "ebpf",
            Some((views, access)),
        ));
        addr
    }

    #[tokio::test]
    async fn the_views_answer_json_and_say_what_is_wrong_with_a_request() {
        let addr = start(DebugAccess::Loopback).await;
        assert_eq!(
            get(addr, "/debug/services").await,
            (200, "{\"frontends\":[]}".into())
        );
        let (code, body) = get(addr, "/debug/trace?from=10.1.0.1&to=10.96.0.1%3A80%2FTCP").await;
        assert_eq!(
            (code, body.as_str()),
            (200, "{\"to\":\"10.96.0.1:80/TCP\"}")
        );
        assert_eq!(get(addr, "/debug/trace?from=x").await.0, 400);
        assert_eq!(get(addr, "/debug/other").await.0, 404);
        assert_eq!(get(addr, "/metrics").await.0, 200);
        let off = start(DebugAccess::Off).await;
        assert_eq!(get(off, "/debug/services").await.0, 404);
    }

    #[test]
    fn query_values_are_percent_decoded() {
        assert_eq!(
            query_value("a=1&to=%5Bfd00%3A%3A1%5D%3A80", "to").as_deref(),
            Some("[fd00::1]:80")
        );
        assert_eq!(query_value("a=1", "to"), None);
        assert_eq!(query_value("to=50%", "to").as_deref(), Some("50%"));
        let to = "[fd00::1]:80/UDP";
        let query = format!("to={}", percent_encode(to));
        assert_eq!(query_value(&query, "to").as_deref(), Some(to));
    }
}
