//! What `pod-server` does: answer every TCP connection and every UDP datagram
//! with its name, so a client can tell which backend it reached.
use std::{
    io::{Read, Write},
    net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::Context;

/// How long a TCP connection may keep sending after we answered; bounds the
/// per-connection thread.
const DRAIN_TIMEOUT: Duration = Duration::from_millis(500);

/// A bound pod server, not yet serving.
pub struct PodServer {
    name: String,
    tcp: Option<TcpListener>,
    udp: Option<UdpSocket>,
}

impl PodServer {
    /// Binds the requested ports on `bind` (port 0 picks a free port).
    pub fn bind(
        name: &str,
        bind: IpAddr,
        tcp_port: Option<u16>,
        udp_port: Option<u16>,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(
            tcp_port.is_some() || udp_port.is_some(),
            "nothing to serve: give --tcp and/or --udp"
        );
        let tcp = tcp_port
            .map(|port| {
                TcpListener::bind(SocketAddr::new(bind, port))
                    .with_context(|| format!("binding TCP {bind}:{port}"))
            })
            .transpose()?;
        let udp = udp_port
            .map(|port| {
                UdpSocket::bind(SocketAddr::new(bind, port))
                    .with_context(|| format!("binding UDP {bind}:{port}"))
            })
            .transpose()?;
        Ok(PodServer {
            name: name.to_string(),
            tcp,
            udp,
        })
    }

    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn udp_addr(&self) -> Option<SocketAddr> {
        self.udp.as_ref().and_then(|s| s.local_addr().ok())
    }

    /// Starts serving on background threads, which run for the life of the
    /// process.
    pub fn spawn(self) -> Vec<JoinHandle<()>> {
        let answer = format!("{}\n", self.name).into_bytes();
        let mut threads = Vec::new();
        if let Some(listener) = self.tcp {
            let answer = answer.clone();
            threads.push(std::thread::spawn(move || serve_tcp(listener, answer)));
        }
        if let Some(socket) = self.udp {
            threads.push(std::thread::spawn(move || serve_udp(socket, answer)));
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

fn serve_tcp(listener: TcpListener, answer: Vec<u8>) {
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                let answer = answer.clone();
                std::thread::spawn(move || answer_tcp(stream, &answer));
            }
            Err(error) => {
                // E.g. a connection reset before accept, or out of fds: keep serving.
                eprintln!("pod-server: accept: {error}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

fn answer_tcp(mut stream: TcpStream, answer: &[u8]) {
    // Errors mean the client went away (or reset); nothing to do about it.
    if stream.write_all(answer).is_err() {
        return;
    }
    let _ = stream.shutdown(Shutdown::Write);
    // Drain what the client sends until it closes, so closing does not turn
    // into a reset, but never wait longer than DRAIN_TIMEOUT.
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

fn serve_udp(socket: UdpSocket, answer: Vec<u8>) {
    let mut buf = [0u8; 2048];
    loop {
        match socket.recv_from(&mut buf) {
            Ok((_, from)) => {
                if let Err(error) = socket.send_to(&answer, from) {
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
