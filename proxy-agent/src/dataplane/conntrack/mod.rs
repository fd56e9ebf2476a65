//! Deleting stale UDP connection-tracking entries through ctnetlink.
//!
//! When a UDP backend goes away, netfilter's conntrack keeps steering the
//! client's datagrams to it: the entry's NAT binding lives as long as
//! datagrams keep coming. kube-proxy therefore deletes the entries whose
//! original destination is the service frontend and whose reply source is
//! the removed backend (vishvananda/netlink's `ConntrackDeleteFilters`).
//! This module does the same over a `NETLINK_NETFILTER` socket:
//!
//! 1. one `IPCTNL_MSG_CT_GET` dump per address family present in the flows;
//! 2. each entry's original and reply tuples are parsed and the entry is
//!    kept when it matches a flow (hash lookups: one pass over the table,
//!    however many flows are given);
//! 3. once the family's dump has finished, one `IPCTNL_MSG_CT_DELETE` per
//!    kept entry goes out, in batches of [`DELETE_BATCH`] requests per send,
//!    each request answered by its own ack.
//!
//! A delete names the entry by its original tuple exactly as the kernel sent
//! it (so a directional `CTA_TUPLE_ZONE` inside it survives), its
//! `CTA_ZONE` when non-zero, and its `CTA_ID`. With the ID the kernel
//! deletes only that very entry: if it expired and a new flow with the same
//! tuple took its place between the dump and the delete, the kernel answers
//! `ENOENT` and the new entry stays. A delete request without a tuple would
//! make the kernel flush the whole table; the encoder cannot produce one.
//!
//! Parsing never trusts a length from the kernel: every header and
//! attribute is bounds-checked, and anything inconsistent is a
//! [`Malformed`] error, never a panic.
//!
//! The socket is netlink-sys's (`socket`), the netlink framing
//! netlink-packet-core's; the ctnetlink payload, which no crate of the tree
//! covers, is encoded and parsed here (`wire`).
use std::{
    collections::{BTreeSet, HashSet},
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

mod socket;
mod wire;

use netlink_packet_core::{NLMSG_ERROR, NetlinkPayload};

use super::ConntrackCleanup;
use socket::{NetlinkSocket, Transport};
use wire::{
    AF_INET, AF_INET6, DeleteRequest, Entry, IPCTNL_MSG_CT_GET, IPCTNL_MSG_CT_NEW, IPPROTO_UDP,
    ct_msg_type, messages, parse_entry, parse_error, put_dump_request,
};

/// A UDP flow that a removed backend served: the entries to delete are
/// those whose original destination is `vip:port` (the service's frontend,
/// port in host order) and whose reply source is `backend:backend_port`
/// (the DNAT target), protocol UDP.
///
/// NodePort variant: any original destination address, destination port
/// `port`. Represent it with `vip` = the unspecified address of the family
/// (`0.0.0.0` or `::`), meaning "any destination address".
///
/// Untranslated variant: `backend:backend_port` equal to `vip:port`
/// ([`StaleFlow::untranslated`]) names the entries whose reply comes from
/// the very address and port the client sent to: never translated. For
/// the NodePort form (`vip` unspecified) that is any entry whose reply
/// source is its own original destination, port `port`.
///
/// A flow whose `vip` and `backend` are of different families matches
/// nothing (a conntrack entry's tuples are of one family).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StaleFlow {
    pub vip: IpAddr,
    pub port: u16,
    pub backend: IpAddr,
    pub backend_port: u16,
}

impl StaleFlow {
    /// The entries to `vip:port` that were never translated.
    pub fn untranslated(vip: IpAddr, port: u16) -> Self {
        StaleFlow {
            vip,
            port,
            backend: vip,
            backend_port: port,
        }
    }
}

/// Why [`delete_stale_udp_flows`] failed.
///
/// A failed dump deletes nothing (all dumps finish before the first delete);
/// a failed delete is reported with the counts in [`DeleteFailed`].
///
/// [`DeleteFailed`]: ConntrackError::DeleteFailed
#[derive(Debug, thiserror::Error)]
pub enum ConntrackError {
    #[error("cannot open a NETLINK_NETFILTER socket: {0}")]
    Socket(#[source] io::Error),
    #[error("netlink I/O failed while {during}: {source}")]
    Io {
        during: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("no answer from the kernel within {timeout:?} while {during}")]
    Timeout {
        during: &'static str,
        timeout: Duration,
    },
    #[error("the netlink receive buffer overflowed while {during}: replies were lost")]
    Overrun { during: &'static str },
    #[error("the kernel refused the conntrack {request} request: {source}")]
    Kernel {
        request: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("malformed netlink data from the kernel: {0}")]
    Malformed(#[from] Malformed),
    #[error("{failed} conntrack entries could not be deleted ({deleted} were): {first}")]
    DeleteFailed {
        deleted: usize,
        failed: usize,
        /// The first error the kernel answered.
        #[source]
        first: io::Error,
    },
}

/// What was wrong with a message the kernel sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("netlink message header truncated ({left} bytes left)")]
    TruncatedHeader { left: usize },
    #[error("netlink message length {len} outside 16..={left}")]
    MessageLength { len: u32, left: usize },
    #[error("datagram of {len} bytes exceeds the receive buffer")]
    TruncatedDatagram { len: usize },
    #[error("{what} payload too short ({len} bytes)")]
    ShortPayload { what: &'static str, len: usize },
    #[error("attribute header truncated ({left} bytes left)")]
    TruncatedAttribute { left: usize },
    #[error("attribute {kind} length {len} outside 4..={left}")]
    AttributeLength { kind: u16, len: u16, left: usize },
    #[error("{what} attribute has {len} bytes")]
    AttributeSize { what: &'static str, len: usize },
    #[error("attribute too long to send ({len} bytes)")]
    AttributeTooLong { len: usize },
    #[error("conntrack entry lacks {0}")]
    Missing(&'static str),
    #[error("tuple addresses mix IPv4 and IPv6")]
    MixedFamilies,
    #[error("tuple addresses do not match the entry's family {family}")]
    FamilyMismatch { family: u8 },
}

/// Deletes every UDP conntrack entry matching one of `flows` (both families
/// as present in `flows`), in the network namespace of the calling thread.
/// Returns how many entries were deleted, and how long it took, per family.
/// An entry already gone (`ENOENT` on delete) is not an error and is not
/// counted.
///
/// Per family, as kube-proxy's per-family reconcilers: one dump, then the
/// deletes; nothing of a family is deleted when its dump fails. Needs
/// `CAP_NET_ADMIN` in the namespace.
pub fn delete_stale_udp_flows(flows: &[StaleFlow]) -> Result<ConntrackCleanup, ConntrackError> {
    delete_with(NetlinkSocket::open, flows)
}

// ---------------------------------------------------------------------------
// Tunables.

/// Delete requests per send. Their acks (one skb each, about 1 KiB of
/// receive-buffer accounting) are all queued before the send returns, so a
/// batch must fit in the receive buffer with room to spare.
const DELETE_BATCH: usize = 64;
/// Receive buffer for one datagram: the kernel's dump skbs are at most
/// 32 KiB.
const RECV_BUF_LEN: usize = 64 * 1024;
/// Receive buffer size asked for (clamped by `net.core.rmem_max`).
const SOCKET_RCVBUF: libc::c_int = 1 << 20;
/// How long one receive waits for the kernel.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// A dump whose replies overflowed the receive buffer is started over, at
/// most this many times in all.
const DUMP_ATTEMPTS: usize = 3;

// ---------------------------------------------------------------------------
// Matching.

fn family_of(ip: IpAddr) -> u8 {
    match ip {
        IpAddr::V4(_) => AF_INET,
        IpAddr::V6(_) => AF_INET6,
    }
}

fn unspecified_like(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        IpAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    }
}

/// The flows of one family, for lookups by entry.
#[derive(Clone, Debug, PartialEq, Eq)]
struct FlowSet {
    family: u8,
    flows: HashSet<StaleFlow>,
}

impl FlowSet {
    /// The non-empty flow sets, IPv4 first. Flows mixing families are left
    /// out: they cannot match an entry.
    fn by_family(flows: &[StaleFlow]) -> Vec<FlowSet> {
        [AF_INET, AF_INET6]
            .into_iter()
            .map(|family| FlowSet {
                family,
                flows: flows
                    .iter()
                    .filter(|f| family_of(f.vip) == family && family_of(f.backend) == family)
                    .copied()
                    .collect(),
            })
            .filter(|set| !set.flows.is_empty())
            .collect()
    }

    fn matches(&self, entry: &Entry<'_>) -> bool {
        if entry.family != self.family || entry.orig.proto != IPPROTO_UDP {
            return false;
        }
        let (Some(port), Some(backend_port)) = (entry.orig.dst_port, entry.reply.src_port) else {
            return false;
        };
        let exact = StaleFlow {
            vip: entry.orig.dst,
            port,
            backend: entry.reply.src,
            backend_port,
        };
        let any = unspecified_like(entry.orig.dst);
        let any_vip = StaleFlow { vip: any, ..exact };
        // The NodePort form of an untranslated entry: its reply comes from
        // its own destination, whichever node address that was.
        let untranslated = exact.backend == exact.vip && exact.backend_port == exact.port;
        self.flows.contains(&exact)
            || self.flows.contains(&any_vip)
            || (untranslated && self.flows.contains(&StaleFlow::untranslated(any, port)))
    }
}

// ---------------------------------------------------------------------------
// The conversation with the kernel.

/// `-errno` from the kernel as an [`io::Error`] (not `ErrorMessage::to_io`,
/// whose `abs` would overflow on `i32::MIN`).
fn kernel_errno(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code.saturating_neg())
}

fn recv_error(err: io::Error, during: &'static str) -> ConntrackError {
    if err.raw_os_error() == Some(libc::ENOBUFS) {
        ConntrackError::Overrun { during }
    } else if err.kind() == io::ErrorKind::WouldBlock {
        ConntrackError::Timeout {
            during,
            timeout: REPLY_TIMEOUT,
        }
    } else {
        ConntrackError::Io {
            during,
            source: err,
        }
    }
}

/// One socket's requests, numbered by `seq`.
struct Session<T> {
    transport: T,
    seq: u32,
    buf: Vec<u8>,
    /// Entries the kernel sent in dumps, matching or not.
    dumped: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Progress {
    More,
    Done,
}

/// Tallies of the delete acks.
#[derive(Debug, Default)]
struct DeleteTally {
    deleted: usize,
    failed: usize,
    first_error: Option<io::Error>,
}

impl<T: Transport> Session<T> {
    fn new(transport: T) -> Self {
        Session {
            transport,
            seq: 0,
            buf: vec![0; RECV_BUF_LEN],
            dumped: 0,
        }
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Receives one datagram; returns its length within `self.buf`.
    fn recv(&mut self, wait: bool, during: &'static str) -> Result<usize, ConntrackError> {
        let len = self
            .transport
            .recv(&mut self.buf, wait)
            .map_err(|e| recv_error(e, during))?;
        if len > self.buf.len() {
            return Err(Malformed::TruncatedDatagram { len }.into());
        }
        Ok(len)
    }

    /// Dumps the UDP entries of the table of `flows.family` (all entries
    /// unless `filtered`), adding a delete request for each matching entry
    /// to `out`.
    #[cfg(test)]
    fn dump(
        &mut self,
        flows: &FlowSet,
        filtered: bool,
        out: &mut BTreeSet<DeleteRequest>,
    ) -> Result<(), ConntrackError> {
        self.dump_with(
            flows.family,
            filtered.then_some(IPPROTO_UDP),
            &mut |entry| {
                if flows.matches(entry) {
                    out.insert(DeleteRequest::of(entry));
                }
            },
        )
    }

    /// Dumps the entries of `family` (of protocol `proto` only, if given),
    /// each to `visit`.
    fn dump_with(
        &mut self,
        family: u8,
        proto: Option<u8>,
        visit: &mut dyn FnMut(&Entry<'_>),
    ) -> Result<(), ConntrackError> {
        const DURING: &str = "dumping the conntrack table";
        let seq = self.next_seq();
        let mut request = Vec::new();
        put_dump_request(&mut request, family, seq, proto)?;
        self.send(&request, DURING)?;
        loop {
            let len = self.recv(true, DURING)?;
            let datagram = &self.buf[..len];
            if handle_dump_datagram_with(datagram, seq, visit, &mut self.dumped)? == Progress::Done
            {
                return Ok(());
            }
        }
    }

    /// Sends `request` (one or more messages) to the kernel.
    fn send(&mut self, request: &[u8], during: &'static str) -> Result<(), ConntrackError> {
        self.transport
            .send(request)
            .map_err(|source| ConntrackError::Io { during, source })
    }

    /// Sends `batch` and reads its acks into `tally`. Returns the requests
    /// whose acks were lost to an overrun of the receive buffer.
    fn delete_batch<'r>(
        &mut self,
        batch: &'r [DeleteRequest],
        tally: &mut DeleteTally,
    ) -> Result<Vec<&'r DeleteRequest>, ConntrackError> {
        const DURING: &str = "deleting conntrack entries";
        let first = self.seq.wrapping_add(1);
        let mut request = Vec::new();
        for delete in batch {
            let seq = self.next_seq();
            delete.put(&mut request, seq)?;
        }
        self.send(&request, DURING)?;
        let mut acked = vec![false; batch.len()];
        let mut waiting = batch.len();
        // The kernel handles the whole batch inside the send, so after an
        // overrun everything that survived is already queued.
        let mut overrun = false;
        while waiting > 0 {
            let len = match self.recv(!overrun, DURING) {
                Ok(len) => len,
                Err(ConntrackError::Overrun { .. }) => {
                    overrun = true;
                    continue;
                }
                Err(ConntrackError::Timeout { .. }) if overrun => break,
                Err(e) => return Err(e),
            };
            for msg in messages(&self.buf[..len]) {
                let msg = msg?;
                let Ok(index) = usize::try_from(msg.seq.wrapping_sub(first)) else {
                    continue;
                };
                if msg.ty != NLMSG_ERROR || acked.get(index) != Some(&false) {
                    continue; // not an answer to this batch
                }
                acked[index] = true;
                waiting -= 1;
                match parse_error(msg.payload)?.code {
                    None => tally.deleted += 1,
                    Some(code) if code.get() == -libc::ENOENT => {}
                    Some(code) => {
                        tally.failed += 1;
                        tally
                            .first_error
                            .get_or_insert_with(|| kernel_errno(code.get()));
                    }
                }
            }
        }
        Ok(batch
            .iter()
            .zip(acked)
            .filter(|(_, acked)| !acked)
            .map(|(delete, _)| delete)
            .collect())
    }

    /// Deletes the entries named by `deletes`; returns how many went.
    fn delete_all(&mut self, deletes: &[DeleteRequest]) -> Result<usize, ConntrackError> {
        let mut tally = DeleteTally::default();
        for batch in deletes.chunks(DELETE_BATCH) {
            let lost = self.delete_batch(batch, &mut tally)?;
            for delete in lost {
                // Sent again alone, whose ack cannot overrun. The first
                // delete was most likely carried out, so an entry gone now
                // counts as deleted.
                let mut again = DeleteTally::default();
                if !self
                    .delete_batch(std::slice::from_ref(delete), &mut again)?
                    .is_empty()
                {
                    return Err(ConntrackError::Overrun {
                        during: "deleting conntrack entries",
                    });
                }
                if again.failed == 0 {
                    tally.deleted += 1;
                }
                tally.failed += again.failed;
                if let Some(err) = again.first_error {
                    tally.first_error.get_or_insert(err);
                }
            }
        }
        match tally.first_error {
            None => Ok(tally.deleted),
            Some(first) => Err(ConntrackError::DeleteFailed {
                deleted: tally.deleted,
                failed: tally.failed,
                first,
            }),
        }
    }
}

/// Handles one datagram of the dump answering request `seq`.
#[cfg(test)]
fn handle_dump_datagram(
    datagram: &[u8],
    seq: u32,
    flows: &FlowSet,
    out: &mut BTreeSet<DeleteRequest>,
    dumped: &mut usize,
) -> Result<Progress, ConntrackError> {
    handle_dump_datagram_with(
        datagram,
        seq,
        &mut |entry| {
            if flows.matches(entry) {
                out.insert(DeleteRequest::of(entry));
            }
        },
        dumped,
    )
}

/// Handles one datagram of the dump answering request `seq`, each entry
/// to `visit`.
fn handle_dump_datagram_with(
    datagram: &[u8],
    seq: u32,
    visit: &mut dyn FnMut(&Entry<'_>),
    dumped: &mut usize,
) -> Result<Progress, ConntrackError> {
    for msg in messages(datagram) {
        let msg = msg?;
        if msg.seq != seq {
            continue; // not ours
        }
        let dump_error = |code: i32| ConntrackError::Kernel {
            request: "dump",
            source: kernel_errno(code),
        };
        match msg.decode()? {
            NetlinkPayload::Error(error) => {
                if let Some(code) = error.code {
                    return Err(dump_error(code.get()));
                }
            }
            // The dump's final status.
            NetlinkPayload::Done(done) if done.code < 0 => return Err(dump_error(done.code)),
            NetlinkPayload::Done(_) => return Ok(Progress::Done),
            NetlinkPayload::Overrun(_) => {
                return Err(ConntrackError::Overrun {
                    during: "dumping the conntrack table",
                });
            }
            NetlinkPayload::InnerMessage(payload)
                if msg.ty == ct_msg_type(IPCTNL_MSG_CT_GET)
                    || msg.ty == ct_msg_type(IPCTNL_MSG_CT_NEW) =>
            {
                let entry = parse_entry(payload)?;
                *dumped += 1;
                visit(&entry);
            }
            // NLMSG_NOOP, and whatever else.
            _ => {}
        }
    }
    Ok(Progress::More)
}

/// `TCP_CONNTRACK_TIME_WAIT`: from here on a TCP entry's connection is
/// over (`TIME_WAIT`, `CLOSE`, and the states after them).
const TCP_CONNTRACK_TIME_WAIT: u8 = 7;

/// Counts the TCP connections (both families) that netfilter translated
/// to another destination (a reply source other than the original
/// destination: DNAT, by rules or by IPVS) and that are not over yet,
/// whose original destination (address, port) `to` accepts: the flows a
/// netfilter mode or kube-proxy carries, which its state must stay for. In
/// the network namespace of the calling thread.
pub fn count_translated_tcp_flows(
    to: impl Fn(IpAddr, u16) -> bool,
) -> Result<usize, ConntrackError> {
    const IPPROTO_TCP: u8 = libc::IPPROTO_TCP as u8;
    let mut count = 0;
    let mut filtered = true;
    for family in [AF_INET, AF_INET6] {
        // Counted again from 0 when a dump starts over.
        let found = std::cell::Cell::new(0);
        dump_again_on_trouble(
            NetlinkSocket::open,
            family,
            IPPROTO_TCP,
            &mut filtered,
            &mut || found.set(0),
            &mut |entry| {
                let live = entry
                    .tcp_state
                    .is_some_and(|state| state < TCP_CONNTRACK_TIME_WAIT);
                if entry.orig.proto == IPPROTO_TCP
                    && live
                    && entry.reply.src != entry.orig.dst
                    && entry
                        .orig
                        .dst_port
                        .is_some_and(|port| to(entry.orig.dst, port))
                {
                    found.set(found.get() + 1);
                }
            },
        )?;
        count += found.get();
    }
    Ok(count)
}

/// The destination netfilter translated a flow to: the reply source of
/// the conntrack entry whose original tuple is `src:sport -> dst:dport`
/// of `proto` (IP protocol number), when it exists and was translated.
/// Reads only (a dump of the family's entries of that protocol).
pub fn translated_destination(
    src: IpAddr,
    sport: u16,
    dst: IpAddr,
    dport: u16,
    proto: u8,
) -> Result<Option<(IpAddr, u16)>, ConntrackError> {
    let family = if dst.is_ipv4() { AF_INET } else { AF_INET6 };
    let mut filtered = true;
    let found = std::cell::Cell::new(None);
    dump_again_on_trouble(
        NetlinkSocket::open,
        family,
        proto,
        &mut filtered,
        &mut || found.set(None),
        &mut |entry| {
            let o = &entry.orig;
            if o.proto == proto
                && o.src == src
                && o.dst == dst
                && o.src_port == Some(sport)
                && o.dst_port == Some(dport)
                && (entry.reply.src != dst || entry.reply.src_port != Some(dport))
                && let Some(port) = entry.reply.src_port
            {
                found.set(Some((entry.reply.src, port)));
            }
        },
    )?;
    Ok(found.get())
}

/// Dumps the table of `family` on a fresh socket from `open`, each entry to
/// `visit`, and returns the session. Only `proto`'s entries while
/// `filtered`; a kernel that refuses the filter gets the plain dump, and
/// `filtered` goes false for the dumps after. A dump whose replies
/// overflowed the receive buffer starts over on a new socket (leftovers of
/// the old must not mix with the new), after `restart`, at most
/// [`DUMP_ATTEMPTS`] times in all.
fn dump_again_on_trouble<T: Transport>(
    mut open: impl FnMut() -> Result<T, ConntrackError>,
    family: u8,
    proto: u8,
    filtered: &mut bool,
    restart: &mut dyn FnMut(),
    visit: &mut dyn FnMut(&Entry<'_>),
) -> Result<Session<T>, ConntrackError> {
    let mut attempt = 1;
    loop {
        let mut session = Session::new(open()?);
        match session.dump_with(family, filtered.then_some(proto), visit) {
            Ok(()) => return Ok(session),
            Err(ConntrackError::Overrun { .. }) if attempt < DUMP_ATTEMPTS => attempt += 1,
            Err(ConntrackError::Kernel { source, .. })
                if *filtered
                    && matches!(source.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP)) =>
            {
                *filtered = false;
            }
            Err(e) => return Err(e),
        }
        restart();
    }
}

/// [`delete_stale_udp_flows`] over transports that `open` makes.
fn delete_with<T: Transport>(
    mut open: impl FnMut() -> Result<T, ConntrackError>,
    flows: &[StaleFlow],
) -> Result<ConntrackCleanup, ConntrackError> {
    let mut cleanup = ConntrackCleanup::default();
    // The kernel filters the dump by protocol where it can; a kernel that
    // refuses the filter gets the plain dump (the entries are matched here
    // either way).
    let mut filtered = true;
    for set in FlowSet::by_family(flows) {
        let started = std::time::Instant::now();
        // A delete request found by an overrun dump names a real entry:
        // kept for the next attempt (the set holds each once).
        let mut deletes = BTreeSet::new();
        let mut session = dump_again_on_trouble(
            &mut open,
            set.family,
            IPPROTO_UDP,
            &mut filtered,
            &mut || {},
            &mut |entry| {
                if set.matches(entry) {
                    deletes.insert(DeleteRequest::of(entry));
                }
            },
        )?;
        let deletes: Vec<DeleteRequest> = deletes.into_iter().collect();
        let deleted = if deletes.is_empty() {
            0
        } else {
            session.delete_all(&deletes)?
        };
        let index = usize::from(set.family == AF_INET6);
        cleanup.deleted[index] = deleted;
        cleanup.took[index] = Some(started.elapsed());
    }
    Ok(cleanup)
}

#[cfg(test)]
mod tests;
