//! The model: pure functions from Kubernetes objects to the desired service
//! table, and the difference between two tables. No I/O happens here.
//!
//! CONTRACT (used by the source and dataplane layers; keep these names):
//! - [`ClusterState`] is the input (what a source produces); a source keeps
//!   each Service and EndpointSlice as the [`ServiceObject`] and [`Slice`]
//!   it reduces to.
//! - [`build_table`] turns it into a [`ServiceTable`] plus [`Rejection`]s.
//! - [`ServiceTable::diff`] yields the [`TableDiff`] a dataplane applies;
//!   [`TableDiff::stale_udp_flows`] names the flows every mode forgets.
//! - [`plan::plan`] decides, once for every mode, how a frontend treats
//!   its clients under the node's [`NodeNetwork`].
//! - [`validate_service`], [`validate_endpoint_slice`] (or the kept forms'
//!   `rejections()`) and [`validate_node`] let a source decide whether
//!   an object is broken; [`build_table`] runs the same checks, so the two
//!   never disagree.
use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use ipnet::IpNet;

use k8s_openapi::api::{
    core::v1::Node, core::v1::Service, discovery::v1::EndpointSlice, networking::v1::ServiceCIDR,
};

mod builder;
pub mod explain;
mod objects;
pub mod plan;
mod service;
mod slice;
mod table;
mod validate;

#[cfg(test)]
mod proptests;
#[cfg(test)]
pub(crate) mod test_support;

pub use builder::{BuildOutput, HealthCheck, TableBuilder, build_table};
pub use objects::{ObjectDelta, ObjectSet, Objects};
pub use plan::NodeNetwork;
pub use service::ServiceObject;
pub use slice::{LAST_CHANGE_TRIGGER_TIME, Slice};
pub use table::{NoLocalEndpoints, NoLocalEndpointsTracker};
pub use validate::{check_service_cidr, validate_endpoint_slice, validate_node, validate_service};

/// Everything the model needs to know about the cluster, as a source sees it.
///
/// Objects are shared (`Arc`), so that a source can publish a new state
/// without copying the objects that did not change: with thousands of
/// services, deep copies would cost more than building the table. Services
/// and EndpointSlices, tens of thousands in a large cluster, are in
/// [`Objects`] lists, which a state shares by chunks with the last one.
/// Services and EndpointSlices are kept as [`ServiceObject`]s and
/// [`Slice`]s, reduced to what the model reads.
#[derive(Clone, Debug, Default)]
pub struct ClusterState {
    pub services: Objects<ServiceObject>,
    pub endpoint_slices: Objects<Slice>,
    pub nodes: Vec<Arc<Node>>,
    /// `networking.k8s.io/v1` ServiceCIDRs: the ranges ClusterIPs are
    /// allocated from (empty where the API server has none to give).
    pub service_cidrs: Vec<Arc<ServiceCIDR>>,
}

impl ClusterState {
    /// A state holding these objects.
    pub fn new(
        services: Vec<Service>,
        endpoint_slices: Vec<EndpointSlice>,
        nodes: Vec<Node>,
    ) -> Self {
        Self {
            services: services
                .iter()
                .map(|service| Arc::new(ServiceObject::new(service)))
                .collect(),
            endpoint_slices: endpoint_slices
                .iter()
                .map(|slice| Arc::new(Slice::new(slice)))
                .collect(),
            nodes: nodes.into_iter().map(Arc::new).collect(),
            service_cidrs: Vec::new(),
        }
    }
}

/// Who a kept object is (see [`ServiceObject`], [`Slice`]): what sources
/// key it by, what change counts compare and what Events name. The fields
/// of its `metadata` of the same names; nothing else of the metadata is
/// kept.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Identity {
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub uid: Option<String>,
    pub resource_version: Option<String>,
}

impl Identity {
    pub fn of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Self {
        Identity {
            namespace: meta.namespace.clone(),
            name: meta.name.clone(),
            uid: meta.uid.clone(),
            resource_version: meta.resource_version.clone(),
        }
    }

    /// (namespace, name), "" where unset: what sources key objects by.
    pub fn key(&self) -> (String, String) {
        (
            self.namespace.clone().unwrap_or_default(),
            self.name.clone().unwrap_or_default(),
        )
    }
}

/// Node-level settings that shape the table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModelConfig {
    /// The node this agent runs on (its Node object and local endpoints).
    pub node_name: String,
    /// The pods' address ranges (`--cluster-cidr`): no ClusterIP is
    /// proxied inside them, where it would capture a pod's own traffic.
    pub cluster_cidrs: Vec<ipnet::IpNet>,
}

/// L4 protocol of a service port.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub const ALL: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

    /// The protocol of an IP protocol number, if it is one of ours.
    pub fn from_number(number: u8) -> Option<Protocol> {
        Protocol::ALL.into_iter().find(|p| p.number() == number)
    }

    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }

    /// The spelling Kubernetes uses ("TCP", "UDP", "SCTP").
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// namespace/name of a Service. Shared strings: the builder, the table's
/// frontends and every claim of a frontend name their Service.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ServiceName {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

impl ServiceName {
    pub fn new(namespace: &str, name: &str) -> ServiceName {
        ServiceName {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl std::fmt::Display for ServiceName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// How traffic reaches a frontend.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum FrontendKind {
    /// `spec.clusterIP(s)`: traffic from inside the cluster.
    #[serde(rename = "ClusterIP")]
    ClusterIp,
    /// `spec.ports[].nodePort` on the node's own addresses. The key's `ip`
    /// is the unspecified address of the family (0.0.0.0 or ::): "every
    /// node address the dataplane accepts NodePorts on".
    NodePort,
    /// `spec.externalIPs`.
    #[serde(rename = "ExternalIP")]
    ExternalIp,
    /// `status.loadBalancer.ingress[].ip`.
    LoadBalancer,
}

impl FrontendKind {
    /// Whether traffic to it comes from outside the cluster (and so follows
    /// `externalTrafficPolicy`).
    pub fn is_external(self) -> bool {
        !matches!(self, FrontendKind::ClusterIp)
    }
}

/// How a frontend treats clients and backends, beyond "a backend at random".
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FrontendPolicy {
    /// `sessionAffinity: ClientIP`: a client stays on its backend until this
    /// many seconds pass without a packet from it
    /// (`sessionAffinityConfig.clientIP.timeoutSeconds`, default 10800).
    pub affinity_timeout_secs: Option<u32>,
    /// The traffic policy that applies to this frontend is `Local`
    /// (`externalTrafficPolicy` for external kinds, `internalTrafficPolicy`
    /// for ClusterIP): `backends` hold this node's endpoints only, an external
    /// client's source address is kept (no masquerade), and with no local
    /// backend the traffic is dropped rather than rejected.
    pub local_only: bool,
    /// `spec.loadBalancerSourceRanges` (LoadBalancer frontends only; empty:
    /// any source). Other sources are dropped.
    pub source_ranges: Vec<IpNet>,
}

/// What a packet is matched on: destination address, port and protocol.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct FrontendKey {
    pub ip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

/// One endpoint address and target port serving a frontend.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct Backend {
    pub ip: IpAddr,
    pub port: u16,
}

impl std::fmt::Display for Backend {
    /// `ip:port`, `[ip]:port` for IPv6.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.ip {
            IpAddr::V4(ip) => write!(f, "{ip}:{}", self.port),
            IpAddr::V6(ip) => write!(f, "[{ip}]:{}", self.port),
        }
    }
}

/// A frontend and the backends new connections may go to (sorted, without
/// duplicates). The model has already applied every rule that decides which
/// endpoints those are: readiness (serving-and-terminating ones only when no
/// endpoint is ready), traffic policy, topology hints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frontend {
    pub service: ServiceName,
    /// The service port's name ("" when unnamed).
    pub port_name: String,
    pub kind: FrontendKind,
    pub backends: Vec<Backend>,
    /// For a `local_only` frontend, the backends it would have under the
    /// `Cluster` policy (sorted, without duplicates): in-cluster clients of
    /// an external frontend use them, as kube-proxy short-circuits pod
    /// traffic, and they tell "no local endpoint" (drop) from "no endpoint
    /// at all" (reject). Empty for other frontends.
    pub cluster_backends: Vec<Backend>,
    pub policy: FrontendPolicy,
}

/// The desired (or programmed) set of frontends, ordered by key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceTable {
    frontends: BTreeMap<FrontendKey, Arc<Frontend>>,
}

/// A Kubernetes object, or part of one, the model refused.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rejection {
    /// "Service", "EndpointSlice" or "Node".
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
    pub reason: String,
}

/// A frontend whose backends (or other attributes) changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendChange {
    pub key: FrontendKey,
    pub old: Arc<Frontend>,
    pub new: Arc<Frontend>,
}

/// What differs between two tables.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
///
/// Frontends are shared with the tables they come from (and with what a
/// dataplane keeps of them): at tens of thousands of frontends, a copy
/// each would be most of the agent's memory.
pub struct TableDiff {
    pub added: Vec<(FrontendKey, Arc<Frontend>)>,
    pub changed: Vec<FrontendChange>,
    pub removed: Vec<(FrontendKey, Arc<Frontend>)>,
}
