//! [`build_table`]: from cluster objects to the desired [`ServiceTable`].
use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    sync::Arc,
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use super::{
    Backend, ClusterState, Frontend, FrontendKey, FrontendKind, FrontendPolicy, ModelConfig,
    Protocol, Rejection, ServiceName, ServiceTable,
    validate::{IpFamily, ServicePlan, check_endpoint_slice, check_service, service_name_of},
    validate_node,
};

/// The table for a cluster state, and everything that was left out of it
/// because it was broken.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BuildOutput {
    pub table: ServiceTable,
    /// Sorted and without duplicates.
    pub rejections: Vec<Rejection>,
}

/// Builds the desired table. Broken objects, or broken parts of objects, are
/// skipped and reported in [`BuildOutput::rejections`]; they never affect
/// other Services. The result does not depend on the order of the input.
pub fn build_table(state: &ClusterState, cfg: &ModelConfig) -> BuildOutput {
    // Nodes and the node name will drive locality and zones; until then only
    // the Nodes' validity matters.
    let _ = &cfg.node_name;
    let mut rejections: Vec<Rejection> =
        state.nodes.iter().flat_map(|n| validate_node(n)).collect();

    let backends = index_backends(&state.endpoint_slices, &mut rejections);
    let plans = service_plans(&state.services, &mut rejections);

    let mut table = ServiceTable::new();
    // Plans come sorted by name, so when two Services claim one frontend the
    // lexically smaller namespace/name wins whatever the input order.
    for plan in plans {
        for &ip in &plan.cluster_ips {
            for port in &plan.ports {
                let key = FrontendKey {
                    ip,
                    port: port.port,
                    protocol: port.protocol,
                };
                if let Some(owner) = table.get(&key) {
                    rejections.push(Rejection {
                        kind: "Service",
                        namespace: plan.name.namespace.clone(),
                        name: plan.name.name.clone(),
                        reason: format!(
                            "spec.ports[{}]: {}/{} is already claimed by Service {}",
                            port.index,
                            SocketAddr::new(ip, port.port),
                            port.protocol,
                            owner.service
                        ),
                    });
                    continue;
                }
                let backends = backends
                    .get(&BackendGroup {
                        service: plan.name.clone(),
                        family: IpFamily::of(ip),
                        port_name: port.name.clone(),
                        protocol: port.protocol,
                    })
                    .map(|set| set.iter().copied().collect())
                    .unwrap_or_default();
                // A frontend without backends stays: the dataplane must
                // refuse its traffic rather than let it through unproxied.
                table.insert(
                    key,
                    Frontend {
                        service: plan.name.clone(),
                        port_name: port.name.clone(),
                        kind: FrontendKind::ClusterIp,
                        backends,
                        policy: FrontendPolicy::default(),
                    },
                );
            }
        }
    }

    rejections.sort();
    rejections.dedup();
    BuildOutput { table, rejections }
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

/// Ready backends of all slices, merged (a set: de-duplicated and sorted).
fn index_backends(
    slices: &[Arc<EndpointSlice>],
    rejections: &mut Vec<Rejection>,
) -> BTreeMap<BackendGroup, BTreeSet<Backend>> {
    let mut groups: BTreeMap<BackendGroup, BTreeSet<Backend>> = BTreeMap::new();
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
            group.extend(plan.ready_addresses.iter().map(|&ip| Backend {
                ip,
                port: port.port,
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

    #[test]
    fn headless_service_is_ignored() {
        let output = build(
            vec![simple_service("ns", "headless", "None", 80)],
            vec![simple_slice(
                "ns",
                "headless-1",
                "headless",
                8080,
                &["10.1.0.1"],
            )],
        );
        assert_eq!(output, BuildOutput::default());
    }

    #[test]
    fn external_name_service_is_ignored() {
        let mut svc = simple_service("ns", "ext", "10.0.0.1", 80);
        if let Some(spec) = svc.spec.as_mut() {
            spec.type_ = Some("ExternalName".into());
            spec.external_name = Some("example.com".into());
        }
        assert_eq!(build(vec![svc], vec![]), BuildOutput::default());
    }

    #[test]
    fn service_without_cluster_ip_is_ignored() {
        let mut no_spec = simple_service("ns", "a", "10.0.0.1", 80);
        no_spec.spec = None;
        let mut empty_spec = simple_service("ns", "b", "10.0.0.1", 80);
        empty_spec.spec = Some(ServiceSpec::default());
        let unallocated = simple_service("ns", "c", "", 80);
        let output = build(vec![no_spec, empty_spec, unallocated], vec![]);
        assert_eq!(output, BuildOutput::default());
    }

    #[test]
    fn service_owned_by_another_proxy_is_ignored() {
        // Even a broken one: its owner judges it.
        let mut svc = simple_service("ns", "other", "not-an-ip", 80);
        svc.metadata.labels = Some(BTreeMap::from([(
            "service.kubernetes.io/service-proxy-name".into(),
            String::new(),
        )]));
        assert_eq!(build(vec![svc], vec![]), BuildOutput::default());
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
    fn cluster_ip_family_not_in_ip_families_rejects_the_service() {
        let mut svc = service(
            "ns",
            "web",
            &["10.0.0.1", "fd00::1"],
            &[service_port("", 80, "")],
        );
        if let Some(spec) = svc.spec.as_mut() {
            spec.ip_families = Some(vec!["IPv4".into()]);
        }
        let output = build(vec![svc], vec![]);
        assert!(output.table.is_empty());
        assert_eq!(
            reasons(&output),
            vec![
                "Service ns/web: spec.clusterIPs[1]: \"fd00::1\" is IPv6, which spec.ipFamilies \
                 does not list"
            ]
        );
    }

    #[test]
    fn unknown_ip_family_rejects_the_service() {
        let mut svc = simple_service("ns", "web", "10.0.0.1", 80);
        if let Some(spec) = svc.spec.as_mut() {
            spec.ip_families = Some(vec!["IPv4".into(), "IPX".into()]);
        }
        let output = build(vec![svc], vec![]);
        assert!(output.table.is_empty());
        assert_eq!(
            reasons(&output),
            vec!["Service ns/web: spec.ipFamilies[1]: \"IPX\" is not IPv4 or IPv6"]
        );
    }

    #[test]
    fn two_cluster_ips_of_one_family_reject_the_service() {
        let svc = service(
            "ns",
            "web",
            &["10.0.0.1", "10.0.0.2"],
            &[service_port("", 80, "")],
        );
        let output = build(vec![svc], vec![]);
        assert!(output.table.is_empty());
        assert_eq!(
            reasons(&output),
            vec![
                "Service ns/web: spec.clusterIPs[1]: \"10.0.0.2\" is a second IPv4 address (at \
                 most one per family)"
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
    fn nodes_and_node_name_do_not_change_the_table_yet() {
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
}
