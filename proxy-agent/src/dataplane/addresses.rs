//! The node's own addresses: followed live from the kernel (rtnetlink), and
//! turned, with the Node object and the settings, into the [`NodeNetwork`] a
//! dataplane programs.
//!
//! [`node_network`] is a pure function; [`follow_addresses`] only keeps a
//! list of the interface addresses up to date.
//!
//! Loopback and IPv6 link-local addresses never serve NodePorts unless a
//! `--nodeport-addresses` CIDR names them explicitly: a NodePort reachable on
//! 127.0.0.1 lets anything on the node's link reach it through a route to
//! loopback (CVE-2020-8558).
use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use futures::StreamExt;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use k8s_openapi::api::core::v1::Node;
use rtnetlink::{
    MulticastGroup,
    packet_core::NetlinkPayload,
    packet_route::{
        RouteNetlinkMessage,
        address::{
            AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage, AddressScope,
        },
    },
};
use tokio::sync::watch;

use super::NodeNetwork;
use crate::config::NodePortAddresses;

/// One address of one interface, as the kernel reports it.
///
/// The derived order (interface index, then address) is the order in which
/// the SNAT fallback picks an address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct InterfaceAddress {
    pub ifindex: u32,
    /// The local address (`IFA_LOCAL`, else `IFA_ADDRESS`).
    pub ip: IpAddr,
    pub prefix_len: u8,
    /// Scope narrower than global (host, link, ...): never a source for
    /// masqueraded traffic.
    pub link_scope: bool,
}

/// The settings [`node_network`] applies to the addresses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeNetworkSettings {
    /// `--nodeport-addresses`; `None` (or an empty CIDR list): every local
    /// address except loopback and IPv6 link-local.
    pub nodeport_addresses: Option<NodePortAddresses>,
    /// `--cluster-cidr`, passed through.
    pub cluster_cidrs: Vec<IpNet>,
    /// `--masquerade-all`, passed through.
    pub masquerade_all: bool,
    /// Which sources are this node's pods: `cluster_cidrs`, or the Node's
    /// `spec.podCIDRs`.
    pub detect_local: DetectLocal,
}

/// How traffic from this node's pods is told from other traffic
/// (kube-proxy's `detectLocalMode`, `--detect-local-mode`): what the
/// dataplanes take as the pods' CIDRs for masquerade and the Local
/// traffic policies.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum DetectLocal {
    /// A source in `--cluster-cidr`.
    #[default]
    #[value(name = "ClusterCIDR")]
    ClusterCidr,
    /// A source in this node's `spec.podCIDRs`.
    #[value(name = "NodeCIDR")]
    NodeCidr,
}

const NODE_INTERNAL_IP: &str = "InternalIP";
const NODE_EXTERNAL_IP: &str = "ExternalIP";

/// The node's network facts from its interface addresses, its Node object
/// (when known) and the settings.
///
/// - NodePort addresses: with no filter, every local address except loopback
///   (127.0.0.0/8, ::1) and IPv6 link-local (fe80::/10). With CIDRs, the
///   local addresses inside any of them; a loopback or link-local address
///   only when a CIDR lying within its range contains it (`127.0.0.0/8`,
///   `::1/128`, `fe80::/64`), never through a wider one such as `0.0.0.0/0`.
///   With `primary`, the primary address of each family (below).
/// - SNAT address per family: the Node's first InternalIP of that family
///   that is a local address, else the first (lowest interface index, then
///   lowest address) global-scope local address of that family.
/// - Primary address per family: the Node's first local InternalIP of that
///   family, else its first local ExternalIP; none when the Node object has
///   no local address of that family. Without a Node object, the SNAT choice.
///
/// Loopback and link-local addresses are never a SNAT or primary address,
/// whatever the Node object says.
pub fn node_network(
    addresses: &[InterfaceAddress],
    node: Option<&Node>,
    settings: &NodeNetworkSettings,
) -> NodeNetwork {
    let local: BTreeSet<IpAddr> = addresses.iter().map(|a| a.ip).collect();
    let nodeport_addresses = match &settings.nodeport_addresses {
        None => all_but_special(&local),
        Some(NodePortAddresses::Cidrs(cidrs)) if cidrs.is_empty() => all_but_special(&local),
        Some(NodePortAddresses::Cidrs(cidrs)) => local
            .iter()
            .copied()
            .filter(|ip| cidrs.iter().any(|c| cidr_selects(c, *ip)))
            .collect(),
        Some(NodePortAddresses::Primary) => [Family::V4, Family::V6]
            .into_iter()
            .filter_map(|f| primary_address(addresses, &local, node, f))
            .collect(),
    };
    NodeNetwork {
        nodeport_addresses,
        snat_v4: snat_address(addresses, &local, node, Family::V4).map(|ip| match ip {
            IpAddr::V4(ip) => ip,
            IpAddr::V6(_) => unreachable!("snat_address keeps the family"),
        }),
        snat_v6: snat_address(addresses, &local, node, Family::V6).map(|ip| match ip {
            IpAddr::V6(ip) => ip,
            IpAddr::V4(_) => unreachable!("snat_address keeps the family"),
        }),
        cluster_cidrs: match settings.detect_local {
            DetectLocal::ClusterCidr => settings.cluster_cidrs.clone(),
            DetectLocal::NodeCidr => node_pod_cidrs(node),
        },
        masquerade_all: settings.masquerade_all,
        // The cluster's, not the node's: the sync loop adds them.
        service_cidrs: Vec::new(),
    }
}

/// The Node's `spec.podCIDRs` (else `spec.podCIDR`), those that parse.
fn node_pod_cidrs(node: Option<&Node>) -> Vec<IpNet> {
    let Some(spec) = node.and_then(|n| n.spec.as_ref()) else {
        return Vec::new();
    };
    let listed: Vec<&String> = match (&spec.pod_cidrs, &spec.pod_cidr) {
        (Some(list), _) if !list.is_empty() => list.iter().collect(),
        (_, Some(one)) => vec![one],
        _ => Vec::new(),
    };
    listed
        .into_iter()
        .filter_map(|c| c.parse::<IpNet>().ok())
        .map(|c| c.trunc())
        .collect()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => Self::V4,
            IpAddr::V6(_) => Self::V6,
        }
    }
}

/// The range of addresses that serve NodePorts only when asked for by name
/// (loopback, IPv6 link-local) that `ip` is in, if any.
fn special_range(ip: IpAddr) -> Option<IpNet> {
    match ip {
        IpAddr::V4(v4) if v4.is_loopback() => Some(IpNet::V4(
            Ipv4Net::new(Ipv4Addr::new(127, 0, 0, 0), 8).expect("valid prefix"),
        )),
        IpAddr::V6(v6) if v6.is_loopback() => Some(IpNet::V6(
            Ipv6Net::new(Ipv6Addr::LOCALHOST, 128).expect("valid prefix"),
        )),
        IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80 => Some(IpNet::V6(
            Ipv6Net::new(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10).expect("valid prefix"),
        )),
        _ => None,
    }
}

fn all_but_special(local: &BTreeSet<IpAddr>) -> BTreeSet<IpAddr> {
    local
        .iter()
        .copied()
        .filter(|ip| special_range(*ip).is_none())
        .collect()
}

/// Whether a `--nodeport-addresses` CIDR selects the local address `ip`: it
/// contains it, and for a loopback or link-local address it lies within
/// that range (so `0.0.0.0/0` does not select 127.0.0.1, `127.0.0.0/8` does).
fn cidr_selects(cidr: &IpNet, ip: IpAddr) -> bool {
    cidr.contains(&ip)
        && match special_range(ip) {
            None => true,
            Some(range) => range.contains(cidr),
        }
}

/// The addresses of `kind` (InternalIP, ExternalIP) and `family` in the
/// Node's status that are local, in the Node's order.
fn node_addresses<'a>(
    node: Option<&'a Node>,
    local: &'a BTreeSet<IpAddr>,
    kind: &'a str,
    family: Family,
) -> impl Iterator<Item = IpAddr> + 'a {
    node.and_then(|n| n.status.as_ref())
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(move |a| a.type_ == kind)
        .filter_map(|a| a.address.trim().parse::<IpAddr>().ok())
        .filter(move |ip| {
            Family::of(*ip) == family && local.contains(ip) && special_range(*ip).is_none()
        })
}

fn snat_address(
    addresses: &[InterfaceAddress],
    local: &BTreeSet<IpAddr>,
    node: Option<&Node>,
    family: Family,
) -> Option<IpAddr> {
    node_addresses(node, local, NODE_INTERNAL_IP, family)
        .next()
        .or_else(|| interface_choice(addresses, family))
}

fn primary_address(
    addresses: &[InterfaceAddress],
    local: &BTreeSet<IpAddr>,
    node: Option<&Node>,
    family: Family,
) -> Option<IpAddr> {
    match node {
        Some(_) => node_addresses(node, local, NODE_INTERNAL_IP, family)
            .next()
            .or_else(|| node_addresses(node, local, NODE_EXTERNAL_IP, family).next()),
        None => interface_choice(addresses, family),
    }
}

/// The first (lowest interface index, then lowest address) global-scope,
/// non-loopback address of `family`.
fn interface_choice(addresses: &[InterfaceAddress], family: Family) -> Option<IpAddr> {
    addresses
        .iter()
        .filter(|a| Family::of(a.ip) == family && !a.link_scope && special_range(a.ip).is_none())
        .min_by_key(|a| (a.ifindex, a.ip))
        .map(|a| a.ip)
}

// ---------------------------------------------------------------------------
// Following the kernel's addresses.

/// Why following the interface addresses stopped.
#[derive(Debug, thiserror::Error)]
pub enum AddressError {
    #[error("opening a netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("listing interface addresses: {0}")]
    Dump(#[source] rtnetlink::Error),
    #[error("the netlink address event stream ended")]
    StreamEnded,
}

/// How often the whole list is read again, repairing whatever events were
/// lost (a netlink multicast socket drops messages when its buffer is full).
const RESYNC_PERIOD: Duration = Duration::from_secs(60);

/// Keeps `tx` equal to the list of interface addresses (sorted), until an
/// error. The first complete list is always sent (so a receiver can tell it
/// arrived); later lists only when they differ.
///
/// Needs no privilege: reading addresses and joining the address multicast
/// groups are open to every process.
pub async fn follow_addresses(
    tx: watch::Sender<Vec<InterfaceAddress>>,
) -> Result<(), AddressError> {
    // Subscribe before dumping, so that a change made during the dump is
    // seen as an event afterwards (events are applied in order, so replaying
    // one the dump already reflects ends in the same state).
    let (conn, _mc_handle, mut events) = rtnetlink::new_multicast_connection(&[
        MulticastGroup::Ipv4Ifaddr,
        MulticastGroup::Ipv6Ifaddr,
    ])
    .map_err(AddressError::Socket)?;
    tokio::spawn(conn);
    let (conn, handle, _) = rtnetlink::new_connection().map_err(AddressError::Socket)?;
    tokio::spawn(conn);

    let mut table = AddressTable::default();
    table.replace(dump(&handle).await?);
    tx.send_replace(table.to_vec());

    let mut resync =
        tokio::time::interval_at(tokio::time::Instant::now() + RESYNC_PERIOD, RESYNC_PERIOD);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            event = events.next() => {
                let Some((message, _)) = event else {
                    return Err(AddressError::StreamEnded);
                };
                let NetlinkPayload::InnerMessage(inner) = message.payload else {
                    continue;
                };
                if !table.apply(&inner) {
                    continue;
                }
            }
            _ = resync.tick() => {
                table.replace(dump(&handle).await?);
            }
        }
        let list = table.to_vec();
        tx.send_if_modified(|current| {
            let changed = *current != list;
            if changed {
                *current = list;
            }
            changed
        });
        if tx.is_closed() {
            // Nobody reads the list any more.
            return Ok(());
        }
    }
}

async fn dump(handle: &rtnetlink::Handle) -> Result<Vec<AddressMessage>, AddressError> {
    let mut out = Vec::new();
    let mut stream = handle.address().get().execute();
    while let Some(msg) = stream.next().await {
        out.push(msg.map_err(AddressError::Dump)?);
    }
    Ok(out)
}

/// The addresses as last reported, keyed by (interface, address, prefix).
#[derive(Debug, Default)]
struct AddressTable {
    addresses: BTreeSet<InterfaceAddress>,
}

impl AddressTable {
    fn to_vec(&self) -> Vec<InterfaceAddress> {
        self.addresses.iter().copied().collect()
    }

    fn replace(&mut self, dump: Vec<AddressMessage>) {
        self.addresses = dump.iter().filter_map(usable).collect();
    }

    /// Applies one RTM_NEWADDR / RTM_DELADDR; returns whether the set changed.
    fn apply(&mut self, message: &RouteNetlinkMessage) -> bool {
        let (msg, deleted) = match message {
            RouteNetlinkMessage::NewAddress(msg) => (msg, false),
            RouteNetlinkMessage::DelAddress(msg) => (msg, true),
            _ => return false,
        };
        let Some(addr) = parse(msg) else {
            return false;
        };
        // An address changes in place (scope, flags): drop the old entry.
        let before = self.addresses.clone();
        self.addresses.retain(|a| {
            (a.ifindex, a.ip, a.prefix_len) != (addr.ifindex, addr.ip, addr.prefix_len)
        });
        if !deleted && !dad_failed(msg) {
            self.addresses.insert(addr);
        }
        self.addresses != before
    }
}

/// The address of `msg`, unless duplicate address detection failed for it
/// (the kernel keeps such an IPv6 address but never uses it).
fn usable(msg: &AddressMessage) -> Option<InterfaceAddress> {
    parse(msg).filter(|_| !dad_failed(msg))
}

fn parse(msg: &AddressMessage) -> Option<InterfaceAddress> {
    let mut local = None;
    let mut address = None;
    for attr in &msg.attributes {
        match attr {
            AddressAttribute::Local(ip) => local = Some(*ip),
            AddressAttribute::Address(ip) => address = Some(*ip),
            _ => {}
        }
    }
    // On a point-to-point link IFA_ADDRESS is the peer; IFA_LOCAL is ours.
    let ip = local.or(address)?;
    Some(InterfaceAddress {
        ifindex: msg.header.index,
        ip,
        prefix_len: msg.header.prefix_len,
        link_scope: msg.header.scope != AddressScope::Universe,
    })
}

fn dad_failed(msg: &AddressMessage) -> bool {
    msg.header.flags.contains(AddressHeaderFlags::Dadfailed)
        || msg
            .attributes
            .iter()
            .any(|a| matches!(a, AddressAttribute::Flags(f) if f.contains(AddressFlags::Dadfailed)))
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{NodeAddress, NodeStatus};

    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    /// `"2 10.0.0.5/24"`, `"1 127.0.0.1/8 host"`: index, CIDR, optional scope.
    fn addr(spec: &str) -> InterfaceAddress {
        let mut parts = spec.split_whitespace();
        let ifindex = parts.next().unwrap().parse().unwrap();
        let (ip_text, prefix) = parts.next().unwrap().split_once('/').unwrap();
        let link_scope = match parts.next() {
            None | Some("global") => false,
            Some("link" | "host") => true,
            Some(other) => panic!("scope {other}"),
        };
        InterfaceAddress {
            ifindex,
            ip: ip(ip_text),
            prefix_len: prefix.parse().unwrap(),
            link_scope,
        }
    }

    /// A typical dual-stack node: loopback, eth0 with a global and a
    /// link-local address, and a second interface.
    fn host() -> Vec<InterfaceAddress> {
        [
            "1 127.0.0.1/8 host",
            "1 ::1/128 host",
            "2 10.0.0.5/24",
            "2 fd00::5/64",
            "2 fe80::1/64 link",
            "3 192.168.1.7/24",
            "3 fe80::2/64 link",
        ]
        .into_iter()
        .map(addr)
        .collect()
    }

    fn node_with(addresses: &[(&str, &str)]) -> Node {
        Node {
            status: Some(NodeStatus {
                addresses: Some(
                    addresses
                        .iter()
                        .map(|(kind, a)| NodeAddress {
                            type_: kind.to_string(),
                            address: a.to_string(),
                        })
                        .collect(),
                ),
                ..NodeStatus::default()
            }),
            ..Node::default()
        }
    }

    fn set(ips: &[&str]) -> BTreeSet<IpAddr> {
        ips.iter().map(|s| ip(s)).collect()
    }

    fn cidrs(list: &[&str]) -> Option<NodePortAddresses> {
        Some(NodePortAddresses::Cidrs(
            list.iter().map(|s| net(s)).collect(),
        ))
    }

    fn nodeports(
        addresses: &[InterfaceAddress],
        filter: Option<NodePortAddresses>,
        node: Option<&Node>,
    ) -> BTreeSet<IpAddr> {
        let settings = NodeNetworkSettings {
            nodeport_addresses: filter,
            ..NodeNetworkSettings::default()
        };
        node_network(addresses, node, &settings).nodeport_addresses
    }

    #[test]
    fn nodeport_addresses_by_filter() {
        let no_node = None;
        let cases: &[(&str, Option<NodePortAddresses>, &[&str])] = &[
            (
                "no filter: all but loopback and link-local",
                None,
                &["10.0.0.5", "fd00::5", "192.168.1.7"],
            ),
            (
                "an empty CIDR list is no filter",
                cidrs(&[]),
                &["10.0.0.5", "fd00::5", "192.168.1.7"],
            ),
            (
                "0.0.0.0/0 does not include loopback",
                cidrs(&["0.0.0.0/0"]),
                &["10.0.0.5", "192.168.1.7"],
            ),
            (
                "::/0 includes neither ::1 nor link-local",
                cidrs(&["::/0"]),
                &["fd00::5"],
            ),
            (
                "both families, everything",
                cidrs(&["0.0.0.0/0", "::/0"]),
                &["10.0.0.5", "fd00::5", "192.168.1.7"],
            ),
            (
                "127.0.0.0/8 names loopback explicitly",
                cidrs(&["127.0.0.0/8"]),
                &["127.0.0.1"],
            ),
            (
                "127.0.0.1/32 too",
                cidrs(&["127.0.0.1/32", "10.0.0.0/8"]),
                &["10.0.0.5", "127.0.0.1"],
            ),
            (
                "127.0.0.0/7 is wider than loopback: not explicit",
                cidrs(&["127.0.0.0/7"]),
                &[],
            ),
            ("::1/128 names IPv6 loopback", cidrs(&["::1/128"]), &["::1"]),
            (
                "fe80::/10 names link-local",
                cidrs(&["fe80::/10"]),
                &["fe80::1", "fe80::2"],
            ),
            (
                "one link-local address",
                cidrs(&["fe80::2/128"]),
                &["fe80::2"],
            ),
            (
                "a subnet selects its addresses only",
                cidrs(&["192.168.0.0/16"]),
                &["192.168.1.7"],
            ),
            (
                "a CIDR matching no local address selects nothing",
                cidrs(&["172.16.0.0/12"]),
                &[],
            ),
            (
                "primary without a Node: first global address per family",
                Some(NodePortAddresses::Primary),
                &["10.0.0.5", "fd00::5"],
            ),
        ];
        for (name, filter, want) in cases {
            assert_eq!(
                nodeports(&host(), filter.clone(), no_node),
                set(want),
                "{name}"
            );
        }
    }

    #[test]
    fn primary_follows_the_node_object() {
        type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a [&'a str]);
        let cases: &[Case] = &[
            (
                "InternalIP of each family",
                &[("InternalIP", "192.168.1.7"), ("InternalIP", "fd00::5")],
                &["192.168.1.7", "fd00::5"],
            ),
            (
                "ExternalIP when there is no InternalIP",
                &[("ExternalIP", "192.168.1.7"), ("Hostname", "node-a")],
                &["192.168.1.7"],
            ),
            (
                "InternalIP preferred over ExternalIP",
                &[("ExternalIP", "192.168.1.7"), ("InternalIP", "10.0.0.5")],
                &["10.0.0.5"],
            ),
            (
                "a non-local InternalIP is dropped; a local ExternalIP stays",
                &[("InternalIP", "203.0.113.9"), ("ExternalIP", "10.0.0.5")],
                &["10.0.0.5"],
            ),
            (
                "nothing local: nothing (no guessing while the Node exists)",
                &[("InternalIP", "203.0.113.9")],
                &[],
            ),
            (
                "first local InternalIP of the family, not the second",
                &[("InternalIP", "10.0.0.5"), ("InternalIP", "192.168.1.7")],
                &["10.0.0.5"],
            ),
            (
                "a loopback InternalIP is never primary",
                &[("InternalIP", "127.0.0.1")],
                &[],
            ),
            (
                "unparsable addresses are skipped",
                &[("InternalIP", "nope")],
                &[],
            ),
        ];
        for (name, node_addrs, want) in cases {
            let node = node_with(node_addrs);
            assert_eq!(
                nodeports(&host(), Some(NodePortAddresses::Primary), Some(&node)),
                set(want),
                "{name}"
            );
        }
    }

    #[test]
    fn snat_address_per_family() {
        type Case<'a> = (
            &'a str,
            Vec<InterfaceAddress>,
            Option<Node>,
            Option<&'a str>,
            Option<&'a str>,
        );
        let cases: Vec<Case> = vec![
            (
                "interfaces only: lowest index first",
                host(),
                None,
                Some("10.0.0.5"),
                Some("fd00::5"),
            ),
            (
                "the Node's local InternalIP wins",
                host(),
                Some(node_with(&[("InternalIP", "192.168.1.7")])),
                Some("192.168.1.7"),
                Some("fd00::5"),
            ),
            (
                "a non-local InternalIP falls back to the interfaces",
                host(),
                Some(node_with(&[
                    ("InternalIP", "203.0.113.9"),
                    ("InternalIP", "2001:db8::9"),
                ])),
                Some("10.0.0.5"),
                Some("fd00::5"),
            ),
            (
                "an ExternalIP is not a SNAT address",
                host(),
                Some(node_with(&[("ExternalIP", "192.168.1.7")])),
                Some("10.0.0.5"),
                Some("fd00::5"),
            ),
            (
                "loopback and link scope are never chosen",
                [
                    "1 127.0.0.1/8 host",
                    "1 ::1/128 host",
                    "2 fe80::1/64 link",
                    "2 169.254.3.3/16 link",
                ]
                .into_iter()
                .map(addr)
                .collect(),
                None,
                None,
                None,
            ),
            (
                "lowest address on the same interface",
                ["4 10.0.0.9/24", "4 10.0.0.3/24", "5 10.0.0.1/24"]
                    .into_iter()
                    .map(addr)
                    .collect(),
                None,
                Some("10.0.0.3"),
                None,
            ),
            (
                "IPv6 only",
                ["1 ::1/128 host", "2 2001:db8::1/64", "2 fe80::1/64 link"]
                    .into_iter()
                    .map(addr)
                    .collect(),
                None,
                None,
                Some("2001:db8::1"),
            ),
            ("no addresses at all", Vec::new(), None, None, None),
        ];
        for (name, addresses, node, v4, v6) in cases {
            let net = node_network(&addresses, node.as_ref(), &NodeNetworkSettings::default());
            assert_eq!(net.snat_v4.map(IpAddr::V4), v4.map(ip), "{name}: v4");
            assert_eq!(net.snat_v6.map(IpAddr::V6), v6.map(ip), "{name}: v6");
        }
    }

    /// detectLocalMode NodeCIDR: this Node's podCIDRs are the pods' CIDRs
    /// (podCIDR when the list is absent; none without a Node), whatever
    /// --cluster-cidr says.
    #[test]
    fn node_cidr_takes_the_pods_cidrs_from_the_node() {
        let settings = NodeNetworkSettings {
            cluster_cidrs: vec![net("10.244.0.0/16")],
            detect_local: DetectLocal::NodeCidr,
            ..NodeNetworkSettings::default()
        };
        let with_spec = |spec: k8s_openapi::api::core::v1::NodeSpec| Node {
            spec: Some(spec),
            ..node_with(&[("InternalIP", "192.168.1.10")])
        };
        let node = with_spec(k8s_openapi::api::core::v1::NodeSpec {
            pod_cidr: Some("10.244.3.0/24".into()),
            pod_cidrs: Some(vec!["10.244.3.0/24".into(), "fd00:10:244:3::1/64".into()]),
            ..Default::default()
        });
        assert_eq!(
            node_network(&[], Some(&node), &settings).cluster_cidrs,
            vec![net("10.244.3.0/24"), net("fd00:10:244:3::/64")]
        );
        let old = with_spec(k8s_openapi::api::core::v1::NodeSpec {
            pod_cidr: Some("10.244.4.0/24".into()),
            ..Default::default()
        });
        assert_eq!(
            node_network(&[], Some(&old), &settings).cluster_cidrs,
            vec![net("10.244.4.0/24")]
        );
        assert!(node_network(&[], None, &settings).cluster_cidrs.is_empty());
        let cluster = NodeNetworkSettings {
            detect_local: DetectLocal::ClusterCidr,
            ..settings
        };
        assert_eq!(
            node_network(&[], Some(&node), &cluster).cluster_cidrs,
            vec![net("10.244.0.0/16")]
        );
    }

    #[test]
    fn settings_pass_through_and_empty_input() {
        let settings = NodeNetworkSettings {
            nodeport_addresses: None,
            cluster_cidrs: vec![net("10.244.0.0/16"), net("fd00:10:244::/56")],
            masquerade_all: true,
            detect_local: DetectLocal::ClusterCidr,
        };
        let got = node_network(&[], None, &settings);
        assert_eq!(
            got,
            NodeNetwork {
                nodeport_addresses: BTreeSet::new(),
                snat_v4: None,
                snat_v6: None,
                cluster_cidrs: settings.cluster_cidrs.clone(),
                masquerade_all: true,
                service_cidrs: Vec::new(),
            }
        );
        // Primary with nothing: nothing, not a panic.
        assert!(nodeports(&[], Some(NodePortAddresses::Primary), None).is_empty());
        assert!(nodeports(&[], Some(NodePortAddresses::Primary), Some(&node_with(&[]))).is_empty());
    }

    #[test]
    fn the_same_address_on_two_interfaces_counts_once() {
        let addresses: Vec<_> = ["2 10.0.0.5/24", "3 10.0.0.5/32"]
            .into_iter()
            .map(addr)
            .collect();
        assert_eq!(nodeports(&addresses, None, None), set(&["10.0.0.5"]));
    }

    // -- the event-driven table --------------------------------------------

    fn message(spec: &str) -> AddressMessage {
        let a = addr(spec);
        let mut msg = AddressMessage::default();
        msg.header.index = a.ifindex;
        msg.header.prefix_len = a.prefix_len;
        msg.header.scope = if a.link_scope {
            AddressScope::Link
        } else {
            AddressScope::Universe
        };
        msg.attributes.push(AddressAttribute::Address(a.ip));
        msg
    }

    #[test]
    fn the_table_follows_new_and_deleted_addresses() {
        let mut table = AddressTable::default();
        table.replace(vec![
            message("1 127.0.0.1/8 host"),
            message("2 10.0.0.5/24"),
        ]);
        assert_eq!(
            table.to_vec(),
            vec![addr("1 127.0.0.1/8 host"), addr("2 10.0.0.5/24")]
        );

        let new = RouteNetlinkMessage::NewAddress(message("2 10.0.0.6/24"));
        assert!(table.apply(&new));
        assert!(!table.apply(&new), "the same address again is no change");
        assert_eq!(table.to_vec().len(), 3);

        // A scope change replaces the entry rather than adding one.
        assert!(table.apply(&RouteNetlinkMessage::NewAddress(message(
            "2 10.0.0.6/24 link"
        ))));
        assert_eq!(table.to_vec().len(), 3);
        assert!(table.to_vec().contains(&addr("2 10.0.0.6/24 link")));

        assert!(table.apply(&RouteNetlinkMessage::DelAddress(message("2 10.0.0.6/24"))));
        assert!(!table.apply(&RouteNetlinkMessage::DelAddress(message("2 10.0.0.6/24"))));
        assert_eq!(
            table.to_vec(),
            vec![addr("1 127.0.0.1/8 host"), addr("2 10.0.0.5/24")]
        );

        // Other messages change nothing.
        assert!(!table.apply(&RouteNetlinkMessage::NewLink(Default::default())));
    }

    #[test]
    fn local_attribute_wins_and_dad_failures_are_left_out() {
        // Point-to-point: IFA_ADDRESS is the peer, IFA_LOCAL ours.
        let mut msg = message("7 192.0.2.2/32");
        msg.attributes
            .push(AddressAttribute::Local(ip("192.0.2.1")));
        assert_eq!(usable(&msg).map(|a| a.ip), Some(ip("192.0.2.1")));

        let mut failed = message("2 fd00::7/64");
        failed.attributes.push(AddressAttribute::Flags(
            AddressFlags::Dadfailed | AddressFlags::Tentative,
        ));
        assert_eq!(usable(&failed), None);
        let mut table = AddressTable::default();
        table.replace(vec![message("2 fd00::7/64")]);
        assert!(table.apply(&RouteNetlinkMessage::NewAddress(failed)));
        assert!(
            table.to_vec().is_empty(),
            "a DAD failure withdraws the address"
        );

        let mut empty = AddressMessage::default();
        empty.header.index = 3;
        assert_eq!(parse(&empty), None, "no address attribute");
    }

    /// Reading addresses needs no privilege; where netlink is unavailable
    /// (some sandboxes) the test says so and passes.
    #[tokio::test]
    async fn follow_addresses_reports_the_loopback_address() {
        let (tx, mut rx) = watch::channel(Vec::new());
        let task = tokio::spawn(follow_addresses(tx));
        let first = tokio::time::timeout(Duration::from_secs(5), rx.changed()).await;
        if task.is_finished() {
            let result = task.await.unwrap();
            eprintln!("netlink unavailable here, skipping: {result:?}");
            return;
        }
        first.expect("first list within 5s").expect("sender alive");
        let list = rx.borrow().clone();
        task.abort();
        assert!(
            list.iter().any(|a| a.ip.is_loopback()),
            "loopback in {list:?}"
        );
        let mut sorted = list.clone();
        sorted.sort();
        assert_eq!(list, sorted, "the list is sorted");
    }

    /// The event path: in a network namespace of its own (needs
    /// CAP_SYS_ADMIN and CAP_NET_ADMIN; skipped without them), an address
    /// added to and removed from `lo` shows up in the list, once each.
    #[test]
    fn follow_addresses_sees_an_address_come_and_go() {
        crate::dataplane::in_private_netns(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let (tx, mut rx) = watch::channel(Vec::new());
                let task = tokio::spawn(follow_addresses(tx));
                let next = async |rx: &mut watch::Receiver<Vec<InterfaceAddress>>| {
                    tokio::time::timeout(Duration::from_secs(5), rx.changed())
                        .await
                        .expect("a list within 5s")
                        .expect("follower alive");
                    rx.borrow_and_update().clone()
                };
                // A new namespace's lo (index 1) is down and has no address.
                let first = next(&mut rx).await;
                let (conn, handle, _) = rtnetlink::new_connection().unwrap();
                tokio::spawn(conn);
                let ip = ip("192.0.2.9");
                handle.address().add(1, ip, 32).execute().await.unwrap();
                let added = next(&mut rx).await;
                let want = InterfaceAddress {
                    ifindex: 1,
                    ip,
                    prefix_len: 32,
                    link_scope: false,
                };
                assert!(added.contains(&want) && !first.contains(&want), "{added:?}");
                let mut dump = handle.address().get().set_address_filter(ip).execute();
                let msg = dump.next().await.unwrap().unwrap();
                handle.address().del(msg).execute().await.unwrap();
                let removed = next(&mut rx).await;
                assert_eq!(removed, first);
                task.abort();
            });
        });
    }
}
