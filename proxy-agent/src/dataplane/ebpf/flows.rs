//! Forgetting the UDP flows to backends that went away.
use std::collections::HashSet;

use proxy_common::{
    Addr, CT_EGRESS, CT_FLAG_SNAT, CT_FLAG_SNAT_OUT, CT_FORWARD, CT_SNAT_IN, CT_SNAT_OUT_OLD,
    CtKey, CtValue, FAMILY_V6, SockRevKey,
};

use super::{EbpfDataplane, EbpfError, encode::addr_of, sockdiag, writer::remove_ignoring_missing};
use crate::dataplane::ConntrackCleanup;
use crate::model::{Backend, FrontendKey, Protocol};

/// (VIP, port, backend, backend port), ports in network byte order, of the
/// stale UDP flows `gone` ([`crate::model::TableDiff::stale_udp_flows`]).
pub(super) fn stale_udp_flows(gone: &[(FrontendKey, Backend)]) -> HashSet<(Addr, u16, Addr, u16)> {
    gone.iter()
        .map(|(key, b)| {
            let (vip, _) = addr_of(key.ip);
            let (addr, _) = addr_of(b.ip);
            (vip, key.port.to_be(), addr, b.port.to_be())
        })
        .collect()
}

/// The update flag of `bpf(2)` that inserts only where no entry is.
const BPF_NOEXIST: u64 = 1;

impl EbpfDataplane {
    /// Copies the masquerade entries an earlier version keyed apart
    /// (`CT_SNAT_OUT_OLD`) to the egress tag they now share with replies,
    /// so that the flows they hold go on through an upgrade. The old
    /// entries stay for the old programs, which run until the new ones
    /// replace them; the map is LRU, so they age out. Returns how many were
    /// copied.
    pub(super) fn move_old_masquerade_entries(&mut self) -> Result<usize, EbpfError> {
        let old: Vec<(CtKey, CtValue)> = self
            .conntrack
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, _)| k.dir == CT_SNAT_OUT_OLD)
            .collect();
        let mut copied = 0;
        for (key, value) in &old {
            let moved_key = CtKey {
                dir: CT_EGRESS,
                ..*key
            };
            let moved = CtValue {
                flags: value.flags | CT_FLAG_SNAT_OUT,
                ..*value
            };
            // An entry under the new tag is newer (the new programs wrote
            // it): kept, atomically so even while they run.
            match self.conntrack.insert(moved_key, moved, BPF_NOEXIST) {
                Ok(()) => copied += 1,
                Err(aya::maps::MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(copied)
    }

    /// A NodePort frontend is keyed on the unspecified address, but its
    /// flows carry the node address the client sent to: stands every node
    /// address in for the unspecified one in `stale`.
    pub(super) fn at_node_addresses(
        &self,
        mut stale: HashSet<(Addr, u16, Addr, u16)>,
    ) -> HashSet<(Addr, u16, Addr, u16)> {
        let unspecified: Vec<_> = stale
            .iter()
            .filter(|(vip, ..)| *vip == [0u8; 16])
            .copied()
            .collect();
        for (_, port, backend, backend_port) in unspecified {
            for ip in &self.node_addresses {
                stale.insert((addr_of(*ip).0, port, backend, backend_port));
            }
        }
        stale
    }

    /// Deletes the connection-tracking entries (every direction, masquerade
    /// legs included) of UDP flows of `stale` (frontend, backend) pairs. UDP
    /// has no end, so a client that keeps sending (DNS from one socket, say)
    /// would otherwise stick to a backend that is gone; without its entries
    /// its next datagram picks a live backend, as kube-proxy's conntrack
    /// flush achieves. Counts the flows forgotten (each by its client ->
    /// frontend entry, as netfilter has one entry per flow), per family.
    pub(super) fn forget_udp_flows(
        &mut self,
        stale: &HashSet<(Addr, u16, Addr, u16)>,
        families: [bool; 2],
    ) -> Result<ConntrackCleanup, EbpfError> {
        // Walks the whole table, but only when a UDP backend went away.
        let started = std::time::Instant::now();
        let udp = Protocol::Udp.number();
        let all: Vec<(CtKey, CtValue)> = self
            .conntrack
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, _)| k.proto == udp)
            .collect();
        let mut doomed: HashSet<CtKey> = HashSet::new();
        let mut snat_out: HashSet<CtKey> = HashSet::new();
        for (k, v) in &all {
            let hit = match k.dir {
                // Client -> VIP; the value holds the backend.
                CT_FORWARD => stale.contains(&(k.dst, k.dport, v.nat_addr, v.nat_port)),
                // Backend -> client; the value holds the VIP.
                CT_EGRESS if v.flags & CT_FLAG_SNAT_OUT == 0 => {
                    stale.contains(&(v.nat_addr, v.nat_port, k.src, k.sport))
                }
                _ => false,
            };
            if hit {
                doomed.insert(*k);
                if k.dir == CT_FORWARD && v.flags & CT_FLAG_SNAT != 0 {
                    snat_out.insert(CtKey {
                        src: k.src,
                        dst: v.nat_addr,
                        sport: k.sport,
                        dport: v.nat_port,
                        dir: CT_EGRESS,
                        ..*k
                    });
                }
            }
        }
        // The masquerade legs: client -> backend at egress, and the node
        // port it was given at ingress.
        for (k, v) in &all {
            if k.dir == CT_EGRESS && v.flags & CT_FLAG_SNAT_OUT != 0 && snat_out.contains(k) {
                doomed.insert(*k);
                doomed.insert(CtKey {
                    src: k.dst,
                    dst: v.nat_addr,
                    sport: k.dport,
                    dport: v.nat_port,
                    dir: CT_SNAT_IN,
                    ..*k
                });
            }
        }
        let mut cleanup = ConntrackCleanup::default();
        for key in &doomed {
            remove_ignoring_missing(&mut self.conntrack, key)?;
            if key.dir == CT_FORWARD {
                cleanup.deleted[usize::from(key.family == FAMILY_V6)] += 1;
            }
        }
        if !doomed.is_empty() {
            tracing::debug!(
                entries = doomed.len(),
                "forgot UDP flows to removed backends"
            );
        }
        // One walk serves both families: each family that had flows to
        // forget is given its time.
        let took = started.elapsed();
        for (family, had) in families.into_iter().enumerate() {
            if had {
                cleanup.took[family] = Some(took);
            }
        }
        Ok(cleanup)
    }

    /// Ends the connected UDP sockets, of the node and of its pods, that the
    /// socket hooks gave a backend of `stale` (see [`sockdiag`]): they send
    /// straight to the backend, so forgetting flows does not move them.
    /// Only sockets the hooks translated to that frontend are ended; one
    /// connected to the backend's address directly is none of ours. Returns
    /// how many were ended; failures are logged, and cost only the move.
    pub(super) fn end_stale_sockets(&self, stale: &HashSet<(Addr, u16, Addr, u16)>) -> usize {
        let own = std::iter::once(None);
        let namespaces = own.chain(self.pod_namespaces.all().into_iter().map(Some));
        let mut ended = 0;
        for netns in namespaces {
            let listed = sockdiag::open_in(netns.as_deref())
                .and_then(|socket| Ok((sockdiag::connected_udp(&socket)?, socket)));
            let (sockets, diag) = match listed {
                Ok(found) => found,
                Err(e) => {
                    tracing::debug!(error = %e, "could not list a namespace's UDP sockets");
                    continue;
                }
            };
            for socket in sockets {
                let (addr, family) = addr_of(socket.peer);
                let port = socket.peer_port.to_be();
                let key = SockRevKey::new(socket.cookie, family, addr, port);
                let Ok(frontend) = self.sock_revnat.get(&key, 0) else {
                    continue;
                };
                if !stale.contains(&(frontend.addr, frontend.port, addr, port)) {
                    continue;
                }
                match sockdiag::destroy(&diag, &socket) {
                    Ok(()) => ended += 1,
                    Err(e) => tracing::warn!(
                        peer = %socket.peer,
                        error = %e,
                        "could not end a UDP socket connected to a removed backend"
                    ),
                }
            }
        }
        if ended > 0 {
            tracing::debug!(sockets = ended, "ended UDP sockets of removed backends");
        }
        ended
    }
}

#[cfg(test)]
mod tests {
    use proxy_common::{FAMILY_V4, PROTO_TCP};

    use super::*;

    /// An agent upgraded under live masqueraded flows finds their egress
    /// entries where its programs look, and leaves the old ones to the old
    /// programs until those are replaced.
    #[test]
    fn masquerade_entries_of_an_earlier_version_are_copied_to_the_egress_tag() {
        let Ok((mut dataplane, _ebpf)) = super::super::load_unpinned() else {
            eprintln!("skipped: cannot load the eBPF object here (not root?)");
            return;
        };
        let v4 = |b: [u8; 4]| addr_of(b.into()).0;
        let old = CtKey {
            src: v4([10, 1, 0, 7]),
            dst: v4([10, 2, 0, 9]),
            sport: 40_000u16.to_be(),
            dport: 8080u16.to_be(),
            proto: PROTO_TCP,
            family: FAMILY_V4,
            dir: CT_SNAT_OUT_OLD,
            _pad0: 0,
        };
        let value = CtValue {
            nat_addr: v4([192, 168, 0, 1]),
            nat_port: 61_000u16.to_be(),
            flags: CT_FLAG_SNAT,
            ..CtValue::default()
        };
        let egress = CtKey {
            dir: CT_EGRESS,
            ..old
        };
        dataplane.conntrack.insert(old, value, 0).unwrap();
        assert_eq!(dataplane.move_old_masquerade_entries().unwrap(), 1);
        let moved = dataplane.conntrack.get(&egress, 0).unwrap();
        assert_eq!(moved.flags, CT_FLAG_SNAT | CT_FLAG_SNAT_OUT);
        assert_eq!(
            (moved.nat_addr, moved.nat_port),
            (value.nat_addr, value.nat_port)
        );
        assert_eq!(dataplane.conntrack.get(&old, 0).unwrap(), value);
        // Once copied, a second start copies nothing over newer entries.
        let newer = CtValue {
            nat_port: 61_001u16.to_be(),
            ..moved
        };
        dataplane.conntrack.insert(egress, newer, 0).unwrap();
        assert_eq!(dataplane.move_old_masquerade_entries().unwrap(), 0);
        let kept = dataplane.conntrack.get(&egress, 0).unwrap();
        assert_eq!(kept.nat_port, newer.nat_port);
    }
}
