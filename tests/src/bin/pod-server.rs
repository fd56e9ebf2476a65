//! A test pod: answers each TCP connection, SCTP association and UDP
//! datagram with its name and the peer address it saw, so clients can count
//! which backend they reached and from where it saw them.
use std::net::IpAddr;

use anyhow::Context;
use clap::Parser;
use proxy_tests::server::{PodServer, ServerPorts};

#[derive(Parser)]
#[command(
    about = "Answers every TCP connection, SCTP association and UDP datagram with \
                   `NAME PEER-ADDR:PORT`"
)]
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
    /// SCTP port to serve (one-to-one style); fails where the kernel has no
    /// SCTP.
    #[arg(long)]
    sctp: Option<u16>,
    /// TCP port for sessions: each line sent is answered, and the
    /// connection stays open until the client closes it.
    #[arg(long)]
    session: Option<u16>,
    /// Address to bind; `::` (the default) serves IPv4 and IPv6.
    #[arg(long, default_value = "::")]
    bind: IpAddr,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let ports = ServerPorts {
        tcp: args.tcp,
        udp: args.udp,
        sctp: args.sctp,
        session: args.session,
    };
    let server = PodServer::bind_ports(&args.name, args.bind, ports)
        .with_context(|| format!("starting pod-server {}", args.name))?;
    server.run()
}
