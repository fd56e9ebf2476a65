//! A directory of Kubernetes manifests for the agent's `--manifests`: one
//! object per file, written atomically so the agent never reads half a file.
use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::Context;
use serde_json::{Value, json};

use crate::client::Protocol;

/// An IP family, as Services (`ipFamilies`) and EndpointSlices
/// (`addressType`) name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    pub fn of(ip: IpAddr) -> Self {
        if ip.is_ipv4() {
            IpFamily::V4
        } else {
            IpFamily::V6
        }
    }

    /// `"IPv4"` or `"IPv6"`.
    pub fn as_str(self) -> &'static str {
        match self {
            IpFamily::V4 => "IPv4",
            IpFamily::V6 => "IPv6",
        }
    }
}

/// `spec.ipFamilyPolicy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IpFamilyPolicy {
    SingleStack,
    PreferDualStack,
    RequireDualStack,
}

impl IpFamilyPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            IpFamilyPolicy::SingleStack => "SingleStack",
            IpFamilyPolicy::PreferDualStack => "PreferDualStack",
            IpFamilyPolicy::RequireDualStack => "RequireDualStack",
        }
    }
}

/// `spec.type`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ServiceType {
    #[default]
    ClusterIP,
    NodePort,
    LoadBalancer,
}

impl ServiceType {
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceType::ClusterIP => "ClusterIP",
            ServiceType::NodePort => "NodePort",
            ServiceType::LoadBalancer => "LoadBalancer",
        }
    }
}

/// `spec.externalTrafficPolicy` / `spec.internalTrafficPolicy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrafficPolicy {
    Cluster,
    Local,
}

impl TrafficPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            TrafficPolicy::Cluster => "Cluster",
            TrafficPolicy::Local => "Local",
        }
    }
}

/// A Service: ClusterIP by default, optionally dual-stack, NodePort or
/// LoadBalancer. Fields left `None`/empty are left out of the object, so
/// the API's defaults apply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    pub namespace: String,
    pub name: String,
    /// The primary cluster IP; its family is the primary family.
    pub cluster_ip: IpAddr,
    pub ports: Vec<ServicePort>,
    /// The second cluster IP of a dual-stack Service (the other family).
    pub secondary_cluster_ip: Option<IpAddr>,
    /// `None`: SingleStack if there is one cluster IP, RequireDualStack if
    /// there are two.
    pub ip_family_policy: Option<IpFamilyPolicy>,
    pub service_type: ServiceType,
    pub external_traffic_policy: Option<TrafficPolicy>,
    pub internal_traffic_policy: Option<TrafficPolicy>,
    pub health_check_node_port: Option<u16>,
    /// `spec.externalIPs`.
    pub external_ips: Vec<IpAddr>,
    /// `status.loadBalancer.ingress[].ip`.
    pub load_balancer_ips: Vec<IpAddr>,
    /// `sessionAffinity: ClientIP` with this timeout in seconds.
    pub session_affinity_timeout: Option<u32>,
    /// `spec.loadBalancerSourceRanges`, as written (so tests can also write
    /// invalid ones).
    pub load_balancer_source_ranges: Vec<String>,
    /// `spec.trafficDistribution` (e.g. `PreferClose`).
    pub traffic_distribution: Option<String>,
}

/// One port of a Service and the port its endpoints serve it on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    pub target_port: u16,
    /// `nodePort`, for NodePort and LoadBalancer Services.
    pub node_port: Option<u16>,
}

/// One ready endpoint: a pod's name and address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub pod: String,
    pub ip: IpAddr,
}

/// An endpoint with everything an EndpointSlice can say about it: where it
/// runs and its conditions. From an [`Endpoint`]: ready and serving, on the
/// default node (see [`ManifestsDir::write_node`]), no zone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceEndpoint {
    pub pod: String,
    pub ip: IpAddr,
    /// `nodeName`; `None` takes the slice's default node, if any.
    pub node: Option<String>,
    /// `zone`.
    pub zone: Option<String>,
    /// `hints.forZones[].name`; empty: no hints.
    pub zone_hints: Vec<String>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

impl From<Endpoint> for SliceEndpoint {
    fn from(endpoint: Endpoint) -> Self {
        SliceEndpoint {
            pod: endpoint.pod,
            ip: endpoint.ip,
            node: None,
            zone: None,
            zone_hints: Vec::new(),
            ready: true,
            serving: true,
            terminating: false,
        }
    }
}

impl SliceEndpoint {
    /// On node `node`.
    pub fn on(mut self, node: &str) -> Self {
        self.node = Some(node.to_string());
        self
    }

    /// In zone `zone`.
    pub fn in_zone(mut self, zone: &str) -> Self {
        self.zone = Some(zone.to_string());
        self
    }

    /// With `hints.forZones` naming `zones`.
    pub fn hinted_for(mut self, zones: &[&str]) -> Self {
        self.zone_hints = zones.iter().map(|z| z.to_string()).collect();
        self
    }

    /// Terminating: not ready; still serving if `serving`.
    pub fn terminating(mut self, serving: bool) -> Self {
        self.ready = false;
        self.serving = serving;
        self.terminating = true;
        self
    }

    fn object(&self, namespace: &str, default_node: Option<&str>) -> Value {
        let mut endpoint = json!({
            "addresses": [self.ip.to_string()],
            "conditions": {
                "ready": self.ready,
                "serving": self.serving,
                "terminating": self.terminating,
            },
            "targetRef": { "kind": "Pod", "namespace": namespace, "name": self.pod },
        });
        if let Some(node) = self.node.as_deref().or(default_node) {
            endpoint["nodeName"] = json!(node);
        }
        if let Some(zone) = &self.zone {
            endpoint["zone"] = json!(zone);
        }
        if !self.zone_hints.is_empty() {
            let zones: Vec<Value> = self
                .zone_hints
                .iter()
                .map(|z| json!({ "name": z }))
                .collect();
            endpoint["hints"] = json!({ "forZones": zones });
        }
        endpoint
    }
}

impl ServiceSpec {
    /// A single-stack ClusterIP Service without ports; add them with
    /// [`ServiceSpec::tcp`], [`ServiceSpec::udp`] and [`ServiceSpec::sctp`].
    pub fn cluster_ip(namespace: &str, name: &str, cluster_ip: IpAddr) -> Self {
        ServiceSpec {
            namespace: namespace.to_string(),
            name: name.to_string(),
            cluster_ip,
            ports: Vec::new(),
            secondary_cluster_ip: None,
            ip_family_policy: None,
            service_type: ServiceType::ClusterIP,
            external_traffic_policy: None,
            internal_traffic_policy: None,
            health_check_node_port: None,
            external_ips: Vec::new(),
            load_balancer_ips: Vec::new(),
            session_affinity_timeout: None,
            load_balancer_source_ranges: Vec::new(),
            traffic_distribution: None,
        }
    }

    /// Adds a TCP port named `tcp-<port>`.
    pub fn tcp(self, port: u16, target_port: u16) -> Self {
        self.port(Protocol::Tcp, port, target_port)
    }

    /// Adds a UDP port named `udp-<port>`.
    pub fn udp(self, port: u16, target_port: u16) -> Self {
        self.port(Protocol::Udp, port, target_port)
    }

    /// Adds an SCTP port named `sctp-<port>`.
    pub fn sctp(self, port: u16, target_port: u16) -> Self {
        self.port(Protocol::Sctp, port, target_port)
    }

    fn port(mut self, protocol: Protocol, port: u16, target_port: u16) -> Self {
        self.ports.push(ServicePort {
            name: format!("{protocol}-{port}"),
            protocol,
            port,
            target_port,
            node_port: None,
        });
        self
    }

    /// Makes it dual-stack: `second` (of the other family) becomes the second
    /// cluster IP, policy RequireDualStack unless set otherwise.
    pub fn dual_stack(mut self, second: IpAddr) -> Self {
        assert_ne!(
            IpFamily::of(second),
            IpFamily::of(self.cluster_ip),
            "the second cluster IP must be of the other family"
        );
        self.secondary_cluster_ip = Some(second);
        self
    }

    pub fn ip_family_policy(mut self, policy: IpFamilyPolicy) -> Self {
        self.ip_family_policy = Some(policy);
        self
    }

    /// Type NodePort, with node port `node_ports[i]` on port `i` (in the
    /// order the ports were added).
    pub fn node_port(mut self, node_ports: &[u16]) -> Self {
        self.service_type = ServiceType::NodePort;
        self.set_node_ports(node_ports);
        self
    }

    /// Type LoadBalancer with ingress IPs `ingress` in its status, and node
    /// ports as in [`ServiceSpec::node_port`].
    pub fn load_balancer(mut self, ingress: &[IpAddr], node_ports: &[u16]) -> Self {
        self.service_type = ServiceType::LoadBalancer;
        self.load_balancer_ips = ingress.to_vec();
        self.set_node_ports(node_ports);
        self
    }

    fn set_node_ports(&mut self, node_ports: &[u16]) {
        assert_eq!(
            node_ports.len(),
            self.ports.len(),
            "one node port per Service port"
        );
        for (port, &node_port) in self.ports.iter_mut().zip(node_ports) {
            port.node_port = Some(node_port);
        }
    }

    pub fn external_traffic_policy(mut self, policy: TrafficPolicy) -> Self {
        self.external_traffic_policy = Some(policy);
        self
    }

    pub fn internal_traffic_policy(mut self, policy: TrafficPolicy) -> Self {
        self.internal_traffic_policy = Some(policy);
        self
    }

    pub fn health_check_node_port(mut self, port: u16) -> Self {
        self.health_check_node_port = Some(port);
        self
    }

    pub fn external_ips(mut self, ips: &[IpAddr]) -> Self {
        self.external_ips = ips.to_vec();
        self
    }

    /// `spec.loadBalancerSourceRanges`.
    pub fn source_ranges(mut self, ranges: &[&str]) -> Self {
        self.load_balancer_source_ranges = ranges.iter().map(|r| r.to_string()).collect();
        self
    }

    /// `spec.trafficDistribution`.
    pub fn traffic_distribution(mut self, value: &str) -> Self {
        self.traffic_distribution = Some(value.to_string());
        self
    }

    /// `sessionAffinity: ClientIP` with `timeout_seconds`.
    pub fn session_affinity(mut self, timeout_seconds: u32) -> Self {
        self.session_affinity_timeout = Some(timeout_seconds);
        self
    }

    /// `spec.clusterIPs`: the primary cluster IP, then the secondary if any.
    pub fn cluster_ips(&self) -> Vec<IpAddr> {
        std::iter::once(self.cluster_ip)
            .chain(self.secondary_cluster_ip)
            .collect()
    }

    /// `spec.ipFamilies`, in the order of [`ServiceSpec::cluster_ips`].
    pub fn ip_families(&self) -> Vec<IpFamily> {
        self.cluster_ips().into_iter().map(IpFamily::of).collect()
    }

    /// The Service object.
    pub fn service(&self) -> Value {
        let ports: Vec<Value> = self
            .ports
            .iter()
            .map(|p| {
                let mut port = json!({
                    "name": p.name,
                    "protocol": kube_protocol(p.protocol),
                    "port": p.port,
                    "targetPort": p.target_port,
                });
                if let Some(node_port) = p.node_port {
                    port["nodePort"] = json!(node_port);
                }
                port
            })
            .collect();
        let cluster_ips: Vec<String> = self.cluster_ips().iter().map(|ip| ip.to_string()).collect();
        let families: Vec<&str> = self.ip_families().iter().map(|f| f.as_str()).collect();
        let mut service = json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": { "namespace": self.namespace, "name": self.name },
            "spec": {
                "type": self.service_type.as_str(),
                "clusterIP": self.cluster_ip.to_string(),
                "clusterIPs": cluster_ips,
                "ipFamilies": families,
                "selector": { "app": self.name },
                "ports": ports,
            },
        });
        let spec = &mut service["spec"];
        let policy = self.ip_family_policy.or(self
            .secondary_cluster_ip
            .map(|_| IpFamilyPolicy::RequireDualStack));
        if let Some(policy) = policy {
            spec["ipFamilyPolicy"] = json!(policy.as_str());
        }
        if let Some(policy) = self.external_traffic_policy {
            spec["externalTrafficPolicy"] = json!(policy.as_str());
        }
        if let Some(policy) = self.internal_traffic_policy {
            spec["internalTrafficPolicy"] = json!(policy.as_str());
        }
        if let Some(port) = self.health_check_node_port {
            spec["healthCheckNodePort"] = json!(port);
        }
        if !self.external_ips.is_empty() {
            let ips: Vec<String> = self.external_ips.iter().map(|ip| ip.to_string()).collect();
            spec["externalIPs"] = json!(ips);
        }
        if let Some(timeout) = self.session_affinity_timeout {
            spec["sessionAffinity"] = json!("ClientIP");
            spec["sessionAffinityConfig"] = json!({ "clientIP": { "timeoutSeconds": timeout } });
        }
        if !self.load_balancer_source_ranges.is_empty() {
            spec["loadBalancerSourceRanges"] = json!(self.load_balancer_source_ranges);
        }
        if let Some(value) = &self.traffic_distribution {
            spec["trafficDistribution"] = json!(value);
        }
        if !self.load_balancer_ips.is_empty() {
            let ingress: Vec<Value> = self
                .load_balancer_ips
                .iter()
                .map(|ip| json!({ "ip": ip.to_string() }))
                .collect();
            service["status"] = json!({ "loadBalancer": { "ingress": ingress } });
        }
        service
    }

    /// The family of the primary cluster IP.
    pub fn family(&self) -> IpFamily {
        IpFamily::of(self.cluster_ip)
    }

    /// The name of the Service's EndpointSlice of `family`: `<name>-1` for
    /// the primary family, `<name>-2` for the other.
    pub fn slice_name(&self, family: IpFamily) -> String {
        let n = if family == self.family() { 1 } else { 2 };
        format!("{}-{n}", self.name)
    }

    /// The Service's EndpointSlice of its primary family listing `endpoints`
    /// (all ready, on node `node_name` if given).
    pub fn endpoint_slice(&self, endpoints: &[Endpoint], node_name: Option<&str>) -> Value {
        let endpoints: Vec<SliceEndpoint> =
            endpoints.iter().cloned().map(SliceEndpoint::from).collect();
        self.endpoint_slice_of(self.family(), &endpoints, node_name)
    }

    /// The Service's EndpointSlice of `family` (addressType) listing
    /// `endpoints`, whose addresses must be of that family; `default_node`
    /// is the nodeName of endpoints that name none.
    pub fn endpoint_slice_of(
        &self,
        family: IpFamily,
        endpoints: &[SliceEndpoint],
        default_node: Option<&str>,
    ) -> Value {
        let endpoints: Vec<Value> = endpoints
            .iter()
            .map(|e| {
                assert_eq!(
                    IpFamily::of(e.ip),
                    family,
                    "endpoint {} in a {} slice",
                    e.ip,
                    family.as_str()
                );
                e.object(&self.namespace, default_node)
            })
            .collect();
        let ports: Vec<Value> = self
            .ports
            .iter()
            .map(|p| {
                json!({
                    "name": p.name,
                    "protocol": kube_protocol(p.protocol),
                    "port": p.target_port,
                })
            })
            .collect();
        json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "namespace": self.namespace,
                "name": self.slice_name(family),
                "labels": {
                    "kubernetes.io/service-name": self.name,
                    "endpointslice.kubernetes.io/managed-by": "proxy-tests",
                },
            },
            "addressType": family.as_str(),
            "endpoints": endpoints,
            "ports": ports,
        })
    }
}

/// The label Nodes (and the agent's topology logic) take the zone from.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// A Node object: its name, InternalIPs (one per family) and zone label.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeSpec {
    pub name: String,
    pub internal_ips: Vec<IpAddr>,
    pub zone: Option<String>,
}

impl NodeSpec {
    pub fn new(name: &str, internal_ip: IpAddr) -> Self {
        NodeSpec {
            name: name.to_string(),
            internal_ips: vec![internal_ip],
            zone: None,
        }
    }

    /// Adds another InternalIP (e.g. the node's IPv6 address).
    pub fn internal_ip(mut self, ip: IpAddr) -> Self {
        self.internal_ips.push(ip);
        self
    }

    /// Sets the [`ZONE_LABEL`].
    pub fn zone(mut self, zone: &str) -> Self {
        self.zone = Some(zone.to_string());
        self
    }

    /// The Node object.
    pub fn object(&self) -> Value {
        let mut addresses: Vec<Value> = self
            .internal_ips
            .iter()
            .map(|ip| json!({ "type": "InternalIP", "address": ip.to_string() }))
            .collect();
        addresses.push(json!({ "type": "Hostname", "address": self.name }));
        let mut node = json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": { "name": self.name },
            "status": { "addresses": addresses },
        });
        if let Some(zone) = &self.zone {
            node["metadata"]["labels"] = json!({
                "kubernetes.io/hostname": self.name,
                ZONE_LABEL: zone,
            });
        }
        node
    }
}

/// A Node object with its InternalIP.
pub fn node(name: &str, internal_ip: IpAddr) -> Value {
    NodeSpec::new(name, internal_ip).object()
}

fn kube_protocol(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Tcp => "TCP",
        Protocol::Udp => "UDP",
        Protocol::Sctp => "SCTP",
    }
}

/// A temporary manifests directory, removed on drop.
pub struct ManifestsDir {
    dir: tempfile::TempDir,
    /// Set by [`ManifestsDir::write_node`]; endpoints get it as `nodeName`.
    node_name: Option<String>,
}

impl ManifestsDir {
    pub fn new() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("proxy-tests-manifests-")
            .tempdir()
            .context("creating a manifests directory")?;
        Ok(ManifestsDir {
            dir,
            node_name: None,
        })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Copies every file of `source` (e.g. `examples/manifests`) in.
    pub fn copy_from(&self, source: &Path) -> anyhow::Result<()> {
        let entries =
            std::fs::read_dir(source).with_context(|| format!("reading {}", source.display()))?;
        for entry in entries {
            let entry = entry.with_context(|| format!("reading {}", source.display()))?;
            if entry.file_type()?.is_file() {
                let bytes = std::fs::read(entry.path())
                    .with_context(|| format!("reading {}", entry.path().display()))?;
                self.write_file(&entry.file_name().to_string_lossy(), &bytes)?;
            }
        }
        Ok(())
    }

    /// Writes the Node object this agent runs as; endpoints that name no
    /// node are put on it.
    pub fn write_node(&mut self, name: &str, internal_ip: IpAddr) -> anyhow::Result<()> {
        self.write_own_node(&NodeSpec::new(name, internal_ip))
    }

    /// As [`ManifestsDir::write_node`], with all of `spec` (IPv6 address,
    /// zone label).
    pub fn write_own_node(&mut self, spec: &NodeSpec) -> anyhow::Result<()> {
        self.write_other_node(spec)?;
        self.node_name = Some(spec.name.clone());
        Ok(())
    }

    /// Writes (or rewrites) a Node object other than the agent's own (e.g.
    /// the second node); the default node of endpoints stays as it was.
    pub fn write_other_node(&self, spec: &NodeSpec) -> anyhow::Result<()> {
        self.write_object(&node_file(&spec.name), &spec.object())
    }

    /// Removes a Node's file.
    pub fn remove_node(&self, name: &str) -> anyhow::Result<()> {
        self.remove_file(&node_file(name))
    }

    /// Writes (or rewrites) the Service.
    pub fn write_service(&self, spec: &ServiceSpec) -> anyhow::Result<()> {
        self.write_object(&service_file(spec), &spec.service())
    }

    /// Writes `object` as the Service's file: a Service as [`ServiceSpec`]
    /// cannot spell it (say, with fields edited as an old object has them).
    pub fn write_service_object(&self, spec: &ServiceSpec, object: &Value) -> anyhow::Result<()> {
        self.write_object(&service_file(spec), object)
    }

    /// Writes (or rewrites) a `networking.k8s.io/v1` ServiceCIDR `name`
    /// with `cidrs` (at most one per family).
    pub fn write_service_cidr(&self, name: &str, cidrs: &[&str]) -> anyhow::Result<()> {
        let object = serde_json::json!({
            "apiVersion": "networking.k8s.io/v1",
            "kind": "ServiceCIDR",
            "metadata": { "name": name },
            "spec": { "cidrs": cidrs },
        });
        self.write_object(&format!("servicecidr-{name}.yaml"), &object)
    }

    /// Writes (or rewrites) the Service's EndpointSlice with `endpoints`.
    pub fn write_endpoint_slice(
        &self,
        spec: &ServiceSpec,
        endpoints: &[Endpoint],
    ) -> anyhow::Result<()> {
        let slice = spec.endpoint_slice(endpoints, self.node_name.as_deref());
        self.write_object(&endpoint_slice_file(spec), &slice)
    }

    /// Writes (or rewrites) the Service's EndpointSlice of each of its IP
    /// families, each listing those of `endpoints` of its family (endpoints
    /// of a family the Service does not have are an error). Endpoints
    /// naming no node are put on the node of [`ManifestsDir::write_node`].
    pub fn write_endpoint_slices(
        &self,
        spec: &ServiceSpec,
        endpoints: &[SliceEndpoint],
    ) -> anyhow::Result<()> {
        let families = spec.ip_families();
        if let Some(stray) = endpoints
            .iter()
            .find(|e| !families.contains(&IpFamily::of(e.ip)))
        {
            anyhow::bail!(
                "endpoint {} of a family Service {} does not have ({families:?})",
                stray.ip,
                spec.name
            );
        }
        for family in families {
            let of_family: Vec<SliceEndpoint> = endpoints
                .iter()
                .filter(|e| IpFamily::of(e.ip) == family)
                .cloned()
                .collect();
            let slice = spec.endpoint_slice_of(family, &of_family, self.node_name.as_deref());
            self.write_object(&endpoint_slice_file_of(spec, family), &slice)?;
        }
        Ok(())
    }

    /// Removes the Service's file (its EndpointSlices stay).
    pub fn remove_service(&self, spec: &ServiceSpec) -> anyhow::Result<()> {
        self.remove_file(&service_file(spec))
    }

    /// Removes the Service's EndpointSlice file(s): that of the primary
    /// family, and that of the secondary family if it was written.
    pub fn remove_endpoint_slice(&self, spec: &ServiceSpec) -> anyhow::Result<()> {
        self.remove_file(&endpoint_slice_file(spec))?;
        if let Some(second) = spec.secondary_cluster_ip {
            let file = endpoint_slice_file_of(spec, IpFamily::of(second));
            if self.file(&file).exists() {
                self.remove_file(&file)?;
            }
        }
        Ok(())
    }

    /// The YAML of `object`, as written.
    pub fn to_yaml(object: &Value) -> anyhow::Result<String> {
        serde_saphyr::to_string(object).context("encoding YAML")
    }

    fn write_object(&self, file_name: &str, object: &Value) -> anyhow::Result<()> {
        self.write_file(file_name, Self::to_yaml(object)?.as_bytes())
    }

    /// Writes a hidden temporary file and renames it into place, so a watcher
    /// sees either the old or the new content, never a partial file.
    pub fn write_file(&self, file_name: &str, bytes: &[u8]) -> anyhow::Result<()> {
        let path = self.file(file_name);
        let temporary = self.file(&format!(".{file_name}.tmp"));
        std::fs::write(&temporary, bytes)
            .with_context(|| format!("writing {}", temporary.display()))?;
        std::fs::rename(&temporary, &path)
            .with_context(|| format!("renaming {} to {}", temporary.display(), path.display()))
    }

    fn remove_file(&self, file_name: &str) -> anyhow::Result<()> {
        let path = self.file(file_name);
        std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))
    }

    fn file(&self, file_name: &str) -> PathBuf {
        self.dir.path().join(file_name)
    }
}

fn service_file(spec: &ServiceSpec) -> String {
    format!("service-{}-{}.yaml", spec.namespace, spec.name)
}

fn endpoint_slice_file(spec: &ServiceSpec) -> String {
    format!("endpointslice-{}-{}.yaml", spec.namespace, spec.name)
}

/// The primary family's slice keeps the single-stack file name.
fn endpoint_slice_file_of(spec: &ServiceSpec, family: IpFamily) -> String {
    if family == spec.family() {
        endpoint_slice_file(spec)
    } else {
        format!("endpointslice-{}-{}-2.yaml", spec.namespace, spec.name)
    }
}

fn node_file(name: &str) -> String {
    format!("node-{name}.yaml")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_rewrites_and_removes_objects() {
        let spec = ServiceSpec::cluster_ip("default", "echo", "198.19.0.1".parse().unwrap())
            .tcp(80, 8080)
            .udp(53, 5353);
        let mut dir = ManifestsDir::new().unwrap();
        dir.write_node("n1", "198.18.0.1".parse().unwrap()).unwrap();
        dir.write_service(&spec).unwrap();
        let one = Endpoint {
            pod: "pod-0".into(),
            ip: "198.18.1.10".parse().unwrap(),
        };
        dir.write_endpoint_slice(&spec, &[one]).unwrap();

        let read = |name: &str| -> Value {
            serde_saphyr::from_str(&std::fs::read_to_string(dir.path().join(name)).unwrap())
                .unwrap()
        };
        let slice = read("endpointslice-default-echo.yaml");
        assert_eq!(slice["endpoints"][0]["addresses"][0], "198.18.1.10");
        assert_eq!(slice["endpoints"][0]["nodeName"], "n1");
        assert_eq!(slice["ports"][1]["port"], 5353);
        assert_eq!(
            read("service-default-echo.yaml")["spec"]["ports"][0]["targetPort"],
            8080
        );

        dir.write_endpoint_slice(&spec, &[]).unwrap();
        assert_eq!(
            read("endpointslice-default-echo.yaml")["endpoints"],
            json!([])
        );

        dir.remove_service(&spec).unwrap();
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["endpointslice-default-echo.yaml", "node-n1.yaml"]);
    }

    #[test]
    fn dual_stack_node_port_service_gets_a_slice_per_family() {
        let v4: IpAddr = "198.19.0.1".parse().unwrap();
        let v6: IpAddr = "2001:2:0:ff::1".parse().unwrap();
        let spec = ServiceSpec::cluster_ip("default", "web", v6)
            .tcp(80, 8080)
            .sctp(90, 9090)
            .dual_stack(v4)
            .node_port(&[30080, 30090])
            .external_traffic_policy(TrafficPolicy::Local);
        let service = spec.service();
        assert_eq!(service["spec"]["type"], "NodePort");
        assert_eq!(service["spec"]["clusterIP"], "2001:2:0:ff::1");
        assert_eq!(
            service["spec"]["clusterIPs"],
            json!(["2001:2:0:ff::1", "198.19.0.1"])
        );
        assert_eq!(service["spec"]["ipFamilies"], json!(["IPv6", "IPv4"]));
        assert_eq!(service["spec"]["ipFamilyPolicy"], "RequireDualStack");
        assert_eq!(service["spec"]["externalTrafficPolicy"], "Local");
        assert_eq!(service["spec"]["ports"][1]["protocol"], "SCTP");
        assert_eq!(service["spec"]["ports"][1]["nodePort"], 30090);

        let mut dir = ManifestsDir::new().unwrap();
        dir.write_own_node(
            &NodeSpec::new("n1", "198.18.0.1".parse().unwrap())
                .internal_ip("2001:2::1".parse().unwrap())
                .zone("a"),
        )
        .unwrap();
        dir.write_other_node(&NodeSpec::new("n2", "198.18.0.3".parse().unwrap()).zone("b"))
            .unwrap();
        let endpoint = |ip: &str| {
            SliceEndpoint::from(Endpoint {
                pod: format!("pod-{ip}"),
                ip: ip.parse().unwrap(),
            })
        };
        dir.write_endpoint_slices(
            &spec,
            &[
                endpoint("198.18.1.10"),
                endpoint("2001:2::1:a"),
                endpoint("2001:2::1:e0").on("n2").in_zone("b"),
            ],
        )
        .unwrap();
        let read = |name: &str| -> Value {
            serde_saphyr::from_str(&std::fs::read_to_string(dir.path().join(name)).unwrap())
                .unwrap()
        };
        let primary = read("endpointslice-default-web.yaml");
        assert_eq!(primary["metadata"]["name"], "web-1");
        assert_eq!(primary["addressType"], "IPv6");
        assert_eq!(primary["endpoints"][0]["nodeName"], "n1");
        assert_eq!(primary["endpoints"][1]["addresses"][0], "2001:2::1:e0");
        assert_eq!(primary["endpoints"][1]["nodeName"], "n2");
        assert_eq!(primary["endpoints"][1]["zone"], "b");
        let secondary = read("endpointslice-default-web-2.yaml");
        assert_eq!(secondary["metadata"]["name"], "web-2");
        assert_eq!(secondary["addressType"], "IPv4");
        assert_eq!(secondary["endpoints"][0]["addresses"][0], "198.18.1.10");
        let n1 = read("node-n1.yaml");
        assert_eq!(n1["metadata"]["labels"][ZONE_LABEL], "a");
        assert_eq!(n1["status"]["addresses"][1]["address"], "2001:2::1");
        assert_eq!(read("node-n2.yaml")["metadata"]["labels"][ZONE_LABEL], "b");

        // An endpoint of a family the Service lacks is refused.
        let single = ServiceSpec::cluster_ip("default", "v4", v4).tcp(80, 8080);
        assert!(
            dir.write_endpoint_slices(&single, &[endpoint("2001:2::1:a")])
                .is_err()
        );
        dir.remove_endpoint_slice(&spec).unwrap();
        assert!(!dir.path().join("endpointslice-default-web-2.yaml").exists());
    }
}
