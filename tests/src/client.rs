//! The exchanges `pod-client` makes, and the report it prints.
//!
//! Each exchange uses a fresh socket, so the source port changes and the
//! dataplane sees a new flow every time. Every exchange is bounded by the
//! timeout, so a run takes at most about `count / parallel * 2 * timeout`.
use std::{
    collections::{BTreeMap, BTreeSet},
    io::{self, Read},
    net::{SocketAddr, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

/// What `pod-client` prints: how many exchanges succeeded, which backend
/// answered each, and why the others failed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientReport {
    pub ok: u64,
    pub failed: u64,
    /// Answers per backend name (the line the server wrote).
    pub by_backend: BTreeMap<String, u64>,
    /// Failures per reason, e.g. `"connect: ConnectionRefused"`.
    pub errors: BTreeMap<String, u64>,
}

impl ClientReport {
    /// How many exchanges `backend` answered.
    pub fn count(&self, backend: &str) -> u64 {
        self.by_backend.get(backend).copied().unwrap_or(0)
    }

    /// The names of the backends that answered at least once.
    pub fn backends(&self) -> BTreeSet<&str> {
        self.by_backend.keys().map(String::as_str).collect()
    }

    fn record(&mut self, outcome: Result<String, ExchangeError>) {
        match outcome {
            Ok(name) => {
                self.ok += 1;
                *self.by_backend.entry(name).or_default() += 1;
            }
            Err(error) => {
                self.failed += 1;
                *self.errors.entry(error.to_string()).or_default() += 1;
            }
        }
    }

    fn merge(&mut self, other: ClientReport) {
        self.ok += other.ok;
        self.failed += other.failed;
        for (name, n) in other.by_backend {
            *self.by_backend.entry(name).or_default() += n;
        }
        for (reason, n) in other.errors {
            *self.errors.entry(reason).or_default() += n;
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One run of exchanges against one address.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    pub protocol: Protocol,
    pub target: SocketAddr,
    pub count: u64,
    /// Bound on connecting and on waiting for the answer, each.
    pub timeout: Duration,
    /// Threads sharing the exchanges.
    pub parallel: usize,
}

/// Makes `options.count` exchanges and reports how they went.
pub fn run(options: &ClientOptions) -> ClientReport {
    let parallel = options.parallel.clamp(1, 64) as u64;
    let threads: Vec<_> = (0..parallel)
        .map(|k| {
            // Spread the remainder over the first threads.
            let share = options.count / parallel + u64::from(k < options.count % parallel);
            let options = options.clone();
            std::thread::spawn(move || {
                let mut report = ClientReport::default();
                for _ in 0..share {
                    report.record(exchange(&options));
                }
                report
            })
        })
        .collect();
    let mut total = ClientReport::default();
    for thread in threads {
        match thread.join() {
            Ok(report) => total.merge(report),
            Err(_) => total.record(Err(ExchangeError::new("thread", "panicked"))),
        }
    }
    total
}

/// Why one exchange failed: the step and what went wrong.
#[derive(Debug)]
struct ExchangeError {
    step: &'static str,
    reason: String,
}

impl ExchangeError {
    fn new(step: &'static str, reason: impl Into<String>) -> Self {
        ExchangeError {
            step,
            reason: reason.into(),
        }
    }

    fn io(step: &'static str, error: &io::Error) -> Self {
        let reason = match error.kind() {
            // A socket read timeout shows up as WouldBlock on Linux.
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => "timeout".to_string(),
            kind => format!("{kind:?}"),
        };
        ExchangeError::new(step, reason)
    }
}

impl std::fmt::Display for ExchangeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.step, self.reason)
    }
}

fn exchange(options: &ClientOptions) -> Result<String, ExchangeError> {
    match options.protocol {
        Protocol::Tcp => tcp_exchange(options.target, options.timeout),
        Protocol::Udp => udp_exchange(options.target, options.timeout),
    }
}

/// The longest answer we accept; servers send one short line.
const MAX_ANSWER: usize = 256;

fn tcp_exchange(target: SocketAddr, timeout: Duration) -> Result<String, ExchangeError> {
    let mut stream = TcpStream::connect_timeout(&target, timeout)
        .map_err(|e| ExchangeError::io("connect", &e))?;
    let deadline = Instant::now() + timeout;
    let mut answer = Vec::new();
    let mut buf = [0u8; MAX_ANSWER];
    // The server writes its name and closes; read until EOF or the deadline.
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ExchangeError::new("read", "timeout"));
        }
        stream
            .set_read_timeout(Some(left))
            .map_err(|e| ExchangeError::io("read", &e))?;
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                answer.extend_from_slice(&buf[..n]);
                if answer.len() > MAX_ANSWER {
                    return Err(ExchangeError::new("read", "answer too long"));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // A reset after the full line still counts: the server answered.
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset && answer.ends_with(b"\n") => {
                break;
            }
            Err(e) => return Err(ExchangeError::io("read", &e)),
        }
    }
    parse_answer(&answer)
}

fn udp_exchange(target: SocketAddr, timeout: Duration) -> Result<String, ExchangeError> {
    let bind: SocketAddr = if target.is_ipv4() {
        "0.0.0.0:0".parse().expect("valid address")
    } else {
        "[::]:0".parse().expect("valid address")
    };
    let socket = UdpSocket::bind(bind).map_err(|e| ExchangeError::io("bind", &e))?;
    socket
        .send_to(b"hello\n", target)
        .map_err(|e| ExchangeError::io("send", &e))?;
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; MAX_ANSWER + 1];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ExchangeError::new("recv", "timeout"));
        }
        socket
            .set_read_timeout(Some(left))
            .map_err(|e| ExchangeError::io("recv", &e))?;
        match socket.recv_from(&mut buf) {
            // The reply must come from the address we sent to: through a
            // service VIP that is what proves the reverse NAT.
            Ok((_, from)) if from != target => {
                return Err(ExchangeError::new("recv", format!("reply from {from}")));
            }
            Ok((n, _)) => return parse_answer(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ExchangeError::io("recv", &e)),
        }
    }
}

fn parse_answer(answer: &[u8]) -> Result<String, ExchangeError> {
    let text = String::from_utf8_lossy(answer);
    let name = text.trim();
    if name.is_empty() {
        return Err(ExchangeError::new("read", "empty answer"));
    }
    if name.contains('\n') {
        return Err(ExchangeError::new("read", "more than one line"));
    }
    Ok(name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_round_trips_through_json() {
        let mut report = ClientReport::default();
        report.record(Ok("pod-a".into()));
        report.record(Ok("pod-a".into()));
        report.record(Err(ExchangeError::new("connect", "timeout")));
        let json = serde_json::to_string(&report).unwrap();
        assert_eq!(
            json,
            r#"{"ok":2,"failed":1,"by_backend":{"pod-a":2},"errors":{"connect: timeout":1}}"#
        );
        assert_eq!(serde_json::from_str::<ClientReport>(&json).unwrap(), report);
    }

    #[test]
    fn count_is_split_exactly_over_threads() {
        // Nothing listens on this port of loopback, so every exchange fails fast.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let target = closed.local_addr().unwrap();
        drop(closed);
        let report = run(&ClientOptions {
            protocol: Protocol::Tcp,
            target,
            count: 7,
            timeout: Duration::from_millis(200),
            parallel: 3,
        });
        assert_eq!(report.ok + report.failed, 7);
        assert_eq!(report.errors.get("connect: ConnectionRefused"), Some(&7));
    }
}
