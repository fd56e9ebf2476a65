//! A test client: makes N exchanges with a pod-server (directly or through a
//! service VIP), each on a new socket, and prints a JSON report of which
//! backends answered and which source addresses they saw (`by_source`).
use std::{net::SocketAddr, time::Duration};

use anyhow::Context;
use clap::{Parser, ValueEnum};
use proxy_tests::client::{ClientOptions, Protocol, run};

#[derive(Clone, Copy, ValueEnum)]
enum Proto {
    Tcp,
    Udp,
    Sctp,
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
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let report = run(&ClientOptions {
        protocol: match args.protocol {
            Proto::Tcp => Protocol::Tcp,
            Proto::Udp => Protocol::Udp,
            Proto::Sctp => Protocol::Sctp,
        },
        target: args.target,
        count: args.count,
        timeout: Duration::from_millis(args.timeout_ms),
        parallel: args.parallel,
    });
    let json = serde_json::to_string(&report).context("encoding the report")?;
    println!("{json}");
    Ok(())
}
