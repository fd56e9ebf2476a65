//! A test client: makes N exchanges with a pod-server (directly or through a
//! service VIP), each on a new socket, and prints a JSON report of which
//! backends answered and which source addresses they saw (`by_source`).
//!
//! `udp-session` instead keeps one connected UDP socket, as a DNS client
//! does, queries on it every interval and prints one line per query as it
//! goes: the answering backend's name, `timeout`, or `error <reason>`. After
//! an error (the socket was refused, or ended by the agent) it goes on with
//! a new socket connected to the same target.
use std::{
    io::{self, Write},
    net::{SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::Context;
use clap::{Parser, ValueEnum};
use proxy_tests::client::{ClientOptions, Protocol, run};

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Proto {
    Tcp,
    Udp,
    Sctp,
    /// One connected UDP socket, a query every `--interval-ms` for
    /// `--duration-ms`; a line per query.
    UdpSession,
}

#[derive(Parser)]
#[command(about = "Counts which backends answer N exchanges; prints JSON")]
struct Args {
    protocol: Proto,
    /// ADDR:PORT to connect or send to.
    target: SocketAddr,
    /// Number of exchanges, each on a new socket.
    #[arg(long, default_value_t = 1)]
    count: u64,
    /// Bound on connecting and on waiting for the answer, each.
    #[arg(long, default_value_t = 1000)]
    timeout_ms: u64,
    /// Threads sharing the exchanges.
    #[arg(long, default_value_t = 1)]
    parallel: usize,
    /// udp-session: time from one query to the next.
    #[arg(long, default_value_t = 20)]
    interval_ms: u64,
    /// udp-session: how long to keep querying.
    #[arg(long, default_value_t = 10_000)]
    duration_ms: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let protocol = match args.protocol {
        Proto::Tcp => Protocol::Tcp,
        Proto::Udp => Protocol::Udp,
        Proto::Sctp => Protocol::Sctp,
        Proto::UdpSession => {
            return udp_session(
                args.target,
                Duration::from_millis(args.interval_ms),
                Duration::from_millis(args.duration_ms),
                Duration::from_millis(args.timeout_ms),
            );
        }
    };
    let report = run(&ClientOptions {
        protocol,
        target: args.target,
        count: args.count,
        timeout: Duration::from_millis(args.timeout_ms),
        parallel: args.parallel,
    });
    let json = serde_json::to_string(&report).context("encoding the report")?;
    println!("{json}");
    Ok(())
}

/// A new UDP socket connected to `target`, waiting at most `timeout` for
/// an answer.
fn connected(target: SocketAddr, timeout: Duration) -> io::Result<UdpSocket> {
    let bind: SocketAddr = if target.is_ipv4() {
        "0.0.0.0:0".parse().expect("valid address")
    } else {
        "[::]:0".parse().expect("valid address")
    };
    let socket = UdpSocket::bind(bind)?;
    socket.connect(target)?;
    socket.set_read_timeout(Some(timeout))?;
    Ok(socket)
}

/// What one query on the session's socket came to.
enum Outcome {
    /// The first word of the answer: the backend's name.
    Answer(String),
    Timeout,
    /// The socket failed: it is dropped, and the next query takes a new one.
    Error(io::Error),
}

/// One query on `socket`.
fn query(socket: &UdpSocket) -> Outcome {
    if let Err(error) = socket.send(b"q\n") {
        return Outcome::Error(error);
    }
    let mut buf = [0u8; 512];
    loop {
        match socket.recv(&mut buf) {
            Ok(n) => {
                let text = String::from_utf8_lossy(&buf[..n]);
                let name = text.split_whitespace().next().unwrap_or_default();
                return Outcome::Answer(name.to_string());
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // A socket read timeout shows up as WouldBlock on Linux.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Outcome::Timeout;
            }
            Err(e) => return Outcome::Error(e),
        }
    }
}

/// `error <kind> (<errno text>)`.
fn error_line(error: &io::Error) -> String {
    format!("error {:?} ({error})", error.kind())
}

/// Queries `target` every `interval` for `duration` on one connected UDP
/// socket, printing a line per query; after an error, with a new socket.
fn udp_session(
    target: SocketAddr,
    interval: Duration,
    duration: Duration,
    timeout: Duration,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut stdout = io::stdout().lock();
    let mut print = |line: &str| -> anyhow::Result<()> {
        writeln!(stdout, "{line}").context("writing to stdout")?;
        stdout.flush().context("flushing stdout")
    };
    let mut socket = None;
    let mut next = started;
    while started.elapsed() < duration {
        if socket.is_none() {
            match connected(target, timeout) {
                Ok(open) => socket = Some(open),
                Err(error) => print(&error_line(&error))?,
            }
        }
        if let Some(open) = &socket {
            match query(open) {
                Outcome::Answer(name) => print(&name)?,
                Outcome::Timeout => print("timeout")?,
                Outcome::Error(error) => {
                    print(&error_line(&error))?;
                    // As a DNS client does: on with a new socket at once.
                    socket = match connected(target, timeout) {
                        Ok(open) => Some(open),
                        Err(error) => {
                            print(&error_line(&error))?;
                            None
                        }
                    };
                }
            }
        }
        next += interval;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else {
            // Late (after a timeout): the next tick runs from now.
            next = now;
        }
    }
    Ok(())
}
