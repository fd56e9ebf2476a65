//! What the ipvs mode makes of a frontend's plan: its virtual servers (one
//! on the frontend's own address, or one per NodePort address) with their
//! real servers, the address it binds on `kube-ipvs0`, and the elements it
//! adds to the companion nftables table's sets for what IPVS cannot do
//! (masquerade, drop, source ranges). Pure: unit-tested without a kernel.
use std::net::IpAddr;

use ipnet::IpNet;

use super::netlink::{RealServer, ServiceId, VirtualServer};
use crate::{
    dataplane::netfilter::{
        Action, Family, FrontendPlan, Masquerade, NodeNetwork, View, proto_name,
    },
    model::Backend,
};

/// A virtual server and the real servers it should have.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Server {
    pub virtual_server: VirtualServer,
    pub real_servers: Vec<RealServer>,
}

/// One element of a set of the companion table: the set's name (without
/// the family suffix) and the element in nft syntax.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Element {
    pub set: &'static str,
    pub family: Family,
    pub value: String,
}

impl Element {
    /// `masq4`, `nodeport-drop6`, ...
    pub fn set_name(&self) -> String {
        format!("{}{}", self.set, suffix(self.family))
    }
}

pub fn suffix(family: Family) -> &'static str {
    match family {
        Family::V4 => "4",
        Family::V6 => "6",
    }
}

/// What the ipvs mode programs for one frontend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpvsFrontend {
    pub servers: Vec<Server>,
    /// The address bound on `kube-ipvs0` (none for a NodePort, served on
    /// the node's own addresses).
    pub vip: Option<IpAddr>,
    /// Elements of the sets this frontend alone owns.
    pub elements: Vec<Element>,
    /// Backends that may be their own client (hairpin): a set element each,
    /// shared by every frontend with that backend.
    pub backends: Vec<Backend>,
}

/// nft's spelling of an address in a concatenation.
fn addr(ip: IpAddr) -> String {
    ip.to_string()
}

/// Renders `plan` with scheduler `scheduler` under `network`.
pub fn render(plan: &FrontendPlan, scheduler: &str, network: &NodeNetwork) -> IpvsFrontend {
    let key = plan.key;
    let protocol = u16::from(key.protocol.number());
    let addresses: Vec<IpAddr> = if plan.is_node_port() {
        // kube-proxy's IPVS mode never serves NodePorts on loopback.
        network
            .nodeport_addresses
            .iter()
            .filter(|ip| Family::of(**ip) == plan.family && !ip.is_loopback())
            .copied()
            .collect()
    } else {
        vec![key.ip]
    };
    // IPVS has one set of real servers per virtual server. The plan's main
    // view (the policy's backends) is it, but for an external frontend with
    // the Local policy and no local endpoint: kube-proxy's IPVS mode then
    // gives the virtual server the cluster-wide endpoints (its #97081), for
    // the pods and the node that the plan's other views serve, and this
    // mode drops the other clients before IPVS sees them (set
    // `local-fallback`), as the view's Drop says. With a local endpoint,
    // pods and the node are served by the local endpoints alone:
    // `Behaviour::ExternalLocalShortCircuitToEveryEndpoint`.
    let fallback = match (&plan.view.action, &plan.node_view) {
        (
            Action::Drop,
            Some(View {
                action: Action::Balance(cluster),
                ..
            }),
        ) => Some(cluster),
        _ => None,
    };
    let backends: Vec<Backend> = match (&plan.view.action, fallback) {
        (Action::Balance(backends), _) | (_, Some(backends)) => backends.clone(),
        (Action::Reject | Action::Drop, None) => Vec::new(),
    };
    let servers = addresses
        .iter()
        .map(|ip| Server {
            virtual_server: VirtualServer::new(
                ServiceId {
                    protocol,
                    addr: *ip,
                    port: key.port,
                },
                scheduler,
                plan.affinity_timeout_secs,
            ),
            real_servers: backends
                .iter()
                .map(|b| RealServer::masq(b.ip, b.port, 1))
                .collect(),
        })
        .collect();

    let proto = proto_name(key.protocol);
    let family = plan.family;
    // A frontend on its own address is matched by address, protocol and
    // port; a NodePort by protocol and port on a local address.
    let matched = if plan.is_node_port() {
        format!("{proto} . {}", key.port)
    } else {
        format!("{} . {proto} . {}", addr(key.ip), key.port)
    };
    let element = |set: &'static str, value: String| Element { set, family, value };
    let node_port = plan.is_node_port();
    // The set of a frontend's own address, or its NodePort twin.
    let own_or_node_port = |own: &'static str, of_node_port: &'static str| {
        element(if node_port { of_node_port } else { own }, matched.clone())
    };
    let mut elements = Vec::new();
    if !node_port {
        elements.push(element("services", matched.clone()));
    }
    match &plan.view.masquerade {
        Masquerade::Never => {}
        Masquerade::Always => elements.push(own_or_node_port("masq", "nodeport-masq")),
        Masquerade::SourceOutside(_) => {
            elements.push(own_or_node_port("masq-outside", "nodeport-masq-outside"))
        }
    }
    match plan.view.action {
        Action::Drop if fallback.is_some() => elements.push(own_or_node_port(
            "local-fallback",
            "nodeport-local-fallback",
        )),
        Action::Drop => elements.push(own_or_node_port("drop", "nodeport-drop")),
        Action::Reject => elements.push(own_or_node_port("reject", "nodeport-reject")),
        Action::Balance(_) => {}
    }
    if let Some(ranges) = &plan.source_ranges
        && !node_port
    {
        elements.push(element("restricted", matched.clone()));
        for range in ranges {
            elements.push(element("allowed", format!("{matched} . {}", net(range))));
        }
    }
    IpvsFrontend {
        servers,
        vip: (!node_port).then_some(key.ip),
        elements,
        backends,
    }
}

fn net(range: &IpNet) -> String {
    range.trunc().to_string()
}

/// The hairpin set's element of a backend: a client that is the backend
/// itself, after IPVS sent its own connection back to it.
pub fn hairpin_element(backend: &Backend) -> Element {
    Element {
        set: "hairpin",
        family: Family::of(backend.ip),
        value: format!(
            "{} . {} . {}",
            addr(backend.ip),
            addr(backend.ip),
            backend.port
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::{
        dataplane::netfilter::plan,
        model::{
            Backend, Frontend, FrontendKey, FrontendKind, Protocol,
            test_support::{backend, key_proto},
        },
    };

    fn network() -> NodeNetwork {
        NodeNetwork {
            nodeport_addresses: ["192.0.2.10", "127.0.0.1", "2001:db8::10"]
                .iter()
                .map(|a| a.parse().unwrap())
                .collect::<BTreeSet<IpAddr>>(),
            cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
            snat_v4: Some("192.0.2.10".parse().unwrap()),
            ..NodeNetwork::default()
        }
    }

    fn key(ip: &str, port: u16, protocol: Protocol) -> FrontendKey {
        key_proto(ip, port, protocol)
    }

    fn frontend(kind: FrontendKind, backends: &[Backend]) -> Frontend {
        Frontend {
            kind,
            ..crate::model::test_support::frontend("default", "web", backends)
        }
    }

    #[test]
    fn a_cluster_ip_is_one_virtual_server_bound_on_kube_ipvs0_masquerading_outsiders() {
        let k = key("10.96.0.10", 80, Protocol::Tcp);
        let mut fe = frontend(FrontendKind::ClusterIp, &[backend("10.244.1.5", 8080)]);
        fe.policy.affinity_timeout_secs = Some(10_800);
        let rendered = render(&plan(&k, &fe, &network()), "rr", &network());
        assert_eq!(rendered.vip, Some(k.ip));
        assert_eq!(rendered.servers.len(), 1);
        let server = &rendered.servers[0];
        assert_eq!(server.virtual_server.id.addr, k.ip);
        assert_eq!(server.virtual_server.id.port, 80);
        assert_eq!(server.virtual_server.id.protocol, 6);
        assert_eq!(server.virtual_server.persistence, Some(10_800));
        assert_eq!(server.virtual_server.scheduler, "rr");
        assert_eq!(
            server.real_servers,
            vec![RealServer::masq("10.244.1.5".parse().unwrap(), 8080, 1)]
        );
        let sets: Vec<(String, &str)> = rendered
            .elements
            .iter()
            .map(|e| (e.set_name(), e.value.as_str()))
            .collect();
        assert_eq!(
            sets,
            vec![
                ("services4".to_string(), "10.96.0.10 . tcp . 80"),
                ("masq-outside4".to_string(), "10.96.0.10 . tcp . 80"),
            ]
        );
    }

    #[test]
    fn a_node_port_is_a_virtual_server_per_node_address_of_its_family_never_loopback() {
        let k = key("0.0.0.0", 30080, Protocol::Udp);
        let fe = frontend(FrontendKind::NodePort, &[backend("10.244.1.5", 53)]);
        let rendered = render(&plan(&k, &fe, &network()), "rr", &network());
        assert_eq!(rendered.vip, None);
        let addrs: Vec<IpAddr> = rendered
            .servers
            .iter()
            .map(|s| s.virtual_server.id.addr)
            .collect();
        assert_eq!(addrs, vec!["192.0.2.10".parse::<IpAddr>().unwrap()]);
        // Cluster policy: every client masqueraded, matched by port.
        assert_eq!(rendered.elements.len(), 1);
        assert_eq!(rendered.elements[0].set_name(), "nodeport-masq4");
        assert_eq!(rendered.elements[0].value, "udp . 30080");
    }

    #[test]
    fn local_policy_without_local_endpoints_serves_the_cluster_only_and_source_ranges_restrict() {
        let k = key("203.0.113.7", 443, Protocol::Tcp);
        let mut fe = frontend(FrontendKind::LoadBalancer, &[]);
        fe.policy.local_only = true;
        fe.cluster_backends = vec![backend("10.244.2.9", 8443)];
        fe.policy.source_ranges = vec!["198.51.100.0/24".parse().unwrap()];
        let rendered = render(&plan(&k, &fe, &network()), "rr", &network());
        // kube-proxy's fallback: the cluster-wide endpoints, for the pods
        // and the node only.
        assert_eq!(
            rendered.servers[0].real_servers,
            vec![RealServer::masq("10.244.2.9".parse().unwrap(), 8443, 1)]
        );
        let sets: Vec<String> = rendered
            .elements
            .iter()
            .map(|e| format!("{} {}", e.set_name(), e.value))
            .collect();
        assert_eq!(
            sets,
            vec![
                "services4 203.0.113.7 . tcp . 443",
                "local-fallback4 203.0.113.7 . tcp . 443",
                "restricted4 203.0.113.7 . tcp . 443",
                "allowed4 203.0.113.7 . tcp . 443 . 198.51.100.0/24",
            ]
        );
    }

    #[test]
    fn local_policy_with_a_local_endpoint_serves_it_alone_and_nodeports_fall_back_by_port() {
        let mut fe = frontend(FrontendKind::NodePort, &[backend("10.244.1.5", 8080)]);
        fe.policy.local_only = true;
        fe.cluster_backends = vec![backend("10.244.1.5", 8080), backend("10.244.2.9", 8080)];
        let k = key("0.0.0.0", 30080, Protocol::Tcp);
        let rendered = render(&plan(&k, &fe, &network()), "rr", &network());
        assert_eq!(
            rendered.servers[0].real_servers,
            vec![RealServer::masq("10.244.1.5".parse().unwrap(), 8080, 1)]
        );
        assert!(rendered.elements.is_empty(), "{:?}", rendered.elements);
        fe.backends.clear();
        let rendered = render(&plan(&k, &fe, &network()), "rr", &network());
        assert_eq!(rendered.servers[0].real_servers.len(), 2);
        assert_eq!(rendered.elements.len(), 1);
        assert_eq!(rendered.elements[0].set_name(), "nodeport-local-fallback4");
        assert_eq!(rendered.elements[0].value, "tcp . 30080");
        // No endpoint anywhere: refused, with no real server.
        fe.cluster_backends.clear();
        let rendered = render(&plan(&k, &fe, &network()), "rr", &network());
        assert!(rendered.servers[0].real_servers.is_empty());
        assert_eq!(rendered.elements[0].set_name(), "nodeport-reject4");
    }

    #[test]
    fn ipv6_frontends_use_the_v6_sets_and_netmask() {
        let k = key("fd00::10", 53, Protocol::Udp);
        let fe = frontend(FrontendKind::ClusterIp, &[backend("fd00:244::5", 5353)]);
        let rendered = render(&plan(&k, &fe, &network()), "rr", &network());
        assert_eq!(rendered.servers[0].virtual_server.netmask, 128);
        assert!(
            rendered
                .elements
                .iter()
                .all(|e| e.set_name().ends_with('6'))
        );
        assert_eq!(
            hairpin_element(&backend("fd00:244::5", 5353)).value,
            "fd00:244::5 . fd00:244::5 . 5353"
        );
    }
}
