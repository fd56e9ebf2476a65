//! What the nftables mode holds, read back from the kernel's tables (not
//! from the agent, which may be down): each element of a frontend verdict
//! map, and what the chain it goes to does, as a [`HeldFrontend`].
//!
//! Decoded: key (and NodePort kind) from the map element; backends from
//! every `dnat` reachable from the frontend's chain; action from the main
//! chain's own rules; affinity from the affinity sets the rules name;
//! source ranges from the `saddr != … drop` rule the chain starts with;
//! the Service from the rules' comments; LoadBalancer (source ranges) and
//! ClusterIP (`cluster-ips` sets) kinds where those tell; new connections
//! from the counters of the views' balancing. Not decoded: masquerade
//! marks, the other kinds.
use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnet::{IpNet, Ipv4Subnets, Ipv6Subnets};
use serde_json::Value;

use super::{
    NftablesError,
    base::REJECT_CHAIN,
    existing::{list, tables_of_ours},
};
use crate::{
    dataplane::held::{HeldAction, HeldCounters, HeldFrontend, HeldTable},
    model::{Backend, FrontendKey, FrontendKind, Protocol},
};

/// The mode's name in a [`HeldTable`].
pub const MODE: &str = "nftables";

/// The verdict maps whose elements are frontends.
const MAPS: [&str; 4] = ["services4", "services6", "nodeports4", "nodeports6"];

/// What every table of ours holds (`nft -j list table inet <name>` each).
/// No table: nothing is held.
pub fn held() -> Result<HeldTable, NftablesError> {
    let mut held = HeldTable::new(MODE);
    // In name order: a frontend left in the unsharded layout's table is
    // superseded by its shard's.
    for table in tables_of_ours()? {
        // `None`: the table went away since it was listed.
        let Some(objects) = list(&["list", "table", "inet", &table])? else {
            continue;
        };
        for frontend in decode(&objects) {
            held.insert(frontend);
        }
    }
    Ok(held)
}

/// The frontends in `nft -j` listing objects (the `nftables` array's
/// items; several tables may be mixed). What does not parse is skipped.
pub fn decode(objects: &[Value]) -> Vec<HeldFrontend> {
    let mut listing = Listing::default();
    let mut elements: Vec<(&str, &str, &Value)> = Vec::new();
    for object in objects {
        let str_at = |kind: &str, field: &str| str_at(object, kind, field);
        if let (Some(table), Some(chain)) = (str_at("rule", "table"), str_at("rule", "chain")) {
            let rules = listing.rules.entry((table, chain)).or_default();
            rules.extend(object.pointer("/rule"));
        } else if let (Some(table), Some(map)) = (str_at("map", "table"), str_at("map", "name"))
            && MAPS.contains(&map)
        {
            let elems = object.pointer("/map/elem").and_then(Value::as_array);
            elements.extend(elems.into_iter().flatten().map(|e| (table, map, e)));
        } else if let (Some(table), Some(set)) = (str_at("set", "table"), str_at("set", "name")) {
            if let Some(t) = object.pointer("/set/timeout").and_then(Value::as_u64) {
                listing.timeouts.insert((table, set), t);
            }
            if set.starts_with("cluster-ips") {
                let elems = object.pointer("/set/elem").and_then(Value::as_array);
                for ip in elems.into_iter().flatten().filter_map(ip_of) {
                    listing.cluster_ips.insert((table, ip));
                }
            }
        }
    }
    elements
        .into_iter()
        .filter_map(|(table, map, element)| listing.frontend(table, map, element))
        .collect()
}

/// A listing's rules by chain, affinity set timeouts and ClusterIPs, each
/// by table.
#[derive(Default)]
struct Listing<'a> {
    rules: HashMap<(&'a str, &'a str), Vec<&'a Value>>,
    timeouts: HashMap<(&'a str, &'a str), u64>,
    cluster_ips: HashSet<(&'a str, IpAddr)>,
}

/// What some rules name: DNAT targets, chains jumped to, sets.
#[derive(Default)]
struct Found<'a> {
    dnat: Vec<(IpAddr, Option<u16>)>,
    chains: Vec<&'a str>,
    sets: Vec<&'a str>,
    /// Packets the rules' counters counted, if they have any.
    counted: Option<u64>,
}

impl<'a> Listing<'a> {
    fn rules(&self, table: &'a str, chain: &'a str) -> &[&'a Value] {
        self.rules.get(&(table, chain)).map_or(&[], Vec::as_slice)
    }

    /// The frontend of one element (`[key, {"goto": {"target": chain}}]`)
    /// of the verdict map `map`.
    fn frontend(&self, table: &'a str, map: &str, element: &'a Value) -> Option<HeldFrontend> {
        let key = element.get(0)?;
        // An element with a comment or timeout is listed as {"elem": {"val": …}}.
        let key = key.pointer("/elem/val").unwrap_or(key);
        let parts = key.get("concat")?.as_array()?;
        let node_port = map.starts_with("nodeports");
        let (ip, rest) = match (node_port, map.ends_with('6')) {
            (true, false) => (IpAddr::V4(Ipv4Addr::UNSPECIFIED), &parts[..]),
            (true, true) => (IpAddr::V6(Ipv6Addr::UNSPECIFIED), &parts[..]),
            (false, _) => (ip_of(parts.first()?)?, parts.get(1..)?),
        };
        let [protocol, port] = rest else { return None };
        let key = FrontendKey {
            ip,
            port: number_of(port)?,
            protocol: protocol_of(protocol)?,
        };
        let main = target_of(element.get(1)?)?;
        let main_rules = self.rules(table, main);
        let own = scan(main_rules);
        // Every chain reachable from the main one; `reject` holds no DNAT.
        let mut reach = Found::default();
        let mut seen = HashSet::from([REJECT_CHAIN]);
        let mut todo = vec![main];
        while let Some(chain) = todo.pop() {
            if seen.insert(chain) {
                let found = scan(self.rules(table, chain));
                todo.extend(&found.chains);
                reach.dnat.extend(found.dnat);
                reach.sets.extend(found.sets);
                if let Some(n) = found.counted {
                    *reach.counted.get_or_insert(0) += n;
                }
            }
        }
        let mut backends: Vec<Backend> = (reach.dnat.iter())
            .map(|&(ip, port)| Backend {
                ip,
                // `dnat to <addr>` keeps the destination port.
                port: port.unwrap_or(key.port),
            })
            .collect();
        backends.sort_unstable();
        backends.dedup();
        // The mode ends the main view with DNAT, `goto reject` or `drop`.
        let action = if !own.dnat.is_empty() {
            HeldAction::Balance
        } else if own.chains.contains(&REJECT_CHAIN) {
            HeldAction::Reject
        } else {
            HeldAction::Drop
        };
        let affinity = format!("{main}-aff");
        let affinity_timeout_secs = reach.sets.iter().find_map(|set| {
            let rest = set.strip_prefix(affinity.as_str())?;
            let timeout = self.timeouts.get(&(table, *set)).copied();
            let named = rest.split('-').next().and_then(|t| t.parse().ok());
            timeout.and_then(|t| u32::try_from(t).ok()).or(named)
        });
        let source_ranges = source_ranges(main_rules);
        let service = (main_rules.iter())
            .find_map(|r| r.get("comment")?.as_str())
            .map(str::to_string);
        let kind = if node_port {
            Some(FrontendKind::NodePort)
        } else if source_ranges.is_some() {
            // Only LoadBalancers have source ranges.
            Some(FrontendKind::LoadBalancer)
        } else if self.cluster_ips.contains(&(table, ip)) {
            Some(FrontendKind::ClusterIp)
        } else {
            None
        };
        Some(HeldFrontend {
            key,
            service,
            kind,
            backends,
            action,
            affinity_timeout_secs,
            source_ranges,
            // Counted in the nat chains, which see first packets only.
            counters: reach.counted.map(|n| HeldCounters {
                connections: Some(n),
                ..HeldCounters::default()
            }),
        })
    }
}

/// What `rules` name, anywhere in their statements.
fn scan<'a>(rules: &[&'a Value]) -> Found<'a> {
    fn visit<'a>(value: &'a Value, found: &mut Found<'a>) {
        match value {
            Value::Object(fields) => {
                for (name, inner) in fields {
                    match name.as_str() {
                        "dnat" => {
                            let port = inner.get("port").and_then(number_of);
                            found
                                .dnat
                                .extend(inner.get("addr").and_then(ip_of).map(|a| (a, port)));
                        }
                        // Also the verdicts of a vmap's elements.
                        "jump" | "goto" => found.chains.extend(target_of(value)),
                        "counter" => {
                            if let Some(n) = inner.get("packets").and_then(Value::as_u64) {
                                *found.counted.get_or_insert(0) += n;
                            }
                        }
                        _ => {}
                    }
                    visit(inner, found);
                }
            }
            Value::Array(items) => items.iter().for_each(|v| visit(v, found)),
            Value::String(text) => found.sets.extend(text.strip_prefix('@')),
            _ => {}
        }
    }
    let mut found = Found::default();
    for rule in rules {
        rule.get("expr")
            .into_iter()
            .for_each(|e| visit(e, &mut found));
    }
    found
}

/// The ranges the mode's first rule of a frontend admits: `saddr != <ranges>
/// drop`, or a bare `drop` ahead of the view's rules (no range of the
/// frontend's family). `None`: any source.
fn source_ranges(rules: &[&Value]) -> Option<Vec<IpNet>> {
    let first = rules.first()?.get("expr")?.as_array()?;
    let mut ranges = match &first[..] {
        [drop] if drop.get("drop").is_some() && rules.len() > 1 => Vec::new(),
        [check, drop] if drop.get("drop").is_some() => {
            let check = check.get("match")?;
            let field = check.pointer("/left/payload/field")?.as_str()?;
            if check.get("op")?.as_str()? != "!=" || field != "saddr" {
                return None;
            }
            let right = check.get("right")?;
            match right.get("set").and_then(Value::as_array) {
                Some(items) => items.iter().flat_map(nets_of).collect(),
                None => nets_of(right),
            }
        }
        _ => return None,
    };
    ranges.sort_unstable();
    ranges.dedup();
    Some(ranges)
}

/// A set item as nft lists it: a prefix, an address, or a range (which nft
/// makes of adjacent prefixes), as prefixes.
fn nets_of(item: &Value) -> Vec<IpNet> {
    if let Some(p) = item.get("prefix") {
        let len = p.get("len").and_then(Value::as_u64);
        let net = p
            .get("addr")
            .and_then(ip_of)
            .zip(len)
            .and_then(|(a, l)| IpNet::new(a, u8::try_from(l).ok()?).ok());
        return net.into_iter().collect();
    }
    if let Some([from, to]) = item
        .get("range")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
    {
        return match (ip_of(from), ip_of(to)) {
            (Some(IpAddr::V4(a)), Some(IpAddr::V4(b))) => {
                Ipv4Subnets::new(a, b, 0).map(IpNet::V4).collect()
            }
            (Some(IpAddr::V6(a)), Some(IpAddr::V6(b))) => {
                Ipv6Subnets::new(a, b, 0).map(IpNet::V6).collect()
            }
            _ => Vec::new(),
        };
    }
    ip_of(item).map(IpNet::from).into_iter().collect()
}

/// `object[kind][field]`, a string.
fn str_at<'a>(object: &'a Value, kind: &str, field: &str) -> Option<&'a str> {
    object.get(kind)?.get(field)?.as_str()
}

fn ip_of(value: &Value) -> Option<IpAddr> {
    value.as_str()?.parse().ok()
}

fn number_of<T: TryFrom<u64>>(value: &Value) -> Option<T> {
    T::try_from(value.as_u64()?).ok()
}

/// `tcp`, `udp` or `sctp`, as nft names them.
fn protocol_of(value: &Value) -> Option<Protocol> {
    let name = value.as_str()?;
    [Protocol::Tcp, Protocol::Udp, Protocol::Sctp]
        .into_iter()
        .find(|p| p.as_str().eq_ignore_ascii_case(name))
}

/// The chain of a `{"goto"|"jump": {"target": …}}` verdict.
fn target_of(verdict: &Value) -> Option<&str> {
    let v = verdict.get("goto").or_else(|| verdict.get("jump"))?;
    v.get("target")?.as_str()
}

/// The backend of `backends` (frontend `key`'s, with affinity `timeout`
/// seconds) whose affinity set holds `client`: an element of
/// `<chain>-aff<timeout>-<ip>-<port>` in the frontend's table expires by
/// itself, so one that is listed is live. `None` when none holds it.
pub fn affinity_backend(
    key: &crate::model::FrontendKey,
    backends: &[crate::model::Backend],
    timeout: u32,
    client: std::net::IpAddr,
) -> Option<crate::model::Backend> {
    let table = format!("{}-{}", super::TABLE, super::shard::shard_of(key));
    let client = client.to_string();
    backends.iter().copied().find(|b| {
        let set = super::render::affinity_set_name(key, b, timeout);
        let Ok(Some(objects)) = super::existing::list(&["list", "set", "inet", &table, &set])
        else {
            return false;
        };
        objects.iter().any(|o| {
            o.pointer("/set/elem")
                .and_then(Value::as_array)
                .is_some_and(|elems| {
                    elems.iter().any(|e| {
                        e.as_str() == Some(&client)
                            || e.pointer("/elem/val").and_then(Value::as_str) == Some(&client)
                    })
                })
        })
    })
}

#[cfg(test)]
mod tests {
    use super::{super::tests::network, *};
    use crate::{
        dataplane::nftables::{NftablesDataplane, cleanup},
        model::{
            Frontend, ServiceTable,
            plan::plan,
            test_support::{backend, frontend, key, key_proto},
        },
    };

    fn of_kind(kind: FrontendKind, name: &str, backends: &[Backend]) -> Frontend {
        let mut f = frontend("ns", name, backends);
        f.kind = kind;
        f
    }

    /// Every case the mode renders differently.
    fn table() -> ServiceTable {
        let mut t = ServiceTable::new();
        let mut web = frontend(
            "ns",
            "web",
            &[backend("10.1.0.1", 8080), backend("10.1.0.2", 8080)],
        );
        web.port_name = "http".into();
        web.policy.affinity_timeout_secs = Some(30);
        t.insert(key("10.96.0.1", 80), web);
        let np = of_kind(FrontendKind::NodePort, "np", &[backend("10.1.0.1", 8080)]);
        t.insert(key("0.0.0.0", 30080), np);
        let mut lb = of_kind(
            FrontendKind::LoadBalancer,
            "lb",
            &[backend("10.1.0.3", 8443)],
        );
        lb.policy.source_ranges = ["198.51.100.0/24", "203.0.113.7/32", "fd00::/8"]
            .iter()
            .map(|r| r.parse().unwrap())
            .collect();
        t.insert(key("192.0.2.10", 443), lb.clone());
        // Only ranges of the other family: nobody is admitted.
        lb.backends = vec![backend("fd00:1::6", 443)];
        lb.policy.source_ranges.pop();
        t.insert(key("fd00:3::1", 443), lb);
        let mut local = of_kind(FrontendKind::ExternalIp, "local", &[]);
        local.policy.local_only = true;
        local.cluster_backends = vec![backend("10.1.0.9", 80)];
        t.insert(key("192.0.2.20", 80), local);
        let dns = frontend("ns", "dns", &[]);
        t.insert(key_proto("10.96.0.3", 53, Protocol::Udp), dns);
        let mut v6 = frontend("ns", "v6", &[backend("fd00:1::5", 8080)]);
        v6.policy.affinity_timeout_secs = Some(60);
        t.insert(key("fd00:2::10", 80), v6);
        t
    }

    /// `held` agrees with every frontend's plan, and holds nothing else.
    fn assert_holds(table: &ServiceTable) -> HeldTable {
        let held = held().unwrap();
        assert_eq!(held.mode, "nftables");
        for (k, f) in table.iter() {
            let got = held
                .frontends
                .get(k)
                .unwrap_or_else(|| panic!("{k:?} missing"));
            let diffs = got.differences(&HeldFrontend::of_plan(&plan(k, f, &network())));
            assert!(diffs.is_empty(), "{k:?}: {diffs:?}");
        }
        let extra: Vec<_> = held
            .frontends
            .keys()
            .filter(|k| table.get(k).is_none())
            .collect();
        assert!(extra.is_empty(), "{extra:?}");
        held
    }

    #[test]
    fn held_reads_back_what_the_dataplane_applied() {
        crate::dataplane::in_private_netns(|| {
            assert!(
                held().unwrap().frontends.is_empty(),
                "no table, nothing held"
            );
            let mut dp = NftablesDataplane::new();
            dp.set_network(&network()).unwrap();
            let mut table = table();
            dp.reconcile_table(&table).unwrap();
            let held = assert_holds(&table);
            let web = &held.frontends[&key("10.96.0.1", 80)];
            assert_eq!(web.service.as_deref(), Some("ns/web:http"));
            assert_eq!(web.kind, Some(FrontendKind::ClusterIp));
            let np = &held.frontends[&key("0.0.0.0", 30080)];
            assert_eq!(np.kind, Some(FrontendKind::NodePort));
            let lb = &held.frontends[&key("fd00:3::1", 443)];
            assert_eq!(lb.kind, Some(FrontendKind::LoadBalancer));
            assert_eq!(lb.source_ranges, Some(Vec::new()));
            let local = &held.frontends[&key("192.0.2.20", 80)];
            assert_eq!((local.action, local.kind), (HeldAction::Drop, None));
            assert_eq!(local.backends, [backend("10.1.0.9", 80)]);
            // Frontends that balance count their new connections (the
            // Local one in its pods' view); a rejecting one has nothing to
            // count.
            let none_yet = Some(HeldCounters {
                connections: Some(0),
                ..HeldCounters::default()
            });
            assert_eq!((web.counters, local.counters), (none_yet, none_yet));
            let dns = &held.frontends[&key_proto("10.96.0.3", 53, Protocol::Udp)];
            assert_eq!(dns.counters, None);

            // A smaller table applied as the agent applies changes: the held
            // state follows.
            let before = table.clone();
            table.remove(&key("fd00:3::1", 443));
            table.remove(&key_proto("10.96.0.3", 53, Protocol::Udp));
            let mut web = table.get(&key("10.96.0.1", 80)).unwrap().clone();
            web.backends.pop();
            table.insert(key("10.96.0.1", 80), web);
            dp.apply_diff(&before.diff(&table)).unwrap();
            assert_holds(&table);
            assert!(cleanup().unwrap());
            assert!(super::held().unwrap().frontends.is_empty());
        });
    }

    /// `nft -j list table` objects as the live test's tables listed them
    /// (handles, families and mark rules left out), in two tables; a
    /// range, an element of a bad key and one without a goto added.
    const LISTING: &str = r#"[
{"map": {"table": "t6", "name": "services4", "map": "verdict", "elem": [
  [{"concat": ["10.96.0.1", "tcp", 80]}, {"goto": {"target": "svc-tcp-10.96.0.1-80"}}],
  [{"concat": ["192.0.2.10", "tcp", 443]}, {"goto": {"target": "svc-tcp-192.0.2.10-443"}}],
  [{"concat": ["192.0.2.20", "tcp", 80]}, {"goto": {"target": "svc-tcp-192.0.2.20-80"}}],
  [{"concat": ["10.96.0.3", "udp", 53]}, {"goto": {"target": "svc-udp-10.96.0.3-53"}}],
  [{"concat": ["10.96.0.", "tcp", 80]}, {"goto": {"target": "svc-tcp-10.96.0.1-80"}}],
  [{"concat": ["10.96.0.9", "tcp", 80]}, {"accept": null}]]}},
{"map": {"table": "t6", "name": "services6", "map": "verdict", "elem": [
  [{"concat": ["fd00:2::10", "tcp", 80]}, {"goto": {"target": "svc-tcp-fd00:2::10-80"}}]]}},
{"map": {"table": "t2", "name": "nodeports4", "map": "verdict", "elem": [
  [{"concat": ["tcp", 30080]}, {"goto": {"target": "svc-tcp-0.0.0.0-30080"}}]]}},
{"set": {"table": "t6", "name": "cluster-ips4", "type": "ipv4_addr", "elem": ["10.96.0.1", "10.96.0.3"]}},
{"set": {"table": "t6", "name": "svc-tcp-10.96.0.1-80-aff30-10.1.0.1-8080", "flags": ["timeout"], "timeout": 30}},
{"rule": {"table": "t6", "chain": "svc-tcp-10.96.0.1-80", "comment": "ns/web:http", "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": "@svc-tcp-10.96.0.1-80-aff30-10.1.0.1-8080"}}, {"set": {"op": "update", "elem": {"payload": {"protocol": "ip", "field": "saddr"}}, "set": "@svc-tcp-10.96.0.1-80-aff30-10.1.0.1-8080"}}, {"dnat": {"family": "ip", "addr": "10.1.0.1", "port": 8080}}]}},
{"rule": {"table": "t6", "chain": "svc-tcp-10.96.0.1-80", "comment": "ns/web:http", "expr": [{"match": {"op": "==", "left": {"numgen": {"mode": "random", "mod": 2, "offset": 0}}, "right": 0}}, {"dnat": {"family": "ip", "addr": "10.1.0.1", "port": 8080}}]}},
{"rule": {"table": "t6", "chain": "svc-tcp-10.96.0.1-80", "comment": "ns/web:http", "expr": [{"dnat": {"family": "ip", "addr": "10.1.0.2", "port": 8080}}]}},
{"rule": {"table": "t6", "chain": "svc-tcp-192.0.2.10-443", "comment": "ns/lb", "expr": [{"match": {"op": "!=", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": {"set": [{"prefix": {"addr": "198.51.100.0", "len": 24}}, "203.0.113.7", {"range": ["203.0.113.8", "203.0.113.15"]}]}}}, {"drop": null}]}},
{"rule": {"table": "t6", "chain": "svc-tcp-192.0.2.10-443", "comment": "ns/lb", "expr": [{"dnat": {"family": "ip", "addr": "10.1.0.3", "port": 8443}}]}},
{"rule": {"table": "t6", "chain": "svc-tcp-192.0.2.20-80", "comment": "ns/local", "expr": [{"match": {"op": "==", "left": {"fib": {"result": "type", "flags": ["saddr"]}}, "right": "local"}}, {"goto": {"target": "svc-tcp-192.0.2.20-80-node"}}]}},
{"rule": {"table": "t6", "chain": "svc-tcp-192.0.2.20-80", "comment": "ns/local", "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": {"prefix": {"addr": "10.1.0.0", "len": 16}}}}, {"goto": {"target": "svc-tcp-192.0.2.20-80-cluster"}}]}},
{"rule": {"table": "t6", "chain": "svc-tcp-192.0.2.20-80", "comment": "ns/local", "expr": [{"drop": null}]}},
{"rule": {"table": "t6", "chain": "svc-tcp-192.0.2.20-80-node", "comment": "ns/local", "expr": [{"dnat": {"family": "ip", "addr": "10.1.0.9", "port": 80}}]}},
{"rule": {"table": "t6", "chain": "svc-tcp-192.0.2.20-80-cluster", "comment": "ns/local", "expr": [{"dnat": {"family": "ip", "addr": "10.1.0.9", "port": 80}}]}},
{"rule": {"table": "t6", "chain": "svc-udp-10.96.0.3-53", "comment": "ns/dns", "expr": [{"goto": {"target": "reject"}}]}},
{"rule": {"table": "t6", "chain": "svc-tcp-fd00:2::10-80", "comment": "ns/v6", "expr": [{"set": {"op": "update", "elem": {"payload": {"protocol": "ip6", "field": "saddr"}}, "set": "@svc-tcp-fd00:2::10-80-aff60-fd00:1::5-8080"}}, {"dnat": {"family": "ip6", "addr": "fd00:1::5", "port": 8080}}]}},
{"rule": {"table": "t2", "chain": "svc-tcp-0.0.0.0-30080", "comment": "ns/np", "expr": [{"dnat": {"family": "ip", "addr": "10.1.0.1", "port": 8080}}]}},
{"rule": {"table": "t6", "chain": "svc-tcp-0.0.0.0-30080", "expr": [{"dnat": {"family": "ip", "addr": "10.9.9.9", "port": 1}}]}}
]"#;

    #[test]
    fn decode_reads_a_captured_listing_and_skips_what_does_not_parse() {
        let objects: Vec<Value> = serde_json::from_str(LISTING).unwrap();
        let mut held = HeldTable::new(MODE);
        decode(&objects).into_iter().for_each(|f| held.insert(f));
        assert_eq!(held.frontends.len(), 6, "{:?}", held.frontends.keys());
        let get = |k| &held.frontends[&k];
        let web = get(key("10.96.0.1", 80));
        assert_eq!(
            (web.backends.clone(), web.action, web.affinity_timeout_secs),
            (
                vec![backend("10.1.0.1", 8080), backend("10.1.0.2", 8080)],
                HeldAction::Balance,
                Some(30)
            )
        );
        assert_eq!(web.service.as_deref(), Some("ns/web:http"));
        assert_eq!(
            (web.kind, web.source_ranges.clone()),
            (Some(FrontendKind::ClusterIp), None)
        );
        let lb = get(key("192.0.2.10", 443));
        let ranges = ["198.51.100.0/24", "203.0.113.7/32", "203.0.113.8/29"];
        let ranges: Vec<IpNet> = ranges.iter().map(|r| r.parse().unwrap()).collect();
        assert_eq!(lb.source_ranges, Some(ranges));
        assert_eq!(lb.kind, Some(FrontendKind::LoadBalancer));
        let local = get(key("192.0.2.20", 80));
        assert_eq!((local.action, local.kind), (HeldAction::Drop, None));
        assert_eq!(local.backends, [backend("10.1.0.9", 80)]);
        let dns = get(key_proto("10.96.0.3", 53, Protocol::Udp));
        assert_eq!((dns.action, dns.backends.len()), (HeldAction::Reject, 0));
        // No set listed: the timeout is read from the set's name.
        assert_eq!(get(key("fd00:2::10", 80)).affinity_timeout_secs, Some(60));
        // The chain of the NodePort's own table, not t6's namesake.
        let np = get(key("0.0.0.0", 30080));
        assert_eq!(np.backends, [backend("10.1.0.1", 8080)]);
        assert_eq!(
            (np.kind, np.service.as_deref()),
            (Some(FrontendKind::NodePort), Some("ns/np"))
        );
        // What the agent writes carries no count; the kernel lists one.
        assert!(held.frontends.values().all(|f| f.counters.is_none()));
        assert!(decode(&[serde_json::json!({"map": {"name": "services4"}})]).is_empty());
    }
}
