//! What `pod-server` does: answer every TCP connection, SCTP association and
//! UDP datagram with one line, `<name> <peer>` (e.g. `pod-0
//! 198.18.0.2:40312`): its name, so a client can tell which backend it
//! reached, and the address the exchange came from as the server saw it, so
//! a scenario can tell whether the client's address was preserved or
//! masqueraded. Bound to `::`, it serves IPv4 and IPv6 on one socket per
//! protocol (IPv4 peers are reported as IPv4, not IPv4-mapped).
use std::{
    io::{self, Read, Write},
    net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::Context;

use crate::client::{Answer, sctp_socket, sockaddr};

/// How long a TCP connection may keep sending after we answered; bounds the
/// per-connection thread.
const DRAIN_TIMEOUT: Duration = Duration::from_millis(500);

/// Which ports a pod server serves; `Some(0)` picks a free port.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServerPorts {
    pub tcp: Option<u16>,
    pub udp: Option<u16>,
    /// One-to-one style SCTP; binding fails where SCTP is unavailable (see
    /// [`crate::client::sctp_skip_reason`]).
    pub sctp: Option<u16>,
    /// TCP sessions: every line the client sends is answered with the
    /// answer line, and the connection stays open until the client closes
    /// it (for scenarios about long-lived flows).
    pub session: Option<u16>,
}

/// A bound pod server, not yet serving.
pub struct PodServer {
    name: String,
    tcp: Option<TcpListener>,
    udp: Option<UdpSocket>,
    /// An SCTP listener, held as a `TcpListener`: accept and the streams it
    /// yields only use generic socket calls (see `client::sctp_connect`).
    sctp: Option<TcpListener>,
    session: Option<TcpListener>,
}

impl PodServer {
    /// Binds the requested TCP and UDP ports on `bind` (port 0 picks a free
    /// port).
    pub fn bind(
        name: &str,
        bind: IpAddr,
        tcp_port: Option<u16>,
        udp_port: Option<u16>,
    ) -> anyhow::Result<Self> {
        Self::bind_ports(
            name,
            bind,
            ServerPorts {
                tcp: tcp_port,
                udp: udp_port,
                ..ServerPorts::default()
            },
        )
    }

    /// Binds the requested ports on `bind`. `::` serves both IPv4 and IPv6
    /// (IPV6_V6ONLY off, whatever the namespace's default).
    pub fn bind_ports(name: &str, bind: IpAddr, ports: ServerPorts) -> anyhow::Result<Self> {
        anyhow::ensure!(
            ports.tcp.is_some()
                || ports.udp.is_some()
                || ports.sctp.is_some()
                || ports.session.is_some(),
            "nothing to serve: give --tcp, --udp, --sctp and/or --session"
        );
        let tcp = ports
            .tcp
            .map(|port| {
                let addr = SocketAddr::new(bind, port);
                stream_listener(addr, libc::IPPROTO_TCP)
                    .with_context(|| format!("binding TCP {addr}"))
            })
            .transpose()?;
        let udp = ports
            .udp
            .map(|port| {
                let addr = SocketAddr::new(bind, port);
                udp_socket(addr).with_context(|| format!("binding UDP {addr}"))
            })
            .transpose()?;
        let sctp = ports
            .sctp
            .map(|port| {
                let addr = SocketAddr::new(bind, port);
                stream_listener(addr, libc::IPPROTO_SCTP)
                    .with_context(|| format!("binding SCTP {addr}"))
            })
            .transpose()?;
        let session = ports
            .session
            .map(|port| {
                let addr = SocketAddr::new(bind, port);
                stream_listener(addr, libc::IPPROTO_TCP)
                    .with_context(|| format!("binding TCP session {addr}"))
            })
            .transpose()?;
        Ok(PodServer {
            name: name.to_string(),
            tcp,
            udp,
            sctp,
            session,
        })
    }

    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn udp_addr(&self) -> Option<SocketAddr> {
        self.udp.as_ref().and_then(|s| s.local_addr().ok())
    }

    pub fn sctp_addr(&self) -> Option<SocketAddr> {
        self.sctp.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn session_addr(&self) -> Option<SocketAddr> {
        self.session.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Starts serving on background threads, which run for the life of the
    /// process.
    pub fn spawn(self) -> Vec<JoinHandle<()>> {
        let mut threads = Vec::new();
        for listener in [self.tcp, self.sctp].into_iter().flatten() {
            let name = self.name.clone();
            threads.push(std::thread::spawn(move || serve_stream(listener, name)));
        }
        if let Some(socket) = self.udp {
            let name = self.name.clone();
            threads.push(std::thread::spawn(move || serve_udp(socket, name)));
        }
        if let Some(listener) = self.session {
            let name = self.name.clone();
            threads.push(std::thread::spawn(move || serve_sessions(listener, name)));
        }
        threads
    }

    /// Serves until the process is killed.
    pub fn run(self) -> anyhow::Result<()> {
        for thread in self.spawn() {
            thread
                .join()
                .map_err(|_| anyhow::anyhow!("a server thread panicked"))?;
        }
        Ok(())
    }
}

/// A socket of `addr`'s family, of type `ty` and protocol `protocol`, bound
/// to `addr`; dual-stack if `addr` is `::`.
fn bound_socket(addr: SocketAddr, ty: libc::c_int, protocol: libc::c_int) -> io::Result<OwnedFd> {
    let fd = if protocol == libc::IPPROTO_SCTP {
        sctp_socket(addr.ip())?
    } else {
        let domain = if addr.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        };
        // SAFETY: socket has no memory-safety preconditions.
        let fd = unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, protocol) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a new socket that nothing else refers to.
        unsafe { OwnedFd::from_raw_fd(fd) }
    };
    let raw = fd.as_raw_fd();
    if ty == libc::SOCK_STREAM {
        // As std does for listeners: a restarted server may rebind at once.
        set_int_option(raw, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    }
    if let IpAddr::V6(ip) = addr.ip()
        && ip.is_unspecified()
    {
        set_int_option(raw, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 0)?;
    }
    let (storage, len) = sockaddr(addr);
    // SAFETY: storage/len describe a valid sockaddr for the call.
    if unsafe { libc::bind(raw, (&storage as *const libc::sockaddr_storage).cast(), len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

fn set_int_option(
    fd: libc::c_int,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: value outlives the call and its size is passed.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A listening TCP or (one-to-one) SCTP socket on `addr`.
fn stream_listener(addr: SocketAddr, protocol: libc::c_int) -> io::Result<TcpListener> {
    let fd = bound_socket(addr, libc::SOCK_STREAM, protocol)?;
    // SAFETY: listen on a bound socket we own.
    if unsafe { libc::listen(fd.as_raw_fd(), 1024) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(TcpListener::from(fd))
}

fn udp_socket(addr: SocketAddr) -> io::Result<UdpSocket> {
    Ok(UdpSocket::from(bound_socket(
        addr,
        libc::SOCK_DGRAM,
        libc::IPPROTO_UDP,
    )?))
}

fn serve_stream(listener: TcpListener, name: String) {
    loop {
        match listener.accept() {
            Ok((stream, peer)) => {
                let answer = Answer::line(&name, peer);
                std::thread::spawn(move || answer_stream(stream, answer.as_bytes()));
            }
            Err(error) => {
                // E.g. a connection reset before accept, or out of fds: keep serving.
                eprintln!("pod-server: accept: {error}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// Writes the answer, then waits for the client to close first (draining
/// what it sends, so that closing does not turn into a reset), for at most
/// [`DRAIN_TIMEOUT`]. The client closing first keeps the TIME_WAIT on its
/// side: a later connection of the client from the same port, to another
/// address that leads here too (the VIP, then the pod itself), does not
/// run into a TIME_WAIT of ours that its unrelated sequence numbers would
/// fail (a one-second SYN retransmit). Clients that wait for our end of
/// stream instead get it after the timeout.
fn answer_stream(mut stream: TcpStream, answer: &[u8]) {
    // Errors mean the client went away (or reset); nothing to do about it.
    if stream.write_all(answer).is_err() {
        return;
    }
    drain_until_closed(&mut stream);
    let _ = stream.shutdown(Shutdown::Write);
}

fn drain_until_closed(stream: &mut TcpStream) {
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    let mut buf = [0u8; 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// How long a session may stay silent before the server gives up on it;
/// bounds the per-session thread.
const SESSION_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

fn serve_sessions(listener: TcpListener, name: String) {
    loop {
        match listener.accept() {
            Ok((stream, peer)) => {
                let answer = Answer::line(&name, peer);
                std::thread::spawn(move || answer_session(stream, answer.as_bytes()));
            }
            Err(error) => {
                eprintln!("pod-server: accept (session): {error}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// Answers each newline the client sends, until it closes or stays silent
/// for [`SESSION_IDLE_TIMEOUT`].
fn answer_session(mut stream: TcpStream, answer: &[u8]) {
    if stream.set_read_timeout(Some(SESSION_IDLE_TIMEOUT)).is_err() {
        return;
    }
    let mut buf = [0u8; 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                for _ in buf[..n].iter().filter(|&&b| b == b'\n') {
                    if stream.write_all(answer).is_err() {
                        return;
                    }
                }
            }
        }
    }
}

fn serve_udp(socket: UdpSocket, name: String) {
    let mut buf = [0u8; 2048];
    loop {
        match socket.recv_from(&mut buf) {
            Ok((_, from)) => {
                let answer = Answer::line(&name, from);
                if let Err(error) = socket.send_to(answer.as_bytes(), from) {
                    eprintln!("pod-server: reply to {from}: {error}");
                }
            }
            Err(error) => {
                eprintln!("pod-server: recv: {error}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{ClientOptions, Protocol, run};

    #[test]
    fn answers_tcp_and_udp_with_its_name_on_loopback() {
        let server =
            PodServer::bind("pod-x", "127.0.0.1".parse().unwrap(), Some(0), Some(0)).unwrap();
        let tcp = server.tcp_addr().unwrap();
        let udp = server.udp_addr().unwrap();
        server.spawn();
        for (protocol, target) in [(Protocol::Tcp, tcp), (Protocol::Udp, udp)] {
            let report = run(&ClientOptions {
                protocol,
                target,
                count: 20,
                timeout: Duration::from_secs(2),
                parallel: 4,
            });
            assert_eq!(report.ok, 20, "{protocol}: {report:?}");
            assert_eq!(report.count("pod-x"), 20);
        }
    }

    #[test]
    fn dual_stack_server_reports_each_peer_in_its_own_family() {
        let server = PodServer::bind("pod-z", "::".parse().unwrap(), Some(0), Some(0)).unwrap();
        let (tcp, udp) = (server.tcp_addr().unwrap(), server.udp_addr().unwrap());
        server.spawn();
        for loopback in ["127.0.0.1", "::1"] {
            let loopback: IpAddr = loopback.parse().unwrap();
            for (protocol, port) in [(Protocol::Tcp, tcp.port()), (Protocol::Udp, udp.port())] {
                let report = run(&ClientOptions {
                    protocol,
                    target: SocketAddr::new(loopback, port),
                    count: 4,
                    timeout: Duration::from_secs(2),
                    parallel: 2,
                });
                assert_eq!(
                    report.count("pod-z"),
                    4,
                    "{protocol} {loopback}: {report:?}"
                );
                assert_eq!(report.source_count(loopback), 4, "{report:?}");
                assert_eq!(report.sources().len(), 1, "{report:?}");
            }
        }
    }

    #[test]
    fn answers_sctp_where_available() {
        if let Some(reason) = crate::client::sctp_skip_reason() {
            eprintln!("answers_sctp_where_available: skipped: {reason}");
            return;
        }
        let ports = ServerPorts {
            sctp: Some(0),
            ..ServerPorts::default()
        };
        let server = PodServer::bind_ports("pod-s", "::".parse().unwrap(), ports).unwrap();
        let sctp = server.sctp_addr().unwrap();
        server.spawn();
        for loopback in ["127.0.0.1", "::1"] {
            let loopback: IpAddr = loopback.parse().unwrap();
            let report = run(&ClientOptions {
                protocol: Protocol::Sctp,
                target: SocketAddr::new(loopback, sctp.port()),
                count: 3,
                timeout: Duration::from_secs(2),
                parallel: 1,
            });
            assert_eq!(report.count("pod-s"), 3, "{loopback}: {report:?}");
            assert_eq!(report.source_count(loopback), 3, "{report:?}");
        }
    }

    #[test]
    fn survives_clients_that_reset() {
        let server = PodServer::bind("pod-y", "127.0.0.1".parse().unwrap(), Some(0), None).unwrap();
        let tcp = server.tcp_addr().unwrap();
        server.spawn();
        for _ in 0..5 {
            let stream = TcpStream::connect(tcp).unwrap();
            // Linger 0 makes close send a reset.
            let fd = std::os::fd::AsRawFd::as_raw_fd(&stream);
            let linger = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            // SAFETY: fd is a valid socket for the duration of the call and
            // `linger` outlives it.
            unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    (&linger as *const libc::linger).cast(),
                    std::mem::size_of::<libc::linger>() as libc::socklen_t,
                );
            }
            drop(stream);
        }
        let report = run(&ClientOptions {
            protocol: Protocol::Tcp,
            target: tcp,
            count: 3,
            timeout: Duration::from_secs(2),
            parallel: 1,
        });
        assert_eq!(report.count("pod-y"), 3, "{report:?}");
    }
}
