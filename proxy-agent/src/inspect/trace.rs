//! `trace`: what happens to one packet `--from IP[:PORT] --to IP:PORT/PROTO`
//! and why, from the plans every mode programs, the model's reasons for
//! each endpoint, what the kernel holds for the frontend, and the flow
//! and affinity entries that pin the client to a backend. Nothing is sent.
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::{Desired, frontend_text, kind_text, service_text};
use crate::{
    dataplane::{
        Mode,
        held::{HeldTable, list_backends},
        mode::Behaviour,
    },
    model::{
        Backend, FrontendKey, Protocol,
        explain::{EndpointVerdict, Explainer},
        plan::{Action, Family, Masquerade, View, plan},
    },
};

/// The packet asked about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Query {
    pub from: IpAddr,
    pub from_port: Option<u16>,
    pub to: IpAddr,
    pub to_port: u16,
    pub protocol: Protocol,
}

/// What the kernel pins the client to, read by the caller from its mode's
/// state (ebpf flow and affinity maps, netfilter conntrack).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pins {
    /// The backend an existing flow of this exact tuple goes to.
    pub flow: Option<Backend>,
    /// The backend the client's affinity entry names.
    pub affinity: Option<Backend>,
    /// Where they were read ("ebpf conntrack map", ...), and what could not be.
    pub notes: Vec<String>,
}

/// The answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trace {
    pub query: Query,
    pub mode: String,
    /// The frontend that matches; `None`: no frontend does.
    pub frontend: Option<FrontendKey>,
    pub service: Option<String>,
    /// "passes" (untranslated), "translated", "rejected", "dropped".
    pub verdict: String,
    /// The backends a new connection is balanced over.
    pub backends: Vec<Backend>,
    /// Every endpoint of the Service port, with why it is a candidate or not.
    pub candidates: Vec<EndpointVerdict>,
    /// The source address the backend sees when masqueraded.
    pub masquerade_to: Option<IpAddr>,
    /// The backend an existing flow or affinity pins the client to.
    pub pinned_to: Option<Backend>,
    /// The decisions in order, in words.
    pub steps: Vec<String>,
}

/// What reads a frontend's [`Pins`] from the kernel, given the frontend
/// and, under session affinity, its timeout and the backends a new
/// connection of the client's view may go to.
pub type PinReader<'a> = dyn Fn(&FrontendKey, Option<(u32, &[Backend])>) -> Pins + 'a;

/// Traces `query` through the desired plans of `desired` as `mode` programs
/// them, with what `held` holds and what `pins` reads for the frontend
/// that matches (called only then).
pub fn trace(
    query: Query,
    mode: Mode,
    desired: &Desired<'_>,
    held: &HeldTable,
    pins: &PinReader<'_>,
) -> Trace {
    let mut out = Trace {
        query,
        mode: mode.name().into(),
        frontend: None,
        service: None,
        verdict: "passes".into(),
        backends: Vec::new(),
        candidates: Vec::new(),
        masquerade_to: None,
        pinned_to: None,
        steps: Vec::new(),
    };
    let network = desired.network;
    let exact = FrontendKey {
        ip: query.to,
        port: query.to_port,
        protocol: query.protocol,
    };
    let node_port = FrontendKey {
        ip: unspecified(query.to),
        ..exact
    };
    let found = desired.table.get(&exact).map(|f| (exact, f)).or_else(|| {
        network
            .nodeport_addresses
            .contains(&query.to)
            .then(|| desired.table.get(&node_port).map(|f| (node_port, f)))
            .flatten()
    });
    let Some((key, frontend)) = found else {
        no_frontend(&mut out, mode, desired);
        return out;
    };
    out.frontend = Some(key);
    out.service = Some(service_text(&frontend.service, &frontend.port_name));
    out.steps.push(format!(
        "matches frontend {} ({} of {})",
        frontend_text(&key),
        kind_text(Some(frontend.kind)),
        out.service.as_deref().unwrap_or("-")
    ));
    let plan = plan(&key, frontend, network);
    let explained = Explainer::new(desired.state, desired.cfg).explain(&key, frontend);
    out.candidates = explained.endpoints;
    out.steps.push(format!(
        "traffic policy {}; topology hints: {}",
        explained.traffic_policy, explained.topology
    ));
    if let Some(ranges) = &plan.source_ranges
        && !ranges.iter().any(|r| r.contains(&query.from))
    {
        out.verdict = "dropped".into();
        out.steps.push(format!(
            "dropped: {} is outside the loadBalancerSourceRanges ({})",
            query.from,
            ranges
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ));
        return out;
    }
    let from_node = is_node_address(query.from, network);
    let (view_name, view): (&str, &View) = match (&plan.node_view, &plan.cluster_view) {
        (Some(view), _) if from_node => ("the node's own connections (cluster-wide)", view),
        (_, Some((cidr, view))) if cidr.contains(&query.from) => {
            ("pods (cluster-wide, kube-proxy's short-circuit)", view)
        }
        _ => ("its clients", &plan.view),
    };
    out.steps
        .push(format!("the view for {} applies", view_name));
    match &view.action {
        Action::Balance(backends) => {
            out.verdict = "translated".into();
            out.backends = backends.clone();
            out.steps.push(format!(
                "a new connection goes to one of {} at random{}",
                list_backends(backends),
                match plan.affinity_timeout_secs {
                    Some(t) => format!(", then the same one for {t} s (sessionAffinity ClientIP)"),
                    None => String::new(),
                }
            ));
        }
        Action::Reject => {
            out.verdict = "rejected".into();
            out.steps.push(
                "rejected: the Service has no endpoint (TCP reset / ICMP unreachable)".into(),
            );
        }
        Action::Drop => {
            out.verdict = "dropped".into();
            out.steps
                .push("dropped: the traffic policy is Local and this node has no endpoint".into());
        }
    }
    if out.verdict == "translated" {
        let node_ip = network.node_ip(Family::of(query.to));
        let masquerade = match &view.masquerade {
            Masquerade::Never => None,
            Masquerade::Always => Some("every client of this view is masqueraded".to_string()),
            Masquerade::SourceOutside(cidr) if !cidr.contains(&query.from) => Some(format!(
                "the source is outside the cluster CIDR {cidr}: masqueraded"
            )),
            Masquerade::SourceOutside(_) => None,
        };
        match (masquerade, node_ip) {
            (Some(why), Some(ip)) => {
                out.masquerade_to = Some(ip);
                out.steps.push(format!("{why} to {ip}"));
            }
            (Some(why), None) => out
                .steps
                .push(format!("{why}, but the node has no address of the family")),
            (None, _) => {
                out.steps.push(format!(
                    "the backend sees the client's address {}",
                    query.from
                ));
                if out.backends.iter().any(|b| b.ip == query.from) {
                    out.steps.push(format!(
                        "if it picks itself (hairpin), masqueraded to {}",
                        node_ip.map_or("the node's address".into(), |ip| ip.to_string())
                    ));
                }
            }
        }
    }
    match held.frontends.get(&key) {
        None => out.steps.push(format!(
            "DRIFT: the kernel ({}) does not hold this frontend: the packet passes untranslated",
            held.mode
        )),
        Some(h) if h.backends != plan.backends() => out.steps.push(format!(
            "DRIFT: the kernel holds backends {} for it",
            list_backends(&h.backends)
        )),
        Some(_) => out
            .steps
            .push(format!("the kernel ({}) holds the same", held.mode)),
    }
    let affinity = plan
        .affinity_timeout_secs
        .map(|t| (t, out.backends.as_slice()));
    let pins = pins(&key, affinity);
    out.steps.extend(pins.notes.iter().cloned());
    if let Some(b) = pins.flow {
        out.pinned_to = Some(b);
        out.steps
            .push(format!("an existing flow of this tuple goes to {b}"));
    } else if let Some(b) = pins.affinity {
        out.pinned_to = Some(b);
        out.steps.push(format!(
            "the client's affinity entry sends a new connection to {b}"
        ));
    }
    out
}

/// The answer when no frontend matches: the packet passes, unless the
/// mode refuses what a ServiceCIDR holds.
fn no_frontend(out: &mut Trace, mode: Mode, desired: &Desired<'_>) {
    let to = out.query.to;
    let checks = mode.cannot(Behaviour::ChecksServiceCidrs).is_none();
    let held_ports: Vec<String> = desired
        .table
        .iter()
        .filter(|(k, _)| k.ip == to)
        .map(|(k, _)| format!("{}/{}", k.port, k.protocol))
        .collect();
    if checks && !held_ports.is_empty() {
        out.verdict = "rejected".into();
        out.steps.push(format!(
            "no frontend on this port: {to} is a ClusterIP on {} only; a new connection is \
             rejected",
            held_ports.join(", ")
        ));
        return;
    }
    if checks
        && let Some(cidr) = desired
            .network
            .service_cidrs
            .iter()
            .find(|c| c.contains(&to))
    {
        out.verdict = "dropped".into();
        out.steps.push(format!(
            "no frontend: {to} is inside the ServiceCIDR {cidr} and no Service holds it; a new \
             connection is dropped"
        ));
        return;
    }
    out.steps
        .push("no frontend matches: the packet passes untranslated".into());
}

impl Query {
    /// `--from IP[:PORT]` and `--to IP:PORT[/PROTO]` (IPv6 in brackets
    /// when a port follows; the protocol TCP unless named).
    pub fn parse(from: &str, to: &str) -> Result<Query, String> {
        let (from, from_port) = match from.parse::<std::net::SocketAddr>() {
            Ok(sa) => (sa.ip(), Some(sa.port())),
            Err(_) => (
                from.trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<IpAddr>()
                    .map_err(|_| format!("--from {from}: not IP or IP:PORT"))?,
                None,
            ),
        };
        let (address, protocol) = match to.rsplit_once('/') {
            Some((a, p)) => (
                a,
                match p.to_ascii_uppercase().as_str() {
                    "TCP" => Protocol::Tcp,
                    "UDP" => Protocol::Udp,
                    "SCTP" => Protocol::Sctp,
                    _ => return Err(format!("--to {to}: protocol {p} is not TCP, UDP or SCTP")),
                },
            ),
            None => (to, Protocol::Tcp),
        };
        let sa: std::net::SocketAddr = address
            .parse()
            .map_err(|_| format!("--to {to}: not IP:PORT[/PROTO] ([IPv6]:PORT for IPv6)"))?;
        if from.is_ipv4() != sa.ip().is_ipv4() {
            return Err(format!(
                "--from {from} and --to {} are of different families",
                sa.ip()
            ));
        }
        Ok(Query {
            from,
            from_port,
            to: sa.ip(),
            to_port: sa.port(),
            protocol,
        })
    }
}

fn unspecified(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
    }
}

fn is_node_address(ip: IpAddr, network: &crate::model::NodeNetwork) -> bool {
    ip.is_loopback()
        || network.nodeport_addresses.contains(&ip)
        || network.node_ip(Family::of(ip)) == Some(ip)
}

/// The trace for a terminal.
pub fn render_trace(trace: &Trace) -> String {
    use std::fmt::Write;
    let q = &trace.query;
    let mut out = String::new();
    let from = match q.from_port {
        Some(p) => format!("{}:{p}", q.from),
        None => q.from.to_string(),
    };
    let _ = writeln!(
        out,
        "{from} -> {}:{}/{} in mode {}: {}",
        q.to, q.to_port, q.protocol, trace.mode, trace.verdict
    );
    for step in &trace.steps {
        let _ = writeln!(out, "  - {step}");
    }
    if !trace.candidates.is_empty() {
        let _ = writeln!(out, "  endpoints:");
        for c in &trace.candidates {
            let mark = if c.chosen || c.chosen_cluster_wide {
                "+"
            } else {
                "-"
            };
            let _ = writeln!(out, "    {mark} {}: {}", c.backend, c.why);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        dataplane::held::{HeldFrontend, sample_table},
        model::{ClusterState, test_support::config},
    };

    fn query(from: &str, to: &str, port: u16) -> Query {
        Query {
            from: from.parse().unwrap(),
            from_port: Some(40000),
            to: to.parse().unwrap(),
            to_port: port,
            protocol: Protocol::Tcp,
        }
    }

    fn run(q: Query, mode: Mode, pins: &Pins) -> Trace {
        let (table, network) = sample_table();
        let mut held = HeldTable::new(mode.name());
        for (key, frontend) in table.iter() {
            held.insert(HeldFrontend::of_plan(&plan(key, frontend, &network)));
        }
        let state = ClusterState::default();
        let cfg = config();
        let desired = Desired {
            table: &table,
            network: &network,
            state: &state,
            cfg: &cfg,
        };
        trace(q, mode, &desired, &held, &|_, _| pins.clone())
    }

    #[test]
    fn a_pod_to_a_cluster_ip_is_translated_unmasqueraded_and_pinned_by_its_flow() {
        let pinned = Backend {
            ip: "10.1.0.2".parse().unwrap(),
            port: 8080,
        };
        let pins = Pins {
            flow: Some(pinned),
            ..Pins::default()
        };
        let t = run(query("10.1.5.5", "10.96.0.10", 80), Mode::Nftables, &pins);
        assert_eq!(t.verdict, "translated");
        assert_eq!(t.backends.len(), 2);
        assert_eq!(t.masquerade_to, None);
        assert_eq!(t.pinned_to, Some(pinned));
        assert_eq!(t.service.as_deref(), Some("ns/web"));
        // From outside the cluster CIDR: masqueraded to the node.
        let t = run(
            query("172.16.0.9", "10.96.0.10", 80),
            Mode::Ebpf,
            &Pins::default(),
        );
        assert_eq!(t.masquerade_to, Some("192.168.0.1".parse().unwrap()));
    }

    #[test]
    fn node_ports_ranges_and_local_policy_decide_as_the_plan_does() {
        let t = run(
            query("172.16.0.9", "192.168.0.1", 30080),
            Mode::Iptables,
            &Pins::default(),
        );
        assert_eq!(
            (
                t.verdict.as_str(),
                t.frontend.map(|k| k.ip.is_unspecified())
            ),
            ("translated", Some(true))
        );
        let t = run(
            query("172.16.0.9", "192.0.2.10", 443),
            Mode::Ebpf,
            &Pins::default(),
        );
        assert_eq!(t.verdict, "dropped", "{t:#?}");
        let t = run(
            query("203.0.113.7", "192.0.2.10", 443),
            Mode::Ebpf,
            &Pins::default(),
        );
        assert_eq!(t.verdict, "translated");
        // Local policy, no local endpoint: outside dropped, pods served.
        let t = run(
            query("172.16.0.9", "192.0.2.11", 80),
            Mode::Nftables,
            &Pins::default(),
        );
        assert_eq!(t.verdict, "dropped");
        let t = run(
            query("10.1.5.5", "192.0.2.11", 80),
            Mode::Nftables,
            &Pins::default(),
        );
        assert_eq!(t.verdict, "translated");
        let t = run(
            query("10.1.5.5", "10.96.0.12", 80),
            Mode::Nftables,
            &Pins::default(),
        );
        assert_eq!(t.verdict, "rejected");
    }

    #[test]
    fn queries_parse_as_an_operator_writes_them() {
        let q = Query::parse("10.1.0.5:40000", "10.96.0.10:53/udp").unwrap();
        assert_eq!(
            (q.from_port, q.to_port, q.protocol),
            (Some(40000), 53, Protocol::Udp)
        );
        let q = Query::parse("fd00::5", "[fd00::10]:80").unwrap();
        assert_eq!((q.from_port, q.protocol), (None, Protocol::Tcp));
        assert!(Query::parse("10.1.0.5", "10.96.0.10").is_err());
        assert!(Query::parse("10.1.0.5", "10.96.0.10:80/icmp").is_err());
        assert!(Query::parse("fd00::5", "10.96.0.10:80").is_err());
    }

    #[test]
    fn without_a_frontend_the_mode_decides_what_a_service_cidr_address_meets() {
        let t = run(
            query("10.1.5.5", "10.96.0.10", 81),
            Mode::Nftables,
            &Pins::default(),
        );
        assert_eq!(t.verdict, "rejected");
        let t = run(
            query("10.1.5.5", "10.96.0.10", 81),
            Mode::Iptables,
            &Pins::default(),
        );
        assert_eq!(t.verdict, "passes");
        let t = run(
            query("10.1.5.5", "10.96.7.7", 80),
            Mode::Ebpf,
            &Pins::default(),
        );
        assert_eq!(t.verdict, "dropped");
        let t = run(
            query("10.1.5.5", "8.8.8.8", 53),
            Mode::Ebpf,
            &Pins::default(),
        );
        assert_eq!(t.verdict, "passes");
        assert!(render_trace(&t).contains("passes untranslated"));
    }
}
