//! What the iptables mode holds, read back from `iptables-save -c` (see the
//! layout in [`super`]): the frontends are the entries of nat
//! `KUBE-SERVICES` and `KUBE-NODEPORTS`, and the refusals of the filter
//! chains for those the nat table does not translate at all.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    process::Command,
};

use ipnet::IpNet;

use super::{
    IptablesBackend, IptablesError,
    backend::first_lines,
    names::{EXTERNAL_SERVICES_CHAIN, FIREWALL_CHAIN, NODEPORTS_CHAIN, SERVICES_CHAIN},
};
use crate::{
    dataplane::{
        held::{HeldAction, HeldCounters, HeldFrontend, HeldTable},
        netfilter::Family,
    },
    model::{Backend, FrontendKey, FrontendKind, Protocol},
};

/// Everything the iptables mode holds through `backend`, both families.
pub fn held(backend: IptablesBackend) -> Result<HeldTable, IptablesError> {
    let mut table = HeldTable::new("iptables");
    for family in [Family::V4, Family::V6] {
        let mut text = save_counted(backend, family, "nat")?;
        text.push_str(&save_counted(backend, family, "filter")?);
        for frontend in decode(family, &text) {
            table.insert(frontend);
        }
    }
    Ok(table)
}

/// `iptables-save -c -t <table>`; a table the kernel lacks holds nothing.
fn save_counted(
    backend: IptablesBackend,
    family: Family,
    table: &str,
) -> Result<String, IptablesError> {
    let binary = backend.save_binary(family);
    let out = Command::new(binary)
        .args(["-c", "-t", table])
        .output()
        .map_err(|source| IptablesError::Spawn { binary, source })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        if stderr.contains("does not exist") {
            return Ok(String::new());
        }
        return Err(IptablesError::Save {
            binary,
            stderr: first_lines(&stderr),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One rule: its packet counter (with `-c`) and its words after the chain.
struct Rule {
    packets: Option<u64>,
    words: Vec<String>,
}

impl Rule {
    /// The word after the first `option`.
    fn value(&self, option: &str) -> Option<&str> {
        let at = self.words.iter().position(|w| w == option)?;
        self.words.get(at + 1).map(String::as_str)
    }

    fn has(&self, word: &str) -> bool {
        self.words.iter().any(|w| w == word)
    }

    fn target(&self) -> Option<&str> {
        self.value("-j").or_else(|| self.value("-g"))
    }

    /// `-s` and whether it is negated (`! -s`).
    fn source(&self) -> Option<(bool, &str)> {
        let at = self.words.iter().position(|w| w == "-s")?;
        let negated = at > 0 && self.words[at - 1] == "!";
        Some((negated, self.words.get(at + 1)?))
    }

    /// (protocol, destination port, destination host address if any).
    fn matched(&self) -> Option<(Protocol, u16, Option<IpAddr>)> {
        let protocol = match self.value("-p")? {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            "sctp" => Protocol::Sctp,
            _ => return None,
        };
        let port = self.value("--dport")?.parse().ok()?;
        Some((protocol, port, self.value("-d").and_then(host)))
    }
}

type Chains = BTreeMap<String, Vec<Rule>>;

/// The tables of iptables-save (or -restore) text, by name.
fn parse(text: &str) -> BTreeMap<String, Chains> {
    let mut tables: BTreeMap<String, Chains> = BTreeMap::new();
    let mut current = String::new();
    for line in text.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix('*') {
            current = name.to_string();
            continue;
        }
        // `[packets:bytes] -A chain ...` with -c.
        let (packets, rest) = match line.strip_prefix('[').and_then(|l| l.split_once(']')) {
            Some((counts, rest)) => (counts.split(':').next().and_then(|p| p.parse().ok()), rest),
            None => (None, line),
        };
        let Some(rule) = rest.trim_start().strip_prefix("-A ") else {
            continue;
        };
        let mut words = split_words(rule).into_iter();
        if let Some(chain) = words.next() {
            let words = words.collect();
            let chains = tables.entry(current.clone()).or_default();
            chains
                .entry(chain)
                .or_default()
                .push(Rule { packets, words });
        }
    }
    tables
}

/// Words as iptables-save quotes them (`"..."`, with `\"` and `\\`).
fn split_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut chars = line.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
            continue;
        }
        let mut word = String::new();
        let mut quoted = false;
        while let Some(c) = chars.next() {
            match c {
                '"' => quoted = !quoted,
                '\\' if quoted => word.extend(chars.next()),
                c if c.is_whitespace() && !quoted => break,
                c => word.push(c),
            }
        }
        words.push(word);
    }
    words
}

/// The address of a host match (`ip/32`, `ip/128`).
fn host(text: &str) -> Option<IpAddr> {
    let net = text.parse::<IpNet>().ok()?;
    (net.prefix_len() == net.max_prefix_len()).then(|| net.addr())
}

/// A DNAT destination: `ip:port` or `[ip]:port`.
fn addr_port(text: &str) -> Option<Backend> {
    let at = text.parse::<SocketAddr>().ok()?;
    Some(Backend {
        ip: at.ip(),
        port: at.port(),
    })
}

/// The Service port a comment names, and the kind when the comment says
/// so (kube-proxy writes "ns/name:port cluster IP"; this mode writes the
/// name alone; other words follow in the firewall's comments).
fn service_of(comment: &str) -> (String, Option<FrontendKind>) {
    let (name, rest) = comment.split_once(' ').unwrap_or((comment, ""));
    let kind = match rest {
        "cluster IP" => Some(FrontendKind::ClusterIp),
        "external IP" => Some(FrontendKind::ExternalIp),
        "loadbalancer IP" => Some(FrontendKind::LoadBalancer),
        _ => None,
    };
    (name.to_string(), kind)
}

const FRONTEND_CHAINS: [&str; 4] = ["KUBE-SVC-", "KUBE-SVL-", "KUBE-EXT-", "KUBE-FW-"];

/// What the rules say of one frontend, gathered before it is decoded.
#[derive(Default)]
struct Found<'a> {
    /// The entry rule's target and packet counter.
    entry: Option<(&'a str, Option<u64>)>,
    comment: Option<&'a str>,
    node_port: bool,
    /// The filter verdict of the main view (no `-s`, or `! -s`).
    refusal: Option<HeldAction>,
    /// Whether `KUBE-PROXY-FIREWALL` drops for it, and the sources it
    /// returns (admits to the refusal).
    firewall: bool,
    admitted: Vec<IpNet>,
}

/// The rules of `chain`, none when it does not exist.
fn rules<'a>(chains: &'a Chains, chain: &str) -> impl Iterator<Item = &'a Rule> {
    chains.get(chain).into_iter().flatten()
}

/// What the iptables mode holds in one family, from the text of
/// `iptables-save -c -t nat` followed by that of `-t filter` (without `-c`
/// counters are `None`). Rules not in the mode's shape are skipped.
pub fn decode(family: Family, text: &str) -> Vec<HeldFrontend> {
    let tables = parse(text);
    let none = Chains::new();
    let nat = tables.get("nat").unwrap_or(&none);
    let filter = tables.get("filter").unwrap_or(&none);
    let unspecified = match family {
        Family::V4 => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        Family::V6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    // The NodePort addresses, which the filter rules of NodePorts name.
    let nodeport_addresses: BTreeSet<IpAddr> = rules(nat, SERVICES_CHAIN)
        .filter(|r| r.target() == Some(NODEPORTS_CHAIN))
        .filter_map(|r| r.value("-d").and_then(host))
        .collect();
    let mut found: BTreeMap<FrontendKey, Found> = BTreeMap::new();
    for chain in [SERVICES_CHAIN, NODEPORTS_CHAIN] {
        for rule in rules(nat, chain) {
            let (Some(target), Some((protocol, port, dst))) = (rule.target(), rule.matched())
            else {
                continue;
            };
            let ip = match (chain, dst) {
                (NODEPORTS_CHAIN, _) => unspecified,
                (_, Some(ip)) => ip,
                _ => continue,
            };
            if !FRONTEND_CHAINS.iter().any(|p| target.starts_with(p)) {
                continue;
            }
            let f = found.entry(FrontendKey { ip, port, protocol }).or_default();
            f.node_port = chain == NODEPORTS_CHAIN;
            f.entry = Some((target, rule.packets));
            f.comment = rule.value("--comment");
        }
    }
    // Frontends the nat table does not translate (for every client) are
    // refused in filter: the main view's verdict is the rule for every
    // source or for those outside the pods' CIDR (`! -s`).
    for chain in [SERVICES_CHAIN, EXTERNAL_SERVICES_CHAIN, FIREWALL_CHAIN] {
        for rule in rules(filter, chain) {
            let (Some(target @ ("REJECT" | "DROP" | "RETURN")), Some((protocol, port, Some(ip)))) =
                (rule.target(), rule.matched())
            else {
                continue;
            };
            let mut key = FrontendKey { ip, port, protocol };
            // A NodePort is refused on each NodePort address, in this chain
            // only; an external address of the node has a key of its own.
            if chain == EXTERNAL_SERVICES_CHAIN
                && nodeport_addresses.contains(&ip)
                && !found.contains_key(&key)
            {
                key.ip = unspecified;
            }
            let f = found.entry(key).or_default();
            f.node_port |= key.ip.is_unspecified();
            f.comment = f.comment.or(rule.value("--comment"));
            let source = rule.source();
            match (chain, target) {
                (FIREWALL_CHAIN, "DROP") => f.firewall = true,
                (FIREWALL_CHAIN, _) => f
                    .admitted
                    .extend(source.and_then(|(_, s)| s.parse::<IpNet>().ok())),
                (_, "RETURN") => {}
                _ if source.is_none_or(|(negated, _)| negated) => {
                    let verdict = if target == "DROP" {
                        HeldAction::Drop
                    } else {
                        HeldAction::Reject
                    };
                    f.refusal = f.refusal.or(Some(verdict));
                }
                _ => {}
            }
        }
    }
    found
        .into_iter()
        .map(|(key, f)| frontend_of(nat, key, f))
        .collect()
}

/// One frontend from what its rules say and its nat chains.
fn frontend_of(nat: &Chains, key: FrontendKey, f: Found<'_>) -> HeldFrontend {
    let (service, comment_kind) = match f.comment.map(service_of) {
        Some((s, k)) => (Some(s), k),
        None => (None, None),
    };
    let entry = f.entry.map(|(target, _)| target);
    // A FW chain admits to the EXT chain of the same hash; walking from
    // there too keeps the backends when no range is of this family.
    let ext = entry.map(|t| match t.strip_prefix("KUBE-FW-") {
        Some(hash) => format!("KUBE-EXT-{hash}"),
        None => t.to_string(),
    });
    let mut backends = BTreeSet::new();
    let mut affinity = None;
    let mut seen = BTreeSet::new();
    let mut todo: Vec<&str> = entry.into_iter().chain(ext.as_deref()).collect();
    while let Some(chain) = todo.pop() {
        if !seen.insert(chain) {
            continue;
        }
        for rule in rules(nat, chain) {
            if rule.has("--rcheck") {
                affinity = affinity.or(rule.value("--seconds").and_then(|s| s.parse().ok()));
            }
            match rule.target() {
                Some("DNAT") => backends.extend(rule.value("--to-destination").and_then(addr_port)),
                Some(t)
                    if FRONTEND_CHAINS.iter().any(|p| t.starts_with(p))
                        || t.starts_with("KUBE-SEP-") =>
                {
                    todo.push(t)
                }
                _ => {}
            }
        }
    }
    let is_choice = |t: &str| t.starts_with("KUBE-SVC-") || t.starts_with("KUBE-SVL-");
    // The main view is the EXT chain's jump that matches every source (the
    // others short-circuit pods and the node); a ClusterIP enters its
    // choice directly.
    let balances = ext.as_deref().is_some_and(|chain| {
        is_choice(chain)
            || rules(nat, chain).any(|r| {
                r.target().is_some_and(is_choice) && r.source().is_none() && !r.has("--src-type")
            })
    });
    // Untranslated and refused by nobody: nothing serves it (reported as
    // a refusal, the closest of the three).
    let action = match (balances, f.refusal) {
        (true, _) => HeldAction::Balance,
        (false, Some(refusal)) => refusal,
        (false, None) => HeldAction::Reject,
    };
    let fw = entry.filter(|t| t.starts_with("KUBE-FW-"));
    let source_ranges = (fw.is_some() || f.firewall).then(|| {
        let mut ranges = f.admitted;
        for rule in fw.into_iter().flat_map(|c| rules(nat, c)) {
            if let (Some((false, s)), Some(_)) = (rule.source(), rule.target()) {
                ranges.extend(s.parse::<IpNet>().ok());
            }
        }
        ranges.sort_unstable();
        ranges.dedup();
        ranges
    });
    HeldFrontend {
        key,
        service,
        kind: f
            .node_port
            .then_some(FrontendKind::NodePort)
            .or(comment_kind),
        backends: backends.into_iter().collect(),
        action,
        affinity_timeout_secs: affinity,
        source_ranges,
        counters: f.entry.and_then(|(_, p)| p).map(|p| HeldCounters {
            connections: Some(p),
            ..HeldCounters::default()
        }),
    }
}

/// The backend of `backends` (frontend `key`'s) whose affinity list holds
/// `client`: the `recent` match's list (named like the endpoint's chain,
/// `/proc/net/xt_recent/KUBE-SEP-...`, of this network namespace) in which
/// the client was last seen. An entry older than the affinity timeout is
/// still listed until the next `--reap` of its list; `None` when no list
/// holds the client.
pub fn affinity_backend(
    key: &crate::model::FrontendKey,
    backends: &[crate::model::Backend],
    client: std::net::IpAddr,
) -> Option<crate::model::Backend> {
    let needle = format!("src={client} ");
    backends
        .iter()
        .filter_map(|b| {
            let list = std::fs::read_to_string(
                std::path::Path::new("/proc/net/xt_recent").join(super::names::sep_chain(key, b)),
            )
            .ok()?;
            // `src=ADDR ttl: T last_seen: JIFFIES oldest_pkt: ...`: the
            // latest wins when two lists hold the client.
            let last_seen: u64 = list
                .lines()
                .find(|l| l.starts_with(&needle))?
                .split_whitespace()
                .skip_while(|w| *w != "last_seen:")
                .nth(1)?
                .parse()
                .ok()?;
            Some((last_seen, *b))
        })
        .max_by_key(|(seen, _)| *seen)
        .map(|(_, b)| b)
}

#[cfg(test)]
mod tests {
    use super::{
        super::{IptablesDataplane, test_support::*},
        *,
    };
    use crate::model::{
        Frontend,
        FrontendKind::{ClusterIp, ExternalIp, LoadBalancer, NodePort},
        ServiceTable,
        plan::plan,
        test_support::{backend, frontend, key, key_proto},
    };

    /// Frontends of every shape the mode writes, with the service text
    /// their rules carry.
    fn frontends() -> Vec<(FrontendKey, Frontend, &'static str)> {
        let bs = [backend("198.18.1.10", 8080), backend("198.18.1.11", 8080)];
        let mut dns = frontend("kube-system", "dns", &bs);
        dns.policy.affinity_timeout_secs = Some(10800);
        let mut lb = external(LoadBalancer, &bs[..1]);
        lb.policy.source_ranges = vec!["203.0.113.0/24".parse().unwrap()];
        let mut lb_empty = lb.clone();
        lb_empty.backends.clear();
        let mut internal_local = external(ClusterIp, &[]);
        internal_local.policy.local_only = true;
        internal_local.cluster_backends = bs.to_vec();
        let b6 = backend("2001:2::1:a", 8080);
        let web = |k, f| (k, f, "ns/web:http");
        vec![
            web(key("198.19.0.10", 80), external(ClusterIp, &bs)),
            (
                key_proto("198.19.0.11", 53, Protocol::Udp),
                dns,
                "kube-system/dns",
            ),
            web(key("0.0.0.0", 30080), external(NodePort, &bs)),
            web(key("0.0.0.0", 30081), external(NodePort, &[])),
            web(key("198.19.2.10", 80), lb),
            web(key("198.19.2.11", 80), lb_empty),
            web(key("198.19.2.12", 80), local(LoadBalancer, &[], &bs)),
            web(key("198.19.0.12", 80), external(ClusterIp, &[])),
            web(key("198.19.0.13", 80), internal_local),
            // An address of the node, refused where NodePorts are.
            web(key("198.18.0.1", 30082), local(ExternalIp, &[], &bs)),
            web(key("2001:2:0:ff::10", 80), external(ClusterIp, &[b6])),
            web(key("::", 30080), external(NodePort, &[b6])),
        ]
    }

    /// `held` agrees with the plans: no drift, and what else it reads.
    fn assert_agrees(held: &BTreeMap<FrontendKey, HeldFrontend>) {
        let all = frontends();
        assert_eq!(held.len(), all.len(), "{:#?}", held.keys());
        for (k, f, service) in &all {
            let p = plan(k, f, &network());
            let h = &held[k];
            let want = HeldFrontend::of_plan(&p);
            assert_eq!(h.differences(&want), Vec::<String>::new(), "{k:?}: {h:#?}");
            assert_eq!(h.service.as_deref(), Some(*service), "{k:?}");
            assert_eq!(h.kind, (f.kind == NodePort).then_some(NodePort), "{k:?}");
            // Translated frontends count their connections at the entry.
            let translated = !p.backends().is_empty();
            let connections = h.counters.and_then(|c| c.connections);
            assert_eq!(connections.is_some(), translated, "{k:?}");
        }
    }

    #[test]
    fn every_shape_the_mode_writes_decodes_back_to_its_plan() {
        let dp = dataplane();
        let all = frontends();
        let pairs: Vec<(FrontendKey, Frontend)> =
            all.iter().map(|(k, f, _)| (*k, f.clone())).collect();
        let diff = added(&pairs);
        let mut held = BTreeMap::new();
        for family in [Family::V4, Family::V6] {
            // As iptables-save -c prints the rules: counters first.
            let text = restore_text(&dp, &diff, family).replace("\n-A ", "\n[7:420] -A ");
            for h in decode(family, &text) {
                assert!(h.counters.is_none_or(|c| c.connections == Some(7)));
                held.insert(h.key, h);
            }
        }
        assert_agrees(&held);
        let lb = &held[&key("198.19.2.10", 80)];
        assert_eq!(
            lb.source_ranges,
            Some(vec!["203.0.113.0/24".parse().unwrap()])
        );
        assert_eq!(held[&key("198.19.2.12", 80)].action, HeldAction::Drop);
    }

    #[test]
    fn kube_proxy_comments_name_the_service_port_and_the_kind() {
        assert_eq!(
            service_of("ns/web:http cluster IP"),
            ("ns/web:http".to_string(), Some(FrontendKind::ClusterIp))
        );
        assert_eq!(
            service_of("ns/web has no endpoints"),
            ("ns/web".to_string(), None)
        );
        let text = "*nat\n[3:180] -A KUBE-SERVICES -d 10.96.0.1/32 -p tcp -m comment \
                    --comment \"default/kubernetes:https cluster IP\" -m tcp --dport 443 \
                    -j KUBE-SVC-NPX46M4PTMTKRN6Y\n-A KUBE-SVC-NPX46M4PTMTKRN6Y -j KUBE-SEP-A\n\
                    -A KUBE-SEP-A -p tcp -j DNAT --to-destination 192.0.2.1:6443 bogus\nCOMMIT\n";
        let held = decode(Family::V4, text);
        assert_eq!(held.len(), 1);
        assert_eq!(held[0].kind, Some(FrontendKind::ClusterIp));
        assert_eq!(held[0].backends, vec![backend("192.0.2.1", 6443)]);
        assert_eq!(held[0].counters.and_then(|c| c.connections), Some(3));
    }

    #[test]
    fn what_the_real_dataplane_wrote_is_read_back_from_the_kernel() {
        crate::dataplane::in_private_netns(|| {
            if Command::new("iptables-nft").arg("-V").output().is_err() {
                eprintln!("skipped: no iptables-nft");
                return;
            }
            // Nothing written yet: nothing held, not an error.
            assert!(held(IptablesBackend::Nft).unwrap().frontends.is_empty());
            let mut dp = IptablesDataplane::new(IptablesBackend::Nft);
            dp.set_network(&network()).unwrap();
            let mut table = ServiceTable::new();
            for (k, f, _) in frontends() {
                table.insert(k, f);
            }
            dp.reconcile_table(&table).unwrap();
            let read = held(IptablesBackend::Nft).unwrap();
            assert_eq!(read.mode, "iptables");
            assert_agrees(&read.frontends);
            // Two datagrams of one flow to a ClusterIP (the VIP and the
            // backends on lo, so the flow is confirmed) are one connection:
            // the nat table sees its first packet only.
            for args in [
                &["link", "set", "lo", "up"][..],
                &["addr", "add", "198.19.0.11/32", "dev", "lo"],
                &["addr", "add", "198.18.1.0/24", "dev", "lo"],
            ] {
                assert!(Command::new("ip").args(args).status().unwrap().success());
            }
            let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            let _ = socket.send_to(b"x", "198.19.0.11:53");
            let _ = socket.send_to(b"x", "198.19.0.11:53");
            let dns = key_proto("198.19.0.11", 53, Protocol::Udp);
            let counted = held(IptablesBackend::Nft).unwrap().frontends[&dns].counters;
            assert_eq!(counted.and_then(|c| c.connections), Some(1), "{counted:?}");
            assert!(super::super::cleanup().unwrap());
        });
    }
}
