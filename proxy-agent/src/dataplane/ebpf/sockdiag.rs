//! Ending connected UDP sockets whose backend went away, through
//! `NETLINK_SOCK_DIAG` (`SOCK_DESTROY`, as `ss -K` does).
//!
//! A socket the socket hooks translated at `connect()` sends straight to its
//! backend: no connection-tracking entry stands between, so forgetting flows
//! cannot move it. Ended, it reports `ECONNABORTED`, and its owner connects
//! again (to a live backend), as DNS clients do; a socket that is not
//! connected is given a backend at each `sendmsg()` and needs nothing.
use std::{fs::File, io, net::IpAddr};

use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};

/// `SOCK_DIAG_BY_FAMILY` and `SOCK_DESTROY` (linux/sock_diag.h).
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_HDRLEN: usize = 16;
/// `struct inet_diag_sockid`: ports, two addresses, interface, cookie.
const SOCKID_LEN: usize = 48;
/// `struct inet_diag_req_v2`.
const REQ_LEN: usize = 8 + SOCKID_LEN;
/// `struct inet_diag_msg`.
const MSG_LEN: usize = 4 + SOCKID_LEN + 20;
/// Connected UDP sockets are in state `TCP_ESTABLISHED`.
const TCP_ESTABLISHED: u32 = 1;
const IPPROTO_UDP: u8 = 17;

/// A connected UDP socket as the kernel lists it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct ConnectedUdp {
    family: u8,
    /// The kernel's identity of the socket, given back to destroy it.
    id: [u8; SOCKID_LEN],
    /// The peer, an IPv4-mapped IPv6 peer as IPv4.
    pub(super) peer: IpAddr,
    pub(super) peer_port: u16,
    pub(super) cookie: u64,
}

/// A socket-diag socket of the namespace of `netns` (this thread's when
/// `None`): a socket belongs to the namespace it was made in, so a thread
/// of its own enters the namespace to make it.
pub(super) fn open_in(netns: Option<&File>) -> io::Result<Socket> {
    match netns {
        Some(netns) => super::pods::in_namespace(netns, open),
        None => open(),
    }
}

fn open() -> io::Result<Socket> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket2::SockRef::from(&socket).set_read_timeout(Some(std::time::Duration::from_secs(2)))?;
    socket.bind(&SocketAddr::new(0, 0))?;
    socket.connect(&SocketAddr::new(0, 0))?;
    Ok(socket)
}

fn request(kind: u16, flags: u16, family: u8, states: u32, id: &[u8; SOCKID_LEN]) -> Vec<u8> {
    let len = NLMSG_HDRLEN + REQ_LEN;
    let mut buf = Vec::with_capacity(len);
    buf.extend_from_slice(&(len as u32).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    buf.extend_from_slice(&0u32.to_ne_bytes()); // port: the kernel's
    buf.extend_from_slice(&[family, IPPROTO_UDP, 0, 0]);
    buf.extend_from_slice(&states.to_ne_bytes());
    buf.extend_from_slice(id);
    buf
}

/// Every connected UDP socket of the socket's namespace, both families.
pub(super) fn connected_udp(socket: &Socket) -> io::Result<Vec<ConnectedUdp>> {
    let mut out = Vec::new();
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        let dump = request(
            SOCK_DIAG_BY_FAMILY,
            NLM_F_REQUEST | NLM_F_DUMP,
            family,
            1 << TCP_ESTABLISHED,
            &[0; SOCKID_LEN],
        );
        socket.send(&dump, 0)?;
        let mut buf = vec![0u8; 64 * 1024];
        'datagrams: loop {
            let len = socket.recv(&mut &mut buf[..], 0)?;
            for (kind, payload) in messages(&buf[..len.min(buf.len())]) {
                match kind {
                    NLMSG_DONE => break 'datagrams,
                    NLMSG_ERROR => return Err(error_of(payload)),
                    SOCK_DIAG_BY_FAMILY => out.extend(parse_msg(payload)),
                    _ => {}
                }
            }
        }
    }
    Ok(out)
}

/// Ends `target`; a socket already gone is no error.
pub(super) fn destroy(socket: &Socket, target: &ConnectedUdp) -> io::Result<()> {
    let req = request(
        SOCK_DESTROY,
        NLM_F_REQUEST | NLM_F_ACK,
        target.family,
        u32::MAX,
        &target.id,
    );
    socket.send(&req, 0)?;
    let mut buf = vec![0u8; 4096];
    let len = socket.recv(&mut &mut buf[..], 0)?;
    for (kind, payload) in messages(&buf[..len.min(buf.len())]) {
        if kind == NLMSG_ERROR {
            let e = error_of(payload);
            return match e.raw_os_error() {
                Some(0) | Some(libc::ENOENT) => Ok(()),
                _ => Err(e),
            };
        }
    }
    Ok(())
}

/// The (type, payload) of each netlink message of a datagram.
fn messages(mut data: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while data.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]) as usize;
        if len < NLMSG_HDRLEN || len > data.len() {
            break;
        }
        let kind = u16::from_ne_bytes([data[4], data[5]]);
        out.push((kind, &data[NLMSG_HDRLEN..len]));
        let aligned = (len + 3) & !3;
        data = &data[aligned.min(data.len())..];
    }
    out
}

/// The error an `NLMSG_ERROR` carries (0: an acknowledgement).
fn error_of(payload: &[u8]) -> io::Error {
    let Some(code) = payload.get(..4) else {
        return io::Error::other("short netlink error message");
    };
    let code = i32::from_ne_bytes([code[0], code[1], code[2], code[3]]);
    io::Error::from_raw_os_error(-code)
}

/// A socket of a `SOCK_DIAG_BY_FAMILY` answer.
fn parse_msg(payload: &[u8]) -> Option<ConnectedUdp> {
    if payload.len() < MSG_LEN {
        return None;
    }
    let family = payload[0];
    let mut id = [0u8; SOCKID_LEN];
    id.copy_from_slice(&payload[4..4 + SOCKID_LEN]);
    let peer_port = u16::from_be_bytes([id[2], id[3]]);
    let dst = &id[20..36];
    let peer = if family == libc::AF_INET as u8 {
        IpAddr::from([dst[0], dst[1], dst[2], dst[3]])
    } else {
        let mut v6 = [0u8; 16];
        v6.copy_from_slice(dst);
        let v6 = std::net::Ipv6Addr::from(v6);
        match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        }
    };
    let low = u32::from_ne_bytes([id[40], id[41], id[42], id[43]]);
    let high = u32::from_ne_bytes([id[44], id[45], id[46], id[47]]);
    Some(ConnectedUdp {
        family,
        id,
        peer,
        peer_port,
        cookie: (u64::from(high) << 32) | u64::from(low),
    })
}

#[cfg(test)]
mod tests {
    use std::net::UdpSocket;

    use super::*;

    proptest::proptest! {
        #![proptest_config(crate::fuzz_config(512))]

        /// Any datagram: split into messages, each read as a socket and as
        /// an error, without panicking.
        #[test]
        fn arbitrary_answers_do_not_panic(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..400),
        ) {
            for (kind, payload) in messages(&bytes) {
                let _ = (kind, parse_msg(payload), error_of(payload));
            }
        }
    }

    /// Against this machine's kernel: a connected socket of ours is listed
    /// with its peer and cookie, and once destroyed reports an error.
    #[test]
    fn lists_and_ends_a_connected_udp_socket() {
        let Ok(diag) = open_in(None) else {
            eprintln!("skipped: no socket-diag netlink here");
            return;
        };
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        udp.connect("127.0.0.9:5399").unwrap();
        let local = udp.local_addr().unwrap();
        let all = connected_udp(&diag).unwrap();
        let ours = all
            .iter()
            .find(|s| {
                s.peer == IpAddr::from([127, 0, 0, 9])
                    && s.peer_port == 5399
                    && u16::from_be_bytes([s.id[0], s.id[1]]) == local.port()
            })
            .copied()
            .expect("our connected socket is listed");
        assert_ne!(ours.cookie, 0);
        if let Err(e) = destroy(&diag, &ours) {
            // Kernels without CONFIG_INET_DIAG_DESTROY refuse.
            assert_eq!(e.raw_os_error(), Some(libc::EOPNOTSUPP), "{e}");
            return;
        }
        let sent = udp.send(b"x");
        assert!(sent.is_err(), "a destroyed socket still sends: {sent:?}");
        // Gone from the list, and destroying it again is no error.
        assert!(!connected_udp(&diag).unwrap().contains(&ours));
        destroy(&diag, &ours).unwrap();
    }

    #[test]
    fn cuts_datagrams_into_messages() {
        let mut datagram = request(SOCK_DIAG_BY_FAMILY, 0, 2, 0, &[0; SOCKID_LEN]);
        let mut done = vec![0u8; NLMSG_HDRLEN];
        done[0] = NLMSG_HDRLEN as u8;
        done[4..6].copy_from_slice(&NLMSG_DONE.to_ne_bytes());
        datagram.extend_from_slice(&done);
        let kinds: Vec<u16> = messages(&datagram).iter().map(|(k, _)| *k).collect();
        assert_eq!(kinds, vec![SOCK_DIAG_BY_FAMILY, NLMSG_DONE]);
        // A length past the end stops the walk instead of reading beyond.
        let mut broken = datagram.clone();
        broken[0] = 200;
        assert!(messages(&broken).is_empty());
    }
}
