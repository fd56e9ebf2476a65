//! Chain names: kube-proxy's fixed ones, and the per-frontend ones, which
//! carry a hash of the frontend (and endpoint) that stays the same on every
//! run and version, since the kernel keeps the chains across restarts of
//! the agent.
use crate::{
    dataplane::netfilter::{fnv1a_128, proto_name},
    model::{Backend, FrontendKey},
};

/// nat: the services' entry point (also a filter chain of that name).
pub(super) const SERVICES_CHAIN: &str = "KUBE-SERVICES";
/// nat: NodePorts, jumped to from the end of `KUBE-SERVICES`.
pub(super) const NODEPORTS_CHAIN: &str = "KUBE-NODEPORTS";
pub(super) const POSTROUTING_CHAIN: &str = "KUBE-POSTROUTING";
pub(super) const MARK_MASQ_CHAIN: &str = "KUBE-MARK-MASQ";
/// filter: packets to external frontends that were not translated.
pub(super) const EXTERNAL_SERVICES_CHAIN: &str = "KUBE-EXTERNAL-SERVICES";
/// filter: packets to LoadBalancer IPs from outside their source ranges.
pub(super) const FIREWALL_CHAIN: &str = "KUBE-PROXY-FIREWALL";

/// Prefixes of the per-frontend chains (kube-proxy's too, `KUBE-XLB-` of
/// its older versions included): every chain of the nat table with one of
/// them is ours, wanted or not.
pub(super) const FRONTEND_PREFIXES: [&str; 6] = [
    "KUBE-SVC-",
    "KUBE-SVL-",
    "KUBE-SEP-",
    "KUBE-EXT-",
    "KUBE-FW-",
    "KUBE-XLB-",
];

/// The built-in chains our jumps stand in (and that cleanup deletes them
/// from).
pub(super) const BUILT_IN: [&str; 5] = ["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"];

/// The nat chains this mode writes whole besides the frontends' ones.
pub(super) fn is_top_level(chain: &str) -> bool {
    [
        SERVICES_CHAIN,
        NODEPORTS_CHAIN,
        POSTROUTING_CHAIN,
        MARK_MASQ_CHAIN,
    ]
    .contains(&chain)
}

/// 16 characters of RFC 4648 base32 of the first 80 bits of the hash of
/// `text` (a 128-bit FNV-1a: short, stable across versions, and enough
/// bits for chain names that must not collide). The hash's own 16 bytes
/// are hashed once more: FNV-1a mixes its last input bytes into few bits,
/// and names of endpoints that differ in one digit should not look alike.
pub(super) fn hash16(text: &str) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let once = fnv1a_128(text.as_bytes()).to_be_bytes();
    let bits = fnv1a_128(&once) >> 48;
    (0..16)
        .rev()
        .map(|i| char::from(ALPHABET[((bits >> (i * 5)) & 31) as usize]))
        .collect()
}

/// The text a frontend's names are hashed from. Changing it renames every
/// chain on upgrade: don't.
fn key_text(key: &FrontendKey) -> String {
    format!("{}/{}/{}", proto_name(key.protocol), key.ip, key.port)
}

fn frontend_hash(key: &FrontendKey) -> String {
    hash16(&key_text(key))
}

/// `KUBE-SVC-<hash>`: the choice among every endpoint of the frontend's
/// main view (or of the pods' view, when it has one).
pub(super) fn svc_chain(key: &FrontendKey) -> String {
    format!("KUBE-SVC-{}", frontend_hash(key))
}

/// `KUBE-SVL-<hash>`: the choice among the local endpoints of a frontend
/// whose pods have a view of their own.
pub(super) fn svl_chain(key: &FrontendKey) -> String {
    format!("KUBE-SVL-{}", frontend_hash(key))
}

/// `KUBE-EXT-<hash>`: the entry of an external frontend.
pub(super) fn ext_chain(key: &FrontendKey) -> String {
    format!("KUBE-EXT-{}", frontend_hash(key))
}

/// `KUBE-FW-<hash>`: the source ranges of a LoadBalancer frontend.
pub(super) fn fw_chain(key: &FrontendKey) -> String {
    format!("KUBE-FW-{}", frontend_hash(key))
}

/// `KUBE-SEP-<hash>`: one endpoint of one frontend.
pub(super) fn sep_chain(key: &FrontendKey, backend: &Backend) -> String {
    let text = format!("{}>{backend}", key_text(key));
    format!("KUBE-SEP-{}", hash16(&text))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::model::{
        Protocol,
        test_support::{backend, key, key_proto},
    };

    /// iptables' limit on chain names.
    const MAX_CHAIN_NAME: usize = 28;

    #[test]
    fn chain_names_are_stable_and_short() {
        let k = key("198.19.0.10", 80);
        let b = backend("198.18.1.10", 8080);
        // Names persist in the kernel across restarts and upgrades: these
        // values must never change. (Computed independently: FNV-1a 128 of
        // "tcp/198.19.0.10/80", FNV-1a 128 of its 16 big-endian bytes, top
        // 80 bits in RFC 4648 base32.)
        assert_eq!(svc_chain(&k), "KUBE-SVC-DEKHJ2P7TAIRGTG7");
        assert_eq!(sep_chain(&k, &b), "KUBE-SEP-3OAMRHB65YO446FJ");
        for name in [
            svc_chain(&k),
            svl_chain(&k),
            ext_chain(&k),
            fw_chain(&k),
            sep_chain(&k, &b),
        ] {
            assert!(name.len() <= MAX_CHAIN_NAME, "{name}");
        }
        let k6 = key_proto(
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            65535,
            Protocol::Sctp,
        );
        let b6 = backend("ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe", 65535);
        assert!(sep_chain(&k6, &b6).len() <= MAX_CHAIN_NAME);
        // Distinct for neighbours.
        let names: BTreeSet<String> = (0..=255u8)
            .flat_map(|i| {
                let k = key(&format!("198.19.0.{i}"), 80);
                let other = backend("198.18.2.1", 9090);
                [
                    svc_chain(&k),
                    sep_chain(&k, &backend(&format!("198.18.1.{i}"), 8080)),
                    sep_chain(&k, &other),
                ]
            })
            .collect();
        assert_eq!(names.len(), 3 * 256);
        assert!(
            hash16("x")
                .chars()
                .all(|c| c.is_ascii_uppercase() || ('2'..='7').contains(&c))
        );
    }
}
