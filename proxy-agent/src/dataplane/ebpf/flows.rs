//! Forgetting the UDP flows to backends that went away.
use std::collections::HashSet;

use proxy_common::{
    Addr, CT_FLAG_SNAT, CT_FORWARD, CT_REPLY, CT_SNAT_IN, CT_SNAT_OUT, CtKey, CtValue,
};

use super::{EbpfDataplane, EbpfError, encode::addr_of, writer::remove_ignoring_missing};
use crate::model::{Protocol, TableDiff};

/// (VIP, port, backend, backend port), ports in network byte order, of the
/// UDP flows `diff` makes stale ([`TableDiff::stale_udp_flows`]).
pub(super) fn stale_udp_flows(diff: &TableDiff) -> HashSet<(Addr, u16, Addr, u16)> {
    diff.stale_udp_flows()
        .into_iter()
        .map(|(key, b)| {
            let (vip, _) = addr_of(key.ip);
            let (addr, _) = addr_of(b.ip);
            (vip, key.port.to_be(), addr, b.port.to_be())
        })
        .collect()
}

impl EbpfDataplane {
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
    /// flush achieves.
    pub(super) fn forget_udp_flows(
        &mut self,
        stale: &HashSet<(Addr, u16, Addr, u16)>,
    ) -> Result<usize, EbpfError> {
        // Walks the whole table, but only when a UDP backend went away.
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
                CT_REPLY => stale.contains(&(v.nat_addr, v.nat_port, k.src, k.sport)),
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
                        dir: CT_SNAT_OUT,
                        ..*k
                    });
                }
            }
        }
        // The masquerade legs: client -> backend at egress, and the node
        // port it was given at ingress.
        for (k, v) in &all {
            if k.dir == CT_SNAT_OUT && snat_out.contains(k) {
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
        for key in &doomed {
            remove_ignoring_missing(&mut self.conntrack, key)?;
        }
        if !doomed.is_empty() {
            tracing::debug!(
                entries = doomed.len(),
                "forgot UDP flows to removed backends"
            );
        }
        Ok(doomed.len())
    }
}
