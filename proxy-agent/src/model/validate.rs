//! Checks on single objects. This is the only place that decides what is
//! broken: the public `validate_*` functions and [`super::build_table`] both
//! call the `check_*` functions here, so a source and the table never disagree.
//!
//! A check yields rejections plus, when the object is usable, a plan: the
//! already-parsed parts the table builder needs. Objects the model ignores on
//! purpose (headless, ExternalName, owned by another proxy, FQDN slices) yield
//! neither.
use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::{IpAddr, Ipv4Addr},
};

use k8s_openapi::{
    api::{
        core::v1::{Node, Service, ServiceSpec},
        discovery::v1::{Endpoint, EndpointPort, EndpointSlice},
        networking::v1::ServiceCIDR,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

use ipnet::IpNet;

use super::{Protocol, Rejection, ServiceName};

/// Services with this label belong to another proxy, whatever its value.
pub(super) const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Links an EndpointSlice to the Service (same namespace) it serves.
pub(super) const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The zone of a Node, which topology hints name.
pub(super) const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// Asks for topology-aware routing ("Auto"); read before the older one.
pub(super) const TOPOLOGY_MODE_ANNOTATION: &str = "service.kubernetes.io/topology-mode";
/// The older spelling of [`TOPOLOGY_MODE_ANNOTATION`].
pub(super) const TOPOLOGY_AWARE_HINTS_ANNOTATION: &str =
    "service.kubernetes.io/topology-aware-hints";

const SERVICE: &str = "Service";
const ENDPOINT_SLICE: &str = "EndpointSlice";
const NODE: &str = "Node";
const SERVICE_CIDR: &str = "ServiceCIDR";
/// The API server's limit on `spec.cidrs` of a ServiceCIDR: one per family.
const MAX_SERVICE_CIDRS: usize = 2;

/// Problems with a Service; empty means the model can use it (or ignores it
/// on purpose, e.g. headless or owned by another proxy).
pub fn validate_service(svc: &Service) -> Vec<Rejection> {
    check_service(svc).rejections
}

/// Problems with an EndpointSlice; empty means every part of it is usable
/// (or the model ignores it on purpose, e.g. an FQDN slice).
pub fn validate_endpoint_slice(slice: &EndpointSlice) -> Vec<Rejection> {
    check_endpoint_slice(slice).rejections
}

/// Problems with a Node; empty means valid. A Node only needs a name for now.
pub fn validate_node(node: &Node) -> Vec<Rejection> {
    let (namespace, name) = identity(&node.metadata, "");
    if name.is_empty() {
        return vec![rejection(
            NODE,
            &namespace,
            &name,
            "metadata.name: missing".into(),
        )];
    }
    Vec::new()
}

/// The ranges of a `networking.k8s.io/v1` ServiceCIDR (its `spec.cidrs`,
/// at most one per family, as the API server allows), or why it is
/// refused. An object that is refused counts for nothing: traffic to its
/// ranges is left alone rather than dropped on a guess.
pub fn check_service_cidr(object: &ServiceCIDR) -> Result<Vec<IpNet>, Vec<Rejection>> {
    let (namespace, name) = identity(&object.metadata, "");
    let refuse = |reasons: Vec<String>| {
        reasons
            .into_iter()
            .map(|reason| rejection(SERVICE_CIDR, &namespace, &name, reason))
            .collect::<Vec<_>>()
    };
    if name.is_empty() {
        return Err(refuse(vec!["metadata.name: missing".into()]));
    }
    let raw = object
        .spec
        .as_ref()
        .and_then(|spec| spec.cidrs.as_deref())
        .unwrap_or_default();
    if raw.len() > MAX_SERVICE_CIDRS {
        return Err(refuse(vec![format!(
            "spec.cidrs: {} ranges, at most {MAX_SERVICE_CIDRS} (one per family)",
            raw.len()
        )]));
    }
    let mut reasons = Vec::new();
    let mut cidrs: Vec<IpNet> = Vec::new();
    for (i, text) in raw.iter().enumerate() {
        match parse_cidr(text.trim()) {
            Some(net)
                if cidrs
                    .iter()
                    .any(|c| IpFamily::of(c.addr()) == IpFamily::of(net.addr())) =>
            {
                reasons.push(format!(
                    "spec.cidrs[{i}]: {text:?}: a second range of its family"
                ))
            }
            Some(net) => cidrs.push(net.trunc()),
            None => reasons.push(format!("spec.cidrs[{i}]: {text:?} is not a CIDR")),
        }
    }
    if reasons.is_empty() {
        Ok(cidrs)
    } else {
        Err(refuse(reasons))
    }
}

/// IP address family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    pub(super) fn of(ip: IpAddr) -> IpFamily {
        match ip {
            IpAddr::V4(_) => IpFamily::V4,
            IpAddr::V6(_) => IpFamily::V6,
        }
    }
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The spelling of spec.ipFamilies and EndpointSlice.addressType.
        f.write_str(match self {
            IpFamily::V4 => "IPv4",
            IpFamily::V6 => "IPv6",
        })
    }
}

/// The usable parts of a valid Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct ServicePlan {
    pub name: ServiceName,
    /// At most one per family, in spec order.
    pub cluster_ips: Vec<IpAddr>,
    /// Valid ports without (port, protocol) duplicates, in spec order.
    pub ports: Vec<ServicePortPlan>,
    /// Valid `spec.externalIPs` of the Service's families: (index, address).
    pub external_ips: Vec<(usize, IpAddr)>,
    /// Valid `status.loadBalancer.ingress[].ip` of the Service's families
    /// (LoadBalancer Services only; `ipMode: Proxy` and hostname-only entries
    /// left out): (index, address).
    pub load_balancer_ips: Vec<(usize, IpAddr)>,
    /// `internalTrafficPolicy: Local`.
    pub internal_local: bool,
    /// `externalTrafficPolicy: Local` on an externally reachable Service.
    pub external_local: bool,
    /// `sessionAffinity: ClientIP` timeout.
    pub affinity_timeout_secs: Option<u32>,
    /// Valid `spec.loadBalancerSourceRanges` (LoadBalancer Services only).
    pub source_ranges: Vec<IpNet>,
    /// `spec.healthCheckNodePort` of a NodePort or LoadBalancer Service with
    /// `externalTrafficPolicy: Local`.
    pub health_check_node_port: Option<u16>,
    /// The Service asks for topology-aware routing (`spec.trafficDistribution`
    /// or the topology annotations): its cluster-wide endpoint set follows
    /// the endpoints' hints when they allow it.
    pub topology: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct ServicePortPlan {
    /// Position in spec.ports, for messages.
    pub index: usize,
    /// "" when unnamed.
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
    /// `nodePort` of a NodePort or LoadBalancer Service, when set and valid.
    pub node_port: Option<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct ServiceCheck {
    pub rejections: Vec<Rejection>,
    /// `None` when the Service is rejected as a whole or ignored on purpose.
    pub plan: Option<ServicePlan>,
}

/// The usable parts of an IPv4 or IPv6 EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct SlicePlan {
    pub namespace: String,
    /// The `kubernetes.io/service-name` label; `None` leaves the slice unused.
    pub service_name: Option<String>,
    pub family: IpFamily,
    /// Valid ports only.
    pub ports: Vec<SlicePortPlan>,
    /// One per valid endpoint that is ready or serving and terminating.
    pub endpoints: Vec<EndpointPlan>,
}

/// A usable endpoint and the conditions that decide when it gets traffic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct EndpointPlan {
    pub ip: IpAddr,
    /// `conditions.ready`; nil means ready.
    pub ready: bool,
    /// `conditions.serving` (nil: same as ready) and `conditions.terminating`
    /// (nil: false) both hold: a fallback when nothing is ready.
    pub serving_terminating: bool,
    /// `nodeName`, when set and not empty.
    pub node_name: Option<NodeName>,
    /// `hints`, when it names any zone or node. Boxed: hundreds of
    /// thousands of endpoints are kept, few of them with hints.
    pub hints: Option<Box<EndpointHintsPlan>>,
}

impl EndpointPlan {
    /// `hints.forZones[].name`: sorted, without duplicates or empty names.
    pub fn zone_hints(&self) -> &[String] {
        self.hints.as_ref().map_or(&[], |h| &h.zones)
    }

    /// `hints.forNodes[].name`: sorted, without duplicates or empty names.
    pub fn node_hints(&self) -> &[String] {
        self.hints.as_ref().map_or(&[], |h| &h.nodes)
    }
}

/// A node's name, interned: hundreds of thousands of endpoints are kept,
/// each naming its node, and a cluster has few nodes. Names are not
/// forgotten: the nodes a cluster has over the agent's life are few too.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct NodeName(std::num::NonZeroU32);

static NODE_NAMES: std::sync::LazyLock<std::sync::Mutex<HashMap<Box<str>, NodeName>>> =
    std::sync::LazyLock::new(Default::default);

impl NodeName {
    /// The name `name`, interned.
    pub fn of(name: &str) -> NodeName {
        let mut names = NODE_NAMES
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(id) = names.get(name) {
            return *id;
        }
        let next = u32::try_from(names.len() + 1)
            .ok()
            .and_then(std::num::NonZeroU32::new)
            .unwrap_or(std::num::NonZeroU32::MAX);
        names.insert(name.into(), NodeName(next));
        NodeName(next)
    }

    /// The name `name` if any endpoint named it.
    pub fn find(name: &str) -> Option<NodeName> {
        let names = NODE_NAMES
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        names.get(name).copied()
    }
}

/// The names an endpoint's hints give (see [`EndpointPlan::zone_hints`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct EndpointHintsPlan {
    pub zones: Vec<String>,
    pub nodes: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct SlicePortPlan {
    /// "" when unnamed.
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct SliceCheck {
    pub rejections: Vec<Rejection>,
    /// `None` when the slice is rejected as a whole or ignored on purpose.
    pub plan: Option<SlicePlan>,
}

/// The namespace/name a Service is known by (namespace defaulted like kubectl).
pub(super) fn service_name_of(svc: &Service) -> ServiceName {
    let (namespace, name) = identity(&svc.metadata, "default");
    ServiceName::new(&namespace, &name)
}

pub(super) fn check_service(svc: &Service) -> ServiceCheck {
    let ServiceName { namespace, name } = service_name_of(svc);
    let into_check = |reasons: Vec<String>, plan: Option<ServicePlan>| ServiceCheck {
        rejections: reasons
            .into_iter()
            .map(|reason| rejection(SERVICE, &namespace, &name, reason))
            .collect(),
        plan,
    };
    // Without a name nothing can refer to the object, whoever proxies it.
    if name.is_empty() {
        return into_check(vec!["metadata.name: missing".into()], None);
    }
    let Some((spec, addresses)) = proxied(svc) else {
        return into_check(Vec::new(), None);
    };

    let mut reasons = Vec::new();
    let cluster_ips = check_cluster_ips(spec, &addresses, &mut reasons);
    let type_ = spec.type_.as_deref();
    let is_load_balancer = type_ == Some("LoadBalancer");
    let has_node_ports = is_load_balancer || type_ == Some("NodePort");
    // Ports are checked even when the cluster IPs are bad, so one pass over a
    // broken manifest reports every problem.
    let ports = check_service_ports(spec, has_node_ports, &mut reasons);
    let topology = check_topology(svc, &mut reasons);

    let policies = check_policies(spec, &mut reasons);
    let (Some(cluster_ips), Some((affinity_timeout_secs, internal_local, external_local))) =
        (cluster_ips, policies)
    else {
        return into_check(reasons, None);
    };

    let families: Vec<IpFamily> = cluster_ips.iter().map(|ip| IpFamily::of(*ip)).collect();
    let external_ips = check_external_addresses(
        spec.external_ips
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, raw)| (i, format!("spec.externalIPs[{i}]"), raw.as_str())),
        &families,
        &mut reasons,
    );
    let (load_balancer_ips, source_ranges) = if is_load_balancer {
        check_load_balancer(svc, spec, &families, &mut reasons)
    } else {
        (Vec::new(), Vec::new())
    };
    // kube-proxy applies externalTrafficPolicy to every externally
    // reachable Service, including ClusterIP ones with externalIPs.
    let external_local =
        external_local && (has_node_ports || spec.external_ips.iter().flatten().next().is_some());
    let health_check_node_port = match spec.health_check_node_port {
        Some(number) if has_node_ports && external_local => {
            check_health_check_node_port(number, &mut reasons)
        }
        _ => None,
    };

    let plan = ServicePlan {
        name: ServiceName {
            namespace: namespace.clone(),
            name: name.clone(),
        },
        cluster_ips,
        ports,
        external_ips,
        load_balancer_ips,
        internal_local,
        external_local,
        affinity_timeout_secs,
        source_ranges,
        health_check_node_port,
        topology,
    };
    into_check(reasons, Some(plan))
}

fn check_health_check_node_port(number: i32, reasons: &mut Vec<String>) -> Option<u16> {
    let port = parse_port(number);
    if port.is_none() {
        reasons.push(format!(
            "spec.healthCheckNodePort: {number} is outside 1..=65535"
        ));
    }
    port
}

/// The spec and cluster IP fields of a Service this proxy serves; `None`
/// for one it leaves alone on purpose: another proxy's, an ExternalName,
/// a headless one or one whose address is not allocated yet (like
/// kube-proxy, only the primary address decides: "" or "None").
fn proxied(svc: &Service) -> Option<(&ServiceSpec, Vec<(String, &str)>)> {
    if has_label(&svc.metadata, SERVICE_PROXY_NAME_LABEL) {
        return None;
    }
    let spec = svc.spec.as_ref()?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    let addresses = cluster_ip_fields(spec);
    if matches!(addresses.first(), None | Some((_, "" | "None"))) {
        return None;
    }
    Some((spec, addresses))
}

/// `sessionAffinity` and both traffic policies (is each `Local`). Values
/// the API server refuses outright reject the whole Service, as the API
/// server would: serving it without its affinity or with another traffic
/// policy than asked for would silently change its behaviour (which
/// backend a client sticks to, whose source address is kept).
fn check_policies(
    spec: &ServiceSpec,
    reasons: &mut Vec<String>,
) -> Option<(Option<u32>, bool, bool)> {
    // All three are checked before any is given up on, so that every
    // problem is reported.
    let affinity = check_affinity(spec).map_err(|r| reasons.push(r)).ok();
    let internal = check_traffic_policy(
        spec.internal_traffic_policy.as_deref(),
        "spec.internalTrafficPolicy",
    )
    .map_err(|r| reasons.push(r))
    .ok();
    let external = check_traffic_policy(
        spec.external_traffic_policy.as_deref(),
        "spec.externalTrafficPolicy",
    )
    .map_err(|r| reasons.push(r))
    .ok();
    Some((affinity?, internal?, external?))
}

/// The load balancer addresses of a LoadBalancer Service (`status`) and
/// its source ranges. When every range is invalid, the addresses are left
/// out: an empty list would open them to every source.
fn check_load_balancer(
    svc: &Service,
    spec: &ServiceSpec,
    families: &[IpFamily],
    reasons: &mut Vec<String>,
) -> (Vec<(usize, IpAddr)>, Vec<IpNet>) {
    let ingress = svc
        .status
        .iter()
        .filter_map(|status| status.load_balancer.as_ref())
        .flat_map(|lb| lb.ingress.iter().flatten())
        .enumerate()
        // Like kube-proxy: a hostname-only entry gives nothing to match,
        // and with ipMode Proxy the load balancer delivers the traffic to
        // the nodes itself (node ports), so the address is not ours.
        .filter(|(_, entry)| entry.ip_mode.as_deref() != Some("Proxy"))
        .filter_map(|(i, entry)| {
            let raw = entry.ip.as_deref().filter(|ip| !ip.is_empty())?;
            Some((i, format!("status.loadBalancer.ingress[{i}].ip"), raw))
        });
    let addresses = check_external_addresses(ingress, families, reasons);
    match check_source_ranges(spec, reasons) {
        Some(ranges) => (addresses, ranges),
        None => (Vec::new(), Vec::new()),
    }
}

/// Whether the Service asks for topology-aware routing. Like kube-proxy,
/// `topology-mode` is read first and `topology-aware-hints` only when it is
/// absent or empty, and only "Auto" or "auto" turns hints on. Values the
/// model does not know are reported and ignored, not held against the
/// Service: both fields are preferences, which a proxy may leave unmet.
fn check_topology(svc: &Service, reasons: &mut Vec<String>) -> bool {
    let annotations = svc.metadata.annotations.as_ref();
    let annotation = [TOPOLOGY_MODE_ANNOTATION, TOPOLOGY_AWARE_HINTS_ANNOTATION]
        .into_iter()
        .find_map(|key| {
            let value = annotations?.get(key).filter(|value| !value.is_empty())?;
            Some((key, value.as_str()))
        });
    let by_annotation = match annotation {
        None | Some((_, "Disabled" | "disabled")) => false,
        Some((_, "Auto" | "auto")) => true,
        Some((key, other)) => {
            reasons.push(format!(
                "metadata.annotations[{key}]: {other:?} is not Auto or Disabled; \
                 topology hints are not used for it"
            ));
            false
        }
    };
    let spec = svc.spec.as_ref();
    let by_distribution = match spec.and_then(|spec| spec.traffic_distribution.as_deref()) {
        None => false,
        // PreferClose is the older name of PreferSameZone.
        Some("PreferClose" | "PreferSameZone" | "PreferSameNode") => true,
        Some(other) => {
            reasons.push(format!(
                "spec.trafficDistribution: {other:?} is not PreferClose, PreferSameZone or \
                 PreferSameNode; it is ignored"
            ));
            false
        }
    };
    by_annotation || by_distribution
}

/// The default and the bounds the API server applies to
/// `sessionAffinityConfig.clientIP.timeoutSeconds`.
const DEFAULT_AFFINITY_TIMEOUT_SECS: u32 = 10800;
const MAX_AFFINITY_TIMEOUT_SECS: i32 = 86400;

fn check_affinity(spec: &ServiceSpec) -> Result<Option<u32>, String> {
    match spec.session_affinity.as_deref() {
        None | Some("None") => Ok(None),
        Some("ClientIP") => {
            let timeout = spec
                .session_affinity_config
                .as_ref()
                .and_then(|config| config.client_ip.as_ref())
                .and_then(|client_ip| client_ip.timeout_seconds);
            match timeout {
                None => Ok(Some(DEFAULT_AFFINITY_TIMEOUT_SECS)),
                Some(secs @ 1..=MAX_AFFINITY_TIMEOUT_SECS) => Ok(u32::try_from(secs).ok()),
                Some(secs) => Err(format!(
                    "spec.sessionAffinityConfig.clientIP.timeoutSeconds: {secs} is outside \
                     1..={MAX_AFFINITY_TIMEOUT_SECS}; the Service is ignored"
                )),
            }
        }
        Some(other) => Err(format!(
            "spec.sessionAffinity: {other:?} is not None or ClientIP; the Service is ignored"
        )),
    }
}

/// Whether the policy is `Local`.
fn check_traffic_policy(value: Option<&str>, field: &str) -> Result<bool, String> {
    match value {
        None | Some("Cluster") => Ok(false),
        Some("Local") => Ok(true),
        Some(other) => Err(format!(
            "{field}: {other:?} is not Cluster or Local; the Service is ignored"
        )),
    }
}

/// Addresses external clients use (externalIPs, load balancer IPs): each must
/// be an address of one of the Service's families, and never the unspecified
/// address, which means "every node address" in a frontend key.
fn check_external_addresses<'a>(
    entries: impl Iterator<Item = (usize, String, &'a str)>,
    families: &[IpFamily],
    reasons: &mut Vec<String>,
) -> Vec<(usize, IpAddr)> {
    let mut addresses = Vec::new();
    for (index, field, raw) in entries {
        let Some(ip) = parse_ip(raw) else {
            reasons.push(format!("{field}: {raw:?} is not an IP address"));
            continue;
        };
        let family = IpFamily::of(ip);
        if ip.is_unspecified() {
            reasons.push(format!("{field}: {raw:?} is the unspecified address"));
        } else if !families.contains(&family) {
            reasons.push(format!(
                "{field}: {raw:?} is {family}, which is not a family of the Service's cluster IPs"
            ));
        } else {
            addresses.push((index, ip));
        }
    }
    addresses
}

/// The valid source ranges (spaces trimmed, like kube-proxy), or `None` when
/// some were given but none is valid.
fn check_source_ranges(spec: &ServiceSpec, reasons: &mut Vec<String>) -> Option<Vec<IpNet>> {
    let raw_ranges = spec
        .load_balancer_source_ranges
        .as_deref()
        .unwrap_or_default();
    let mut ranges = Vec::new();
    for (i, raw) in raw_ranges.iter().enumerate() {
        match parse_cidr(raw.trim()) {
            Some(range) => ranges.push(range.trunc()),
            None => reasons.push(format!(
                "spec.loadBalancerSourceRanges[{i}]: {raw:?} is not a CIDR"
            )),
        }
    }
    if ranges.is_empty() && !raw_ranges.is_empty() {
        reasons.push(
            "spec.loadBalancerSourceRanges: no valid range; the load balancer addresses \
             are left out rather than opened to every source"
                .into(),
        );
        return None;
    }
    ranges.sort();
    ranges.dedup();
    Some(ranges)
}

/// (field path, value) of every cluster IP: spec.clusterIPs, or spec.clusterIP
/// when clusterIPs is empty. An empty clusterIP means "none allocated".
fn cluster_ip_fields(spec: &ServiceSpec) -> Vec<(String, &str)> {
    match spec.cluster_ips.as_deref() {
        Some(ips) if !ips.is_empty() => ips
            .iter()
            .enumerate()
            .map(|(i, ip)| (format!("spec.clusterIPs[{i}]"), ip.as_str()))
            .collect(),
        _ => match spec.cluster_ip.as_deref() {
            Some(ip) if !ip.is_empty() => vec![("spec.clusterIP".to_owned(), ip)],
            _ => Vec::new(),
        },
    }
}

/// The parsed cluster IPs, or `None` (with reasons) when any is unusable:
/// a Service half-programmed on one family would be worse than none.
fn check_cluster_ips(
    spec: &ServiceSpec,
    addresses: &[(String, &str)],
    reasons: &mut Vec<String>,
) -> Option<Vec<IpAddr>> {
    let reasons_before = reasons.len();

    // The API keeps clusterIP equal to clusterIPs[0]; if they differ the
    // intent is unclear.
    if let (Some(single), Some(first)) = (
        spec.cluster_ip.as_deref().filter(|ip| !ip.is_empty()),
        spec.cluster_ips.as_deref().and_then(|ips| ips.first()),
    ) && single != first
    {
        reasons.push(format!(
            "spec.clusterIP: {single:?} differs from spec.clusterIPs[0] {first:?}"
        ));
    }

    let mut listed_families = Vec::new();
    let families_given = spec.ip_families.as_deref().is_some_and(|f| !f.is_empty());
    for (i, family) in spec.ip_families.iter().flatten().enumerate() {
        match family.as_str() {
            "IPv4" => listed_families.push(IpFamily::V4),
            "IPv6" => listed_families.push(IpFamily::V6),
            other => reasons.push(format!(
                "spec.ipFamilies[{i}]: {other:?} is not IPv4 or IPv6"
            )),
        }
    }

    let mut cluster_ips: Vec<IpAddr> = Vec::new();
    for (field, raw) in addresses {
        let Some(ip) = parse_ip(raw) else {
            reasons.push(format!("{field}: {raw:?} is not an IP address"));
            continue;
        };
        // In a frontend key it would mean "every node address" (NodePort).
        if ip.is_unspecified() {
            reasons.push(format!("{field}: {raw:?} is the unspecified address"));
            continue;
        }
        let family = IpFamily::of(ip);
        if cluster_ips.iter().any(|seen| IpFamily::of(*seen) == family) {
            reasons.push(format!(
                "{field}: {raw:?} is a second {family} address (at most one per family)"
            ));
            continue;
        }
        if families_given && !listed_families.contains(&family) {
            reasons.push(format!(
                "{field}: {raw:?} is {family}, which spec.ipFamilies does not list"
            ));
            continue;
        }
        cluster_ips.push(ip);
    }

    (reasons.len() == reasons_before).then_some(cluster_ips)
}

/// The usable ports; a bad or duplicate port is skipped alone, since the
/// Service's other ports are still meaningful.
fn check_service_ports(
    spec: &ServiceSpec,
    has_node_ports: bool,
    reasons: &mut Vec<String>,
) -> Vec<ServicePortPlan> {
    let mut ports: Vec<ServicePortPlan> = Vec::new();
    for (index, service_port) in spec.ports.iter().flatten().enumerate() {
        let port = parse_port(service_port.port);
        if port.is_none() {
            reasons.push(format!(
                "spec.ports[{index}].port: {} is outside 1..=65535",
                service_port.port
            ));
        }
        let protocol = parse_protocol(service_port.protocol.as_deref());
        if protocol.is_none() {
            reasons.push(format!(
                "spec.ports[{index}].protocol: {:?} is not TCP, UDP or SCTP",
                service_port.protocol.as_deref().unwrap_or_default()
            ));
        }
        let (Some(port), Some(protocol)) = (port, protocol) else {
            continue;
        };
        // The first occurrence wins: it is what a reader of the spec sees first.
        if let Some(first) = ports
            .iter()
            .find(|seen| seen.port == port && seen.protocol == protocol)
        {
            reasons.push(format!(
                "spec.ports[{index}]: {port}/{protocol} duplicates spec.ports[{}]",
                first.index
            ));
            continue;
        }
        // A bad node port loses only the NodePort frontend of this port.
        let node_port = match service_port.node_port {
            Some(number) if has_node_ports => {
                let node_port = parse_port(number);
                if node_port.is_none() {
                    reasons.push(format!(
                        "spec.ports[{index}].nodePort: {number} is outside 1..=65535"
                    ));
                }
                node_port
            }
            _ => None,
        };
        ports.push(ServicePortPlan {
            index,
            name: service_port.name.clone().unwrap_or_default(),
            port,
            protocol,
            node_port,
        });
    }
    ports
}

pub(super) fn check_endpoint_slice(slice: &EndpointSlice) -> SliceCheck {
    let (namespace, name) = identity(&slice.metadata, "default");
    let into_check = |reasons: Vec<String>, plan: Option<SlicePlan>| SliceCheck {
        rejections: reasons
            .into_iter()
            .map(|reason| rejection(ENDPOINT_SLICE, &namespace, &name, reason))
            .collect(),
        plan,
    };
    if name.is_empty() {
        return into_check(vec!["metadata.name: missing".into()], None);
    }
    let family = match slice.address_type.as_str() {
        "IPv4" => IpFamily::V4,
        "IPv6" => IpFamily::V6,
        // Names cannot be proxied to without DNS; not an error.
        "FQDN" => return into_check(Vec::new(), None),
        other => {
            let reason = format!("addressType: {other:?} is not IPv4, IPv6 or FQDN");
            return into_check(vec![reason], None);
        }
    };

    let mut reasons = Vec::new();
    let mut ports: Vec<SlicePortPlan> = slice
        .ports
        .iter()
        .flatten()
        .enumerate()
        .filter_map(|(i, port)| check_slice_port(i, port, &mut reasons))
        .collect();
    let mut endpoints: Vec<EndpointPlan> = slice
        .endpoints
        .iter()
        .flatten()
        .enumerate()
        .filter_map(|(i, endpoint)| {
            let ip = check_endpoint(i, endpoint, family, &mut reasons)?;
            let (ready, serving_terminating) = conditions(endpoint);
            if !(ready || serving_terminating) {
                return None;
            }
            let (zones, nodes) = check_hints(i, endpoint, &mut reasons);
            let hints = (!zones.is_empty() || !nodes.is_empty())
                .then(|| Box::new(EndpointHintsPlan { zones, nodes }));
            Some(EndpointPlan {
                ip,
                ready,
                serving_terminating,
                node_name: endpoint
                    .node_name
                    .as_deref()
                    .filter(|name| !name.is_empty())
                    .map(NodeName::of),
                hints,
            })
        })
        .collect();
    // Kept as long as the slice lives: no spare room.
    ports.shrink_to_fit();
    endpoints.shrink_to_fit();

    let plan = SlicePlan {
        namespace: namespace.clone(),
        service_name: slice
            .metadata
            .labels
            .as_ref()
            .and_then(|labels| labels.get(SERVICE_NAME_LABEL))
            .cloned(),
        family,
        ports,
        endpoints,
    };
    into_check(reasons, Some(plan))
}

fn check_slice_port(
    index: usize,
    slice_port: &EndpointPort,
    reasons: &mut Vec<String>,
) -> Option<SlicePortPlan> {
    let port = match slice_port.port {
        // The API lets a nil port mean "all ports"; kube-proxy cannot serve
        // that either and skips it.
        None => {
            reasons.push(format!(
                "ports[{index}].port: missing (\"all ports\" is not supported)"
            ));
            None
        }
        Some(number) => {
            let port = parse_port(number);
            if port.is_none() {
                reasons.push(format!(
                    "ports[{index}].port: {number} is outside 1..=65535"
                ));
            }
            port
        }
    };
    let protocol = parse_protocol(slice_port.protocol.as_deref());
    if protocol.is_none() {
        reasons.push(format!(
            "ports[{index}].protocol: {:?} is not TCP, UDP or SCTP",
            slice_port.protocol.as_deref().unwrap_or_default()
        ));
    }
    Some(SlicePortPlan {
        name: slice_port.name.clone().unwrap_or_default(),
        protocol: protocol?,
        port: port?,
    })
}

/// The address to send traffic to, or `None` (with reasons) when the endpoint
/// is broken. Every address is checked, but only the first is used: the API
/// calls them fungible and kube-proxy also uses only the first, so using all
/// would weight a multi-address pod more than others.
fn check_endpoint(
    index: usize,
    endpoint: &Endpoint,
    family: IpFamily,
    reasons: &mut Vec<String>,
) -> Option<IpAddr> {
    if endpoint.addresses.is_empty() {
        reasons.push(format!("endpoints[{index}].addresses: empty"));
        return None;
    }
    let reasons_before = reasons.len();
    let mut first = None;
    for (i, raw) in endpoint.addresses.iter().enumerate() {
        match parse_ip(raw) {
            None => reasons.push(format!(
                "endpoints[{index}].addresses[{i}]: {raw:?} is not an IP address"
            )),
            Some(ip) if IpFamily::of(ip) != family => reasons.push(format!(
                "endpoints[{index}].addresses[{i}]: {raw:?} is not an {family} address \
                 as addressType requires"
            )),
            Some(ip) => match unsafe_endpoint_range(ip) {
                Some(range) => reasons.push(format!(
                    "endpoints[{index}].addresses[{i}]: {raw:?} is in the {range} range, \
                     which the API server refuses for endpoints"
                )),
                None => {
                    first.get_or_insert(ip);
                }
            },
        }
    }
    if reasons.len() > reasons_before {
        return None;
    }
    first
}

/// The zone and node names an endpoint is hinted for (sorted, without
/// duplicates). An empty name is reported and counts as no hint, so an
/// endpoint whose only hint is empty lacks hints (and so turns topology off
/// for its Service) rather than being meant for a zone called "".
fn check_hints(
    index: usize,
    endpoint: &Endpoint,
    reasons: &mut Vec<String>,
) -> (Vec<String>, Vec<String>) {
    let Some(hints) = &endpoint.hints else {
        return (Vec::new(), Vec::new());
    };
    let mut names = |field: &str, given: &mut dyn Iterator<Item = &String>| {
        let mut kept = Vec::new();
        for (i, name) in given.enumerate() {
            if name.is_empty() {
                reasons.push(format!(
                    "endpoints[{index}].hints.{field}[{i}].name: empty; the hint is ignored"
                ));
            } else {
                kept.push(name.clone());
            }
        }
        kept.sort();
        kept.dedup();
        kept
    };
    let zones = names(
        "forZones",
        &mut hints.for_zones.iter().flatten().map(|zone| &zone.name),
    );
    let nodes = names(
        "forNodes",
        &mut hints.for_nodes.iter().flatten().map(|node| &node.name),
    );
    (zones, nodes)
}

/// Ranges the API server refuses as endpoint addresses (its
/// `ValidateEndpointIP`); a manifest directory bypasses the API server, so
/// the model refuses them too: a service must never steer traffic to the
/// node's own loopback or to link-local services such as cloud metadata.
fn unsafe_endpoint_range(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            if v4.is_unspecified() {
                Some("unspecified")
            } else if v4.is_loopback() {
                Some("loopback")
            } else if v4.is_link_local() {
                Some("link-local")
            } else if o[0] == 224 && o[1] == 0 && o[2] == 0 {
                Some("link-local multicast")
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            if v6.is_unspecified() {
                Some("unspecified")
            } else if v6.is_loopback() {
                Some("loopback")
            } else if s[0] & 0xffc0 == 0xfe80 {
                Some("link-local")
            } else if s[0] & 0xff0f == 0xff02 {
                Some("link-local multicast")
            } else {
                None
            }
        }
    }
}

/// (ready, serving and terminating) of an endpoint. The API documents a nil
/// `ready` (and so nil conditions) as ready, a nil `serving` as "defer to
/// ready" and a nil `terminating` as false.
fn conditions(endpoint: &Endpoint) -> (bool, bool) {
    let conditions = endpoint.conditions.clone().unwrap_or_default();
    let ready = conditions.ready.unwrap_or(true);
    let serving = conditions.serving.unwrap_or(ready);
    let terminating = conditions.terminating.unwrap_or(false);
    (ready, serving && terminating)
}

/// Parses an IP address the way kube-proxy does (Go's `ParseIPSloppy`):
/// IPv4 octets may carry leading zeros (read as decimal, as objects created
/// before Kubernetes tightened validation still do), and IPv4-mapped IPv6
/// addresses are IPv4.
pub(super) fn parse_ip(raw: &str) -> Option<IpAddr> {
    if let Ok(ip) = raw.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    let mut octets = [0u8; 4];
    let mut parts = raw.split('.');
    for octet in &mut octets {
        let part = parts.next()?;
        // u8::from_str would also accept a leading '+'.
        if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        *octet = part.parse().ok()?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(IpAddr::V4(Ipv4Addr::from(octets)))
}

/// Parses a CIDR the way kube-proxy does (Go's `ParseCIDRSloppy`): the
/// address as [`parse_ip`] reads it, then `/` and a prefix length of its
/// family. An IPv4-mapped IPv6 prefix stays IPv6, as in Go.
pub(super) fn parse_cidr(raw: &str) -> Option<IpNet> {
    if let Ok(net) = raw.parse::<IpNet>() {
        return Some(net);
    }
    let (addr, len) = raw.split_once('/')?;
    if len.is_empty() || !len.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let len: u8 = len.parse().ok()?;
    match parse_ip(addr)? {
        IpAddr::V4(v4) => ipnet::Ipv4Net::new(v4, len).ok().map(IpNet::V4),
        IpAddr::V6(_) => None,
    }
}

fn parse_port(number: i32) -> Option<u16> {
    u16::try_from(number).ok().filter(|port| *port != 0)
}

/// An absent protocol means TCP, as in the API. Matching is exact: the API
/// rejects other spellings such as "tcp".
pub(super) fn parse_protocol(value: Option<&str>) -> Option<Protocol> {
    match value {
        None | Some("TCP") => Some(Protocol::Tcp),
        Some("UDP") => Some(Protocol::Udp),
        Some("SCTP") => Some(Protocol::Sctp),
        Some(_) => None,
    }
}

/// (namespace, name) of an object; `default_namespace` stands in for an
/// absent or empty namespace ("" for cluster-scoped kinds).
fn identity(meta: &ObjectMeta, default_namespace: &str) -> (String, String) {
    let namespace = match meta.namespace.as_deref() {
        Some(namespace) if !namespace.is_empty() => namespace.to_owned(),
        _ => default_namespace.to_owned(),
    };
    (namespace, meta.name.clone().unwrap_or_default())
}

fn has_label(meta: &ObjectMeta, label: &str) -> bool {
    meta.labels
        .as_ref()
        .is_some_and(|labels: &BTreeMap<String, String>| labels.contains_key(label))
}

fn rejection(kind: &'static str, namespace: &str, name: &str, reason: String) -> Rejection {
    Rejection {
        kind,
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::super::{ClusterState, ModelConfig, build_table, test_support::*};
    use super::*;

    #[test]
    fn valid_objects_have_no_rejections() {
        assert!(validate_service(&simple_service("ns", "web", "10.0.0.1", 80)).is_empty());
        assert!(
            validate_endpoint_slice(&simple_slice("ns", "web-1", "web", 8080, &["10.1.0.1"]))
                .is_empty()
        );
        assert!(validate_node(&node("node-a")).is_empty());
    }

    #[test]
    fn endpoints_in_ranges_the_api_server_refuses_are_rejected() {
        for bad in ["127.0.0.1", "169.254.169.254", "0.0.0.0", "224.0.0.5"] {
            let r = validate_endpoint_slice(&simple_slice("ns", "s", "web", 80, &[bad]));
            assert_eq!(r.len(), 1, "{bad} refused: {r:?}");
            assert!(r[0].reason.contains("range"), "{}", r[0].reason);
        }
        for bad in ["::1", "fe80::1", "::", "ff02::1"] {
            let s = slice(
                "ns",
                "s6",
                "web",
                "IPv6",
                &[slice_port("", 80, "")],
                &[endpoint(bad)],
            );
            assert_eq!(validate_endpoint_slice(&s).len(), 1, "{bad} refused");
        }
        // The good endpoints of the same slice still serve.
        let mixed = simple_slice("ns", "web-1", "web", 8080, &["127.0.0.1", "10.1.0.9"]);
        let out = build_table(
            &ClusterState::new(
                vec![simple_service("ns", "web", "10.0.0.1", 80)],
                vec![mixed],
                vec![],
            ),
            &ModelConfig::default(),
        );
        let backends: Vec<_> = out
            .table
            .iter()
            .flat_map(|(_, f)| f.backends.clone())
            .collect();
        assert_eq!(backends.len(), 1);
        assert_eq!(backends[0].ip.to_string(), "10.1.0.9");
    }

    #[test]
    fn ignored_objects_are_valid() {
        let headless = simple_service("ns", "headless", "None", 80);
        let fqdn = slice(
            "ns",
            "fqdn",
            "web",
            "FQDN",
            &[slice_port("", 80, "")],
            &[endpoint("example.com")],
        );
        assert!(validate_service(&headless).is_empty());
        assert!(validate_endpoint_slice(&fqdn).is_empty());
    }

    #[test]
    fn broken_objects_are_reported_with_kind_and_identity() {
        let rejections = validate_service(&simple_service("ns", "web", "10.0.0.300", 0));
        let web = |reason: &str| Rejection {
            kind: "Service",
            namespace: "ns".into(),
            name: "web".into(),
            reason: reason.into(),
        };
        assert_eq!(
            rejections,
            vec![
                web("spec.clusterIPs[0]: \"10.0.0.300\" is not an IP address"),
                web("spec.ports[0].port: 0 is outside 1..=65535"),
            ]
        );

        let slice_rejections =
            validate_endpoint_slice(&simple_slice("ns", "web-1", "web", 8080, &["nope"]));
        assert_eq!(slice_rejections.len(), 1);
        assert_eq!(slice_rejections[0].kind, "EndpointSlice");
        assert_eq!(slice_rejections[0].name, "web-1");

        let node_rejections = validate_node(&node(""));
        assert_eq!(node_rejections.len(), 1);
        assert_eq!(node_rejections[0].kind, "Node");
    }

    /// build_table must report exactly what the validators report, object by
    /// object: the two share one implementation.
    #[test]
    fn build_table_reports_what_validators_report() {
        let services = vec![
            simple_service("ns", "a", "10.0.0.300", 80),
            service(
                "ns",
                "b",
                &["10.0.0.2"],
                &[service_port("", 80, "HTTP"), service_port("", 81, "")],
            ),
            simple_service("ns", "c", "10.0.0.3", 80),
        ];
        let slices = vec![
            simple_slice("ns", "s1", "c", 0, &["10.1.0.1"]),
            slice(
                "ns",
                "s2",
                "c",
                "IPv6",
                &[slice_port("", 80, "")],
                &[endpoint("10.1.0.2")],
            ),
        ];
        let nodes = vec![node(""), node("n")];
        let mut expected: Vec<Rejection> = services
            .iter()
            .flat_map(validate_service)
            .chain(slices.iter().flat_map(validate_endpoint_slice))
            .chain(nodes.iter().flat_map(validate_node))
            .collect();
        expected.sort();
        assert_eq!(expected.len(), 5);

        let state = ClusterState::new(services, slices, nodes);
        assert_eq!(
            build_table(&state, &ModelConfig::default()).rejections,
            expected
        );
    }

    #[test]
    fn parse_ip_accepts_what_kube_proxy_accepts() {
        assert_eq!(parse_ip("10.0.0.1"), Some(ip("10.0.0.1")));
        assert_eq!(parse_ip("fd00::1"), Some(ip("fd00::1")));
        assert_eq!(parse_ip("010.0.0.01"), Some(ip("10.0.0.1")));
        assert_eq!(parse_ip("::ffff:192.168.0.1"), Some(ip("192.168.0.1")));
        for junk in [
            "",
            "None",
            "10.0.0",
            "10.0.0.1.",
            "10.0.0.256",
            "10.0.0.+1",
            "10..0.1",
            "a.b.c.d",
            "10.0.0.1/32",
            "fe80::1%eth0",
            " 10.0.0.1",
        ] {
            assert_eq!(parse_ip(junk), None, "{junk:?}");
        }
    }

    /// Rows: (name, spec.cidrs, the ranges or the reasons' beginnings).
    #[test]
    fn service_cidrs_are_one_range_per_family_or_refused_whole() {
        type Row<'a> = (&'a str, &'a [&'a str], Result<&'a [&'a str], &'a [&'a str]>);
        let rows: [Row; 6] = [
            (
                "kubernetes",
                &["10.96.0.0/12", "fd00:10:96::/112"],
                Ok(&["10.96.0.0/12", "fd00:10:96::/112"]),
            ),
            ("zeros", &["010.096.0.0/12"], Ok(&["10.96.0.0/12"])),
            ("host-bits", &["10.96.0.7/12"], Ok(&["10.96.0.0/12"])),
            (
                "bad",
                &["10.96.0.0/12", "nonsense"],
                Err(&["spec.cidrs[1]: \"nonsense\" is not a CIDR"]),
            ),
            (
                "two-v4",
                &["10.96.0.0/12", "10.200.0.0/16"],
                Err(&["spec.cidrs[1]: \"10.200.0.0/16\": a second range"]),
            ),
            ("", &["10.96.0.0/12"], Err(&["metadata.name: missing"])),
        ];
        for (name, cidrs, expected) in rows {
            let object = ServiceCIDR {
                metadata: ObjectMeta {
                    name: (!name.is_empty()).then(|| name.to_string()),
                    ..ObjectMeta::default()
                },
                spec: Some(k8s_openapi::api::networking::v1::ServiceCIDRSpec {
                    cidrs: Some(cidrs.iter().map(|c| c.to_string()).collect()),
                }),
                ..ServiceCIDR::default()
            };
            match (check_service_cidr(&object), expected) {
                (Ok(got), Ok(want)) => {
                    let want: Vec<IpNet> = want.iter().map(|c| c.parse().unwrap()).collect();
                    assert_eq!(got, want, "{name}");
                }
                (Err(got), Err(want)) => {
                    assert_eq!(got.len(), want.len(), "{name}: {got:?}");
                    for (r, w) in got.iter().zip(want) {
                        assert_eq!(r.kind, "ServiceCIDR");
                        assert!(r.reason.starts_with(w), "{name}: {r:?}");
                    }
                }
                (got, want) => panic!("{name}: got {got:?}, expected {want:?}"),
            }
        }
        let three = ServiceCIDR {
            metadata: ObjectMeta {
                name: Some("three".into()),
                ..ObjectMeta::default()
            },
            spec: Some(k8s_openapi::api::networking::v1::ServiceCIDRSpec {
                cidrs: Some(vec![
                    "10.0.0.0/8".into(),
                    "fd00::/64".into(),
                    "10.1.0.0/16".into(),
                ]),
            }),
            ..ServiceCIDR::default()
        };
        assert!(check_service_cidr(&three).is_err());
    }

    #[test]
    fn node_names_are_interned_once_and_found_by_name() {
        let a = NodeName::of("interned-node-a");
        assert_eq!(NodeName::of("interned-node-a"), a);
        assert_ne!(NodeName::of("interned-node-b"), a);
        assert_eq!(NodeName::find("interned-node-a"), Some(a));
        assert_eq!(NodeName::find("interned-node-never-named"), None);
        // Hundreds of thousands are kept: an endpoint is four words.
        assert!(std::mem::size_of::<EndpointPlan>() <= 32);
    }

    #[test]
    fn parse_cidr_accepts_leading_zeros_as_kube_proxy_does() {
        let rows = [
            ("10.0.0.0/8", Some("10.0.0.0/8")),
            ("010.000.0.0/16", Some("10.0.0.0/16")),
            ("203.0.113.07/32", Some("203.0.113.7/32")),
            ("fd00::/64", Some("fd00::/64")),
            ("010.0.0.0/33", None),
            ("010.0.0.0/", None),
            ("010.0.0.0/+8", None),
            ("010.0.0.0", None),
            ("not-a-cidr", None),
        ];
        for (raw, expected) in rows {
            let expected: Option<IpNet> = expected.map(|e| e.parse().unwrap());
            assert_eq!(parse_cidr(raw), expected, "{raw:?}");
        }
    }

    #[test]
    fn parse_protocol_defaults_to_tcp_and_is_exact() {
        assert_eq!(parse_protocol(None), Some(Protocol::Tcp));
        assert_eq!(parse_protocol(Some("TCP")), Some(Protocol::Tcp));
        assert_eq!(parse_protocol(Some("UDP")), Some(Protocol::Udp));
        assert_eq!(parse_protocol(Some("SCTP")), Some(Protocol::Sctp));
        assert_eq!(parse_protocol(Some("udp")), None);
        assert_eq!(parse_protocol(Some("")), None);
    }
}
