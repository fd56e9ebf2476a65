//! What the ipvs mode holds, read back from the kernel (`proxy-agent list`,
//! drift): the virtual servers and their real servers over generic
//! netlink, and what IPVS cannot say itself (drop, reject, source ranges)
//! from the companion table's sets. Needs no running agent.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    process::Command,
};

use ipnet::IpNet;
use serde_json::Value;

use super::{
    IpvsModeError, is_node_port, link,
    netlink::{IpvsError, IpvsSocket, RealServer, VirtualServer},
    render::suffix,
    table,
};
use crate::{
    dataplane::{
        held::{HeldAction, HeldCounters, HeldFrontend, HeldTable},
        netfilter::{Family, proto_name},
    },
    model::{Backend, FrontendKey, FrontendKind, Protocol},
};

/// The companion table's sets: name with its family suffix (`drop4`) to
/// elements in nft syntax (`10.96.0.10 . tcp . 80`), as the mode writes them.
pub type SetElements = BTreeMap<String, BTreeSet<String>>;

/// Reads what the ipvs mode holds; `nodeport_addresses` tells NodePort
/// virtual servers (one per node address) from the others. A kernel
/// without IPVS, or with no virtual server, holds nothing.
pub fn held(nodeport_addresses: &BTreeSet<IpAddr>) -> Result<HeldTable, IpvsModeError> {
    let mut out = HeldTable::new("ipvs");
    let mut socket = match IpvsSocket::open() {
        Ok(socket) => socket,
        Err(IpvsError::NoIpvs) => return Ok(out),
        Err(e) => return Err(e.into()),
    };
    let mut servers = Vec::new();
    for vs in socket.services()? {
        match socket.real_servers(&vs.id) {
            Ok(real) => servers.push((vs, real)),
            // Deleted between the two requests.
            Err(IpvsError::Kernel { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    if servers.is_empty() {
        return Ok(out);
    }
    let mut sets = read_sets()?;
    // A VIP bound on kube-ipvs0 is the mode's, even if the table lost it.
    for ip in link::addresses()? {
        sets.entry(format!("vips{}", suffix(Family::of(ip))))
            .or_default()
            .insert(ip.to_string());
    }
    decode(&servers, &sets, nodeport_addresses)
        .into_iter()
        .for_each(|f| out.insert(f));
    Ok(out)
}

/// The companion table's sets (none when the table does not exist).
fn read_sets() -> Result<SetElements, IpvsModeError> {
    let out = Command::new("nft")
        .args(["-j", "list", "table", "inet", table::TABLE])
        .output()
        .map_err(|e| IpvsModeError::List(e.to_string()))?;
    if !out.status.success() {
        let text = String::from_utf8_lossy(&out.stderr);
        if text.contains("No such file or directory") {
            return Ok(SetElements::new());
        }
        return Err(IpvsModeError::List(text.trim().to_string()));
    }
    sets_of_json(&out.stdout)
}

/// `nft -j list table`'s sets, their elements spelled as nft's text does.
pub fn sets_of_json(json: &[u8]) -> Result<SetElements, IpvsModeError> {
    let value: Value =
        serde_json::from_slice(json).map_err(|e| IpvsModeError::List(e.to_string()))?;
    let objects = value
        .get("nftables")
        .and_then(Value::as_array)
        .ok_or_else(|| IpvsModeError::List("no \"nftables\" array".into()))?;
    let mut out = SetElements::new();
    for set in objects.iter().filter_map(|o| o.get("set")) {
        let Some(name) = set.get("name").and_then(Value::as_str) else {
            continue;
        };
        let elements = out.entry(name.to_string()).or_default();
        let elems = set.get("elem").and_then(Value::as_array);
        elements.extend(elems.into_iter().flatten().filter_map(element_text));
    }
    Ok(out)
}

/// One JSON element in nft's text syntax (`a . tcp . 80`, `net/len`).
fn element_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Object(o) => {
            if let Some(parts) = o.get("concat").and_then(Value::as_array) {
                let parts: Option<Vec<String>> = parts.iter().map(element_text).collect();
                parts.map(|p| p.join(" . "))
            } else if let Some(p) = o.get("prefix") {
                let (addr, len) = (element_text(p.get("addr")?)?, p.get("len")?);
                Some(format!("{addr}/{len}"))
            } else {
                // An element with a timeout, counter or comment.
                element_text(o.get("elem")?.get("val")?)
            }
        }
        _ => None,
    }
}

/// The frontends that `servers` (virtual servers with their real servers)
/// and the companion table's `sets` make, as render.rs programs a plan:
/// virtual servers on the node's `nodeport_addresses` that no set names as
/// a frontend of their own are one NodePort per family, protocol and port;
/// virtual servers of other IPVS users (on no VIP of the mode, nor a
/// NodePort) are left out.
pub fn decode(
    servers: &[(VirtualServer, Vec<RealServer>)],
    sets: &SetElements,
    nodeport_addresses: &BTreeSet<IpAddr>,
) -> Vec<HeldFrontend> {
    let sets = Sets::parse(sets);
    let mut out: BTreeMap<FrontendKey, HeldFrontend> = BTreeMap::new();
    for (vs, real) in servers {
        let Some(protocol) = u8::try_from(vs.id.protocol)
            .ok()
            .and_then(Protocol::from_number)
        else {
            continue;
        };
        let own = FrontendKey {
            ip: vs.id.addr,
            port: vs.id.port,
            protocol,
        };
        let node_port = FrontendKey {
            ip: unspecified(Family::of(own.ip)),
            ..own
        };
        let key = if sets.has("services", &own) {
            own
        } else if nodeport_addresses.contains(&own.ip)
            && (is_node_port(vs) || sets.names_node_port(&node_port))
        {
            node_port
        } else if sets.vips.contains(&own.ip) {
            own
        } else {
            continue;
        };
        let frontend = out.entry(key).or_insert_with(|| HeldFrontend {
            key,
            service: None,
            kind: key.ip.is_unspecified().then_some(FrontendKind::NodePort),
            backends: Vec::new(),
            action: HeldAction::Reject,
            // A NodePort's virtual servers are written alike: the first
            // speaks for all.
            affinity_timeout_secs: vs.persistence,
            source_ranges: None,
            counters: None,
        });
        // Weight 0: a TCP backend that left, draining its connections; no
        // new connection goes there.
        let live = real.iter().filter(|r| r.weight > 0);
        frontend.backends.extend(live.map(|r| Backend {
            ip: r.addr,
            port: r.port,
        }));
        let c = frontend.counters.get_or_insert_with(HeldCounters::default);
        let stats = &vs.stats;
        for (sum, n) in [
            (&mut c.connections, stats.connections),
            (&mut c.packets, stats.packets_in),
            (&mut c.bytes, stats.bytes_in),
        ] {
            *sum = Some(sum.unwrap_or(0).saturating_add(n));
        }
    }
    for frontend in out.values_mut() {
        frontend.backends.sort_unstable();
        frontend.backends.dedup();
        frontend.action = sets.action(&frontend.key, !frontend.backends.is_empty());
        frontend.source_ranges = sets.source_ranges(&frontend.key);
    }
    out.into_values().collect()
}

/// The sets, parsed: which frontends each names.
#[derive(Default)]
struct Sets {
    /// (set name without family suffix, frontend); a NodePort set's
    /// frontend has the unspecified address of the set's family.
    holds: BTreeSet<(String, FrontendKey)>,
    /// `loadBalancerSourceRanges` admitted, by frontend.
    allowed: BTreeMap<FrontendKey, Vec<IpNet>>,
    vips: BTreeSet<IpAddr>,
}

impl Sets {
    fn parse(sets: &SetElements) -> Sets {
        let mut out = Sets::default();
        for (name, elements) in sets {
            let (base, any) = match name.char_indices().last() {
                Some((i, '4')) => (&name[..i], unspecified(Family::V4)),
                Some((i, '6')) => (&name[..i], unspecified(Family::V6)),
                _ => continue,
            };
            for element in elements {
                let fields: Vec<&str> = element.split(" . ").map(str::trim).collect();
                match (base, fields.as_slice()) {
                    ("vips", [ip]) => out.vips.extend(ip.parse::<IpAddr>()),
                    ("allowed", [ip, proto, port, range]) => {
                        if let (Some(key), Some(range)) = (key_of(ip, proto, port), net_of(range)) {
                            out.allowed.entry(key).or_default().push(range);
                        }
                    }
                    (_, [proto, port]) if base.starts_with("nodeport-") => {
                        out.holds.extend(
                            key_of(&any.to_string(), proto, port).map(|k| (base.into(), k)),
                        );
                    }
                    (_, [ip, proto, port]) => {
                        out.holds
                            .extend(key_of(ip, proto, port).map(|k| (base.into(), k)));
                    }
                    _ => {}
                }
            }
        }
        out
    }

    fn has(&self, set: &str, key: &FrontendKey) -> bool {
        self.holds.contains(&(set.to_string(), *key))
    }

    /// Whether some `nodeport-*` set names NodePort `key`.
    fn names_node_port(&self, key: &FrontendKey) -> bool {
        self.holds
            .iter()
            .any(|(set, k)| set.starts_with("nodeport-") && k == key)
    }

    /// What a new connection meets, in the order of the table's filtering
    /// chain (drops, then rejects, before IPVS sees the packet); IPVS
    /// itself refuses one with no real server of weight above 0.
    fn action(&self, key: &FrontendKey, has_backends: bool) -> HeldAction {
        let prefix = if key.ip.is_unspecified() {
            "nodeport-"
        } else {
            ""
        };
        let named = |set: &str| self.has(&format!("{prefix}{set}"), key);
        // `local-fallback`: the Local policy's main view drops; only the
        // pods and the node reach the (cluster-wide) real servers.
        if named("drop") || named("local-fallback") {
            HeldAction::Drop
        } else if named("reject") || !has_backends {
            HeldAction::Reject
        } else {
            HeldAction::Balance
        }
    }

    fn source_ranges(&self, key: &FrontendKey) -> Option<Vec<IpNet>> {
        if !self.has("restricted", key) {
            return None;
        }
        let mut ranges = self.allowed.get(key).cloned().unwrap_or_default();
        ranges.sort_unstable();
        ranges.dedup();
        Some(ranges)
    }
}

fn key_of(ip: &str, proto: &str, port: &str) -> Option<FrontendKey> {
    let number: Option<u16> = proto.parse().ok();
    let protocol = Protocol::ALL
        .into_iter()
        .find(|p| proto_name(*p) == proto || number == Some(p.number().into()))?;
    Some(FrontendKey {
        ip: ip.parse().ok()?,
        port: port.parse().ok()?,
        protocol,
    })
}

/// A range as nft lists it: `net/len`, or a bare address for a host.
fn net_of(text: &str) -> Option<IpNet> {
    text.parse::<IpNet>()
        .ok()
        .or_else(|| text.parse::<IpAddr>().ok().map(IpNet::from))
        .map(|n| n.trunc())
}

fn unspecified(family: Family) -> IpAddr {
    match family {
        Family::V4 => Ipv4Addr::UNSPECIFIED.into(),
        Family::V6 => Ipv6Addr::UNSPECIFIED.into(),
    }
}

/// The real server IPVS's persistence template sends `client` to at the
/// virtual server `vip:vport` (this network namespace's
/// `/proc/net/ip_vs_conn`; what `ipvsadm -Lnc` lists), if it has one.
pub fn affinity_backend(vip: IpAddr, vport: u16, client: IpAddr) -> Option<crate::model::Backend> {
    let text = std::fs::read_to_string("/proc/net/ip_vs_conn").ok()?;
    template_in(&text, vip, vport, client)
}

/// [`affinity_backend`] of a listing: a template's client port is 0 (a
/// connection always has one); its state is `NONE`, or `ASSURED` once a
/// connection it scheduled completed. IPv4 addresses are in hex, IPv6 ones
/// written out.
fn template_in(
    text: &str,
    vip: IpAddr,
    vport: u16,
    client: IpAddr,
) -> Option<crate::model::Backend> {
    let ip = |t: &str| -> Option<IpAddr> {
        if t.contains(':') {
            t.parse().ok()
        } else {
            u32::from_str_radix(t, 16)
                .ok()
                .map(|n| IpAddr::V4(std::net::Ipv4Addr::from(n)))
        }
    };
    let port = |t: &str| u16::from_str_radix(t, 16).ok();
    text.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 || port(f[2])? != 0 {
            return None;
        }
        let matches = ip(f[1])? == client && ip(f[3])? == vip && port(f[4])? == vport;
        matches.then_some(crate::model::Backend {
            ip: ip(f[5])?,
            port: port(f[6])?,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        dataplane::{
            ipvs::{render::render, shared_of},
            netfilter::NodeNetwork,
        },
        model::{
            Frontend,
            FrontendKind::*,
            Protocol::*,
            plan::{FrontendPlan, plan},
            test_support::{backend, frontend, key_proto as key},
        },
    };

    fn network() -> NodeNetwork {
        NodeNetwork {
            nodeport_addresses: ["192.0.2.10", "192.0.2.11", "127.0.0.1", "2001:db8::10"]
                .iter()
                .map(|a| a.parse().unwrap())
                .collect(),
            cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
            snat_v4: Some("192.0.2.10".parse().unwrap()),
            ..NodeNetwork::default()
        }
    }

    /// A frontend; `cluster` set makes its policy Local.
    fn fe(kind: FrontendKind, backends: &[Backend], cluster: Option<&[Backend]>) -> Frontend {
        let mut f = Frontend {
            kind,
            ..frontend("default", "web", backends)
        };
        f.policy.local_only = cluster.is_some();
        f.cluster_backends = cluster.unwrap_or_default().to_vec();
        f
    }

    fn plans() -> Vec<FrontendPlan> {
        let (b1, b2) = (backend("10.244.1.5", 8080), backend("10.244.2.9", 8080));
        let v6 = backend("fd00:244::5", 5353);
        let mut cluster_ip = fe(ClusterIp, &[b2, b1], None);
        cluster_ip.policy.affinity_timeout_secs = Some(10_800);
        let mut lb = fe(LoadBalancer, &[b1], None);
        // The node's address inside a range admits the VIP itself too; the
        // IPv6 range is of the other family.
        lb.policy.source_ranges = ["198.51.100.7/24", "192.0.2.0/24", "2001:db8::/32"]
            .iter()
            .map(|r| r.parse().unwrap())
            .collect();
        [
            (key("10.96.0.10", 80, Tcp), cluster_ip),
            (key("0.0.0.0", 30080, Tcp), fe(NodePort, &[b1, b2], None)),
            (key("0.0.0.0", 30053, Udp), fe(NodePort, &[], None)),
            (key("203.0.113.7", 443, Tcp), lb),
            // Local without a local endpoint: dropped, but pods and the
            // node reach the cluster-wide endpoints.
            (
                key("198.51.100.20", 80, Tcp),
                fe(ExternalIp, &[], Some(&[b2])),
            ),
            (key("0.0.0.0", 30443, Tcp), fe(NodePort, &[], Some(&[b1]))),
            (key("10.96.0.11", 53, Udp), fe(ClusterIp, &[], None)),
            (key("fd00::10", 53, Udp), fe(ClusterIp, &[v6], None)),
            (key("::", 30053, Sctp), fe(NodePort, &[v6], None)),
        ]
        .iter()
        .map(|(k, f)| plan(k, f, &network()))
        .collect()
    }

    /// What the mode programs for `plans`: virtual servers with their real
    /// servers, and the sets' elements (shared ones too).
    fn programmed(plans: &[FrontendPlan]) -> (Vec<(VirtualServer, Vec<RealServer>)>, SetElements) {
        let (mut servers, mut sets) = (Vec::new(), SetElements::new());
        for p in plans {
            let rendered = render(p, "rr", &network());
            for e in rendered.elements.iter().chain(&shared_of(&rendered)) {
                sets.entry(e.set_name())
                    .or_default()
                    .insert(e.value.clone());
            }
            for s in rendered.servers {
                servers.push((s.virtual_server, s.real_servers));
            }
        }
        (servers, sets)
    }

    #[test]
    fn every_programmed_plan_reads_back_as_itself_and_nothing_else() {
        let plans = plans();
        let (mut servers, sets) = programmed(&plans);
        // Another IPVS user's server on a node address, a draining backend.
        let mut foreign = servers[0].clone();
        (foreign.0.id.addr, foreign.0.id.port) = ("192.0.2.10".parse().unwrap(), 80);
        servers.push(foreign);
        let draining = RealServer::masq("10.244.3.3".parse().unwrap(), 8080, 0);
        servers[0].1.push(draining);
        for (vs, _) in servers.iter_mut().filter(|(vs, _)| vs.id.port == 30080) {
            (vs.stats.connections, vs.stats.packets_in, vs.stats.bytes_in) = (2, 10, 600);
        }
        let held: BTreeMap<FrontendKey, HeldFrontend> =
            decode(&servers, &sets, &network().nodeport_addresses)
                .into_iter()
                .map(|f| (f.key, f))
                .collect();
        for p in &plans {
            let got = &held[&p.key];
            let differences = got.differences(&HeldFrontend::of_plan(p));
            assert!(differences.is_empty(), "{:?}: {differences:?}", p.key);
            assert_eq!(got.kind.is_some(), p.is_node_port());
        }
        let keys: BTreeSet<FrontendKey> = plans.iter().map(|p| p.key).collect();
        assert_eq!(held.keys().copied().collect::<BTreeSet<_>>(), keys);
        // Spot checks of what the comparison is made of.
        let lb = &held[&key("203.0.113.7", 443, Tcp)];
        assert_eq!(lb.source_ranges.as_ref().map(Vec::len), Some(2 + 1));
        let local = &held[&key("198.51.100.20", 80, Tcp)];
        assert_eq!((local.backends.len(), local.action), (1, HeldAction::Drop));
        // A NodePort's counters add up over its node addresses.
        let np = &held[&key("0.0.0.0", 30080, Tcp)];
        assert_eq!((np.backends.len(), np.action), (2, HeldAction::Balance));
        let counters = np.counters.unwrap_or_default();
        assert_eq!(
            (counters.connections, counters.packets, counters.bytes),
            (Some(4), Some(20), Some(1200))
        );
    }

    #[test]
    fn local_endpoints_hide_the_cluster_wide_ones_as_the_mode_documents() {
        // IPVS has one set of real servers: pods and the node get the local
        // endpoints too (`ExternalLocalShortCircuitToEveryEndpoint`).
        let (b1, b2) = (backend("10.244.1.5", 80), backend("10.244.2.9", 80));
        let local = fe(LoadBalancer, &[b1], Some(&[b1, b2]));
        let p = plan(&key("203.0.113.8", 80, Tcp), &local, &network());
        let (servers, sets) = programmed(std::slice::from_ref(&p));
        let held = decode(&servers, &sets, &network().nodeport_addresses);
        let diff = held[0].differences(&HeldFrontend::of_plan(&p));
        assert_eq!(diff.len(), 1);
        assert!(
            diff[0].starts_with("backends 10.244.1.5:80 where"),
            "{diff:?}"
        );
    }

    #[test]
    fn nft_json_sets_read_as_the_elements_written() {
        let json = br#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
            {"set": {"name": "drop4", "elem": [{"concat": ["10.96.0.10", "tcp", 80]}]}},
            {"set": {"name": "nodeport-reject6", "elem": [{"concat": ["udp", 30080]}]}},
            {"set": {"name": "allowed4", "flags": ["interval"], "elem": [
              {"concat": ["203.0.113.7", "tcp", 443, {"prefix": {"addr": "198.51.100.0", "len": 24}}]},
              {"concat": ["203.0.113.7", "tcp", 443, "203.0.113.7"]}]}},
            {"set": {"name": "vips4", "elem": [{"elem": {"val": "10.96.0.10", "comment": "x"}}]}},
            {"set": {"name": "hairpin6"}}]}"#;
        let sets = sets_of_json(json).unwrap();
        let text = |name: &str| sets[name].iter().cloned().collect::<Vec<_>>();
        assert_eq!(text("drop4"), ["10.96.0.10 . tcp . 80"]);
        assert_eq!(text("nodeport-reject6"), ["udp . 30080"]);
        assert_eq!(text("vips4"), ["10.96.0.10"]);
        assert!(sets["hairpin6"].is_empty());
        // A host range is listed bare: the /32 the plan holds.
        let parsed = Sets::parse(&sets);
        let allowed = &parsed.allowed[&key("203.0.113.7", 443, Tcp)];
        let want: Vec<IpNet> = vec![
            "198.51.100.0/24".parse().unwrap(),
            "203.0.113.7/32".parse().unwrap(),
        ];
        assert_eq!(allowed, &want);
        assert!(parsed.has("nodeport-reject", &key("::", 30080, Udp)));
        assert!(parsed.has("drop", &key("10.96.0.10", 80, Tcp)));
        assert!(sets_of_json(b"{}").is_err());
    }
}

#[cfg(test)]
mod template_tests {
    use super::*;

    #[test]
    fn a_persistence_template_names_the_clients_real_server() {
        let text = "Pro FromIP   FPrt ToIP     TPrt DestIP   DPrt State       Expires PEName PEData\n\
                    TCP C6130005 9C40 C613000A 0050 C6120110 1F90 ESTABLISHED     899\n\
                    TCP C6130005 0000 C613000A 0050 C612010B 1F90 NONE          10799\n\
                    UDP C6130005 0000 C613000A 0035 C612010A 14E9 NONE          10799\n\
                    TCP C6130006 0000 C613000A 0050 C612010C 1F90 ASSURED       10799\n";
        let client: IpAddr = "198.19.0.5".parse().unwrap();
        let vip: IpAddr = "198.19.0.10".parse().unwrap();
        let found = template_in(text, vip, 80, client).unwrap();
        assert_eq!(
            (found.ip.to_string(), found.port),
            ("198.18.1.11".into(), 8080)
        );
        assert_eq!(template_in(text, vip, 81, client), None);
        // Assured: a connection it scheduled completed.
        let other: IpAddr = "198.19.0.6".parse().unwrap();
        let found = template_in(text, vip, 80, other).unwrap();
        assert_eq!(found.ip.to_string(), "198.18.1.12");
        let third: IpAddr = "198.19.0.7".parse().unwrap();
        assert_eq!(template_in(text, vip, 80, third), None);
    }
}
