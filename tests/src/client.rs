//! The exchanges `pod-client` makes, and the report it prints.
//!
//! Each exchange uses a fresh socket, so the source port changes and the
//! dataplane sees a new flow every time. Every exchange is bounded by the
//! timeout, so a run takes at most about `count / parallel * 2 * timeout`.
//!
//! A server answers one line, `<name> <peer>`: its name and the address it
//! saw the exchange come from (see [`crate::server`]). The report counts
//! answers by name and by that source address, so a scenario can tell
//! which backend answered and whether the client's address survived the
//! way there (source-IP preservation) or was masqueraded.
use std::{
    collections::{BTreeMap, BTreeSet},
    io::{self, Read},
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
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
    /// Answers per source address the server saw (IPv4-mapped IPv6
    /// addresses shown as IPv4). Answers without a source are not counted.
    #[serde(default)]
    pub by_source: BTreeMap<IpAddr, u64>,
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

    /// The source addresses the servers saw, over all answers.
    pub fn sources(&self) -> BTreeSet<IpAddr> {
        self.by_source.keys().copied().collect()
    }

    /// How many answers saw `source` as the client's address.
    pub fn source_count(&self, source: IpAddr) -> u64 {
        self.by_source.get(&source).copied().unwrap_or(0)
    }

    fn record(&mut self, outcome: Result<Answer, ExchangeError>) {
        match outcome {
            Ok(answer) => {
                self.ok += 1;
                *self.by_backend.entry(answer.backend).or_default() += 1;
                if let Some(source) = answer.source {
                    *self.by_source.entry(source.ip()).or_default() += 1;
                }
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
        for (source, n) in other.by_source {
            *self.by_source.entry(source).or_default() += n;
        }
    }
}

/// All `count` exchanges succeeded, every backend in `expected` got a fair
/// share (at least a tenth of the exchanges; a fair coin falls below that
/// with negligible probability at these counts) and no other backend
/// answered.
pub fn check_spread(
    what: &str,
    report: &ClientReport,
    count: u64,
    expected: &BTreeSet<&str>,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        report.ok == count && report.failed == 0,
        "{what}: {} of {count} succeeded: {report:?}",
        report.ok
    );
    anyhow::ensure!(
        report.backends() == *expected,
        "{what}: answered by {:?}, expected exactly {expected:?}: {report:?}",
        report.backends()
    );
    for backend in expected {
        anyhow::ensure!(
            report.count(backend) >= count / 10,
            "{what}: {backend} got only {} of {count}: {report:?}",
            report.count(backend)
        );
    }
    Ok(())
}

/// One server answer: who answered, and where it saw the exchange come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub backend: String,
    /// `None` if the server did not say (an answer of only a name).
    pub source: Option<SocketAddr>,
}

impl Answer {
    /// Parses `<name>` or `<name> <addr>:<port>` (one line, trailing newline
    /// optional).
    pub fn parse(answer: &[u8]) -> Option<Answer> {
        let text = std::str::from_utf8(answer).ok()?.trim();
        if text.is_empty() || text.contains('\n') {
            return None;
        }
        if let Some((name, source)) = text.rsplit_once(' ')
            && let Ok(source) = source.parse::<SocketAddr>()
        {
            return Some(Answer {
                backend: name.trim_end().to_string(),
                source: Some(source),
            });
        }
        Some(Answer {
            backend: text.to_string(),
            source: None,
        })
    }

    /// The line a server writes: `<name> <source>\n`, with an IPv4-mapped
    /// source shown as IPv4.
    pub fn line(backend: &str, source: SocketAddr) -> String {
        format!("{backend} {}\n", unmap(source))
    }
}

/// `source` with an IPv4-mapped IPv6 address (a dual-stack socket's view of
/// an IPv4 peer) turned into IPv4.
pub fn unmap(source: SocketAddr) -> SocketAddr {
    match source.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), source.port()),
            None => source,
        },
        IpAddr::V4(_) => source,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
    /// One-to-one style SCTP (see [`sctp_skip_reason`]).
    Sctp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}

/// Why SCTP sockets cannot be made on this machine (no `sctp` kernel module,
/// or a kernel without SCTP), or `None` when they can. The module is global,
/// so the answer holds in every network namespace.
pub fn sctp_skip_reason() -> Option<String> {
    match sctp_socket(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)) {
        Ok(_) => None,
        Err(error) => Some(format!(
            "cannot create SCTP sockets ({error}): the kernel lacks SCTP or \
             the sctp module is not loaded (`modprobe sctp`)"
        )),
    }
}

/// A new blocking one-to-one style SCTP socket (`SOCK_STREAM`,
/// `IPPROTO_SCTP`) of `family`'s address family.
pub fn sctp_socket(family: IpAddr) -> io::Result<OwnedFd> {
    let domain = if family.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: socket has no memory-safety preconditions.
    let fd = unsafe {
        libc::socket(
            domain,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            libc::IPPROTO_SCTP,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a socket we own and nothing else refers to.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `addr` as a sockaddr for bind/connect.
pub(crate) fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than, and aligned for,
            // sockaddr_in.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: v6.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: v6.scope_id(),
            };
            // SAFETY: as above, for sockaddr_in6.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// Connects a new SCTP socket to `target` within `timeout` (non-blocking
/// connect, then poll). The socket is handed back as a `TcpStream`: std's
/// stream only makes generic socket calls (read, write, shutdown,
/// SO_RCVTIMEO), which mean the same on a one-to-one SCTP socket.
fn sctp_connect(target: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let fd = sctp_socket(target.ip())?;
    let raw = fd.as_raw_fd();
    set_nonblocking(raw, true)?;
    let (addr, len) = sockaddr(target);
    // SAFETY: addr/len describe a valid sockaddr for the duration of the call.
    let rc = unsafe { libc::connect(raw, (&addr as *const libc::sockaddr_storage).cast(), len) };
    if rc != 0 {
        let error = io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(error);
        }
        let mut pollfd = libc::pollfd {
            fd: raw,
            events: libc::POLLOUT,
            revents: 0,
        };
        let millis = timeout.as_millis().clamp(1, i32::MAX as u128) as i32;
        let deadline = Instant::now() + timeout;
        loop {
            // SAFETY: pollfd is valid for the duration of the call.
            let n = unsafe { libc::poll(&mut pollfd, 1, millis) };
            if n > 0 {
                break;
            }
            if n == 0 || Instant::now() >= deadline {
                return Err(io::Error::from(io::ErrorKind::TimedOut));
            }
            let error = io::Error::last_os_error();
            if error.kind() != io::ErrorKind::Interrupted {
                return Err(error);
            }
        }
        let mut so_error: libc::c_int = 0;
        let mut so_len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: so_error/so_len are valid for the duration of the call.
        let rc = unsafe {
            libc::getsockopt(
                raw,
                libc::SOL_SOCKET,
                libc::SO_ERROR,
                (&mut so_error as *mut libc::c_int).cast(),
                &mut so_len,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        if so_error != 0 {
            return Err(io::Error::from_raw_os_error(so_error));
        }
    }
    set_nonblocking(raw, false)?;
    Ok(TcpStream::from(fd))
}

fn set_nonblocking(fd: libc::c_int, on: bool) -> io::Result<()> {
    // SAFETY: fcntl on an fd we own, no pointers involved.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    let flags = if on {
        flags | libc::O_NONBLOCK
    } else {
        flags & !libc::O_NONBLOCK
    };
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
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

fn exchange(options: &ClientOptions) -> Result<Answer, ExchangeError> {
    match options.protocol {
        Protocol::Tcp => {
            let stream = TcpStream::connect_timeout(&options.target, options.timeout)
                .map_err(|e| ExchangeError::io("connect", &e))?;
            // The socket's peer is the address it connected to, whatever
            // translated the connection (socket-level load balancing
            // answers getpeername() with the frontend).
            match stream.peer_addr() {
                Ok(peer) if peer == options.target => {}
                Ok(peer) => return Err(ExchangeError::new("getpeername", peer.to_string())),
                Err(e) => return Err(ExchangeError::io("getpeername", &e)),
            }
            stream_exchange(stream, options.timeout)
        }
        Protocol::Sctp => {
            let stream = sctp_connect(options.target, options.timeout)
                .map_err(|e| ExchangeError::io("connect", &e))?;
            stream_exchange(stream, options.timeout)
        }
        Protocol::Udp => udp_exchange(options.target, options.timeout),
    }
}

/// The longest answer we accept; servers send one short line.
const MAX_ANSWER: usize = 256;

/// Reads the answer from a connected TCP (or SCTP) stream.
fn stream_exchange(mut stream: TcpStream, timeout: Duration) -> Result<Answer, ExchangeError> {
    let deadline = Instant::now() + timeout;
    let mut answer = Vec::new();
    let mut buf = [0u8; MAX_ANSWER];
    // The server writes one line and waits for us to close first (see
    // `server::answer_stream`): read until the line is whole, EOF, or the
    // deadline, then close.
    while !answer.ends_with(b"\n") {
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

fn udp_exchange(target: SocketAddr, timeout: Duration) -> Result<Answer, ExchangeError> {
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

fn parse_answer(answer: &[u8]) -> Result<Answer, ExchangeError> {
    let text = String::from_utf8_lossy(answer);
    if text.trim().is_empty() {
        return Err(ExchangeError::new("read", "empty answer"));
    }
    if text.trim().contains('\n') {
        return Err(ExchangeError::new("read", "more than one line"));
    }
    Answer::parse(answer).ok_or_else(|| ExchangeError::new("read", "not UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_round_trips_through_json() {
        let mut report = ClientReport::default();
        report.record(Ok(Answer::parse(b"pod-a 198.18.0.2:40000\n").unwrap()));
        report.record(Ok(Answer::parse(b"pod-a [2001:2::2]:40001").unwrap()));
        report.record(Ok(Answer::parse(b"pod-b").unwrap()));
        report.record(Err(ExchangeError::new("connect", "timeout")));
        let json = serde_json::to_string(&report).unwrap();
        assert_eq!(
            json,
            r#"{"ok":3,"failed":1,"by_backend":{"pod-a":2,"pod-b":1},"errors":{"connect: timeout":1},"by_source":{"198.18.0.2":1,"2001:2::2":1}}"#
        );
        assert_eq!(serde_json::from_str::<ClientReport>(&json).unwrap(), report);
        assert_eq!(
            report.sources(),
            BTreeSet::from(["198.18.0.2".parse().unwrap(), "2001:2::2".parse().unwrap()])
        );
        // Reports of before the source field still parse.
        let old: ClientReport =
            serde_json::from_str(r#"{"ok":1,"failed":0,"by_backend":{"x":1},"errors":{}}"#)
                .unwrap();
        assert_eq!(old.count("x"), 1);
        assert!(old.sources().is_empty());
    }

    #[test]
    fn answers_parse_with_and_without_source() {
        let mapped: SocketAddr = "[::ffff:198.18.0.2]:5".parse().unwrap();
        assert_eq!(Answer::line("pod-0", mapped), "pod-0 198.18.0.2:5\n");
        assert_eq!(
            Answer::parse(Answer::line("node-vip", mapped).as_bytes()),
            Some(Answer {
                backend: "node-vip".into(),
                source: Some("198.18.0.2:5".parse().unwrap()),
            })
        );
        assert_eq!(
            Answer::parse(b"a name with spaces\n").unwrap().backend,
            "a name with spaces"
        );
        assert_eq!(Answer::parse(b" \n"), None);
        assert_eq!(Answer::parse(b"a\nb"), None);
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
