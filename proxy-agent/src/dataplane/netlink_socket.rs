//! What every netlink socket of the dataplanes (conntrack's
//! `NETLINK_NETFILTER`, IPVS's `NETLINK_GENERIC`) needs: connected to the
//! kernel alone, with a reply timeout, and calls restarted when a signal
//! interrupts them.
use std::{io, time::Duration};

use netlink_sys::{Socket, SocketAddr};

/// A socket of `protocol` bound to a port the kernel picks and connected
/// to the kernel (port 0, so no other process can send to it), whose
/// receives give up after `timeout`, in the calling thread's network
/// namespace.
pub fn connected(protocol: isize, timeout: Duration) -> io::Result<Socket> {
    let mut socket = Socket::new(protocol)?;
    // netlink-sys has no setter for SO_RCVTIMEO; socket2 sets it on any
    // socket it borrows.
    socket2::SockRef::from(&socket).set_read_timeout(Some(timeout))?;
    socket.bind(&SocketAddr::new(0, 0))?;
    socket.connect(&SocketAddr::new(0, 0))?;
    Ok(socket)
}

/// Runs `op` again while a signal interrupts it.
pub fn restarting<T>(mut op: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match op() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            done => return done,
        }
    }
}
