//! The datagram channel to the kernel: a `NETLINK_NETFILTER` socket of
//! netlink-sys, behind a trait that tests implement with a fake kernel.

use std::io;

use netlink_sys::{Socket, protocols::NETLINK_NETFILTER};

use super::{ConntrackError, REPLY_TIMEOUT, SOCKET_RCVBUF};
use crate::dataplane::netlink_socket::{connected, restarting};

/// A datagram channel to the kernel's netfilter netlink (a fake in tests).
pub(super) trait Transport {
    /// Sends one datagram (one or more messages).
    fn send(&mut self, datagram: &[u8]) -> io::Result<()>;
    /// Receives one datagram into `buf` and returns its full length, which
    /// exceeds `buf.len()` when it was cut. Without `wait`, an empty queue
    /// is `WouldBlock`; with it, so is a timeout. `ENOBUFS` means replies
    /// were dropped.
    fn recv(&mut self, buf: &mut [u8], wait: bool) -> io::Result<usize>;
}

pub(super) struct NetlinkSocket {
    socket: Socket,
}

impl NetlinkSocket {
    /// A `NETLINK_NETFILTER` socket connected to the kernel (so no other
    /// process can send to it), in the calling thread's network namespace.
    pub(super) fn open() -> Result<Self, ConntrackError> {
        let socket = connected(NETLINK_NETFILTER, REPLY_TIMEOUT).map_err(ConntrackError::Socket)?;
        // Best effort: a larger receive buffer and short acks only make
        // overruns less likely; the protocol works without them.
        let _ = socket.set_rx_buf_sz(SOCKET_RCVBUF);
        let _ = socket.set_cap_ack(true);
        Ok(NetlinkSocket { socket })
    }
}

impl Transport for NetlinkSocket {
    fn send(&mut self, datagram: &[u8]) -> io::Result<()> {
        let sent = restarting(|| self.socket.send(datagram, 0))?;
        if sent != datagram.len() {
            return Err(io::Error::other("short netlink send"));
        }
        Ok(())
    }

    fn recv(&mut self, buf: &mut [u8], wait: bool) -> io::Result<usize> {
        // MSG_TRUNC: the full length even when the datagram was cut.
        let flags = libc::MSG_TRUNC | if wait { 0 } else { libc::MSG_DONTWAIT };
        restarting(|| self.socket.recv(&mut &mut buf[..], flags))
    }
}
