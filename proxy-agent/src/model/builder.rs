//! [`build_table`]: from cluster objects to the desired [`ServiceTable`].
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
};

use ipnet::IpNet;
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};

use super::{
    Backend, ClusterState, Frontend, FrontendKey, FrontendKind, FrontendPolicy, ModelConfig,
    Protocol, Rejection, ServiceName, ServiceTable, check_service_cidr,
    validate::{
        EndpointPlan, IpFamily, ServicePlan, ServicePortPlan, ZONE_LABEL, check_endpoint_slice,
        check_service, service_name_of,
    },
    validate_node,
};

/// The table for a cluster state, and everything that was left out of it
/// because it was broken.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BuildOutput {
    pub table: ServiceTable,
    /// Sorted and without duplicates.
    pub rejections: Vec<Rejection>,
    /// Health check node ports to serve: NodePort and LoadBalancer Services
    /// with `externalTrafficPolicy: Local` and `spec.healthCheckNodePort`.
    pub health_check_node_ports: BTreeMap<ServiceName, HealthCheck>,
    /// The ranges of every valid ServiceCIDR, sorted, without duplicates:
    /// traffic to an address inside them that no Service holds is dropped,
    /// as kube-proxy's nftables mode drops it.
    pub service_cidrs: Vec<IpNet>,
}

/// What a health check node port answers for one Service: healthy when this
/// node has local endpoints (so the load balancer sends traffic here).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub port: u16,
    /// Ready endpoints of the Service on this node: distinct addresses of
    /// one family, the larger count of the two. kube-proxy runs one proxier
    /// per family, each reporting its own count, so a dual-stack pod (one
    /// address of each family) counts once, not twice.
    pub local_endpoints: usize,
}

/// Builds the desired table. Broken objects, or broken parts of objects, are
/// skipped and reported in [`BuildOutput::rejections`]; they never affect
/// other Services. The result does not depend on the order of the input.
pub fn build_table(state: &ClusterState, cfg: &ModelConfig) -> BuildOutput {
    let mut rejections: Vec<Rejection> =
        state.nodes.iter().flat_map(|n| validate_node(n)).collect();
    let service_cidrs = service_cidrs(state, &mut rejections);

    let zone = node_zone(&state.nodes, cfg, &mut rejections);
    let place = Place {
        node_name: &cfg.node_name,
        zone: zone.as_deref(),
    };
    let endpoints = index_endpoints(&state.endpoint_slices, place, &mut rejections);
    let plans = service_plans(&state.services, &mut rejections);

    let mut table = ServiceTable::new();
    let mut health_check_node_ports = BTreeMap::new();
    // Plans come sorted by name, and each yields its frontends in a fixed
    // order, so when two Services (or two parts of one) claim one frontend
    // the lexically smaller namespace/name wins whatever the input order.
    for plan in plans {
        for planned in plan_frontends(&plan, &endpoints) {
            if let Some(owner) = table.get(&planned.key) {
                rejections.push(Rejection {
                    kind: "Service",
                    namespace: plan.name.namespace.clone(),
                    name: plan.name.name.clone(),
                    reason: format!(
                        "{}: {}/{} is already claimed by Service {}",
                        planned.field,
                        SocketAddr::new(planned.key.ip, planned.key.port),
                        planned.key.protocol,
                        owner.service
                    ),
                });
                continue;
            }
            // A frontend without backends stays: the dataplane must refuse
            // its traffic rather than let it through unproxied.
            table.insert(planned.key, planned.frontend);
        }
        if let Some(port) = plan.health_check_node_port {
            let local: BTreeSet<IpAddr> = endpoints
                .range(BackendGroup::first_of(&plan.name)..)
                .take_while(|(group, _)| group.service == plan.name)
                .flat_map(|(_, entries)| entries)
                .filter(|entry| entry.local && entry.ready)
                .map(|entry| entry.backend.ip)
                .collect();
            let v4 = local.iter().filter(|ip| ip.is_ipv4()).count();
            let local_endpoints = v4.max(local.len() - v4);
            health_check_node_ports.insert(
                plan.name.clone(),
                HealthCheck {
                    port,
                    local_endpoints,
                },
            );
        }
    }

    rejections.sort();
    rejections.dedup();
    BuildOutput {
        table,
        rejections,
        health_check_node_ports,
        service_cidrs,
    }
}

/// The ranges of the valid ServiceCIDRs, sorted, without duplicates; the
/// others are rejected.
fn service_cidrs(state: &ClusterState, rejections: &mut Vec<Rejection>) -> Vec<IpNet> {
    let mut cidrs = Vec::new();
    for object in &state.service_cidrs {
        match check_service_cidr(object) {
            Ok(ranges) => cidrs.extend(ranges),
            Err(refused) => rejections.extend(refused),
        }
    }
    cidrs.sort();
    cidrs.dedup();
    cidrs
}

/// A frontend a Service asks for, and the spec field it comes from.
struct PlannedFrontend {
    field: String,
    key: FrontendKey,
    frontend: Frontend,
}

/// Every frontend of a valid Service, in a fixed order: per cluster IP and
/// port the ClusterIP frontend, then NodePort, externalIPs and load balancer
/// addresses.
fn plan_frontends(
    plan: &ServicePlan,
    endpoints: &BTreeMap<BackendGroup, BTreeSet<EndpointEntry>>,
) -> Vec<PlannedFrontend> {
    let mut planned = Vec::new();
    for &cluster_ip in &plan.cluster_ips {
        let family = IpFamily::of(cluster_ip);
        for port in &plan.ports {
            let entries = endpoints.get(&BackendGroup {
                service: plan.name.clone(),
                family,
                port_name: port.name.clone(),
                protocol: port.protocol,
            });
            for (field, ip, number, kind) in frontend_addresses(plan, cluster_ip, port) {
                let key = FrontendKey {
                    ip,
                    port: number,
                    protocol: port.protocol,
                };
                let frontend = frontend_of(plan, port, entries, kind);
                planned.push(PlannedFrontend {
                    field,
                    key,
                    frontend,
                });
            }
        }
    }
    planned
}

/// Where one port of a Service is reached from `cluster_ip`'s family: the
/// field that asks for it (for messages), address, port and kind.
fn frontend_addresses(
    plan: &ServicePlan,
    cluster_ip: IpAddr,
    port: &ServicePortPlan,
) -> Vec<(String, IpAddr, u16, FrontendKind)> {
    let family = IpFamily::of(cluster_ip);
    let index = port.index;
    let mut out = vec![(
        format!("spec.ports[{index}]"),
        cluster_ip,
        port.port,
        FrontendKind::ClusterIp,
    )];
    if let Some(node_port) = port.node_port {
        let any = match family {
            IpFamily::V4 => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpFamily::V6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        };
        let field = format!("spec.ports[{index}].nodePort");
        out.push((field, any, node_port, FrontendKind::NodePort));
    }
    let of_family = |list: &[(usize, IpAddr)]| -> Vec<(usize, IpAddr)> {
        list.iter()
            .copied()
            .filter(|(_, ip)| IpFamily::of(*ip) == family)
            .collect()
    };
    for (i, ip) in of_family(&plan.external_ips) {
        let field = format!("spec.externalIPs[{i}] (spec.ports[{index}])");
        out.push((field, ip, port.port, FrontendKind::ExternalIp));
    }
    for (i, ip) in of_family(&plan.load_balancer_ips) {
        let field = format!("status.loadBalancer.ingress[{i}].ip (spec.ports[{index}])");
        out.push((field, ip, port.port, FrontendKind::LoadBalancer));
    }
    out
}

/// The frontend of one port of a Service reached as `kind`: its traffic
/// policy's backends among `entries`, and its policy.
fn frontend_of(
    plan: &ServicePlan,
    port: &ServicePortPlan,
    entries: Option<&BTreeSet<EndpointEntry>>,
    kind: FrontendKind,
) -> Frontend {
    let local_only = if kind.is_external() {
        plan.external_local
    } else {
        plan.internal_local
    };
    let source_ranges = if kind == FrontendKind::LoadBalancer {
        plan.source_ranges.clone()
    } else {
        Vec::new()
    };
    Frontend {
        service: plan.name.clone(),
        port_name: port.name.clone(),
        kind,
        backends: select_backends(entries, local_only, plan.topology),
        // Topology applies here too: kube-proxy sends pod traffic to an
        // external Local frontend through its cluster-wide
        // (topology-filtered) endpoint set.
        cluster_backends: if local_only {
            select_backends(entries, false, plan.topology)
        } else {
            Vec::new()
        },
        policy: FrontendPolicy {
            affinity_timeout_secs: plan.affinity_timeout_secs,
            local_only,
            source_ranges,
        },
    }
}

/// The backends new connections may go to, like kube-proxy's
/// CategorizeEndpoints: the ready endpoints (of this node only when
/// `local_only`; else, when the Service asks for `topology`, those its
/// endpoints' hints meant for this node or zone); when there is none, the
/// serving and terminating ones of that same node-local or cluster-wide set,
/// regardless of hints, so connections drain gracefully during rollouts.
fn select_backends(
    entries: Option<&BTreeSet<EndpointEntry>>,
    local_only: bool,
    topology: bool,
) -> Vec<Backend> {
    let candidates = || {
        entries
            .into_iter()
            .flatten()
            .filter(move |entry| !local_only || entry.local)
    };
    // As in kube-proxy, traffic policy Local overrides topology.
    let scope = if topology && !local_only {
        TopologyScope::of(candidates().filter(|entry| entry.ready))
    } else {
        TopologyScope::Cluster
    };
    let ready: BTreeSet<Backend> = candidates()
        .filter(|entry| entry.ready && scope.admits(entry))
        .map(|entry| entry.backend)
        .collect();
    if !ready.is_empty() {
        return ready.into_iter().collect();
    }
    // A topology scope always admits a ready endpoint, so the set is empty
    // only when nothing is ready at all: hints play no part in the fallback.
    candidates()
        .filter(|entry| entry.serving_terminating)
        .map(|entry| entry.backend)
        .collect::<BTreeSet<Backend>>()
        .into_iter()
        .collect()
}

/// Which ready endpoints the cluster-wide set of a Service that asks for
/// topology-aware routing keeps, decided like kube-proxy's
/// topologyModeFromHints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TopologyScope {
    /// Every ready endpoint: the hints are incomplete or name neither this
    /// node nor its zone.
    Cluster,
    /// Those hinted for this node (`hints.forNodes`, PreferSameNode).
    Node,
    /// Those hinted for this node's zone (`hints.forZones`).
    Zone,
}

impl TopologyScope {
    /// The scope for these ready endpoints: node hints when every one has
    /// some and one names this node; else zone hints when every one has some
    /// and one names this node's zone; else all of them. A partial set of
    /// hints means the hint writer is mid-update or gave up, so following it
    /// could overload the few hinted endpoints.
    fn of<'a>(ready: impl Iterator<Item = &'a EndpointEntry> + Clone) -> TopologyScope {
        let complete_with_ours = |hint: fn(&EndpointEntry) -> Hint| {
            let mut any = false;
            let mut ours = false;
            for entry in ready.clone() {
                any = true;
                match hint(entry) {
                    Hint::Absent => return false,
                    Hint::Elsewhere => {}
                    Hint::Here => ours = true,
                }
            }
            any && ours
        };
        if complete_with_ours(|entry| entry.node_hint) {
            TopologyScope::Node
        } else if complete_with_ours(|entry| entry.zone_hint) {
            TopologyScope::Zone
        } else {
            TopologyScope::Cluster
        }
    }

    fn admits(self, entry: &EndpointEntry) -> bool {
        match self {
            TopologyScope::Cluster => true,
            TopologyScope::Node => entry.node_hint == Hint::Here,
            TopologyScope::Zone => entry.zone_hint == Hint::Here,
        }
    }
}

/// The backends one Service port of one address family can use: how
/// EndpointSlices are matched to frontends (by port name and protocol).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct BackendGroup {
    service: ServiceName,
    family: IpFamily,
    port_name: String,
    protocol: Protocol,
}

impl BackendGroup {
    /// The smallest group of `service`, to iterate over all of its groups.
    fn first_of(service: &ServiceName) -> BackendGroup {
        BackendGroup {
            service: service.clone(),
            family: IpFamily::V4,
            port_name: String::new(),
            protocol: Protocol::Tcp,
        }
    }
}

/// An endpoint address and port with what decides whether it gets traffic.
/// Kept as a set, so that one endpoint listed in several slices (even with
/// differing conditions or hints) gives the same result in any order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct EndpointEntry {
    backend: Backend,
    ready: bool,
    serving_terminating: bool,
    /// On the node this agent runs on.
    local: bool,
    /// `hints.forZones` against this node's zone.
    zone_hint: Hint,
    /// `hints.forNodes` against this node.
    node_hint: Hint,
}

/// What an endpoint's hints of one kind (zones or nodes) say about this
/// node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Hint {
    /// No hint of that kind.
    Absent,
    /// Hints that name neither this node nor its zone.
    Elsewhere,
    /// A hint for this node, or for its zone.
    Here,
}

impl Hint {
    fn of(hints: &[String], here: Option<&str>) -> Hint {
        if hints.is_empty() {
            Hint::Absent
        } else if here.is_some_and(|here| hints.iter().any(|hint| hint == here)) {
            Hint::Here
        } else {
            Hint::Elsewhere
        }
    }
}

/// Where this agent runs, as endpoints and their hints name it.
#[derive(Clone, Copy, Debug)]
struct Place<'a> {
    /// "" when unknown.
    node_name: &'a str,
    /// The `topology.kubernetes.io/zone` label of this node's Node object.
    zone: Option<&'a str>,
}

impl Place<'_> {
    fn entry(&self, endpoint: &EndpointPlan, backend: Backend) -> EndpointEntry {
        let node_name = Some(self.node_name).filter(|name| !name.is_empty());
        EndpointEntry {
            backend,
            ready: endpoint.ready,
            serving_terminating: endpoint.serving_terminating,
            local: node_name.is_some() && endpoint.node_name.as_deref() == node_name,
            zone_hint: Hint::of(&endpoint.zone_hints, self.zone),
            node_hint: Hint::of(&endpoint.node_hints, node_name),
        }
    }
}

/// The zone of this node: the `topology.kubernetes.io/zone` label of the
/// Node named in `cfg` (absent or empty: no zone, as for kube-proxy). Copies
/// of that Node that disagree on it are reported and give no zone, so the
/// result does not depend on their order.
fn node_zone(
    nodes: &[Arc<Node>],
    cfg: &ModelConfig,
    rejections: &mut Vec<Rejection>,
) -> Option<String> {
    if cfg.node_name.is_empty() {
        return None;
    }
    let zones: BTreeSet<Option<&str>> = nodes
        .iter()
        .filter(|node| node.metadata.name.as_deref() == Some(cfg.node_name.as_str()))
        .map(|node| {
            node.metadata
                .labels
                .as_ref()
                .and_then(|labels| labels.get(ZONE_LABEL))
                .map(String::as_str)
                .filter(|zone| !zone.is_empty())
        })
        .collect();
    if zones.len() > 1 {
        rejections.push(Rejection {
            kind: "Node",
            namespace: String::new(),
            name: cfg.node_name.clone(),
            reason: format!(
                "metadata.labels[{ZONE_LABEL}]: {} Node objects share this name and differ in \
                 it; topology hints are not used",
                zones.len()
            ),
        });
        return None;
    }
    zones.into_iter().next().flatten().map(str::to_owned)
}

/// Usable endpoints of all slices, merged per group.
fn index_endpoints(
    slices: &[Arc<EndpointSlice>],
    place: Place<'_>,
    rejections: &mut Vec<Rejection>,
) -> BTreeMap<BackendGroup, BTreeSet<EndpointEntry>> {
    let mut groups: BTreeMap<BackendGroup, BTreeSet<EndpointEntry>> = BTreeMap::new();
    for slice in slices {
        let check = check_endpoint_slice(slice);
        rejections.extend(check.rejections);
        let Some(plan) = check.plan else { continue };
        let Some(service_name) = plan.service_name else {
            continue;
        };
        let service = ServiceName {
            namespace: plan.namespace,
            name: service_name,
        };
        for port in plan.ports {
            let group = groups
                .entry(BackendGroup {
                    service: service.clone(),
                    family: plan.family,
                    port_name: port.name,
                    protocol: port.protocol,
                })
                .or_default();
            group.extend(plan.endpoints.iter().map(|endpoint| {
                let backend = Backend {
                    ip: endpoint.ip,
                    port: port.port,
                };
                place.entry(endpoint, backend)
            }));
        }
    }
    groups
}

/// Plans of the usable Services, sorted by namespace/name.
///
/// Differing objects with one namespace/name (two manifest files defining
/// the same Service, say) are all rejected: picking one would make the table
/// depend on input order. Identical copies count as one.
fn service_plans(services: &[Arc<Service>], rejections: &mut Vec<Rejection>) -> Vec<ServicePlan> {
    let mut by_name: BTreeMap<ServiceName, Vec<&Service>> = BTreeMap::new();
    for svc in services.iter().map(|s| &**s) {
        by_name.entry(service_name_of(svc)).or_default().push(svc);
    }

    let mut plans = Vec::new();
    for (name, copies) in by_name {
        let Some((&first, others)) = copies.split_first() else {
            continue;
        };
        let identical = others.iter().all(|&other| other == first);
        // Nameless objects are all rejected by the check; they are not copies
        // of each other.
        if !identical && !name.name.is_empty() {
            rejections.push(Rejection {
                kind: "Service",
                namespace: name.namespace.clone(),
                name: name.name.clone(),
                reason: format!(
                    "metadata.name: {} Service objects share this namespace/name and differ; \
                     all are ignored",
                    copies.len()
                ),
            });
        }
        if !identical {
            // Still report each copy's own problems.
            for &svc in &copies {
                rejections.extend(check_service(svc).rejections);
            }
            continue;
        }
        let check = check_service(first);
        rejections.extend(check.rejections);
        plans.extend(check.plan);
    }
    plans
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::api::core::v1::ServiceSpec;

    use super::super::test_support::*;
    use super::super::validate::{TOPOLOGY_AWARE_HINTS_ANNOTATION, TOPOLOGY_MODE_ANNOTATION};
    use super::*;

    fn build(services: Vec<Service>, slices: Vec<EndpointSlice>) -> BuildOutput {
        build_table(&state(services, slices), &config())
    }

    fn reasons(output: &BuildOutput) -> Vec<String> {
        output
            .rejections
            .iter()
            .map(|r| format!("{} {}/{}: {}", r.kind, r.namespace, r.name, r.reason))
            .collect()
    }

    fn backends_of(output: &BuildOutput, frontend: FrontendKey) -> Vec<Backend> {
        match output.table.get(&frontend) {
            Some(found) => found.backends.clone(),
            None => panic!("no frontend {frontend:?} in {:?}", output.table),
        }
    }

    fn keys(output: &BuildOutput) -> Vec<FrontendKey> {
        output.table.iter().map(|(k, _)| *k).collect()
    }

    #[test]
    fn empty_state_gives_empty_table() {
        let output = build_table(&ClusterState::default(), &ModelConfig::default());
        assert_eq!(output, BuildOutput::default());
    }

    #[test]
    fn one_cluster_ip_frontend_per_port() {
        let svc = service(
            "ns",
            "web",
            &["10.0.0.1"],
            &[
                service_port("http", 80, "TCP"),
                service_port("dns", 53, "UDP"),
                service_port("sig", 9000, "SCTP"),
            ],
        );
        let output = build(vec![svc], vec![]);
        assert!(output.rejections.is_empty(), "{:?}", reasons(&output));
        assert_eq!(
            keys(&output),
            vec![
                key_proto("10.0.0.1", 53, Protocol::Udp),
                key_proto("10.0.0.1", 80, Protocol::Tcp),
                key_proto("10.0.0.1", 9000, Protocol::Sctp),
            ]
        );
        let http = output.table.get(&key("10.0.0.1", 80));
        assert_eq!(
            http,
            Some(&Frontend {
                service: ServiceName {
                    namespace: "ns".into(),
                    name: "web".into()
                },
                port_name: "http".into(),
                kind: FrontendKind::ClusterIp,
                backends: vec![],
                cluster_backends: vec![],
                policy: FrontendPolicy::default(),
            })
        );
    }

    #[test]
    fn absent_protocol_is_tcp() {
        let output = build(vec![simple_service("ns", "web", "10.0.0.1", 80)], vec![]);
        assert_eq!(keys(&output), vec![key("10.0.0.1", 80)]);
    }

    #[test]
    fn dual_stack_gets_one_frontend_per_cluster_ip() {
        let mut svc = service(
            "ns",
            "web",
            &["10.0.0.1", "fd00::1"],
            &[service_port("", 80, "TCP")],
        );
        if let Some(spec) = svc.spec.as_mut() {
            spec.ip_families = Some(vec!["IPv4".into(), "IPv6".into()]);
        }
        let output = build(vec![svc], vec![]);
        assert!(output.rejections.is_empty(), "{:?}", reasons(&output));
        assert_eq!(keys(&output), vec![key("10.0.0.1", 80), key("fd00::1", 80)]);
    }

    #[test]
    fn cluster_ip_is_used_when_cluster_ips_is_empty() {
        for cluster_ips in [None, Some(vec![])] {
            let mut svc = simple_service("ns", "web", "10.0.0.1", 80);
            if let Some(spec) = svc.spec.as_mut() {
                spec.cluster_ips = cluster_ips;
            }
            let output = build(vec![svc], vec![]);
            assert_eq!(keys(&output), vec![key("10.0.0.1", 80)]);
            assert!(output.rejections.is_empty());
        }
    }

    /// Rows: (what, the Services): each is left alone on purpose, as
    /// kube-proxy leaves it, and nothing is rejected either.
    #[test]
    fn services_this_proxy_leaves_alone() {
        let with_spec = |name: &str, edit: &dyn Fn(&mut Service)| {
            let mut svc = simple_service("ns", name, "10.0.0.1", 80);
            edit(&mut svc);
            svc
        };
        let rows: Vec<(&str, Vec<Service>, Vec<EndpointSlice>)> = vec![
            (
                "headless",
                vec![simple_service("ns", "headless", "None", 80)],
                vec![simple_slice(
                    "ns",
                    "headless-1",
                    "headless",
                    8080,
                    &["10.1.0.1"],
                )],
            ),
            (
                "ExternalName",
                vec![with_spec("ext", &|svc| {
                    let spec = spec_mut(svc);
                    spec.type_ = Some("ExternalName".into());
                    spec.external_name = Some("example.com".into());
                })],
                vec![],
            ),
            (
                "no spec, an empty spec, no cluster IP allocated yet",
                vec![
                    with_spec("a", &|svc| svc.spec = None),
                    with_spec("b", &|svc| svc.spec = Some(ServiceSpec::default())),
                    simple_service("ns", "c", "", 80),
                ],
                vec![],
            ),
            (
                // Even a broken one: its owner judges it.
                "another proxy's",
                vec![{
                    let mut svc = simple_service("ns", "other", "not-an-ip", 80);
                    svc.metadata.labels = Some(BTreeMap::from([(
                        "service.kubernetes.io/service-proxy-name".into(),
                        String::new(),
                    )]));
                    svc
                }],
                vec![],
            ),
        ];
        for (what, services, slices) in rows {
            assert_eq!(build(services, slices), BuildOutput::default(), "{what}");
        }
    }

    /// Rows: (the Services, the reasons): cluster IPs or families the API
    /// server would refuse reject the whole Service.
    #[test]
    fn bad_cluster_ips_or_families_reject_the_service() {
        let families = |ips: &[&str], families: &[&str]| {
            let mut svc = service("ns", "web", ips, &[service_port("", 80, "")]);
            spec_mut(&mut svc).ip_families = Some(families.iter().map(|f| f.to_string()).collect());
            svc
        };
        let rows: Vec<(Vec<Service>, Vec<&str>)> = vec![
            (
                vec![families(&["10.0.0.1"], &["IPv4", "IPX"])],
                vec!["Service ns/web: spec.ipFamilies[1]: \"IPX\" is not IPv4 or IPv6"],
            ),
            (
                vec![service(
                    "ns",
                    "web",
                    &["10.0.0.1", "10.0.0.2"],
                    &[service_port("", 80, "")],
                )],
                vec![
                    "Service ns/web: spec.clusterIPs[1]: \"10.0.0.2\" is a second IPv4 address (at \
                     most one per family)",
                ],
            ),
            (
                vec![families(&["10.0.0.1", "fd00::1"], &["IPv4"])],
                vec![
                    "Service ns/web: spec.clusterIPs[1]: \"fd00::1\" is IPv6, which spec.ipFamilies \
                     does not list",
                ],
            ),
            (
                vec![
                    simple_service("ns", "v4", "0.0.0.0", 80),
                    simple_service("ns", "v6", "::", 80),
                ],
                vec![
                    "Service ns/v4: spec.clusterIPs[0]: \"0.0.0.0\" is the unspecified address",
                    "Service ns/v6: spec.clusterIPs[0]: \"::\" is the unspecified address",
                ],
            ),
        ];
        for (services, expected) in rows {
            let output = build(services, vec![]);
            assert!(output.table.is_empty(), "{expected:?}");
            assert_eq!(reasons(&output), expected);
        }
    }

    #[test]
    fn slice_ports_match_service_ports_by_name() {
        let svc = service(
            "ns",
            "web",
            &["10.0.0.1"],
            &[service_port("http", 80, ""), service_port("https", 443, "")],
        );
        let ready = [endpoint("10.1.0.1")];
        let slices = vec![slice(
            "ns",
            "web-1",
            "web",
            "IPv4",
            &[slice_port("https", 8443, ""), slice_port("http", 8080, "")],
            &ready,
        )];
        let output = build(vec![svc], slices);
        assert_eq!(
            backends_of(&output, key("10.0.0.1", 80)),
            vec![backend("10.1.0.1", 8080)]
        );
        assert_eq!(
            backends_of(&output, key("10.0.0.1", 443)),
            vec![backend("10.1.0.1", 8443)]
        );
    }

    #[test]
    fn unnamed_and_empty_port_names_match() {
        // Service port named "" explicitly; slice port name absent.
        let svc = service("ns", "web", &["10.0.0.1"], &[service_port("", 80, "")]);
        let mut port = slice_port("", 8080, "");
        port.name = None;
        let output = build(
            vec![svc.clone()],
            vec![slice(
                "ns",
                "s",
                "web",
                "IPv4",
                &[port.clone()],
                &[endpoint("10.1.0.1")],
            )],
        );
        assert_eq!(
            backends_of(&output, key("10.0.0.1", 80)),
            vec![backend("10.1.0.1", 8080)]
        );

        port.name = Some(String::new());
        let output = build(
            vec![svc],
            vec![slice(
                "ns",
                "s",
                "web",
                "IPv4",
                &[port],
                &[endpoint("10.1.0.1")],
            )],
        );
        assert_eq!(
            backends_of(&output, key("10.0.0.1", 80)),
            vec![backend("10.1.0.1", 8080)]
        );
    }

    #[test]
    fn differently_named_slice_port_does_not_match() {
        let svc = service("ns", "web", &["10.0.0.1"], &[service_port("http", 80, "")]);
        let slices = vec![slice(
            "ns",
            "s",
            "web",
            "IPv4",
            &[slice_port("metrics", 9090, ""), slice_port("", 8080, "")],
            &[endpoint("10.1.0.1")],
        )];
        let output = build(vec![svc], slices);
        assert!(backends_of(&output, key("10.0.0.1", 80)).is_empty());
    }

    #[test]
    fn slice_port_protocol_must_match_and_defaults_to_tcp() {
        let svc = service(
            "ns",
            "dns",
            &["10.0.0.10"],
            &[
                service_port("dns", 53, "UDP"),
                service_port("dns-tcp", 53, ""),
            ],
        );
        let slices = vec![slice(
            "ns",
            "dns-1",
            "dns",
            "IPv4",
            &[
                // Same name, wrong protocol: must not feed the UDP frontend.
                slice_port("dns", 5353, "TCP"),
                slice_port("dns-tcp", 5354, ""),
            ],
            &[endpoint("10.1.0.1")],
        )];
        let output = build(vec![svc], slices);
        assert!(backends_of(&output, key_proto("10.0.0.10", 53, Protocol::Udp)).is_empty());
        assert_eq!(
            backends_of(&output, key("10.0.0.10", 53)),
            vec![backend("10.1.0.1", 5354)]
        );
    }

    #[test]
    fn only_ready_endpoints_are_backends_and_nil_means_ready() {
        let mut no_conditions = endpoint("10.1.0.4");
        no_conditions.conditions = None;
        let endpoints = [
            endpoint_with(&["10.1.0.1"], Some(true)),
            endpoint_with(&["10.1.0.2"], Some(false)),
            endpoint_with(&["10.1.0.3"], None),
            no_conditions,
        ];
        let slices = vec![slice(
            "ns",
            "web-1",
            "web",
            "IPv4",
            &[slice_port("", 8080, "")],
            &endpoints,
        )];
        let output = build(vec![simple_service("ns", "web", "10.0.0.1", 80)], slices);
        assert_eq!(
            backends_of(&output, key("10.0.0.1", 80)),
            vec![
                backend("10.1.0.1", 8080),
                backend("10.1.0.3", 8080),
                backend("10.1.0.4", 8080),
            ]
        );
        assert!(output.rejections.is_empty());
    }

    #[test]
    fn only_the_first_address_of_an_endpoint_is_used() {
        let slices = vec![slice(
            "ns",
            "web-1",
            "web",
            "IPv4",
            &[slice_port("", 8080, "")],
            &[endpoint_with(&["10.1.0.1", "10.1.0.2"], Some(true))],
        )];
        let output = build(vec![simple_service("ns", "web", "10.0.0.1", 80)], slices);
        assert_eq!(
            backends_of(&output, key("10.0.0.1", 80)),
            vec![backend("10.1.0.1", 8080)]
        );
    }

    #[test]
    fn backends_follow_the_frontend_address_family() {
        let svc = service(
            "ns",
            "web",
            &["10.0.0.1", "fd00::1"],
            &[service_port("", 80, "")],
        );
        let slices = vec![
            slice(
                "ns",
                "web-v4",
                "web",
                "IPv4",
                &[slice_port("", 8080, "")],
                &[endpoint("10.1.0.1")],
            ),
            slice(
                "ns",
                "web-v6",
                "web",
                "IPv6",
                &[slice_port("", 8080, "")],
                &[endpoint("fd01::1")],
            ),
        ];
        let output = build(vec![svc], slices);
        assert_eq!(
            backends_of(&output, key("10.0.0.1", 80)),
            vec![backend("10.1.0.1", 8080)]
        );
        assert_eq!(
            backends_of(&output, key("fd00::1", 80)),
            vec![backend("fd01::1", 8080)]
        );
    }

    #[test]
    fn ipv6_slice_does_not_feed_single_stack_ipv4_service() {
        let slices = vec![slice(
            "ns",
            "web-v6",
            "web",
            "IPv6",
            &[slice_port("", 8080, "")],
            &[endpoint("fd01::1")],
        )];
        let output = build(vec![simple_service("ns", "web", "10.0.0.1", 80)], slices);
        assert!(backends_of(&output, key("10.0.0.1", 80)).is_empty());
    }

    #[test]
    fn fqdn_slices_are_ignored() {
        let slices = vec![slice(
            "ns",
            "web-fqdn",
            "web",
            "FQDN",
            &[slice_port("", 8080, "")],
            &[endpoint("backend.example.com")],
        )];
        let output = build(vec![simple_service("ns", "web", "10.0.0.1", 80)], slices);
        assert!(backends_of(&output, key("10.0.0.1", 80)).is_empty());
        assert!(output.rejections.is_empty());
    }

    #[test]
    fn address_of_the_wrong_type_is_rejected_and_only_its_endpoint_skipped() {
        let slices = vec![slice(
            "ns",
            "web-1",
            "web",
            "IPv4",
            &[slice_port("", 8080, "")],
            &[endpoint("fd01::1"), endpoint("10.1.0.2")],
        )];
        let output = build(vec![simple_service("ns", "web", "10.0.0.1", 80)], slices);
        assert_eq!(
            backends_of(&output, key("10.0.0.1", 80)),
            vec![backend("10.1.0.2", 8080)]
        );
        assert_eq!(
            reasons(&output),
            vec![
                "EndpointSlice ns/web-1: endpoints[0].addresses[0]: \"fd01::1\" is not an IPv4 \
                 address as addressType requires"
            ]
        );
    }

    #[test]
    fn unparsable_endpoint_address_is_rejected_and_skipped() {
        let slices = vec![slice(
            "ns",
            "web-1",
            "web",
            "IPv4",
            &[slice_port("", 8080, "")],
            &[
                endpoint("10.1.0.1"),
                endpoint("10.1.0.256"),
                endpoint_with(&["10.1.0.3", "garbage"], Some(true)),
                endpoint_with(&[], Some(true)),
            ],
        )];
        let output = build(vec![simple_service("ns", "web", "10.0.0.1", 80)], slices);
        assert_eq!(
            backends_of(&output, key("10.0.0.1", 80)),
            vec![backend("10.1.0.1", 8080)]
        );
        assert_eq!(
            reasons(&output),
            vec![
                "EndpointSlice ns/web-1: endpoints[1].addresses[0]: \"10.1.0.256\" is not an IP \
                 address",
                "EndpointSlice ns/web-1: endpoints[2].addresses[1]: \"garbage\" is not an IP \
                 address",
                "EndpointSlice ns/web-1: endpoints[3].addresses: empty",
            ]
        );
    }

    #[test]
    fn unknown_address_type_rejects_the_slice() {
        let slices = vec![slice(
            "ns",
            "web-1",
            "web",
            "IPv5",
            &[slice_port("", 8080, "")],
            &[endpoint("10.1.0.1")],
        )];
        let output = build(vec![simple_service("ns", "web", "10.0.0.1", 80)], slices);
        assert!(backends_of(&output, key("10.0.0.1", 80)).is_empty());
        assert_eq!(
            reasons(&output),
            vec!["EndpointSlice ns/web-1: addressType: \"IPv5\" is not IPv4, IPv6 or FQDN"]
        );
    }

    #[test]
    fn bad_slice_ports_are_rejected_and_skipped() {
        let mut missing = slice_port("c", 0, "");
        missing.port = None;
        let svc = service(
            "ns",
            "web",
            &["10.0.0.1"],
            &[
                service_port("a", 80, ""),
                service_port("b", 81, ""),
                service_port("c", 82, ""),
                service_port("d", 83, ""),
                service_port("e", 84, ""),
            ],
        );
        let slices = vec![slice(
            "ns",
            "web-1",
            "web",
            "IPv4",
            &[
                slice_port("a", 8080, ""),
                slice_port("b", 0, ""),
                missing,
                slice_port("d", 65536, ""),
                slice_port("e", 8084, "HTTP"),
            ],
            &[endpoint("10.1.0.1")],
        )];
        let output = build(vec![svc], slices);
        assert_eq!(
            backends_of(&output, key("10.0.0.1", 80)),
            vec![backend("10.1.0.1", 8080)]
        );
        for port in 81..=84 {
            assert!(backends_of(&output, key("10.0.0.1", port)).is_empty());
        }
        assert_eq!(
            reasons(&output),
            vec![
                "EndpointSlice ns/web-1: ports[1].port: 0 is outside 1..=65535",
                "EndpointSlice ns/web-1: ports[2].port: missing (\"all ports\" is not supported)",
                "EndpointSlice ns/web-1: ports[3].port: 65536 is outside 1..=65535",
                "EndpointSlice ns/web-1: ports[4].protocol: \"HTTP\" is not TCP, UDP or SCTP",
            ]
        );
    }

    #[test]
    fn backends_are_merged_across_slices_without_duplicates() {
        let slices = vec![
            simple_slice("ns", "web-2", "web", 8080, &["10.1.0.3", "10.1.0.1"]),
            simple_slice("ns", "web-1", "web", 8080, &["10.1.0.2", "10.1.0.1"]),
        ];
        let output = build(vec![simple_service("ns", "web", "10.0.0.1", 80)], slices);
        assert_eq!(
            backends_of(&output, key("10.0.0.1", 80)),
            vec![
                backend("10.1.0.1", 8080),
                backend("10.1.0.2", 8080),
                backend("10.1.0.3", 8080),
            ]
        );
        assert_eq!(output.table.backend_count(), 3);
    }

    #[test]
    fn slices_of_other_services_or_namespaces_or_unlabelled_are_not_used() {
        let mut unlabelled = simple_slice("ns", "loose", "web", 8080, &["10.1.0.9"]);
        unlabelled.metadata.labels = None;
        let slices = vec![
            simple_slice("other", "web-1", "web", 8080, &["10.1.0.1"]),
            simple_slice("ns", "api-1", "api", 8080, &["10.1.0.2"]),
            unlabelled,
        ];
        let output = build(vec![simple_service("ns", "web", "10.0.0.1", 80)], slices);
        assert!(backends_of(&output, key("10.0.0.1", 80)).is_empty());
        assert!(output.rejections.is_empty());
    }

    #[test]
    fn absent_namespace_means_default() {
        let output = build(
            vec![simple_service("", "web", "10.0.0.1", 80)],
            vec![simple_slice("default", "web-1", "web", 8080, &["10.1.0.1"])],
        );
        let web = output.table.get(&key("10.0.0.1", 80));
        assert_eq!(
            web.map(|f| f.service.to_string()),
            Some("default/web".into())
        );
        assert_eq!(
            backends_of(&output, key("10.0.0.1", 80)),
            vec![backend("10.1.0.1", 8080)]
        );
    }

    #[test]
    fn unparsable_cluster_ip_rejects_only_that_service() {
        let broken = service(
            "ns",
            "broken",
            &["10.0.0.2", "10.0.0.300"],
            &[service_port("", 80, "")],
        );
        let output = build(
            vec![broken, simple_service("ns", "fine", "10.0.0.1", 80)],
            vec![simple_slice("ns", "fine-1", "fine", 8080, &["10.1.0.1"])],
        );
        assert_eq!(keys(&output), vec![key("10.0.0.1", 80)]);
        assert_eq!(
            reasons(&output),
            vec!["Service ns/broken: spec.clusterIPs[1]: \"10.0.0.300\" is not an IP address"]
        );
    }

    #[test]
    fn unparsable_fallback_cluster_ip_names_cluster_ip_field() {
        let mut svc = simple_service("ns", "web", "nope", 80);
        if let Some(spec) = svc.spec.as_mut() {
            spec.cluster_ips = None;
        }
        let output = build(vec![svc], vec![]);
        assert!(output.table.is_empty());
        assert_eq!(
            reasons(&output),
            vec!["Service ns/web: spec.clusterIP: \"nope\" is not an IP address"]
        );
    }

    #[test]
    fn none_as_a_secondary_cluster_ip_is_rejected() {
        let svc = service(
            "ns",
            "web",
            &["10.0.0.1", "None"],
            &[service_port("", 80, "")],
        );
        let output = build(vec![svc], vec![]);
        assert!(output.table.is_empty());
        assert_eq!(
            reasons(&output),
            vec!["Service ns/web: spec.clusterIPs[1]: \"None\" is not an IP address"]
        );
    }

    #[test]
    fn cluster_ip_differing_from_first_cluster_ips_entry_is_rejected() {
        let mut svc = simple_service("ns", "web", "10.0.0.1", 80);
        if let Some(spec) = svc.spec.as_mut() {
            spec.cluster_ip = Some("10.0.0.2".into());
        }
        let output = build(vec![svc], vec![]);
        assert!(output.table.is_empty());
        assert_eq!(
            reasons(&output),
            vec![
                "Service ns/web: spec.clusterIP: \"10.0.0.2\" differs from spec.clusterIPs[0] \
                 \"10.0.0.1\""
            ]
        );
    }

    #[test]
    fn out_of_range_service_port_is_skipped_alone() {
        let svc = service(
            "ns",
            "web",
            &["10.0.0.1"],
            &[
                service_port("a", 0, ""),
                service_port("b", 80, ""),
                service_port("c", 65536, ""),
                service_port("d", -1, ""),
            ],
        );
        let output = build(vec![svc], vec![]);
        assert_eq!(keys(&output), vec![key("10.0.0.1", 80)]);
        assert_eq!(
            reasons(&output),
            vec![
                "Service ns/web: spec.ports[0].port: 0 is outside 1..=65535",
                "Service ns/web: spec.ports[2].port: 65536 is outside 1..=65535",
                "Service ns/web: spec.ports[3].port: -1 is outside 1..=65535",
            ]
        );
    }

    #[test]
    fn unknown_protocol_skips_that_port_only() {
        let svc = service(
            "ns",
            "web",
            &["10.0.0.1"],
            &[
                service_port("a", 80, "HTTP"),
                service_port("b", 81, "tcp"),
                service_port("c", 82, "TCP"),
            ],
        );
        let output = build(vec![svc], vec![]);
        assert_eq!(keys(&output), vec![key("10.0.0.1", 82)]);
        assert_eq!(
            reasons(&output),
            vec![
                "Service ns/web: spec.ports[0].protocol: \"HTTP\" is not TCP, UDP or SCTP",
                "Service ns/web: spec.ports[1].protocol: \"tcp\" is not TCP, UDP or SCTP",
            ]
        );
    }

    #[test]
    fn duplicate_port_and_protocol_keeps_the_first() {
        let svc = service(
            "ns",
            "web",
            &["10.0.0.1"],
            &[
                service_port("first", 80, "TCP"),
                service_port("udp", 80, "UDP"),
                service_port("second", 80, ""),
            ],
        );
        let output = build(vec![svc], vec![]);
        assert_eq!(
            keys(&output),
            vec![
                key("10.0.0.1", 80),
                key_proto("10.0.0.1", 80, Protocol::Udp)
            ]
        );
        assert_eq!(
            output
                .table
                .get(&key("10.0.0.1", 80))
                .map(|f| f.port_name.as_str()),
            Some("first")
        );
        assert_eq!(
            reasons(&output),
            vec!["Service ns/web: spec.ports[2]: 80/TCP duplicates spec.ports[0]"]
        );
    }

    #[test]
    fn frontend_conflict_goes_to_the_smaller_name_in_any_order() {
        let a = simple_service("ns", "a", "10.0.0.1", 80);
        let b = service(
            "ns",
            "b",
            &["10.0.0.1"],
            &[service_port("x", 80, ""), service_port("y", 81, "")],
        );
        let slices = vec![
            simple_slice("ns", "a-1", "a", 8080, &["10.1.0.1"]),
            slice(
                "ns",
                "b-1",
                "b",
                "IPv4",
                &[slice_port("x", 9090, ""), slice_port("y", 9091, "")],
                &[endpoint("10.2.0.1")],
            ),
        ];
        let forward = build(vec![a.clone(), b.clone()], slices.clone());
        let backward = build(vec![b, a], slices);
        assert_eq!(forward, backward);
        assert_eq!(
            backends_of(&forward, key("10.0.0.1", 80)),
            vec![backend("10.1.0.1", 8080)]
        );
        // The loser keeps its other frontend.
        assert_eq!(
            backends_of(&forward, key("10.0.0.1", 81)),
            vec![backend("10.2.0.1", 9091)]
        );
        assert_eq!(
            reasons(&forward),
            vec!["Service ns/b: spec.ports[0]: 10.0.0.1:80/TCP is already claimed by Service ns/a"]
        );
    }

    #[test]
    fn differing_services_with_one_name_are_all_rejected() {
        let one = simple_service("ns", "web", "10.0.0.1", 80);
        let two = simple_service("ns", "web", "10.0.0.2", 80);
        let output = build(vec![one.clone(), two.clone()], vec![]);
        assert!(output.table.is_empty());
        assert_eq!(
            reasons(&output),
            vec![
                "Service ns/web: metadata.name: 2 Service objects share this namespace/name and \
                 differ; all are ignored"
            ]
        );
        assert_eq!(output, build(vec![two, one], vec![]));
    }

    #[test]
    fn identical_copies_of_a_service_count_as_one() {
        let web = simple_service("ns", "web", "10.0.0.1", 80);
        let output = build(vec![web.clone(), web.clone()], vec![]);
        assert_eq!(output, build(vec![web], vec![]));
        assert!(output.rejections.is_empty());
    }

    #[test]
    fn nameless_objects_are_rejected() {
        let mut state = state(
            vec![simple_service("ns", "", "10.0.0.1", 80)],
            vec![simple_slice("ns", "", "web", 8080, &["10.1.0.1"])],
        );
        state.nodes = vec![Arc::new(node("")), Arc::new(node("node-a"))];
        let output = build_table(&state, &config());
        assert!(output.table.is_empty());
        assert_eq!(
            reasons(&output),
            vec![
                "EndpointSlice ns/: metadata.name: missing",
                "Node /: metadata.name: missing",
                "Service ns/: metadata.name: missing",
            ]
        );
    }

    #[test]
    fn nodes_and_node_name_do_not_change_a_cluster_policy_table() {
        let services = vec![simple_service("ns", "web", "10.0.0.1", 80)];
        let slices = vec![simple_slice("ns", "web-1", "web", 8080, &["10.1.0.1"])];
        let plain = build_table(
            &state(services.clone(), slices.clone()),
            &ModelConfig::default(),
        );
        let mut with_nodes = state(services, slices);
        with_nodes.nodes = vec![Arc::new(node("node-a")), Arc::new(node("node-b"))];
        assert_eq!(build_table(&with_nodes, &config()), plain);
    }

    #[test]
    fn legacy_ipv4_with_leading_zeros_is_read_as_decimal() {
        let output = build(
            vec![simple_service("ns", "web", "010.000.000.001", 80)],
            vec![simple_slice(
                "ns",
                "web-1",
                "web",
                8080,
                &["010.001.000.010"],
            )],
        );
        assert!(output.rejections.is_empty(), "{:?}", reasons(&output));
        assert_eq!(
            backends_of(&output, key("10.0.0.1", 80)),
            vec![backend("10.1.0.10", 8080)]
        );
    }

    #[test]
    fn ipv4_mapped_ipv6_counts_as_ipv4() {
        let output = build(
            vec![simple_service("ns", "web", "::ffff:10.0.0.1", 80)],
            vec![simple_slice(
                "ns",
                "web-1",
                "web",
                8080,
                &["::ffff:10.1.0.1"],
            )],
        );
        assert!(output.rejections.is_empty(), "{:?}", reasons(&output));
        assert_eq!(
            backends_of(&output, key("10.0.0.1", 80)),
            vec![backend("10.1.0.1", 8080)]
        );
    }

    #[test]
    fn rejections_are_sorted_and_independent_of_order() {
        let services = vec![
            simple_service("z", "svc", "bad", 80),
            simple_service("a", "svc", "10.0.0.1", 0),
            simple_service("m", "svc", "10.0.0.2", 80),
        ];
        let slices = vec![
            simple_slice("m", "s2", "svc", 8080, &["x"]),
            simple_slice("m", "s1", "svc", 70000, &["10.1.0.1"]),
        ];
        let forward = build(services.clone(), slices.clone());
        let mut reversed_services = services;
        reversed_services.reverse();
        let mut reversed_slices = slices;
        reversed_slices.reverse();
        assert_eq!(forward, build(reversed_services, reversed_slices));
        let mut sorted = forward.rejections.clone();
        sorted.sort();
        assert_eq!(forward.rejections, sorted);
        assert_eq!(forward.rejections.len(), 4);
    }

    fn frontend_at(output: &BuildOutput, frontend: FrontendKey) -> Frontend {
        match output.table.get(&frontend) {
            Some(found) => found.clone(),
            None => panic!("no frontend {frontend:?} in {:?}", output.table),
        }
    }

    fn kinds(output: &BuildOutput) -> Vec<(FrontendKey, FrontendKind)> {
        output.table.iter().map(|(k, f)| (*k, f.kind)).collect()
    }

    fn web_slice(endpoints: &[k8s_openapi::api::discovery::v1::Endpoint]) -> EndpointSlice {
        slice(
            "ns",
            "web-1",
            "web",
            "IPv4",
            &[slice_port("", 8080, "")],
            endpoints,
        )
    }

    #[test]
    fn node_port_service_gets_a_node_port_frontend_per_family() {
        let mut svc = service(
            "ns",
            "web",
            &["10.0.0.1", "fd00::1"],
            &[with_node_port(service_port("", 80, ""), 30080)],
        );
        spec_mut(&mut svc).type_ = Some("NodePort".into());
        let slices = vec![
            web_slice(&[endpoint("10.1.0.1")]),
            slice(
                "ns",
                "web-v6",
                "web",
                "IPv6",
                &[slice_port("", 8080, "")],
                &[endpoint("fd01::1")],
            ),
        ];
        let output = build(vec![svc], slices);
        assert!(output.rejections.is_empty(), "{:?}", reasons(&output));
        assert_eq!(
            kinds(&output),
            vec![
                (key("0.0.0.0", 30080), FrontendKind::NodePort),
                (key("10.0.0.1", 80), FrontendKind::ClusterIp),
                (key("::", 30080), FrontendKind::NodePort),
                (key("fd00::1", 80), FrontendKind::ClusterIp),
            ]
        );
        assert_eq!(
            backends_of(&output, key("0.0.0.0", 30080)),
            vec![backend("10.1.0.1", 8080)]
        );
        assert_eq!(
            backends_of(&output, key("::", 30080)),
            vec![backend("fd01::1", 8080)]
        );
        assert_eq!(
            frontend_at(&output, key("::", 30080)).policy,
            FrontendPolicy::default()
        );
    }

    #[test]
    fn node_ports_of_cluster_ip_services_and_unallocated_ones_give_nothing() {
        let mut cluster_ip = typed_service("ns", "a", "ClusterIP", "10.0.0.1", 80, 30080);
        spec_mut(&mut cluster_ip).type_ = None;
        let mut lb = typed_service("ns", "b", "LoadBalancer", "10.0.0.2", 80, 0);
        spec_mut(&mut lb).allocate_load_balancer_node_ports = Some(false);
        spec_mut(&mut lb).ports = Some(vec![service_port("", 80, "")]);
        let output = build(vec![cluster_ip, lb], vec![]);
        assert!(output.rejections.is_empty(), "{:?}", reasons(&output));
        assert_eq!(
            keys(&output),
            vec![key("10.0.0.1", 80), key("10.0.0.2", 80)]
        );
    }

    #[test]
    fn bad_node_port_loses_only_its_node_port_frontend() {
        let svc = typed_service("ns", "web", "NodePort", "10.0.0.1", 80, 70000);
        let output = build(vec![svc], vec![]);
        assert_eq!(keys(&output), vec![key("10.0.0.1", 80)]);
        assert_eq!(
            reasons(&output),
            vec!["Service ns/web: spec.ports[0].nodePort: 70000 is outside 1..=65535"]
        );
    }

    #[test]
    fn node_port_conflict_goes_to_the_smaller_name_in_any_order() {
        let a = typed_service("ns", "a", "NodePort", "10.0.0.1", 80, 30080);
        let b = typed_service("ns", "b", "NodePort", "10.0.0.2", 80, 30080);
        let forward = build(vec![a.clone(), b.clone()], vec![]);
        assert_eq!(forward, build(vec![b, a], vec![]));
        assert_eq!(
            frontend_at(&forward, key("0.0.0.0", 30080)).service.name,
            "a"
        );
        assert_eq!(
            reasons(&forward),
            vec![
                "Service ns/b: spec.ports[0].nodePort: 0.0.0.0:30080/TCP is already claimed \
                 by Service ns/a"
            ]
        );
        assert!(forward.table.get(&key("10.0.0.2", 80)).is_some());
    }

    #[test]
    fn external_ips_get_frontends_and_bad_ones_are_rejected_alone() {
        let mut svc = simple_service("ns", "web", "10.0.0.1", 80);
        spec_mut(&mut svc).external_ips = Some(vec![
            "192.0.2.1".into(),
            "2001:db8::1".into(),
            "nope".into(),
            "0.0.0.0".into(),
            "192.0.2.2".into(),
        ]);
        let output = build(vec![svc], vec![web_slice(&[endpoint("10.1.0.1")])]);
        assert_eq!(
            kinds(&output),
            vec![
                (key("10.0.0.1", 80), FrontendKind::ClusterIp),
                (key("192.0.2.1", 80), FrontendKind::ExternalIp),
                (key("192.0.2.2", 80), FrontendKind::ExternalIp),
            ]
        );
        assert_eq!(
            backends_of(&output, key("192.0.2.2", 80)),
            vec![backend("10.1.0.1", 8080)]
        );
        assert_eq!(
            reasons(&output),
            vec![
                "Service ns/web: spec.externalIPs[1]: \"2001:db8::1\" is IPv6, which is not a \
                 family of the Service's cluster IPs",
                "Service ns/web: spec.externalIPs[2]: \"nope\" is not an IP address",
                "Service ns/web: spec.externalIPs[3]: \"0.0.0.0\" is the unspecified address",
            ]
        );
    }

    #[test]
    fn load_balancer_ingress_ips_get_frontends_like_kube_proxy() {
        let mut svc = typed_service("ns", "web", "LoadBalancer", "10.0.0.1", 80, 30080);
        set_ingress(
            &mut svc,
            vec![
                lb_ingress("192.0.2.10", "", ""),
                lb_ingress("", "lb.example.com", ""),
                lb_ingress("192.0.2.11", "", "Proxy"),
                lb_ingress("192.0.2.12", "", "VIP"),
                lb_ingress("192.0.2.300", "", ""),
                lb_ingress("fd02::1", "", ""),
            ],
        );
        let output = build(vec![svc], vec![web_slice(&[endpoint("10.1.0.1")])]);
        assert_eq!(
            kinds(&output),
            vec![
                (key("0.0.0.0", 30080), FrontendKind::NodePort),
                (key("10.0.0.1", 80), FrontendKind::ClusterIp),
                (key("192.0.2.10", 80), FrontendKind::LoadBalancer),
                (key("192.0.2.12", 80), FrontendKind::LoadBalancer),
            ]
        );
        assert_eq!(
            backends_of(&output, key("192.0.2.10", 80)),
            vec![backend("10.1.0.1", 8080)]
        );
        let found = reasons(&output);
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(found[0].contains("status.loadBalancer.ingress[4].ip: \"192.0.2.300\""));
        assert!(found[1].contains("status.loadBalancer.ingress[5].ip: \"fd02::1\" is IPv6"));
    }

    #[test]
    fn load_balancer_status_of_other_types_is_ignored() {
        let mut svc = simple_service("ns", "web", "10.0.0.1", 80);
        set_ingress(&mut svc, vec![lb_ingress("192.0.2.10", "", "")]);
        let output = build(vec![svc], vec![]);
        assert_eq!(keys(&output), vec![key("10.0.0.1", 80)]);
    }

    /// Objects the API server accepted before it tightened validation
    /// spell IPv4 octets with leading zeros; kube-proxy reads them as the
    /// plain (decimal) address, everywhere an address or range is given.
    #[test]
    fn ipv4_with_leading_zeros_is_read_as_the_plain_address() {
        let mut svc = typed_service("ns", "web", "LoadBalancer", "172.30.0.041", 80, 30080);
        spec_mut(&mut svc).cluster_ips = Some(vec!["172.30.0.041".into()]);
        spec_mut(&mut svc).external_ips = Some(vec!["192.0.002.1".into()]);
        spec_mut(&mut svc).load_balancer_source_ranges = Some(vec!["203.0.113.000/24".into()]);
        set_ingress(&mut svc, vec![lb_ingress("192.0.2.010", "", "")]);
        let endpoints = [endpoint("10.001.0.1")];
        let slices = vec![slice(
            "ns",
            "web-1",
            "web",
            "IPv4",
            &[slice_port("", 8080, "TCP")],
            &endpoints,
        )];
        let output = build(vec![svc], slices);
        assert!(output.rejections.is_empty(), "{:?}", reasons(&output));
        assert_eq!(
            keys(&output),
            vec![
                key("0.0.0.0", 30080),
                key("172.30.0.41", 80),
                key("192.0.2.1", 80),
                key("192.0.2.10", 80),
            ]
        );
        let lb = frontend_at(&output, key("192.0.2.10", 80));
        assert_eq!(lb.backends, vec![backend("10.1.0.1", 8080)]);
        assert_eq!(
            lb.policy.source_ranges,
            vec!["203.0.113.0/24".parse::<ipnet::IpNet>().unwrap()]
        );
    }

    #[test]
    fn source_ranges_apply_to_load_balancer_frontends_only() {
        let mut svc = typed_service("ns", "web", "LoadBalancer", "10.0.0.1", 80, 30080);
        spec_mut(&mut svc).external_ips = Some(vec!["192.0.2.1".into()]);
        spec_mut(&mut svc).load_balancer_source_ranges = Some(vec![
            " 203.0.113.0/24 ".into(),
            "not-a-cidr".into(),
            "198.51.100.7/16".into(),
        ]);
        set_ingress(&mut svc, vec![lb_ingress("192.0.2.10", "", "")]);
        let output = build(vec![svc], vec![]);
        assert_eq!(
            reasons(&output),
            vec!["Service ns/web: spec.loadBalancerSourceRanges[1]: \"not-a-cidr\" is not a CIDR"]
        );
        let expected: Vec<ipnet::IpNet> = vec![
            "198.51.0.0/16".parse().unwrap(),
            "203.0.113.0/24".parse().unwrap(),
        ];
        assert_eq!(
            frontend_at(&output, key("192.0.2.10", 80))
                .policy
                .source_ranges,
            expected
        );
        for other in [
            key("10.0.0.1", 80),
            key("0.0.0.0", 30080),
            key("192.0.2.1", 80),
        ] {
            assert!(frontend_at(&output, other).policy.source_ranges.is_empty());
        }
    }

    #[test]
    fn all_invalid_source_ranges_leave_the_load_balancer_frontends_out() {
        let mut svc = typed_service("ns", "web", "LoadBalancer", "10.0.0.1", 80, 30080);
        spec_mut(&mut svc).load_balancer_source_ranges = Some(vec!["bad".into()]);
        set_ingress(&mut svc, vec![lb_ingress("192.0.2.10", "", "")]);
        let output = build(vec![svc], vec![]);
        assert_eq!(
            keys(&output),
            vec![key("0.0.0.0", 30080), key("10.0.0.1", 80)]
        );
        assert_eq!(output.rejections.len(), 2, "{:?}", reasons(&output));
    }

    #[test]
    fn serving_terminating_endpoints_are_used_only_when_none_is_ready() {
        let svc = || simple_service("ns", "web", "10.0.0.1", 80);
        let terminating = terminating_on("10.1.0.2", "");
        // nil serving defers to ready (false here): not a fallback.
        let not_serving = endpoint_full("10.1.0.3", Some(false), None, Some(true), "");
        // nil terminating is false: serving but not terminating is no fallback.
        let not_terminating = endpoint_full("10.1.0.4", Some(false), Some(true), None, "");
        let output = build(
            vec![svc()],
            vec![web_slice(&[
                endpoint("10.1.0.1"),
                terminating.clone(),
                not_serving.clone(),
                not_terminating.clone(),
            ])],
        );
        assert_eq!(
            backends_of(&output, key("10.0.0.1", 80)),
            vec![backend("10.1.0.1", 8080)]
        );
        let output = build(
            vec![svc()],
            vec![web_slice(&[terminating, not_serving, not_terminating])],
        );
        assert_eq!(
            backends_of(&output, key("10.0.0.1", 80)),
            vec![backend("10.1.0.2", 8080)]
        );
    }

    #[test]
    fn internal_traffic_policy_local_keeps_local_endpoints_for_cluster_ip_only() {
        let mut svc = typed_service("ns", "web", "NodePort", "10.0.0.1", 80, 30080);
        spec_mut(&mut svc).internal_traffic_policy = Some("Local".into());
        let slices = vec![web_slice(&[
            endpoint_on("10.1.0.1", "node-a"),
            endpoint_on("10.1.0.2", "node-b"),
            endpoint("10.1.0.3"),
        ])];
        let output = build(vec![svc], slices);
        let cluster = frontend_at(&output, key("10.0.0.1", 80));
        assert_eq!(cluster.backends, vec![backend("10.1.0.1", 8080)]);
        assert!(cluster.policy.local_only);
        let node_port = frontend_at(&output, key("0.0.0.0", 30080));
        assert_eq!(node_port.backends.len(), 3);
        assert!(!node_port.policy.local_only);
    }

    #[test]
    fn external_traffic_policy_local_applies_to_external_frontends() {
        let mut svc = typed_service("ns", "web", "LoadBalancer", "10.0.0.1", 80, 30080);
        spec_mut(&mut svc).external_traffic_policy = Some("Local".into());
        spec_mut(&mut svc).external_ips = Some(vec!["192.0.2.1".into()]);
        set_ingress(&mut svc, vec![lb_ingress("192.0.2.10", "", "")]);
        // The only local endpoint terminates: the local set falls back to it
        // while the cluster-wide set still has a ready one elsewhere.
        let slices = vec![web_slice(&[
            terminating_on("10.1.0.1", "node-a"),
            endpoint_on("10.1.0.2", "node-b"),
        ])];
        let output = build(vec![svc], slices);
        assert!(output.rejections.is_empty(), "{:?}", reasons(&output));
        let cluster = frontend_at(&output, key("10.0.0.1", 80));
        assert_eq!(cluster.backends, vec![backend("10.1.0.2", 8080)]);
        assert!(!cluster.policy.local_only);
        for external in [
            key("0.0.0.0", 30080),
            key("192.0.2.1", 80),
            key("192.0.2.10", 80),
        ] {
            let found = frontend_at(&output, external);
            assert!(found.kind.is_external());
            assert_eq!(
                found.backends,
                vec![backend("10.1.0.1", 8080)],
                "{external:?}"
            );
            assert!(found.policy.local_only);
        }
    }

    #[test]
    fn external_traffic_policy_local_on_cluster_ip_service_covers_external_ips() {
        let mut svc = simple_service("ns", "web", "10.0.0.1", 80);
        spec_mut(&mut svc).external_traffic_policy = Some("Local".into());
        spec_mut(&mut svc).external_ips = Some(vec!["192.0.2.1".into()]);
        let slices = vec![web_slice(&[endpoint_on("10.1.0.2", "node-b")])];
        let output = build(vec![svc], slices);
        let external = frontend_at(&output, key("192.0.2.1", 80));
        assert!(external.policy.local_only);
        assert!(external.backends.is_empty());
        assert!(!frontend_at(&output, key("10.0.0.1", 80)).policy.local_only);
    }

    #[test]
    fn unknown_traffic_policy_or_affinity_rejects_the_service() {
        let mut bad = vec![];
        for (field, value) in [
            ("internal", "local"),
            ("external", "Nope"),
            ("affinity", "Cookie"),
        ] {
            let mut svc = simple_service("ns", field, "10.0.0.1", 80);
            let spec = spec_mut(&mut svc);
            match field {
                "internal" => spec.internal_traffic_policy = Some(value.into()),
                "external" => spec.external_traffic_policy = Some(value.into()),
                _ => spec.session_affinity = Some(value.into()),
            }
            bad.push(svc);
        }
        let output = build(bad, vec![]);
        assert!(output.table.is_empty());
        assert_eq!(
            reasons(&output),
            vec![
                "Service ns/affinity: spec.sessionAffinity: \"Cookie\" is not None or ClientIP; \
                 the Service is ignored",
                "Service ns/external: spec.externalTrafficPolicy: \"Nope\" is not Cluster or \
                 Local; the Service is ignored",
                "Service ns/internal: spec.internalTrafficPolicy: \"local\" is not Cluster or \
                 Local; the Service is ignored",
            ]
        );
    }

    #[test]
    fn client_ip_affinity_sets_the_timeout_on_every_frontend() {
        use k8s_openapi::api::core::v1::{ClientIPConfig, SessionAffinityConfig};
        let with_timeout = |timeout: Option<i32>| {
            let mut svc = typed_service("ns", "web", "NodePort", "10.0.0.1", 80, 30080);
            let spec = spec_mut(&mut svc);
            spec.session_affinity = Some("ClientIP".into());
            spec.session_affinity_config = timeout.map(|secs| SessionAffinityConfig {
                client_ip: Some(ClientIPConfig {
                    timeout_seconds: Some(secs),
                }),
            });
            build(vec![svc], vec![])
        };
        for (timeout, expected) in [(None, 10800), (Some(1), 1), (Some(86400), 86400)] {
            let output = with_timeout(timeout);
            assert!(output.rejections.is_empty());
            assert_eq!(output.table.len(), 2);
            for (_, found) in output.table.iter() {
                assert_eq!(found.policy.affinity_timeout_secs, Some(expected));
            }
        }
        for bad in [0, -5, 86401] {
            let output = with_timeout(Some(bad));
            assert!(output.table.is_empty(), "{bad}");
            let found = reasons(&output);
            assert_eq!(found.len(), 1);
            assert!(
                found[0].starts_with(
                    "Service ns/web: spec.sessionAffinityConfig.clientIP.timeoutSeconds: "
                ),
                "{found:?}"
            );
        }
    }

    #[test]
    fn health_check_node_port_counts_a_dual_stack_pod_once() {
        let mut svc = service(
            "ns",
            "web",
            &["10.0.0.1", "fd00::1"],
            &[with_node_port(service_port("http", 80, ""), 30080)],
        );
        let spec = spec_mut(&mut svc);
        spec.type_ = Some("NodePort".into());
        spec.external_traffic_policy = Some("Local".into());
        spec.health_check_node_port = Some(31000);
        let port = [slice_port("http", 8080, "")];
        let slices = vec![
            slice(
                "ns",
                "web-1",
                "web",
                "IPv4",
                &port,
                &[
                    endpoint_on("10.1.0.1", "node-a"),
                    endpoint_on("10.1.0.2", "node-a"),
                ],
            ),
            slice(
                "ns",
                "web-2",
                "web",
                "IPv6",
                &port,
                &[
                    endpoint_on("fd00:1::1", "node-a"),
                    endpoint_on("fd00:1::2", "node-a"),
                    endpoint_on("fd00:1::3", "node-b"),
                ],
            ),
        ];
        let output = build(vec![svc], slices);
        let counts: Vec<usize> = output
            .health_check_node_ports
            .values()
            .map(|check| check.local_endpoints)
            .collect();
        assert_eq!(counts, [2], "two pods with an address of each family");
    }

    #[test]
    fn health_check_node_port_counts_local_ready_endpoint_addresses() {
        let mut svc = service(
            "ns",
            "web",
            &["10.0.0.1"],
            &[
                with_node_port(service_port("http", 80, ""), 30080),
                with_node_port(service_port("https", 443, ""), 30443),
            ],
        );
        let spec = spec_mut(&mut svc);
        spec.type_ = Some("LoadBalancer".into());
        spec.external_traffic_policy = Some("Local".into());
        spec.health_check_node_port = Some(31000);
        let endpoints = [
            endpoint_on("10.1.0.1", "node-a"),
            endpoint_on("10.1.0.2", "node-a"),
            endpoint_on("10.1.0.3", "node-b"),
            terminating_on("10.1.0.4", "node-a"),
        ];
        let slices = vec![slice(
            "ns",
            "web-1",
            "web",
            "IPv4",
            &[slice_port("http", 8080, ""), slice_port("https", 8443, "")],
            &endpoints,
        )];
        let output = build(vec![svc.clone()], slices);
        let name = ServiceName {
            namespace: "ns".into(),
            name: "web".into(),
        };
        assert_eq!(
            output.health_check_node_ports,
            BTreeMap::from([(
                name,
                HealthCheck {
                    port: 31000,
                    local_endpoints: 2
                }
            )])
        );

        spec_mut(&mut svc).external_traffic_policy = Some("Cluster".into());
        assert!(
            build(vec![svc.clone()], vec![])
                .health_check_node_ports
                .is_empty()
        );

        spec_mut(&mut svc).external_traffic_policy = Some("Local".into());
        spec_mut(&mut svc).health_check_node_port = Some(0);
        let output = build(vec![svc], vec![]);
        assert!(output.health_check_node_ports.is_empty());
        assert_eq!(
            reasons(&output),
            vec!["Service ns/web: spec.healthCheckNodePort: 0 is outside 1..=65535"]
        );
    }

    /// Topology-aware routing: this agent runs on node-a, in zone-1.
    mod topology {
        use k8s_openapi::api::{core::v1::Node, discovery::v1::Endpoint};

        use super::*;

        fn build_on(
            nodes: Vec<Node>,
            services: Vec<Service>,
            slices: Vec<EndpointSlice>,
        ) -> BuildOutput {
            build_table(&ClusterState::new(services, slices, nodes), &config())
        }

        fn zone_1() -> Vec<Node> {
            vec![
                node_in_zone("node-a", "zone-1"),
                node_in_zone("node-b", "zone-2"),
            ]
        }

        /// A NodePort Service (Cluster policies) with `trafficDistribution`.
        fn distributed(distribution: &str) -> Service {
            let mut svc = typed_service("ns", "web", "NodePort", "10.0.0.1", 80, 30080);
            spec_mut(&mut svc).traffic_distribution = Some(distribution.into());
            svc
        }

        fn annotated(annotations: &[(&str, &str)]) -> Service {
            let mut svc = simple_service("ns", "web", "10.0.0.1", 80);
            svc.metadata.annotations = Some(
                annotations
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            );
            svc
        }

        fn ready_in(address: &str, zones: &[&str]) -> Endpoint {
            for_zones(endpoint(address), zones)
        }

        fn backends(addresses: &[&str]) -> Vec<Backend> {
            addresses.iter().map(|a| backend(a, 8080)).collect()
        }

        /// 10.1.0.1 and 10.1.0.3 are meant for zone-1, 10.1.0.2 for zone-2.
        fn hinted() -> Vec<Endpoint> {
            vec![
                ready_in("10.1.0.1", &["zone-1"]),
                ready_in("10.1.0.2", &["zone-2"]),
                ready_in("10.1.0.3", &["zone-3", "zone-1"]),
            ]
        }

        const ALL: &[&str] = &["10.1.0.1", "10.1.0.2", "10.1.0.3"];
        const SAME_ZONE: &[&str] = &["10.1.0.1", "10.1.0.3"];

        #[test]
        fn prefer_close_with_complete_hints_keeps_same_zone_endpoints() {
            for distribution in ["PreferClose", "PreferSameZone", "PreferSameNode"] {
                let output = build_on(
                    zone_1(),
                    vec![distributed(distribution)],
                    vec![web_slice(&hinted())],
                );
                assert!(output.rejections.is_empty(), "{:?}", reasons(&output));
                for frontend in [key("10.0.0.1", 80), key("0.0.0.0", 30080)] {
                    assert_eq!(
                        backends_of(&output, frontend),
                        backends(SAME_ZONE),
                        "{distribution} {frontend:?}"
                    );
                }
            }
        }

        #[test]
        fn incomplete_hints_fall_back_to_every_endpoint() {
            let mut endpoints = hinted();
            endpoints.push(endpoint("10.1.0.4"));
            let output = build_on(
                zone_1(),
                vec![distributed("PreferClose")],
                vec![web_slice(&endpoints)],
            );
            assert_eq!(
                backends_of(&output, key("10.0.0.1", 80)),
                backends(&["10.1.0.1", "10.1.0.2", "10.1.0.3", "10.1.0.4"])
            );

            // Hints are required of ready endpoints only, as in kube-proxy.
            let mut endpoints = hinted();
            endpoints.push(terminating_on("10.1.0.4", "node-b"));
            endpoints.push(endpoint_with(&["10.1.0.5"], Some(false)));
            let output = build_on(
                zone_1(),
                vec![distributed("PreferClose")],
                vec![web_slice(&endpoints)],
            );
            assert_eq!(
                backends_of(&output, key("10.0.0.1", 80)),
                backends(SAME_ZONE)
            );
        }

        #[test]
        fn hints_split_across_slices_are_all_considered() {
            let slices = vec![
                slice(
                    "ns",
                    "web-1",
                    "web",
                    "IPv4",
                    &[slice_port("", 8080, "")],
                    &hinted()[..2],
                ),
                slice(
                    "ns",
                    "web-2",
                    "web",
                    "IPv4",
                    &[slice_port("", 8080, "")],
                    &[endpoint("10.1.0.4")],
                ),
            ];
            let output = build_on(zone_1(), vec![distributed("PreferClose")], slices.clone());
            assert_eq!(backends_of(&output, key("10.0.0.1", 80)).len(), 3);

            // The same endpoint in two slices, hinted in one only: its
            // unhinted listing makes the hints incomplete, in any order.
            let both = vec![
                web_slice(&hinted()),
                slice(
                    "ns",
                    "web-2",
                    "web",
                    "IPv4",
                    &[slice_port("", 8080, "")],
                    &[endpoint("10.1.0.2")],
                ),
            ];
            let mut reversed = both.clone();
            reversed.reverse();
            let forward = build_on(zone_1(), vec![distributed("PreferClose")], both);
            let backward = build_on(zone_1(), vec![distributed("PreferClose")], reversed);
            assert_eq!(forward, backward);
            assert_eq!(backends_of(&forward, key("10.0.0.1", 80)), backends(ALL));
        }

        #[test]
        fn no_endpoint_for_our_zone_falls_back_to_every_endpoint() {
            let endpoints = [
                ready_in("10.1.0.1", &["zone-2"]),
                ready_in("10.1.0.2", &["zone-3"]),
            ];
            let output = build_on(
                zone_1(),
                vec![distributed("PreferClose")],
                vec![web_slice(&endpoints)],
            );
            assert_eq!(
                backends_of(&output, key("10.0.0.1", 80)),
                backends(&["10.1.0.1", "10.1.0.2"])
            );
        }

        #[test]
        fn node_without_zone_falls_back_to_every_endpoint() {
            let svc = || vec![distributed("PreferClose")];
            let slices = || vec![web_slice(&hinted())];
            let cases = [
                ("no label", vec![node("node-a")]),
                ("empty label", vec![node_in_zone("node-a", "")]),
                ("no Node object", vec![node_in_zone("node-b", "zone-1")]),
            ];
            for (case, nodes) in cases {
                let output = build_on(nodes, svc(), slices());
                assert!(
                    output.rejections.is_empty(),
                    "{case}: {:?}",
                    reasons(&output)
                );
                assert_eq!(
                    backends_of(&output, key("10.0.0.1", 80)),
                    backends(ALL),
                    "{case}"
                );
            }
            // Without a node name, no Node is this node's.
            let output = build_table(
                &ClusterState::new(svc(), slices(), zone_1()),
                &ModelConfig::default(),
            );
            assert_eq!(backends_of(&output, key("10.0.0.1", 80)), backends(ALL));
        }

        #[test]
        fn differing_copies_of_our_node_give_no_zone_in_any_order() {
            let copies = vec![
                node_in_zone("node-a", "zone-1"),
                node_in_zone("node-a", "zone-2"),
            ];
            let mut reversed = copies.clone();
            reversed.reverse();
            let forward = build_on(
                copies,
                vec![distributed("PreferClose")],
                vec![web_slice(&hinted())],
            );
            let backward = build_on(
                reversed,
                vec![distributed("PreferClose")],
                vec![web_slice(&hinted())],
            );
            assert_eq!(forward, backward);
            assert_eq!(backends_of(&forward, key("10.0.0.1", 80)), backends(ALL));
            assert_eq!(
                reasons(&forward),
                vec![
                    "Node /node-a: metadata.labels[topology.kubernetes.io/zone]: 2 Node objects \
                     share this name and differ in it; topology hints are not used"
                ]
            );

            // Identical copies are one Node.
            let same = vec![
                node_in_zone("node-a", "zone-1"),
                node_in_zone("node-a", "zone-1"),
            ];
            let output = build_on(
                same,
                vec![distributed("PreferClose")],
                vec![web_slice(&hinted())],
            );
            assert!(output.rejections.is_empty());
            assert_eq!(
                backends_of(&output, key("10.0.0.1", 80)),
                backends(SAME_ZONE)
            );
        }

        #[test]
        fn service_that_does_not_ask_for_topology_ignores_hints() {
            let services = [
                simple_service("ns", "web", "10.0.0.1", 80),
                annotated(&[(TOPOLOGY_MODE_ANNOTATION, "Disabled")]),
                annotated(&[(TOPOLOGY_AWARE_HINTS_ANNOTATION, "disabled")]),
                // topology-mode is read first.
                annotated(&[
                    (TOPOLOGY_MODE_ANNOTATION, "Disabled"),
                    (TOPOLOGY_AWARE_HINTS_ANNOTATION, "Auto"),
                ]),
            ];
            for svc in services {
                let output = build_on(zone_1(), vec![svc.clone()], vec![web_slice(&hinted())]);
                assert!(output.rejections.is_empty(), "{:?}", reasons(&output));
                assert_eq!(
                    backends_of(&output, key("10.0.0.1", 80)),
                    backends(ALL),
                    "{:?}",
                    svc.metadata.annotations
                );
            }
        }

        #[test]
        fn topology_annotations_set_to_auto_turn_topology_on() {
            let services = [
                annotated(&[(TOPOLOGY_MODE_ANNOTATION, "Auto")]),
                annotated(&[(TOPOLOGY_MODE_ANNOTATION, "auto")]),
                annotated(&[(TOPOLOGY_AWARE_HINTS_ANNOTATION, "Auto")]),
                annotated(&[(TOPOLOGY_AWARE_HINTS_ANNOTATION, "auto")]),
                // An empty topology-mode defers to the older annotation.
                annotated(&[
                    (TOPOLOGY_MODE_ANNOTATION, ""),
                    (TOPOLOGY_AWARE_HINTS_ANNOTATION, "auto"),
                ]),
            ];
            for svc in services {
                let output = build_on(zone_1(), vec![svc.clone()], vec![web_slice(&hinted())]);
                assert!(output.rejections.is_empty(), "{:?}", reasons(&output));
                assert_eq!(
                    backends_of(&output, key("10.0.0.1", 80)),
                    backends(SAME_ZONE),
                    "{:?}",
                    svc.metadata.annotations
                );
            }
        }

        #[test]
        fn unknown_topology_requests_are_reported_and_ignored() {
            let mut svc = annotated(&[(TOPOLOGY_MODE_ANNOTATION, "Custom")]);
            spec_mut(&mut svc).traffic_distribution = Some("Nearby".into());
            let output = build_on(zone_1(), vec![svc], vec![web_slice(&hinted())]);
            assert_eq!(backends_of(&output, key("10.0.0.1", 80)), backends(ALL));
            assert_eq!(
                reasons(&output),
                vec![
                    "Service ns/web: metadata.annotations[service.kubernetes.io/topology-mode]: \
                     \"Custom\" is not Auto or Disabled; topology hints are not used for it",
                    "Service ns/web: spec.trafficDistribution: \"Nearby\" is not PreferClose, \
                     PreferSameZone or PreferSameNode; it is ignored",
                ]
            );

            // Either request is enough.
            let mut svc = annotated(&[(TOPOLOGY_MODE_ANNOTATION, "Custom")]);
            spec_mut(&mut svc).traffic_distribution = Some("PreferClose".into());
            let output = build_on(zone_1(), vec![svc], vec![web_slice(&hinted())]);
            assert_eq!(
                backends_of(&output, key("10.0.0.1", 80)),
                backends(SAME_ZONE)
            );
        }

        #[test]
        fn local_policy_ignores_topology_but_its_cluster_backends_follow_it() {
            let mut svc = typed_service("ns", "web", "LoadBalancer", "10.0.0.1", 80, 30080);
            spec_mut(&mut svc).traffic_distribution = Some("PreferClose".into());
            spec_mut(&mut svc).external_traffic_policy = Some("Local".into());
            set_ingress(&mut svc, vec![lb_ingress("192.0.2.10", "", "")]);
            // The local endpoint is hinted for another zone.
            let endpoints = [
                for_zones(endpoint_on("10.1.0.1", "node-a"), &["zone-2"]),
                for_zones(endpoint_on("10.1.0.2", "node-b"), &["zone-1"]),
                for_zones(endpoint_on("10.1.0.3", "node-b"), &["zone-2"]),
            ];
            let output = build_on(zone_1(), vec![svc.clone()], vec![web_slice(&endpoints)]);
            assert!(output.rejections.is_empty(), "{:?}", reasons(&output));
            for external in [key("0.0.0.0", 30080), key("192.0.2.10", 80)] {
                let found = frontend_at(&output, external);
                assert!(found.policy.local_only);
                assert_eq!(found.backends, backends(&["10.1.0.1"]), "{external:?}");
                assert_eq!(
                    found.cluster_backends,
                    backends(&["10.1.0.2"]),
                    "{external:?}"
                );
            }
            let cluster = frontend_at(&output, key("10.0.0.1", 80));
            assert!(!cluster.policy.local_only);
            assert_eq!(cluster.backends, backends(&["10.1.0.2"]));

            // internalTrafficPolicy: Local likewise keeps the ClusterIP
            // frontend to the local endpoint.
            spec_mut(&mut svc).internal_traffic_policy = Some("Local".into());
            let output = build_on(zone_1(), vec![svc], vec![web_slice(&endpoints)]);
            let cluster = frontend_at(&output, key("10.0.0.1", 80));
            assert!(cluster.policy.local_only);
            assert_eq!(cluster.backends, backends(&["10.1.0.1"]));
            assert_eq!(cluster.cluster_backends, backends(&["10.1.0.2"]));
        }

        #[test]
        fn terminating_fallback_works_with_topology() {
            let svc = || vec![distributed("PreferClose")];
            // A ready endpoint exists only in another zone: topology falls
            // back to it rather than to the terminating one in our zone.
            let endpoints = [
                for_zones(terminating_on("10.1.0.1", "node-a"), &["zone-1"]),
                ready_in("10.1.0.2", &["zone-2"]),
            ];
            let output = build_on(zone_1(), svc(), vec![web_slice(&endpoints)]);
            assert_eq!(
                backends_of(&output, key("10.0.0.1", 80)),
                backends(&["10.1.0.2"])
            );

            // Nothing ready: every serving and terminating endpoint, whatever
            // its hints (as kube-proxy does).
            let endpoints = [
                for_zones(terminating_on("10.1.0.1", "node-a"), &["zone-1"]),
                for_zones(terminating_on("10.1.0.2", "node-b"), &["zone-2"]),
                terminating_on("10.1.0.3", "node-b"),
            ];
            let output = build_on(zone_1(), svc(), vec![web_slice(&endpoints)]);
            assert_eq!(backends_of(&output, key("10.0.0.1", 80)), backends(ALL));

            // Ready ones in our zone win over a terminating one there.
            let mut endpoints = hinted();
            endpoints.push(for_zones(terminating_on("10.1.0.4", "node-a"), &["zone-1"]));
            let output = build_on(zone_1(), svc(), vec![web_slice(&endpoints)]);
            assert_eq!(
                backends_of(&output, key("10.0.0.1", 80)),
                backends(SAME_ZONE)
            );
        }

        #[test]
        fn same_node_hints_come_before_zone_hints() {
            let both = |address: &str, node: &str, zone: &str| {
                for_nodes(ready_in(address, &[zone]), &[node])
            };
            let endpoints = vec![
                both("10.1.0.1", "node-a", "zone-1"),
                both("10.1.0.2", "node-c", "zone-1"),
                both("10.1.0.3", "node-b", "zone-2"),
            ];
            let output = build_on(
                zone_1(),
                vec![distributed("PreferSameNode")],
                vec![web_slice(&endpoints)],
            );
            assert_eq!(
                backends_of(&output, key("10.0.0.1", 80)),
                backends(&["10.1.0.1"])
            );

            // No endpoint for this node: zone hints decide.
            let mut elsewhere = endpoints.clone();
            elsewhere[0] = both("10.1.0.1", "node-d", "zone-1");
            let output = build_on(
                zone_1(),
                vec![distributed("PreferSameNode")],
                vec![web_slice(&elsewhere)],
            );
            assert_eq!(
                backends_of(&output, key("10.0.0.1", 80)),
                backends(&["10.1.0.1", "10.1.0.2"])
            );

            // A ready endpoint without a node hint: zone hints decide.
            let mut partial = endpoints.clone();
            partial[2] = ready_in("10.1.0.3", &["zone-2"]);
            let output = build_on(
                zone_1(),
                vec![distributed("PreferSameNode")],
                vec![web_slice(&partial)],
            );
            assert_eq!(
                backends_of(&output, key("10.0.0.1", 80)),
                backends(&["10.1.0.1", "10.1.0.2"])
            );

            // Node hints need no zone label on the Node.
            let output = build_on(
                vec![node("node-a")],
                vec![distributed("PreferSameNode")],
                vec![web_slice(&endpoints)],
            );
            assert_eq!(
                backends_of(&output, key("10.0.0.1", 80)),
                backends(&["10.1.0.1"])
            );
        }

        #[test]
        fn empty_hint_names_are_reported_and_count_as_no_hint() {
            let mut endpoints = hinted();
            endpoints[1] = ready_in("10.1.0.2", &[""]);
            endpoints.push(for_nodes(ready_in("10.1.0.4", &["", "zone-1"]), &[""]));
            let output = build_on(
                zone_1(),
                vec![distributed("PreferClose")],
                vec![web_slice(&endpoints)],
            );
            // 10.1.0.2 lacks a usable hint, so the hints are incomplete.
            assert_eq!(
                backends_of(&output, key("10.0.0.1", 80)),
                backends(&["10.1.0.1", "10.1.0.2", "10.1.0.3", "10.1.0.4"])
            );
            assert_eq!(
                reasons(&output),
                vec![
                    "EndpointSlice ns/web-1: endpoints[1].hints.forZones[0].name: empty; the \
                     hint is ignored",
                    "EndpointSlice ns/web-1: endpoints[3].hints.forNodes[0].name: empty; the \
                     hint is ignored",
                    "EndpointSlice ns/web-1: endpoints[3].hints.forZones[0].name: empty; the \
                     hint is ignored",
                ]
            );

            // The good hint beside an empty one still counts.
            endpoints.remove(1);
            let output = build_on(
                zone_1(),
                vec![distributed("PreferClose")],
                vec![web_slice(&endpoints)],
            );
            assert_eq!(
                backends_of(&output, key("10.0.0.1", 80)),
                backends(&["10.1.0.1", "10.1.0.3", "10.1.0.4"])
            );
        }

        #[test]
        fn health_check_counts_ignore_topology() {
            let mut svc = typed_service("ns", "web", "LoadBalancer", "10.0.0.1", 80, 30080);
            let spec = spec_mut(&mut svc);
            spec.traffic_distribution = Some("PreferClose".into());
            spec.external_traffic_policy = Some("Local".into());
            spec.health_check_node_port = Some(31000);
            let endpoints = [
                for_zones(endpoint_on("10.1.0.1", "node-a"), &["zone-2"]),
                for_zones(endpoint_on("10.1.0.2", "node-b"), &["zone-1"]),
            ];
            let output = build_on(zone_1(), vec![svc], vec![web_slice(&endpoints)]);
            let checks: Vec<usize> = output
                .health_check_node_ports
                .values()
                .map(|check| check.local_endpoints)
                .collect();
            assert_eq!(checks, vec![1]);
        }
    }
}
