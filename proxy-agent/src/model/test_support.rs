//! Short constructors for Kubernetes objects and table parts, for tests.
use std::{collections::BTreeMap, net::IpAddr};

use k8s_openapi::{
    api::{
        core::v1::{
            LoadBalancerIngress, LoadBalancerStatus, Node, Service, ServicePort, ServiceSpec,
            ServiceStatus,
        },
        discovery::v1::{
            Endpoint, EndpointConditions, EndpointHints, EndpointPort, EndpointSlice, ForNode,
            ForZone,
        },
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

use super::{
    Backend, ClusterState, Frontend, FrontendKey, FrontendKind, FrontendPolicy, ModelConfig,
    Protocol, ServiceName, ServiceTable, TableDiff,
    validate::{SERVICE_NAME_LABEL, ZONE_LABEL},
};

pub fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

/// A TCP frontend key.
pub fn key(address: &str, port: u16) -> FrontendKey {
    key_proto(address, port, Protocol::Tcp)
}

pub fn key_proto(address: &str, port: u16, protocol: Protocol) -> FrontendKey {
    FrontendKey {
        ip: ip(address),
        port,
        protocol,
    }
}

pub fn backend(address: &str, port: u16) -> Backend {
    Backend {
        ip: ip(address),
        port,
    }
}

/// A ClusterIP frontend of an unnamed port.
pub fn frontend(namespace: &str, name: &str, backends: &[Backend]) -> Frontend {
    Frontend {
        service: ServiceName {
            namespace: namespace.into(),
            name: name.into(),
        },
        port_name: String::new(),
        kind: FrontendKind::ClusterIp,
        backends: backends.to_vec(),
        cluster_backends: Vec::new(),
        policy: FrontendPolicy::default(),
    }
}

/// A service port: (name, port, protocol); "" leaves name or protocol unset.
pub fn service_port(name: &str, port: i32, protocol: &str) -> ServicePort {
    ServicePort {
        name: (!name.is_empty()).then(|| name.into()),
        port,
        protocol: (!protocol.is_empty()).then(|| protocol.into()),
        ..ServicePort::default()
    }
}

/// A ClusterIP Service with `spec.clusterIPs` (and `spec.clusterIP` set to
/// the first, as the API server does).
pub fn service(
    namespace: &str,
    name: &str,
    cluster_ips: &[&str],
    ports: &[ServicePort],
) -> Service {
    Service {
        metadata: meta(namespace, name),
        spec: Some(ServiceSpec {
            cluster_ip: cluster_ips.first().map(|ip| (*ip).into()),
            cluster_ips: Some(cluster_ips.iter().map(|ip| (*ip).into()).collect()),
            ports: Some(ports.to_vec()),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// A Service with one unnamed TCP port.
pub fn simple_service(namespace: &str, name: &str, cluster_ip: &str, port: i32) -> Service {
    service(
        namespace,
        name,
        &[cluster_ip],
        &[service_port("", port, "")],
    )
}

/// The spec of a Service built by these helpers.
pub fn spec_mut(svc: &mut Service) -> &mut ServiceSpec {
    svc.spec.get_or_insert_with(ServiceSpec::default)
}

/// A port with `nodePort` set.
pub fn with_node_port(port: ServicePort, node_port: i32) -> ServicePort {
    ServicePort {
        node_port: Some(node_port),
        ..port
    }
}

/// A Service of `type_` ("NodePort", "LoadBalancer") with one unnamed TCP
/// port and its node port.
pub fn typed_service(
    namespace: &str,
    name: &str,
    type_: &str,
    cluster_ip: &str,
    port: i32,
    node_port: i32,
) -> Service {
    let mut svc = service(
        namespace,
        name,
        &[cluster_ip],
        &[with_node_port(service_port("", port, ""), node_port)],
    );
    spec_mut(&mut svc).type_ = Some(type_.into());
    svc
}

/// A load balancer ingress entry; "" leaves a field unset.
pub fn lb_ingress(address: &str, hostname: &str, ip_mode: &str) -> LoadBalancerIngress {
    LoadBalancerIngress {
        ip: (!address.is_empty()).then(|| address.into()),
        hostname: (!hostname.is_empty()).then(|| hostname.into()),
        ip_mode: (!ip_mode.is_empty()).then(|| ip_mode.into()),
        ..LoadBalancerIngress::default()
    }
}

/// Sets `status.loadBalancer.ingress`.
pub fn set_ingress(svc: &mut Service, ingress: Vec<LoadBalancerIngress>) {
    svc.status = Some(ServiceStatus {
        load_balancer: Some(LoadBalancerStatus {
            ingress: Some(ingress),
        }),
        ..ServiceStatus::default()
    });
}

pub fn slice_port(name: &str, port: i32, protocol: &str) -> EndpointPort {
    EndpointPort {
        name: (!name.is_empty()).then(|| name.into()),
        port: Some(port),
        protocol: (!protocol.is_empty()).then(|| protocol.into()),
        ..EndpointPort::default()
    }
}

/// A ready endpoint with one address.
pub fn endpoint(address: &str) -> Endpoint {
    endpoint_with(&[address], Some(true))
}

pub fn endpoint_with(addresses: &[&str], ready: Option<bool>) -> Endpoint {
    Endpoint {
        addresses: addresses.iter().map(|a| (*a).into()).collect(),
        conditions: Some(EndpointConditions {
            ready,
            ..EndpointConditions::default()
        }),
        ..Endpoint::default()
    }
}

/// An endpoint with explicit conditions and node ("" leaves it unset).
pub fn endpoint_full(
    address: &str,
    ready: Option<bool>,
    serving: Option<bool>,
    terminating: Option<bool>,
    node: &str,
) -> Endpoint {
    Endpoint {
        addresses: vec![address.into()],
        conditions: Some(EndpointConditions {
            ready,
            serving,
            terminating,
        }),
        node_name: (!node.is_empty()).then(|| node.into()),
        ..Endpoint::default()
    }
}

/// A ready endpoint on `node`.
pub fn endpoint_on(address: &str, node: &str) -> Endpoint {
    endpoint_full(address, Some(true), None, None, node)
}

/// A terminating endpoint on `node` that still serves.
pub fn terminating_on(address: &str, node: &str) -> Endpoint {
    endpoint_full(address, Some(false), Some(true), Some(true), node)
}

/// `endpoint` with `hints.forZones` naming `zones`.
pub fn for_zones(mut endpoint: Endpoint, zones: &[&str]) -> Endpoint {
    let hints = endpoint.hints.get_or_insert_with(EndpointHints::default);
    hints.for_zones = Some(
        zones
            .iter()
            .map(|zone| ForZone {
                name: (*zone).into(),
            })
            .collect(),
    );
    endpoint
}

/// `endpoint` with `hints.forNodes` naming `nodes`.
pub fn for_nodes(mut endpoint: Endpoint, nodes: &[&str]) -> Endpoint {
    let hints = endpoint.hints.get_or_insert_with(EndpointHints::default);
    hints.for_nodes = Some(
        nodes
            .iter()
            .map(|node| ForNode {
                name: (*node).into(),
            })
            .collect(),
    );
    endpoint
}

/// An EndpointSlice labelled for `service` in `namespace`.
pub fn slice(
    namespace: &str,
    name: &str,
    service: &str,
    address_type: &str,
    ports: &[EndpointPort],
    endpoints: &[Endpoint],
) -> EndpointSlice {
    let mut metadata = meta(namespace, name);
    metadata.labels = Some(BTreeMap::from([(
        SERVICE_NAME_LABEL.to_owned(),
        service.to_owned(),
    )]));
    EndpointSlice {
        metadata,
        address_type: address_type.into(),
        ports: Some(ports.to_vec()),
        endpoints: Some(endpoints.to_vec()),
    }
}

/// An IPv4 slice with one unnamed TCP port and ready endpoints.
pub fn simple_slice(
    namespace: &str,
    name: &str,
    service: &str,
    port: i32,
    addresses: &[&str],
) -> EndpointSlice {
    let endpoints: Vec<Endpoint> = addresses.iter().map(|a| endpoint(a)).collect();
    slice(
        namespace,
        name,
        service,
        "IPv4",
        &[slice_port("", port, "")],
        &endpoints,
    )
}

pub fn node(name: &str) -> Node {
    Node {
        metadata: ObjectMeta {
            name: (!name.is_empty()).then(|| name.into()),
            ..ObjectMeta::default()
        },
        ..Node::default()
    }
}

/// A Node labelled with `zone` (`topology.kubernetes.io/zone`).
pub fn node_in_zone(name: &str, zone: &str) -> Node {
    let mut node = node(name);
    node.metadata.labels = Some(BTreeMap::from([(ZONE_LABEL.to_owned(), zone.to_owned())]));
    node
}

/// Object metadata; "" leaves namespace or name unset.
pub fn meta(namespace: &str, name: &str) -> ObjectMeta {
    ObjectMeta {
        namespace: (!namespace.is_empty()).then(|| namespace.into()),
        name: (!name.is_empty()).then(|| name.into()),
        ..ObjectMeta::default()
    }
}

pub fn state(services: Vec<Service>, endpoint_slices: Vec<EndpointSlice>) -> ClusterState {
    ClusterState::new(services, endpoint_slices, Vec::new())
}

pub fn config() -> ModelConfig {
    ModelConfig {
        node_name: "node-a".into(),
        cluster_cidrs: Vec::new(),
    }
}

/// Applies `diff` to `table` the way a dataplane would, checking on the way
/// that the diff describes `table` correctly (what it removes or changes is
/// there as described, what it adds is not).
pub fn apply(table: &ServiceTable, diff: &TableDiff) -> ServiceTable {
    let mut result = table.clone();
    for (key, old) in &diff.removed {
        assert_eq!(result.remove(key).as_ref(), Some(old), "removed {key:?}");
    }
    for change in &diff.changed {
        let replaced = result.insert_shared(change.key, change.new.clone());
        assert_eq!(
            replaced.as_ref(),
            Some(&change.old),
            "changed {:?}",
            change.key
        );
    }
    for (key, frontend) in &diff.added {
        assert_eq!(
            result.insert_shared(*key, frontend.clone()),
            None,
            "added {key:?}"
        );
    }
    result
}
