//! Property tests: the model survives any input, does not depend on input
//! order, and its diffs are exact.
use std::{collections::BTreeMap, sync::Arc};

use k8s_openapi::{
    api::{
        core::v1::{
            ClientIPConfig, LoadBalancerIngress, LoadBalancerStatus, Node, Service, ServicePort,
            ServiceSpec, ServiceStatus, SessionAffinityConfig,
        },
        discovery::v1::{
            Endpoint, EndpointConditions, EndpointHints, EndpointPort, EndpointSlice, ForNode,
            ForZone,
        },
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use proptest::{collection::vec, option, prelude::*, test_runner::FileFailurePersistence};

use super::{
    Backend, ClusterState, Frontend, FrontendKey, FrontendKind, FrontendPolicy, ModelConfig,
    Protocol, ServiceName, ServiceTable, TableBuilder, build_table,
    test_support::{
        apply, node as test_node, node_in_zone, slice, slice_port, spec_mut, typed_service,
    },
    validate::{
        SERVICE_NAME_LABEL, SERVICE_PROXY_NAME_LABEL, TOPOLOGY_AWARE_HINTS_ANNOTATION,
        TOPOLOGY_MODE_ANNOTATION, ZONE_LABEL,
    },
    validate_node,
};

/// Modest case counts keep the suite fast on small machines; failures are
/// saved beside this file.
fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("regressions"))),
        ..ProptestConfig::default()
    }
}

/// Mostly a value from a small pool (so objects collide and match each
/// other), sometimes anything at all.
fn text(pool: &'static [&'static str]) -> impl Strategy<Value = String> {
    prop_oneof![
        8 => proptest::sample::select(pool).prop_map(str::to_owned),
        1 => any::<String>(),
    ]
}

/// Mostly present: absent fields are allowed everywhere, but an input where
/// everything is absent exercises little.
fn mostly<S: Strategy>(value: S) -> impl Strategy<Value = Option<S::Value>> {
    option::weighted(0.85, value)
}

fn ipv4_text() -> impl Strategy<Value = String> {
    (0u8..6).prop_map(|n| format!("10.0.0.{n}"))
}

fn ipv6_text() -> impl Strategy<Value = String> {
    (0u8..6).prop_map(|n| format!("fd00::{n}"))
}

/// Mostly IPv4, some IPv6, and junk.
fn ip_text() -> impl Strategy<Value = String> {
    prop_oneof![
        24 => ipv4_text(),
        12 => ipv6_text(),
        1 => Just("None".to_owned()),
        1 => Just(String::new()),
        1 => "[0-9a-f.:]{0,16}",
        1 => any::<String>(),
    ]
}

/// Addresses mostly of the slice's addressType.
fn address_text(address_type: &str) -> BoxedStrategy<String> {
    match address_type {
        "IPv4" => prop_oneof![8 => ipv4_text(), 1 => ip_text()].boxed(),
        "IPv6" => prop_oneof![8 => ipv6_text(), 1 => ip_text()].boxed(),
        _ => ip_text().boxed(),
    }
}

fn port_number() -> impl Strategy<Value = i32> {
    prop_oneof![
        24 => 79..82i32,
        1 => 0..2i32,
        1 => 65535..65537i32,
        1 => any::<i32>(),
    ]
}

fn protocol() -> impl Strategy<Value = Option<String>> {
    option::weighted(
        0.4,
        text(&["TCP", "TCP", "UDP", "SCTP", "TCP", "UDP", "tcp"]),
    )
}

fn port_name() -> impl Strategy<Value = Option<String>> {
    option::weighted(0.5, text(&["", "", "http"]))
}

fn meta(
    names: &'static [&'static str],
    labels: impl Strategy<Value = Option<BTreeMap<String, String>>>,
) -> impl Strategy<Value = ObjectMeta> {
    let namespaces = &["ns", "ns", "ns", "ns", "other", ""];
    (
        mostly(text(namespaces)),
        option::weighted(0.95, text(names)),
        labels,
    )
        .prop_map(|(namespace, name, labels)| ObjectMeta {
            namespace,
            name,
            labels,
            ..ObjectMeta::default()
        })
}

fn service_port() -> impl Strategy<Value = ServicePort> {
    let node_port = option::weighted(0.3, prop_oneof![8 => 30000..30003i32, 1 => any::<i32>()]);
    (port_name(), port_number(), protocol(), node_port).prop_map(
        |(name, port, protocol, node_port)| ServicePort {
            name,
            port,
            protocol,
            node_port,
            ..ServicePort::default()
        },
    )
}

/// Addresses for externalIPs and load balancer ingress: a small pool that
/// collides with cluster IPs and with itself, and junk.
fn external_ip_text() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => (0u8..3).prop_map(|n| format!("192.0.2.{n}")),
        2 => ipv6_text(),
        2 => ipv4_text(),
        1 => ip_text(),
    ]
}

fn load_balancer_ingress() -> impl Strategy<Value = LoadBalancerIngress> {
    (
        mostly(external_ip_text()),
        option::weighted(0.2, Just("lb.example.com".to_owned())),
        option::weighted(0.3, text(&["VIP", "Proxy"])),
    )
        .prop_map(|(ip, hostname, ip_mode)| LoadBalancerIngress {
            ip,
            hostname,
            ip_mode,
            ..LoadBalancerIngress::default()
        })
}

fn traffic_policy() -> impl Strategy<Value = Option<String>> {
    option::weighted(0.3, text(&["Cluster", "Local", "Local"]))
}

/// The parts of a Service beyond cluster IPs and ports: external
/// addresses, policies, affinity.
#[derive(Clone, Debug)]
struct ServiceExtras {
    external_ips: Option<Vec<String>>,
    internal_traffic_policy: Option<String>,
    external_traffic_policy: Option<String>,
    session_affinity: Option<String>,
    affinity_timeout: Option<i32>,
    source_ranges: Option<Vec<String>>,
    health_check_node_port: Option<i32>,
    ingress: Option<Vec<LoadBalancerIngress>>,
    traffic_distribution: Option<String>,
    annotations: Option<BTreeMap<String, String>>,
}

/// The topology annotations, with values that turn hints on, off, or are
/// unknown.
fn topology_annotations() -> impl Strategy<Value = BTreeMap<String, String>> {
    let value = || text(&["Auto", "auto", "Disabled", "", "Custom"]);
    (option::of(value()), option::of(value())).prop_map(|(mode, hints)| {
        let mut annotations = BTreeMap::new();
        if let Some(mode) = mode {
            annotations.insert(TOPOLOGY_MODE_ANNOTATION.to_owned(), mode);
        }
        if let Some(hints) = hints {
            annotations.insert(TOPOLOGY_AWARE_HINTS_ANNOTATION.to_owned(), hints);
        }
        annotations
    })
}

fn service_extras() -> impl Strategy<Value = ServiceExtras> {
    (
        option::weighted(0.25, vec(external_ip_text(), 0..3)),
        traffic_policy(),
        traffic_policy(),
        option::weighted(0.2, text(&["ClientIP", "ClientIP", "None"])),
        option::weighted(0.5, prop_oneof![8 => 1..86401i32, 1 => any::<i32>()]),
        option::weighted(
            0.4,
            vec(
                text(&["203.0.113.0/24", " 10.0.0.0/8", "fd00::/8", "nope"]),
                0..3,
            ),
        ),
        option::weighted(0.3, prop_oneof![8 => 31000..31002i32, 1 => any::<i32>()]),
        option::weighted(0.6, vec(load_balancer_ingress(), 0..3)),
        option::weighted(
            0.4,
            text(&[
                "PreferClose",
                "PreferClose",
                "PreferSameZone",
                "PreferSameNode",
                "Nearby",
            ]),
        ),
        option::weighted(0.3, topology_annotations()),
    )
        .prop_map(
            |(
                external_ips,
                internal_traffic_policy,
                external_traffic_policy,
                session_affinity,
                affinity_timeout,
                source_ranges,
                health_check_node_port,
                ingress,
                traffic_distribution,
                annotations,
            )| ServiceExtras {
                external_ips,
                internal_traffic_policy,
                external_traffic_policy,
                session_affinity,
                affinity_timeout,
                source_ranges,
                health_check_node_port,
                ingress,
                traffic_distribution,
                annotations,
            },
        )
}

fn service_spec() -> impl Strategy<Value = ServiceSpec> {
    (
        option::weighted(
            0.4,
            text(&["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"]),
        ),
        option::weighted(
            0.95,
            prop_oneof![4 => vec(ip_text(), 1..2), 1 => vec(ip_text(), 0..3)],
        ),
        // Usually clusterIP mirrors clusterIPs[0], as the API keeps it.
        prop_oneof![9 => Just(None), 1 => option::of(ip_text()).prop_map(Some)],
        option::weighted(0.15, vec(text(&["IPv4", "IPv6"]), 0..3)),
        option::weighted(
            0.95,
            prop_oneof![9 => vec(service_port(), 1..4), 1 => Just(Vec::new())],
        ),
    )
        .prop_map(|(type_, cluster_ips, own_cluster_ip, ip_families, ports)| {
            let mirrored = cluster_ips.as_ref().and_then(|ips| ips.first().cloned());
            ServiceSpec {
                type_,
                cluster_ip: own_cluster_ip.unwrap_or(mirrored),
                cluster_ips,
                ip_families,
                ports,
                ..ServiceSpec::default()
            }
        })
}

fn service() -> impl Strategy<Value = Service> {
    let labels = option::weighted(
        0.1,
        proptest::sample::select(&[SERVICE_PROXY_NAME_LABEL, "app"][..])
            .prop_map(|label| BTreeMap::from([(label.to_owned(), String::new())])),
    );
    let names = &["a", "b", "c", "d", "e", "f", "g", "h"];
    (
        meta(names, labels),
        option::weighted(0.95, service_spec()),
        service_extras(),
    )
        .prop_map(|(mut metadata, spec, extras)| {
            metadata.annotations = extras.annotations;
            let spec = spec.map(|spec| ServiceSpec {
                external_ips: extras.external_ips,
                internal_traffic_policy: extras.internal_traffic_policy,
                external_traffic_policy: extras.external_traffic_policy,
                session_affinity: extras.session_affinity,
                session_affinity_config: extras.affinity_timeout.map(|secs| {
                    SessionAffinityConfig {
                        client_ip: Some(ClientIPConfig {
                            timeout_seconds: Some(secs),
                        }),
                    }
                }),
                load_balancer_source_ranges: extras.source_ranges,
                health_check_node_port: extras.health_check_node_port,
                traffic_distribution: extras.traffic_distribution,
                ..spec
            });
            let status = extras.ingress.map(|ingress| ServiceStatus {
                load_balancer: Some(LoadBalancerStatus {
                    ingress: Some(ingress),
                }),
                ..ServiceStatus::default()
            });
            Service {
                metadata,
                spec,
                status,
            }
        })
}

fn endpoint_port() -> impl Strategy<Value = EndpointPort> {
    (port_name(), mostly(port_number()), protocol()).prop_map(|(name, port, protocol)| {
        EndpointPort {
            name,
            // Offset so backend ports differ from frontend ports.
            port: port.map(|p| p.wrapping_add(8000)),
            protocol,
            ..EndpointPort::default()
        }
    })
}

/// Topology hints: mostly zones (sometimes none, so that hints are
/// incomplete), some nodes, and empty names.
fn endpoint_hints() -> impl Strategy<Value = EndpointHints> {
    let zones = || text(&["zone-1", "zone-1", "zone-2", ""]);
    (
        option::weighted(
            0.9,
            prop_oneof![8 => vec(zones(), 1..3), 1 => vec(zones(), 0..1)],
        ),
        option::weighted(0.3, vec(text(&["node-a", "node-b", ""]), 0..3)),
    )
        .prop_map(|(zones, nodes)| EndpointHints {
            for_zones: zones.map(|zones| zones.into_iter().map(|name| ForZone { name }).collect()),
            for_nodes: nodes.map(|nodes| nodes.into_iter().map(|name| ForNode { name }).collect()),
        })
}

fn endpoint(address_type: &str) -> impl Strategy<Value = Endpoint> + use<> {
    (
        prop_oneof![8 => vec(address_text(address_type), 1..2), 1 => vec(ip_text(), 0..3)],
        option::of((
            option::of(any::<bool>()),
            option::of(any::<bool>()),
            option::of(any::<bool>()),
        )),
        option::weighted(0.6, text(&["node-a", "node-b", ""])),
        option::weighted(0.7, endpoint_hints()),
    )
        .prop_map(|(addresses, conditions, node_name, hints)| Endpoint {
            addresses,
            conditions: conditions.map(|(ready, serving, terminating)| EndpointConditions {
                ready,
                serving,
                terminating,
            }),
            node_name,
            hints,
            ..Endpoint::default()
        })
}

fn endpoint_slice() -> impl Strategy<Value = EndpointSlice> {
    let labels = mostly(
        text(&["a", "b", "c", "d", "e", "f", "g", "h"])
            .prop_map(|service| BTreeMap::from([(SERVICE_NAME_LABEL.to_owned(), service)])),
    );
    (
        meta(&["s1", "s2", "s3", "s4"], labels),
        prop_oneof![6 => Just("IPv4".to_owned()), 3 => Just("IPv6".to_owned()), 1 => text(&["FQDN"])],
    )
        .prop_flat_map(|(metadata, address_type)| {
            (
                Just(metadata),
                mostly(vec(endpoint_port(), 0..3)),
                mostly(vec(endpoint(&address_type), 0..5)),
                Just(address_type),
            )
        })
        .prop_map(|(metadata, ports, endpoints, address_type)| EndpointSlice {
            metadata,
            address_type,
            ports,
            endpoints,
        })
}

fn node() -> impl Strategy<Value = Node> {
    (
        mostly(text(&["node-a", "node-b", ""])),
        mostly(text(&["zone-1", "zone-1", "zone-2", ""])),
    )
        .prop_map(|(name, zone)| Node {
            metadata: ObjectMeta {
                name,
                labels: zone.map(|zone| BTreeMap::from([(ZONE_LABEL.to_owned(), zone)])),
                ..ObjectMeta::default()
            },
            ..Node::default()
        })
}

/// A slice written for one of `services` (its namespace, name label and
/// ports), so that generated states actually have backends; the endpoints are
/// still random.
fn slice_for(services: Vec<Service>) -> impl Strategy<Value = EndpointSlice> {
    (
        any::<proptest::sample::Index>(),
        // Usually the family of the Service's first cluster IP.
        prop_oneof![3 => Just(None), 1 => Just(Some("IPv4")), 1 => Just(Some("IPv6"))],
        text(&["s1", "s2", "s3", "s4"]),
    )
        .prop_flat_map(move |(index, address_type, name)| {
            let service = services.get(index.index(services.len().max(1))).cloned();
            let first_ip = service
                .as_ref()
                .and_then(|svc| svc.spec.as_ref())
                .and_then(|spec| spec.cluster_ips.as_ref())
                .and_then(|ips| ips.first())
                .cloned()
                .unwrap_or_default();
            let address_type = address_type.unwrap_or(if first_ip.contains(':') {
                "IPv6"
            } else {
                "IPv4"
            });
            (
                Just(service),
                Just(address_type.to_owned()),
                Just(name),
                vec(endpoint(address_type), 1..4),
            )
        })
        .prop_map(|(service, address_type, name, endpoints)| {
            let service = service.unwrap_or_default();
            let ports = service
                .spec
                .iter()
                .flat_map(|spec| spec.ports.iter().flatten())
                .map(|port| EndpointPort {
                    name: port.name.clone(),
                    port: Some(port.port.wrapping_add(8000)),
                    protocol: port.protocol.clone(),
                    ..EndpointPort::default()
                })
                .collect();
            let label = service.metadata.name.clone().unwrap_or_default();
            EndpointSlice {
                metadata: ObjectMeta {
                    namespace: service.metadata.namespace.clone(),
                    name: Some(name),
                    labels: Some(BTreeMap::from([(SERVICE_NAME_LABEL.to_owned(), label)])),
                    ..ObjectMeta::default()
                },
                address_type,
                ports: Some(ports),
                endpoints: Some(endpoints),
            }
        })
}

/// A cluster state: random objects, slices written for the random Services,
/// and sometimes exact copies of objects (as two manifest files holding the
/// same object would give).
fn cluster_state() -> impl Strategy<Value = ClusterState> {
    (
        vec(service(), 0..6),
        vec(endpoint_slice(), 0..4),
        vec(node(), 0..3),
        0usize..3,
    )
        .prop_flat_map(|(services, random_slices, nodes, copies)| {
            let matching_slices = if services.is_empty() {
                Just(Vec::new()).boxed()
            } else {
                vec(slice_for(services.clone()), 1..5).boxed()
            };
            (
                Just(services),
                Just(random_slices),
                matching_slices,
                Just(nodes),
                Just(copies),
            )
        })
        .prop_map(
            |(mut services, mut endpoint_slices, matching_slices, nodes, copies)| {
                endpoint_slices.extend(matching_slices);
                let service_copies: Vec<Service> = services.iter().take(copies).cloned().collect();
                services.extend(service_copies);
                let slice_copies: Vec<EndpointSlice> =
                    endpoint_slices.iter().take(copies).cloned().collect();
                endpoint_slices.extend(slice_copies);
                ClusterState::new(services, endpoint_slices, nodes)
            },
        )
}

/// The state and the same objects in another order.
fn state_and_shuffled() -> impl Strategy<Value = (ClusterState, ClusterState)> {
    cluster_state().prop_flat_map(|state| {
        let original = Just(state.clone());
        let shuffled = (
            Just(state.services.to_vec()).prop_shuffle(),
            Just(state.endpoint_slices.to_vec()).prop_shuffle(),
            Just(state.nodes).prop_shuffle(),
        )
            .prop_map(|(services, endpoint_slices, nodes)| ClusterState {
                services: services.into(),
                endpoint_slices: endpoint_slices.into(),
                nodes,
                service_cidrs: Vec::new(),
            });
        (original, shuffled)
    })
}

/// Successive states that share objects, as a source's snapshots share the
/// `Arc` of every object that did not change: each one keeps some objects
/// of the one before (the same `Arc`s) and takes the rest from a new state;
/// the last is the first again.
fn successive_states() -> impl Strategy<Value = Vec<ClusterState>> {
    (vec(cluster_state(), 2..4), vec(any::<bool>(), 64)).prop_map(|(fresh, keep)| {
        let mut keep = keep.into_iter().cycle();
        let mut states = vec![fresh[0].clone()];
        for new in &fresh[1..] {
            let old = states.last().cloned().unwrap_or_default();
            states.push(ClusterState {
                services: pick(&old.services.to_vec(), &new.services.to_vec(), &mut keep).into(),
                endpoint_slices: pick(
                    &old.endpoint_slices.to_vec(),
                    &new.endpoint_slices.to_vec(),
                    &mut keep,
                )
                .into(),
                nodes: if keep.next().unwrap_or(false) {
                    old.nodes.clone()
                } else {
                    new.nodes.clone()
                },
                service_cidrs: Vec::new(),
            });
        }
        states.push(fresh[0].clone());
        states
    })
}

/// Some of `old` (the same `Arc`s) and some of `new`, as `keep` says.
fn pick<T>(old: &[Arc<T>], new: &[Arc<T>], keep: &mut impl Iterator<Item = bool>) -> Vec<Arc<T>> {
    let kept: Vec<_> = old
        .iter()
        .filter(|_| keep.next().unwrap_or(false))
        .cloned()
        .collect();
    let taken: Vec<_> = new
        .iter()
        .filter(|_| keep.next().unwrap_or(true))
        .cloned()
        .collect();
    kept.into_iter().chain(taken).collect()
}

/// A state made for topology: one NodePort Service (random traffic policies,
/// usually asking for topology-aware routing), slices of random endpoints
/// for it, and random Nodes beside node-a, where this agent runs. In half
/// the states every endpoint has a zone hint, as hints are otherwise rarely
/// complete.
fn topology_state() -> impl Strategy<Value = (ClusterState, ModelConfig)> {
    let request = option::weighted(
        0.8,
        text(&["PreferClose", "PreferSameZone", "PreferSameNode"]),
    );
    let slices = vec(vec(endpoint("IPv4"), 1..6), 1..3);
    let our_zone = option::weighted(0.9, text(&["zone-1", "zone-2", ""]));
    (
        request,
        traffic_policy(),
        traffic_policy(),
        slices,
        any::<bool>(),
        our_zone,
        vec(node(), 0..2),
    )
        .prop_map(
            |(request, internal, external, slices, complete, our_zone, mut nodes)| {
                let mut svc = typed_service("ns", "web", "NodePort", "10.0.0.1", 80, 30080);
                let spec = spec_mut(&mut svc);
                spec.traffic_distribution = request;
                spec.internal_traffic_policy = internal;
                spec.external_traffic_policy = external;
                let slices = slices
                    .into_iter()
                    .enumerate()
                    .map(|(i, mut endpoints)| {
                        if complete {
                            for (j, endpoint) in endpoints.iter_mut().enumerate() {
                                let hints =
                                    endpoint.hints.get_or_insert_with(EndpointHints::default);
                                let zones = hints.for_zones.get_or_insert_with(Vec::new);
                                if zones.iter().all(|zone| zone.name.is_empty()) {
                                    let name = if (i + j) % 3 == 0 { "zone-2" } else { "zone-1" };
                                    zones.push(ForZone {
                                        name: name.to_owned(),
                                    });
                                }
                            }
                        }
                        let name = format!("web-{i}");
                        let port = [slice_port("", 8080, "")];
                        slice("ns", &name, "web", "IPv4", &port, &endpoints)
                    })
                    .collect();
                nodes.push(match our_zone {
                    Some(zone) => node_in_zone("node-a", &zone),
                    None => test_node("node-a"),
                });
                let cfg = ModelConfig {
                    node_name: "node-a".to_owned(),
                    cluster_cidrs: Vec::new(),
                };
                (ClusterState::new(vec![svc], slices, nodes), cfg)
            },
        )
}

fn model_config() -> impl Strategy<Value = ModelConfig> {
    // Some cluster CIDRs cover generated ClusterIPs: the refusal of those
    // must come out the same however the table was built.
    let cidrs = prop_oneof![
        Just(Vec::new()),
        Just(vec!["10.0.0.2/31".parse().expect("a CIDR")]),
        Just(vec!["fd00::/126".parse().expect("a CIDR")]),
    ];
    (text(&["node-a", ""]), cidrs).prop_map(|(node_name, cluster_cidrs)| ModelConfig {
        node_name,
        cluster_cidrs,
    })
}

fn frontend_key() -> impl Strategy<Value = FrontendKey> {
    (
        proptest::sample::select(&["10.0.0.1", "10.0.0.2", "fd00::1"][..]),
        1u16..4,
        proptest::sample::select(&[Protocol::Tcp, Protocol::Udp, Protocol::Sctp][..]),
    )
        .prop_map(|(ip, port, protocol)| FrontendKey {
            ip: ip.parse().unwrap(),
            port,
            protocol,
        })
}

fn frontend() -> impl Strategy<Value = Frontend> {
    let backend = (0u8..4, 1u16..3).prop_map(|(host, port)| Backend {
        ip: format!("10.1.0.{host}").parse().unwrap(),
        port,
    });
    // Mostly the default policy, so that equal frontends are common.
    let policy = option::weighted(
        0.3,
        (
            option::of(prop_oneof![Just(10800u32), Just(60u32)]),
            any::<bool>(),
            vec(
                proptest::sample::select(&["203.0.113.0/24", "10.0.0.0/8"][..]),
                0..2,
            ),
        ),
    )
    .prop_map(|policy| match policy {
        None => FrontendPolicy::default(),
        Some((affinity_timeout_secs, local_only, ranges)) => FrontendPolicy {
            affinity_timeout_secs,
            local_only,
            source_ranges: ranges.iter().map(|r| r.parse().unwrap()).collect(),
        },
    });
    (
        proptest::sample::select(&["a", "b"][..]),
        proptest::sample::select(&["", "http"][..]),
        vec(backend, 0..4),
        prop_oneof![
            3 => Just(FrontendKind::ClusterIp),
            1 => Just(FrontendKind::NodePort),
            1 => Just(FrontendKind::ExternalIp),
            1 => Just(FrontendKind::LoadBalancer),
        ],
        policy,
    )
        .prop_map(|(name, port_name, backends, kind, policy)| Frontend {
            service: ServiceName {
                namespace: "ns".into(),
                name: name.into(),
            },
            port_name: port_name.into(),
            kind,
            cluster_backends: if policy.local_only {
                backends.clone()
            } else {
                Vec::new()
            },
            backends,
            policy,
        })
}

fn service_table() -> impl Strategy<Value = ServiceTable> {
    vec((frontend_key(), frontend()), 0..8).prop_map(|entries| {
        let mut table = ServiceTable::new();
        for (key, frontend) in entries {
            table.insert(key, frontend);
        }
        table
    })
}

/// The same state with every topology hint removed.
fn without_hints(state: &ClusterState) -> ClusterState {
    let endpoint_slices = state
        .endpoint_slices
        .iter()
        .map(|slice| {
            let mut slice = (**slice).clone();
            for endpoint in slice.check.plan.iter_mut().flat_map(|p| &mut p.endpoints) {
                endpoint.hints = None;
            }
            Arc::new(slice)
        })
        .collect();
    ClusterState {
        endpoint_slices,
        ..state.clone()
    }
}

fn is_subset<T: Ord>(small: &[T], large: &[T]) -> bool {
    small.iter().all(|item| large.binary_search(item).is_ok())
}

fn is_strictly_sorted<T: Ord>(items: &[T]) -> bool {
    items.windows(2).all(|pair| pair[0] < pair[1])
}

proptest! {
    #![proptest_config(config(96))]

    /// Any input builds without panicking, and the table keeps its promises.
    #[test]
    fn build_never_panics_and_keeps_invariants(state in cluster_state(), cfg in model_config()) {
        let output = build_table(&state, &cfg);

        prop_assert!(is_strictly_sorted(&output.rejections));
        for (service, check) in &output.health_check_node_ports {
            prop_assert!(check.port != 0);
            if cfg.node_name.is_empty() {
                prop_assert_eq!(check.local_endpoints, 0, "{}", service);
            }
        }
        for (key, frontend) in output.table.iter() {
            prop_assert!(key.port != 0);
            // Only NodePort keys use the unspecified address.
            prop_assert_eq!(
                key.ip.is_unspecified(),
                frontend.kind == FrontendKind::NodePort,
                "{:?}",
                key
            );
            if frontend.kind != FrontendKind::LoadBalancer {
                prop_assert!(frontend.policy.source_ranges.is_empty());
            }
            // No ClusterIP inside the pods' ranges.
            if frontend.kind == FrontendKind::ClusterIp {
                prop_assert!(!cfg.cluster_cidrs.iter().any(|net| net.contains(&key.ip)), "{:?}", key);
            }
            if let Some(secs) = frontend.policy.affinity_timeout_secs {
                prop_assert!((1..=86400).contains(&secs));
            }
            if frontend.policy.local_only && cfg.node_name.is_empty() {
                prop_assert!(frontend.backends.is_empty());
            }
            prop_assert!(is_strictly_sorted(&frontend.backends));
            for backend in &frontend.backends {
                prop_assert!(backend.port != 0);
                prop_assert_eq!(backend.ip.is_ipv4(), key.ip.is_ipv4());
            }
        }

        // Every problem the validators see is reported by the build; the
        // build adds only conflicts between objects.
        let validated: Vec<_> = state
            .services
            .iter()
            .flat_map(|s| s.rejections().to_vec())
            .chain(
                state
                    .endpoint_slices
                    .iter()
                    .flat_map(|s| s.rejections().to_vec()),
            )
            .chain(state.nodes.iter().flat_map(|n| validate_node(n)))
            .collect();
        for rejection in &validated {
            prop_assert!(output.rejections.contains(rejection), "missing {:?}", rejection);
        }
        for rejection in &output.rejections {
            prop_assert!(
                validated.contains(rejection)
                    || rejection.reason.contains("is already claimed by")
                    || rejection.reason.contains("share this namespace/name")
                    || rejection.reason.contains("Node objects share this name")
                    || rejection.reason.contains("the pods' addresses; not proxied")
                    || rejection.reason.contains("the address of this node"),
                "unexplained {:?}",
                rejection
            );
        }
    }

    /// A builder that redoes only what changed gives, for each of
    /// successive states, what a fresh build gives, and as its difference
    /// exactly what separates the two tables (which keeps the Local ports
    /// without a local endpoint counted); a second update of the same state
    /// changes nothing.
    #[test]
    fn incremental_builds_equal_fresh_builds(
        states in successive_states(),
        cfg in model_config(),
    ) {
        let mut builder = TableBuilder::default();
        let mut no_local = super::NoLocalEndpointsTracker::default();
        for (i, state) in states.iter().enumerate() {
            let before = builder.table().clone();
            let diff = builder.update(state, &cfg);
            prop_assert_eq!(&diff, &before.diff(builder.table()), "state {}", i);
            no_local.apply(&diff);
            prop_assert_eq!(no_local.counts(), builder.table().no_local_endpoints(), "state {}", i);
            prop_assert_eq!(builder.backend_count(), builder.table().backend_count());
            prop_assert_eq!(builder.build(state, &cfg), build_table(state, &cfg), "state {}", i);
            prop_assert!(builder.update(state, &cfg).is_empty(), "state {} again", i);
        }
    }

    /// The same objects in another order give the same table and rejections.
    #[test]
    fn build_is_independent_of_input_order(
        (state, shuffled) in state_and_shuffled(),
        cfg in model_config(),
    ) {
        prop_assert_eq!(build_table(&state, &cfg), build_table(&shuffled, &cfg));
    }
}

proptest! {
    #![proptest_config(config(256))]

    /// Topology hints only narrow a cluster-wide set of backends, never
    /// empty it, and never touch a node-local one; the order of endpoints
    /// and Nodes does not matter.
    #[test]
    fn topology_only_narrows_cluster_wide_backends((state, cfg) in topology_state()) {
        let hinted = build_table(&state, &cfg);
        let plain = build_table(&without_hints(&state), &cfg);
        // The slices, their endpoints and the Nodes in reverse order.
        let mut reversed = state.clone();
        reversed.nodes.reverse();
        let mut slices = reversed.endpoint_slices.to_vec();
        slices.reverse();
        reversed.endpoint_slices = slices.into();
        for slice in &mut reversed.endpoint_slices {
            let mut changed = (**slice).clone();
            if let Some(plan) = changed.check.plan.as_mut() {
                plan.endpoints.reverse();
            }
            *slice = Arc::new(changed);
        }
        // (Rejections name endpoints by position, so only the table compares.)
        prop_assert_eq!(&build_table(&reversed, &cfg).table, &hinted.table);
        let keys = |output: &super::BuildOutput| -> Vec<FrontendKey> {
            output.table.iter().map(|(key, _)| *key).collect()
        };
        prop_assert_eq!(keys(&hinted), keys(&plain));
        prop_assert_eq!(&hinted.health_check_node_ports, &plain.health_check_node_ports);
        for (key, with) in hinted.table.iter() {
            let Some(without) = plain.table.get(key) else { continue };
            let cluster_wide = [
                (&with.cluster_backends, &without.cluster_backends),
                (&with.backends, &without.backends),
            ];
            let checked = if with.policy.local_only {
                prop_assert_eq!(&with.backends, &without.backends, "{:?}", key);
                &cluster_wide[..1]
            } else {
                &cluster_wide[..]
            };
            for (narrowed, all) in checked {
                prop_assert!(is_subset(narrowed, all), "{:?}: {:?} {:?}", key, narrowed, all);
                prop_assert_eq!(narrowed.is_empty(), all.is_empty(), "{:?}", key);
            }
        }
    }
}

proptest! {
    #![proptest_config(config(128))]

    /// diff(a, b) turns a into b, touching only what differs.
    #[test]
    fn diff_applied_gives_the_desired_table(a in service_table(), b in service_table()) {
        let diff = a.diff(&b);
        prop_assert_eq!(&apply(&a, &diff), &b);

        let added: Vec<FrontendKey> = diff.added.iter().map(|(k, _)| *k).collect();
        let changed: Vec<FrontendKey> = diff.changed.iter().map(|c| c.key).collect();
        let removed: Vec<FrontendKey> = diff.removed.iter().map(|(k, _)| *k).collect();
        prop_assert!(is_strictly_sorted(&added));
        prop_assert!(is_strictly_sorted(&changed));
        prop_assert!(is_strictly_sorted(&removed));
        for change in &diff.changed {
            prop_assert_ne!(&change.old, &change.new);
        }
        prop_assert_eq!(diff.is_empty(), a == b);
    }

    #[test]
    fn diff_with_itself_is_empty(a in service_table()) {
        prop_assert!(a.diff(&a).is_empty());
    }

    /// Backend deltas of a change rebuild the new backend list from the old.
    #[test]
    fn backend_deltas_are_exact(a in service_table(), b in service_table()) {
        for change in a.diff(&b).changed {
            let added = change.added_backends();
            let removed = change.removed_backends();
            let mut rebuilt: Vec<Backend> = change
                .old
                .backends
                .iter()
                .filter(|backend| !removed.contains(backend))
                .copied()
                .chain(added)
                .collect();
            rebuilt.sort();
            prop_assert_eq!(rebuilt, change.new.backends.clone());
        }
    }
}
