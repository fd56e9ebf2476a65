//! A test pod: answers each TCP connection and each UDP datagram with its
//! name, so clients can count which backend they reached.
use std::net::IpAddr;

use anyhow::Context;
use clap::Parser;
use proxy_tests::server::PodServer;

#[derive(Parser)]
#[command(about = "Answers every TCP connection and UDP datagram with NAME")]
struct Args {
    /// The name written back to clients.
    #[arg(long)]
    name: String,
    /// TCP port to serve.
    #[arg(long)]
    tcp: Option<u16>,
    /// UDP port to serve.
    #[arg(long)]
    udp: Option<u16>,
    /// Address to bind.
    #[arg(long, default_value = "0.0.0.0")]
    bind: IpAddr,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let server = PodServer::bind(&args.name, args.bind, args.tcp, args.udp)
        .with_context(|| format!("starting pod-server {}", args.name))?;
    server.run()
}
