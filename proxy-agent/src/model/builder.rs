//! [`build_table`]: from cluster objects to the desired [`ServiceTable`].
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
};

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;

use super::{
    Backend, ClusterState, Frontend, FrontendChange, FrontendKey, FrontendKind, FrontendPolicy,
    ModelConfig, Protocol, Rejection, ServiceName, ServiceTable, TableDiff, check_service_cidr,
    objects::ObjectSet,
    service::ServiceObject,
    slice::Slice,
    validate::{
        EndpointPlan, IpFamily, NodeName, ServicePlan, ServicePortPlan, SliceCheck, ZONE_LABEL,
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
    TableBuilder::default().build(state, cfg)
}

/// Builds the tables of successive states, redoing only what a changed
/// object touches: a source's snapshots share the `Arc` of every object that
/// did not change, so a new `Arc` is a new or changed object. Its Service
/// (for an EndpointSlice, the one it names) is planned again, and only the
/// frontends that Service claims, had claimed, or contests with another are
/// looked at again. Anything every Service depends on (this node's Node
/// objects, the node name) changing plans them all again.
///
/// [`TableBuilder::update`] returns what changed since the last update, as a
/// [`TableDiff`]; the table, rejections and health checks after it are what
/// [`build_table`] gives for the same state (a property test holds it).
#[derive(Default)]
pub struct TableBuilder {
    /// The checks of the objects of the last update, by object identity.
    services: ObjectSet<ServiceObject, ()>,
    slices: ObjectSet<Slice, ()>,
    context: Context,
    /// The objects and output of each Service name that has objects or
    /// slices (boxed: the table keeps room for up to twice as many).
    by_service: HashMap<ServiceName, Box<ServiceEntry>>,
    /// Every frontend asked for and its claimants, sorted: the first holds
    /// it, as when the Services are planned in name order.
    claims: HashMap<FrontendKey, Vec<Claim>>,
    /// The rejections of the claimants that lost, per contested frontend.
    claim_rejections: HashMap<FrontendKey, Vec<Rejection>>,
    table: ServiceTable,
    /// Every current rejection, counted by its sources (an object's
    /// checks, a contested frontend, the Nodes...): the output holds each
    /// once.
    rejections: BTreeMap<Rejection, usize>,
    health_check_node_ports: BTreeMap<ServiceName, HealthCheck>,
    backend_count: usize,
    /// The EndpointSlices new, and gone, in the last update.
    slices_new: Vec<Arc<Slice>>,
    slices_gone: Vec<Arc<Slice>>,
}

/// What every Service's planning depends on, and what depends only on it.
#[derive(Default)]
struct Context {
    /// The Node and ServiceCIDR objects it was derived from, by identity.
    nodes: Vec<usize>,
    service_cidr_objects: Vec<usize>,
    node_name: String,
    zone: Option<String>,
    /// Of the Nodes and ServiceCIDRs.
    rejections: Vec<Rejection>,
    service_cidrs: Vec<IpNet>,
    /// `cfg.cluster_cidrs` it was derived with.
    cluster_cidrs: Vec<IpNet>,
    /// Where no ClusterIP is proxied: the cluster CIDRs and this node's
    /// addresses.
    reserved: Vec<Reserved>,
    /// Whether it was ever derived (the first update plans everything).
    derived: bool,
}

/// Addresses no ClusterIP may take, and what they are, for the rejection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Reserved {
    net: IpNet,
    what: String,
}

impl Reserved {
    /// The cluster CIDRs and the addresses of this node's Node objects.
    fn of(nodes: &[Arc<Node>], cfg: &ModelConfig) -> Vec<Reserved> {
        let mut reserved: Vec<Reserved> = cfg
            .cluster_cidrs
            .iter()
            .map(|net| Reserved {
                net: *net,
                what: format!("inside the cluster CIDR {net}, the pods' addresses"),
            })
            .collect();
        let own = nodes.iter().filter(|node| {
            !cfg.node_name.is_empty()
                && node.metadata.name.as_deref() == Some(cfg.node_name.as_str())
        });
        let addresses: BTreeSet<IpAddr> = own
            .flat_map(|node| {
                node.status
                    .iter()
                    .flat_map(|s| s.addresses.iter().flatten())
            })
            .filter_map(|a| a.address.parse::<IpAddr>().ok())
            .collect();
        reserved.extend(addresses.into_iter().map(|ip| Reserved {
            net: IpNet::from(ip),
            what: format!("the address of this node ({})", cfg.node_name),
        }));
        reserved
    }
}

/// One Service name's objects (normally one) and slices, and the
/// rejections its objects give.
#[derive(Default)]
struct ServiceEntry {
    /// By identity of the Service object.
    objects: Vec<(usize, Arc<ServiceObject>)>,
    /// By identity of the EndpointSlice.
    slices: Vec<(usize, Arc<Slice>)>,
    rejections: Vec<Rejection>,
    /// The frontends the Service asks for, in its fixed order.
    planned: Vec<PlannedFrontend>,
}

/// A Service asking for a frontend: the `order`-th of its planned ones.
/// Claims sort as the frontend goes: to the oldest Service, as the API
/// server's allocator would have it (a new Service never takes a live
/// one's address), then by name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Claim {
    age: Age,
    service: ServiceName,
    order: usize,
}

impl Claim {
    fn is_of(&self, service: &ServiceName, order: usize) -> bool {
        self.service == *service && self.order == order
    }
}

/// A Service's creation time, for sorting: older first, unknown last.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Age {
    Created(jiff::Timestamp),
    Unknown,
}

impl TableBuilder {
    /// The table, rejections, health checks and ServiceCIDR ranges of
    /// `state`.
    pub fn build(&mut self, state: &ClusterState, cfg: &ModelConfig) -> BuildOutput {
        self.update(state, cfg);
        BuildOutput {
            table: self.table.clone(),
            rejections: self.rejections().cloned().collect(),
            health_check_node_ports: self.health_check_node_ports.clone(),
            service_cidrs: self.context.service_cidrs.clone(),
        }
    }

    /// Brings the table to `state`, returning what changed in it since the
    /// last update (every frontend on the first).
    pub fn update(&mut self, state: &ClusterState, cfg: &ModelConfig) -> TableDiff {
        let mut dirty: BTreeSet<ServiceName> = BTreeSet::new();
        if self.update_context(state, cfg) {
            dirty.extend(self.by_service.keys().cloned());
        }
        let services = self.services.refresh(&state.services, |_| ());
        for (id, service, ()) in services.removed {
            let name = &service.name;
            if let Some(entry) = self.by_service.get_mut(name) {
                entry.objects.retain(|(object, _)| *object != id);
            }
            dirty.insert(name.clone());
        }
        for (id, service, ()) in services.added {
            dirty.insert(service.name.clone());
            let entry = self.by_service.entry(service.name.clone()).or_default();
            entry.objects.push((id, service));
        }
        let slices = self.slices.refresh(&state.endpoint_slices, |_| ());
        self.slices_new.clear();
        self.slices_gone.clear();
        for (id, slice, ()) in slices.removed {
            count_out(&mut self.rejections, slice.rejections());
            if let Some(name) = slice_service(&slice.check) {
                if let Some(entry) = self.by_service.get_mut(&name) {
                    entry.slices.retain(|(slice, _)| *slice != id);
                }
                dirty.insert(name);
            }
            self.slices_gone.push(slice);
        }
        for (id, slice, ()) in slices.added {
            count_in(&mut self.rejections, slice.rejections());
            if let Some(name) = slice_service(&slice.check) {
                self.by_service
                    .entry(name.clone())
                    .or_default()
                    .slices
                    .push((id, slice.clone()));
                dirty.insert(name);
            }
            self.slices_new.push(slice);
        }

        let mut touched: BTreeSet<FrontendKey> = BTreeSet::new();
        self.plan_services(&dirty, &mut touched);
        self.settle_claims(touched)
    }

    /// The EndpointSlices new (first) and gone (second) in the last
    /// update: a changed slice is in both, its old version gone.
    pub fn slice_changes(&self) -> (&[Arc<Slice>], &[Arc<Slice>]) {
        (&self.slices_new, &self.slices_gone)
    }

    /// The table after the last update.
    pub fn table(&self) -> &ServiceTable {
        &self.table
    }

    /// The rejections after the last update, sorted, without duplicates.
    pub fn rejections(&self) -> impl Iterator<Item = &Rejection> {
        self.rejections.keys()
    }

    pub fn health_check_node_ports(&self) -> &BTreeMap<ServiceName, HealthCheck> {
        &self.health_check_node_ports
    }

    pub fn service_cidrs(&self) -> &[IpNet] {
        &self.context.service_cidrs
    }

    /// The table's backends, counted over its frontends
    /// ([`ServiceTable::backend_count`]), without walking it.
    pub fn backend_count(&self) -> usize {
        self.backend_count
    }

    /// Derives the context again when its objects changed; true when that
    /// changes how every Service is planned.
    fn update_context(&mut self, state: &ClusterState, cfg: &ModelConfig) -> bool {
        let nodes = ids_of(&state.nodes);
        let cidrs = ids_of(&state.service_cidrs);
        let ctx = &self.context;
        if ctx.derived
            && ctx.nodes == nodes
            && ctx.service_cidr_objects == cidrs
            && ctx.node_name == cfg.node_name
            && ctx.cluster_cidrs == cfg.cluster_cidrs
        {
            return false;
        }
        let mut rejections: Vec<Rejection> =
            state.nodes.iter().flat_map(|n| validate_node(n)).collect();
        let service_cidrs = service_cidrs(state, &mut rejections);
        let zone = node_zone(&state.nodes, cfg, &mut rejections);
        count_out(&mut self.rejections, &self.context.rejections);
        count_in(&mut self.rejections, &rejections);
        let reserved = Reserved::of(&state.nodes, cfg);
        let replan = !self.context.derived
            || self.context.node_name != cfg.node_name
            || self.context.zone != zone
            || self.context.reserved != reserved;
        self.context = Context {
            nodes,
            service_cidr_objects: cidrs,
            node_name: cfg.node_name.clone(),
            zone,
            rejections,
            service_cidrs,
            cluster_cidrs: cfg.cluster_cidrs.clone(),
            reserved,
            derived: true,
        };
        replan
    }

    /// Plans the Services `dirty` again from their objects and slices: their
    /// rejections, health checks and claims (the frontends whose claims
    /// changed are added to `touched`). Planning a Service reads only its
    /// own entry, so a large update (every Service, at start) plans on
    /// every core, then records the plans one by one.
    fn plan_services(
        &mut self,
        dirty: &BTreeSet<ServiceName>,
        touched: &mut BTreeSet<FrontendKey>,
    ) {
        let place = Place {
            node_name: &self.context.node_name,
            node: NodeName::find(&self.context.node_name),
            zone: self.context.zone.as_deref(),
            reserved: &self.context.reserved,
        };
        let by_service = &self.by_service;
        let plan_one = |name: &ServiceName| {
            by_service
                .get(name)
                .map(|entry| plan_entry(name, entry, place))
        };
        let names: Vec<&ServiceName> = dirty.iter().collect();
        // Asked only for a large update: the answer comes from reading the
        // process's cgroup files, which costs more than planning a Service.
        let threads = if names.len() < PARALLEL_PLANNING_MIN {
            1
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
        };
        // In the order of `names`.
        let planned: Vec<Option<ServicePlanned>> = if threads < 2 {
            names.iter().map(|name| plan_one(name)).collect()
        } else {
            let chunk = names.len().div_ceil(threads);
            std::thread::scope(|scope| {
                let workers: Vec<_> = names
                    .chunks(chunk)
                    .map(|part| {
                        scope.spawn(|| part.iter().map(|name| plan_one(name)).collect::<Vec<_>>())
                    })
                    .collect();
                workers
                    .into_iter()
                    .flat_map(|worker| {
                        worker
                            .join()
                            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
                    })
                    .collect()
            })
        };
        let plans: Vec<(ServiceName, ServicePlanned)> = names
            .into_iter()
            .zip(planned)
            .filter_map(|(name, plan)| Some((name.clone(), plan?)))
            .collect();
        for (name, plan) in plans {
            self.record_plan(&name, plan, touched);
        }
    }

    /// Replaces the plan of the Service `name` (which has an entry) with
    /// `plan`.
    fn record_plan(
        &mut self,
        name: &ServiceName,
        plan: ServicePlanned,
        touched: &mut BTreeSet<FrontendKey>,
    ) {
        let Some(entry) = self.by_service.get_mut(name) else {
            return;
        };
        count_out(&mut self.rejections, &entry.rejections);
        for (order, old) in entry.planned.iter().enumerate() {
            if let Some(claims) = self.claims.get_mut(&old.key) {
                claims.retain(|c| !c.is_of(name, order));
            }
            touched.insert(old.key);
        }
        let age = entry
            .objects
            .iter()
            .filter_map(|(_, object)| object.created)
            .min()
            .map_or(Age::Unknown, Age::Created);
        entry.planned = plan.frontends;
        match plan.health_check {
            Some(check) => {
                self.health_check_node_ports.insert(name.clone(), check);
            }
            None => {
                self.health_check_node_ports.remove(name);
            }
        }
        count_in(&mut self.rejections, &plan.rejections);
        entry.rejections = plan.rejections;
        for (order, planned) in entry.planned.iter().enumerate() {
            let claim = Claim {
                age,
                service: name.clone(),
                order,
            };
            // Most frontends have one claimant: room for one.
            let claims = self
                .claims
                .entry(planned.key)
                .or_insert_with(|| Vec::with_capacity(1));
            let at = claims.partition_point(|c| *c < claim);
            claims.insert(at, claim);
            touched.insert(planned.key);
        }
        if entry.objects.is_empty() && entry.slices.is_empty() {
            self.by_service.remove(name);
        }
    }

    /// Gives each of `touched` to its first claimant (or removes it), and
    /// rejects the others; returns what that changed in the table.
    fn settle_claims(&mut self, touched: BTreeSet<FrontendKey>) -> TableDiff {
        let mut diff = TableDiff::default();
        for key in touched {
            let old_rejections = self.claim_rejections.remove(&key).unwrap_or_default();
            count_out(&mut self.rejections, &old_rejections);
            let claims = match self.claims.get(&key) {
                Some(claims) if !claims.is_empty() => claims,
                _ => {
                    self.claims.remove(&key);
                    if let Some(old) = self.table.remove(&key) {
                        self.backend_count -= old.backends.len();
                        diff.removed.push((key, old));
                    }
                    continue;
                }
            };
            let planned_of = |claim: &Claim| {
                self.by_service
                    .get(&claim.service)
                    .and_then(|entry| entry.planned.get(claim.order))
            };
            let Some(winner) = planned_of(&claims[0]) else {
                continue;
            };
            let rejections: Vec<Rejection> = claims[1..]
                .iter()
                .filter_map(|claim| Some((claim, planned_of(claim)?)))
                .map(|(claim, planned)| Rejection {
                    kind: "Service",
                    namespace: claim.service.namespace.to_string(),
                    name: claim.service.name.to_string(),
                    reason: format!(
                        "{}: {}/{} is already claimed by Service {}",
                        planned.field,
                        SocketAddr::new(key.ip, key.port),
                        key.protocol,
                        claims[0].service
                    ),
                })
                .collect();
            // Planned backends come sorted and without duplicates, as the
            // table keeps them.
            let new = winner.frontend.clone();
            count_in(&mut self.rejections, &rejections);
            if !rejections.is_empty() {
                self.claim_rejections.insert(key, rejections);
            }
            self.backend_count += new.backends.len();
            match self.table.insert_shared(key, new.clone()) {
                None => diff.added.push((key, new)),
                Some(old) => {
                    self.backend_count -= old.backends.len();
                    if old != new {
                        diff.changed.push(FrontendChange { key, old, new });
                    }
                }
            }
        }
        diff
    }
}

fn ids_of<K>(objects: &[Arc<K>]) -> Vec<usize> {
    let mut ids: Vec<usize> = objects.iter().map(|o| Arc::as_ptr(o) as usize).collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

fn count_in(counts: &mut BTreeMap<Rejection, usize>, rejections: &[Rejection]) {
    for rejection in rejections {
        *counts.entry(rejection.clone()).or_default() += 1;
    }
}

fn count_out(counts: &mut BTreeMap<Rejection, usize>, rejections: &[Rejection]) {
    for rejection in rejections {
        if let Some(count) = counts.get_mut(rejection) {
            *count -= 1;
            if *count == 0 {
                counts.remove(rejection);
            }
        }
    }
}

/// The Service whose endpoints a usable slice holds.
pub(super) fn slice_service(check: &SliceCheck) -> Option<ServiceName> {
    let plan = check.plan.as_ref()?;
    Some(ServiceName::new(
        &plan.namespace,
        plan.service_name.as_deref()?,
    ))
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

/// Below this many Services to plan, one thread plans them (starting
/// threads costs more than it saves).
const PARALLEL_PLANNING_MIN: usize = 1024;

/// What planning one Service gives: its frontends in their fixed order,
/// its health check, and the rejections of its objects.
struct ServicePlanned {
    frontends: Vec<PlannedFrontend>,
    health_check: Option<HealthCheck>,
    rejections: Vec<Rejection>,
}

/// Plans the Service `name` from its objects and slices (pure: reads only
/// `entry`).
fn plan_entry(name: &ServiceName, entry: &ServiceEntry, place: Place<'_>) -> ServicePlanned {
    let mut rejections = Vec::new();
    let plan = service_plan(name, &entry.objects, &mut rejections);
    let endpoints = index_endpoints(name, &entry.slices, place);
    // A ClusterIP in a pod range or on the node would capture their own
    // traffic: refused, the Service's other addresses still proxied.
    let mut refused: Vec<IpAddr> = Vec::new();
    for (i, ip) in plan
        .iter()
        .flat_map(|plan| plan.cluster_ips.iter().enumerate())
    {
        if let Some(reserved) = place.reserved.iter().find(|r| r.net.contains(ip)) {
            refused.push(*ip);
            rejections.push(Rejection {
                kind: "Service",
                namespace: name.namespace.to_string(),
                name: name.name.to_string(),
                reason: format!(
                    "spec.clusterIPs[{i}]: {ip} is {}; not proxied on it",
                    reserved.what
                ),
            });
        }
    }
    let mut frontends = plan
        .map(|plan| plan_frontends(plan, &endpoints, &refused))
        .unwrap_or_default();
    // Kept until the Service changes: no spare room.
    frontends.shrink_to_fit();
    let health_check = plan
        .and_then(|plan| plan.health_check_node_port)
        .map(|port| {
            let local: BTreeSet<IpAddr> = endpoints
                .values()
                .flatten()
                .filter(|entry| entry.local && entry.ready)
                .map(|entry| entry.backend.ip)
                .collect();
            let v4 = local.iter().filter(|ip| ip.is_ipv4()).count();
            HealthCheck {
                port,
                local_endpoints: v4.max(local.len() - v4),
            }
        });
    ServicePlanned {
        frontends,
        health_check,
        rejections,
    }
}

/// A frontend a Service asks for, and the spec field it comes from.
struct PlannedFrontend {
    field: FrontendField,
    key: FrontendKey,
    /// Shared with the table (and the diffs and dataplanes after it) while
    /// the Service does not change.
    frontend: Arc<Frontend>,
}

/// Every frontend of a valid Service, in a fixed order: per cluster IP and
/// port the ClusterIP frontend, then NodePort, externalIPs and load balancer
/// addresses.
fn plan_frontends(
    plan: &ServicePlan,
    endpoints: &BTreeMap<BackendGroup, BTreeSet<EndpointEntry>>,
    refused: &[IpAddr],
) -> Vec<PlannedFrontend> {
    let mut planned = Vec::new();
    for &cluster_ip in plan.cluster_ips.iter().filter(|ip| !refused.contains(ip)) {
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
                let frontend = Arc::new(frontend_of(plan, port, entries, kind));
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

/// The spec field that asks for a frontend, for messages (written out
/// only for a message: every frontend keeps one).
#[derive(Clone, Copy, Debug)]
enum FrontendField {
    /// `spec.ports[port]`.
    Port { port: usize },
    /// `spec.ports[port].nodePort`.
    NodePort { port: usize },
    /// `spec.externalIPs[at]` of `spec.ports[port]`.
    ExternalIp { at: usize, port: usize },
    /// `status.loadBalancer.ingress[at].ip` of `spec.ports[port]`.
    LoadBalancer { at: usize, port: usize },
}

impl std::fmt::Display for FrontendField {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrontendField::Port { port } => write!(f, "spec.ports[{port}]"),
            FrontendField::NodePort { port } => write!(f, "spec.ports[{port}].nodePort"),
            FrontendField::ExternalIp { at, port } => {
                write!(f, "spec.externalIPs[{at}] (spec.ports[{port}])")
            }
            FrontendField::LoadBalancer { at, port } => {
                write!(
                    f,
                    "status.loadBalancer.ingress[{at}].ip (spec.ports[{port}])"
                )
            }
        }
    }
}

/// Where one port of a Service is reached from `cluster_ip`'s family: the
/// field that asks for it (for messages), address, port and kind.
fn frontend_addresses(
    plan: &ServicePlan,
    cluster_ip: IpAddr,
    port: &ServicePortPlan,
) -> Vec<(FrontendField, IpAddr, u16, FrontendKind)> {
    let family = IpFamily::of(cluster_ip);
    let index = port.index;
    let mut out = vec![(
        FrontendField::Port { port: index },
        cluster_ip,
        port.port,
        FrontendKind::ClusterIp,
    )];
    if let Some(node_port) = port.node_port {
        let any = match family {
            IpFamily::V4 => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpFamily::V6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        };
        let field = FrontendField::NodePort { port: index };
        out.push((field, any, node_port, FrontendKind::NodePort));
    }
    let of_family = |list: &[(usize, IpAddr)]| -> Vec<(usize, IpAddr)> {
        list.iter()
            .copied()
            .filter(|(_, ip)| IpFamily::of(*ip) == family)
            .collect()
    };
    for (i, ip) in of_family(&plan.external_ips) {
        let field = FrontendField::ExternalIp { at: i, port: index };
        out.push((field, ip, port.port, FrontendKind::ExternalIp));
    }
    for (i, ip) in of_family(&plan.load_balancer_ips) {
        let field = FrontendField::LoadBalancer { at: i, port: index };
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
pub(super) enum TopologyScope {
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
    pub(super) fn of<'a>(ready: impl Iterator<Item = &'a EndpointEntry> + Clone) -> TopologyScope {
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

    pub(super) fn admits(self, entry: &EndpointEntry) -> bool {
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
pub(super) struct BackendGroup {
    pub(super) service: ServiceName,
    pub(super) family: IpFamily,
    pub(super) port_name: String,
    pub(super) protocol: Protocol,
}

/// An endpoint address and port with what decides whether it gets traffic.
/// Kept as a set, so that one endpoint listed in several slices (even with
/// differing conditions or hints) gives the same result in any order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct EndpointEntry {
    pub(super) backend: Backend,
    pub(super) ready: bool,
    pub(super) serving_terminating: bool,
    /// On the node this agent runs on.
    pub(super) local: bool,
    /// `hints.forZones` against this node's zone.
    pub(super) zone_hint: Hint,
    /// `hints.forNodes` against this node.
    pub(super) node_hint: Hint,
}

/// What an endpoint's hints of one kind (zones or nodes) say about this
/// node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Hint {
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
pub(super) struct Place<'a> {
    /// "" when unknown.
    pub(super) node_name: &'a str,
    /// `node_name` as endpoints name it (`None`: none does).
    pub(super) node: Option<NodeName>,
    /// The `topology.kubernetes.io/zone` label of this node's Node object.
    pub(super) zone: Option<&'a str>,
    /// Where no ClusterIP is proxied.
    pub(super) reserved: &'a [Reserved],
}

impl Place<'_> {
    fn entry(&self, endpoint: &EndpointPlan, backend: Backend) -> EndpointEntry {
        let node_name = Some(self.node_name).filter(|name| !name.is_empty());
        EndpointEntry {
            backend,
            ready: endpoint.ready,
            serving_terminating: endpoint.serving_terminating,
            local: self.node.is_some() && endpoint.node_name == self.node,
            zone_hint: Hint::of(endpoint.zone_hints(), self.zone),
            node_hint: Hint::of(endpoint.node_hints(), node_name),
        }
    }
}

/// The zone of this node: the `topology.kubernetes.io/zone` label of the
/// Node named in `cfg` (absent or empty: no zone, as for kube-proxy). Copies
/// of that Node that disagree on it are reported and give no zone, so the
/// result does not depend on their order.
pub(super) fn node_zone(
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

/// The usable endpoints of one Service's slices, merged per group.
pub(super) fn index_endpoints(
    service: &ServiceName,
    slices: &[(usize, Arc<Slice>)],
    place: Place<'_>,
) -> BTreeMap<BackendGroup, BTreeSet<EndpointEntry>> {
    let mut groups: BTreeMap<BackendGroup, BTreeSet<EndpointEntry>> = BTreeMap::new();
    for (_, slice) in slices {
        let Some(plan) = &slice.check.plan else {
            continue;
        };
        for port in &plan.ports {
            let group = groups
                .entry(BackendGroup {
                    service: service.clone(),
                    family: plan.family,
                    port_name: port.name.clone(),
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

/// The plan of the Service `name`, from its objects (normally one); its
/// rejections go to `rejections`.
///
/// Differing objects with one namespace/name (two manifest files defining
/// the same Service, say) are all rejected: picking one would make the table
/// depend on input order. Identical copies count as one.
fn service_plan<'a>(
    name: &ServiceName,
    objects: &'a [(usize, Arc<ServiceObject>)],
    rejections: &mut Vec<Rejection>,
) -> Option<&'a ServicePlan> {
    let ((_, first), others) = objects.split_first()?;
    // Copies are identical when they proxy the same: fields nothing here
    // reads may differ.
    let identical = others
        .iter()
        .all(|(_, other)| Arc::ptr_eq(other, first) || other.check == first.check);
    // Nameless objects are all rejected by the check; they are not copies
    // of each other.
    if !identical && !name.name.is_empty() {
        rejections.push(Rejection {
            kind: "Service",
            namespace: name.namespace.to_string(),
            name: name.name.to_string(),
            reason: format!(
                "metadata.name: {} Service objects share this namespace/name and differ; \
                 all are ignored",
                objects.len()
            ),
        });
    }
    if !identical {
        // Still report each copy's own problems.
        for (_, other) in objects {
            rejections.extend(other.rejections().iter().cloned());
        }
        return None;
    }
    rejections.extend(first.rejections().iter().cloned());
    first.check.plan.as_ref()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::api::{
        core::v1::{LoadBalancerIngress, Service, ServicePort, ServiceSpec},
        discovery::v1::{Endpoint, EndpointPort, EndpointSlice},
    };

    use super::super::test_support::*;
    use super::super::validate::{TOPOLOGY_AWARE_HINTS_ANNOTATION, TOPOLOGY_MODE_ANNOTATION};
    use super::*;
    use Want::{Backends, Frontends, Health};

    #[test]
    fn planning_on_several_threads_gives_what_planning_one_by_one_gives() {
        // More Services than PARALLEL_PLANNING_MIN; every 97th takes the
        // address of the one before (a contested frontend, one rejection).
        let n = PARALLEL_PLANNING_MIN + 500;
        let address = |i: usize| {
            let i = if i.is_multiple_of(97) && i > 0 {
                i - 1
            } else {
                i
            };
            format!("10.96.{}.{}", i / 250, i % 250 + 1)
        };
        let services: Vec<Service> = (0..n)
            .map(|i| simple_service("ns", &format!("s{i}"), &address(i), 80))
            .collect();
        let slices: Vec<EndpointSlice> = (0..n)
            .map(|i| {
                let a = format!("10.1.{}.{}", i / 250, i % 250 + 1);
                let b = format!("10.2.{}.{}", i / 250, i % 250 + 1);
                simple_slice("ns", &format!("s{i}-x"), &format!("s{i}"), 8080, &[&a, &b])
            })
            .collect();
        let all = state(services.clone(), slices.clone());
        let mut at_once = TableBuilder::default();
        let diff = at_once.update(&all, &config());
        // The same state reached in two updates, each under the threshold.
        let half = n / 2;
        let first = state(services[..half].to_vec(), slices[..half].to_vec());
        let mut in_steps = TableBuilder::default();
        in_steps.update(&first, &config());
        in_steps.update(&all, &config());
        assert_eq!(at_once.table().len(), n - n / 97);
        assert_eq!(at_once.table(), in_steps.table());
        assert_eq!(
            at_once.rejections().collect::<Vec<_>>(),
            in_steps.rejections().collect::<Vec<_>>()
        );
        assert_eq!(at_once.rejections().count(), n / 97);
        assert_eq!(&apply(&ServiceTable::new(), &diff), at_once.table());
    }

    /// One row: a cluster state, this agent's config, and what building them
    /// gives. Every row is also built with each list reversed, and with all
    /// three reversed, which must give the same output; and its rejections
    /// must come sorted.
    struct Case {
        name: &'static str,
        config: ModelConfig,
        nodes: Vec<Node>,
        services: Vec<Service>,
        slices: Vec<EndpointSlice>,
        /// Every rejection, as `reasons` spells them.
        reasons: &'static [&'static str],
        want: Want,
    }

    /// What a row expects besides its rejections (and no ServiceCIDR ranges).
    enum Want {
        /// Every frontend, as `render` spells them, and no health check.
        Frontends(&'static [&'static str]),
        /// The backends (on port 8080) of every frontend, of which
        /// 10.0.0.1:80/TCP is one, and no health check.
        Backends(&'static [&'static str]),
        /// Every health check node port, as `render_health` spells them.
        Health(&'static [&'static str]),
    }

    impl Case {
        /// On node-a, without objects; expects nothing at all until told.
        fn new(name: &'static str) -> Case {
            Case {
                name,
                config: config(),
                nodes: vec![],
                services: vec![],
                slices: vec![],
                reasons: &[],
                want: Frontends(&[]),
            }
        }

        fn cluster_cidrs(mut self, cidrs: &[&str]) -> Case {
            self.config.cluster_cidrs = cidrs.iter().map(|c| c.parse().expect("a CIDR")).collect();
            self
        }

        fn no_node_name(self) -> Case {
            let config = ModelConfig::default();
            Case { config, ..self }
        }

        fn nodes(self, nodes: impl IntoIterator<Item = Node>) -> Case {
            let nodes = nodes.into_iter().collect();
            Case { nodes, ..self }
        }

        fn services(self, services: impl IntoIterator<Item = Service>) -> Case {
            let services = services.into_iter().collect();
            Case { services, ..self }
        }

        fn slices(self, slices: impl IntoIterator<Item = EndpointSlice>) -> Case {
            let slices = slices.into_iter().collect();
            Case { slices, ..self }
        }

        fn reasons(self, reasons: &'static [&'static str]) -> Case {
            Case { reasons, ..self }
        }

        fn frontends(self, want: &'static [&'static str]) -> Case {
            let want = Frontends(want);
            Case { want, ..self }
        }

        fn backends(self, want: &'static [&'static str]) -> Case {
            let want = Backends(want);
            Case { want, ..self }
        }

        fn health(self, want: &'static [&'static str]) -> Case {
            let want = Health(want);
            Case { want, ..self }
        }
    }

    fn run(cases: Vec<Case>) {
        for case in cases {
            let name = case.name;
            let build = |nodes, services, slices| {
                build_table(&ClusterState::new(services, slices, nodes), &case.config)
            };
            let output = build(
                case.nodes.clone(),
                case.services.clone(),
                case.slices.clone(),
            );
            // Which of nodes, services and slices to reverse.
            for flips in [
                [true, false, false],
                [false, true, false],
                [false, false, true],
                [true, true, true],
            ] {
                let again = build(
                    reversed_if(flips[0], &case.nodes),
                    reversed_if(flips[1], &case.services),
                    reversed_if(flips[2], &case.slices),
                );
                assert_eq!(again, output, "{name}: reversed {flips:?}");
            }
            assert!(output.rejections.is_sorted(), "{name}");
            assert_eq!(reasons(&output), case.reasons, "{name}");
            assert!(output.service_cidrs.is_empty(), "{name}");
            match case.want {
                Frontends(want) => assert_eq!(render(&output), want, "{name}"),
                Backends(want) => {
                    let want: Vec<Backend> = want.iter().map(|a| backend(a, 8080)).collect();
                    assert!(output.table.get(&key("10.0.0.1", 80)).is_some(), "{name}");
                    for (frontend, found) in output.table.iter() {
                        assert_eq!(found.backends, want, "{name}: {frontend:?}");
                    }
                }
                Health(want) => assert_eq!(render_health(&output), want, "{name}"),
            }
            if !matches!(case.want, Health(_)) {
                assert!(output.health_check_node_ports.is_empty(), "{name}");
            }
        }
    }

    fn reasons(output: &BuildOutput) -> Vec<String> {
        output
            .rejections
            .iter()
            .map(|r| format!("{} {}/{}: {}", r.kind, r.namespace, r.name, r.reason))
            .collect()
    }

    /// Each frontend on one line: `address/protocol Kind namespace/name`,
    /// then what is set of `:port-name`, `local`, `affinity Ns`, `from`
    /// source ranges, `-> backends` and `; cluster -> backends`.
    fn render(output: &BuildOutput) -> Vec<String> {
        fn join<T: ToString>(items: impl Iterator<Item = T>) -> String {
            let items: Vec<String> = items.map(|item| item.to_string()).collect();
            items.join(", ")
        }
        let backends = |list: &[Backend]| join(list.iter().map(|b| SocketAddr::new(b.ip, b.port)));
        let render = |key: &FrontendKey, f: &Frontend| {
            let address = SocketAddr::new(key.ip, key.port);
            let mut line = format!("{address}/{} {:?} {}", key.protocol, f.kind, f.service);
            if !f.port_name.is_empty() {
                line += &format!(":{}", f.port_name);
            }
            if f.policy.local_only {
                line += " local";
            }
            if let Some(secs) = f.policy.affinity_timeout_secs {
                line += &format!(" affinity {secs}s");
            }
            if !f.policy.source_ranges.is_empty() {
                line += &format!(" from {}", join(f.policy.source_ranges.iter()));
            }
            if !f.backends.is_empty() {
                line += &format!(" -> {}", backends(&f.backends));
            }
            if !f.cluster_backends.is_empty() {
                line += &format!("; cluster -> {}", backends(&f.cluster_backends));
            }
            line
        };
        output.table.iter().map(|(k, f)| render(k, f)).collect()
    }

    fn render_health(output: &BuildOutput) -> Vec<String> {
        let checks = output.health_check_node_ports.iter();
        let render = |(name, check): (&ServiceName, &HealthCheck)| {
            format!(
                "{name}: port {}, {} local",
                check.port, check.local_endpoints
            )
        };
        checks.map(render).collect()
    }

    fn reversed_if<T: Clone>(reverse: bool, list: &[T]) -> Vec<T> {
        let mut list = list.to_vec();
        if reverse {
            list.reverse();
        }
        list
    }

    /// `svc` with `edit` applied to its spec.
    fn with(mut svc: Service, edit: impl FnOnce(&mut ServiceSpec)) -> Service {
        edit(spec_mut(&mut svc));
        svc
    }

    fn with_ingress(mut svc: Service, ingress: Vec<LoadBalancerIngress>) -> Service {
        set_ingress(&mut svc, ingress);
        svc
    }

    fn list(items: &[&str]) -> Option<Vec<String>> {
        Some(items.iter().map(|item| (*item).to_owned()).collect())
    }

    /// ns/web: 10.0.0.1, one unnamed TCP port, 80.
    /// Node `name` with InternalIP `address`.
    fn node_with_address(name: &str, address: &str) -> Node {
        let mut node = node(name);
        node.status = Some(k8s_openapi::api::core::v1::NodeStatus {
            addresses: Some(vec![k8s_openapi::api::core::v1::NodeAddress {
                address: address.into(),
                type_: "InternalIP".into(),
            }]),
            ..Default::default()
        });
        node
    }

    /// `service` with `metadata.creationTimestamp` `at` (RFC 3339).
    fn created(mut service: Service, at: &str) -> Service {
        service.metadata.creation_timestamp = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(at.parse().expect("a timestamp")),
        );
        service
    }

    fn web() -> Service {
        simple_service("ns", "web", "10.0.0.1", 80)
    }

    /// ns/web at 10.0.0.1 with `ports`.
    fn web_ports(ports: &[ServicePort]) -> Service {
        service("ns", "web", &["10.0.0.1"], ports)
    }

    /// `web()` of `type_`, with node port 30080.
    fn typed(type_: &str) -> Service {
        typed_service("ns", "web", type_, "10.0.0.1", 80, 30080)
    }

    /// An IPv4 slice of ns/web.
    fn ipv4_slice(name: &str, ports: &[EndpointPort], endpoints: &[Endpoint]) -> EndpointSlice {
        slice("ns", name, "web", "IPv4", ports, endpoints)
    }

    /// An IPv4 slice of ns/web with one unnamed TCP port, 8080.
    fn web_slice_named(name: &str, endpoints: &[Endpoint]) -> EndpointSlice {
        ipv4_slice(name, &[slice_port("", 8080, "")], endpoints)
    }

    fn web_slice(endpoints: &[Endpoint]) -> EndpointSlice {
        web_slice_named("web-1", endpoints)
    }

    fn web_v6_slice() -> EndpointSlice {
        let port = [slice_port("", 8080, "")];
        slice("ns", "web-v6", "web", "IPv6", &port, &[endpoint("fd01::1")])
    }

    /// `web()`'s frontend, without backends and with 10.1.0.1:8080.
    const WEB: &str = "10.0.0.1:80/TCP ClusterIp ns/web";
    const WEB_1: &str = "10.0.0.1:80/TCP ClusterIp ns/web -> 10.1.0.1:8080";

    /// Nodes for this agent on node-a, in zone-1.
    fn zone_1() -> Vec<Node> {
        vec![
            node_in_zone("node-a", "zone-1"),
            node_in_zone("node-b", "zone-2"),
        ]
    }

    /// A NodePort Service (Cluster policies) with `trafficDistribution`.
    fn distributed(distribution: &str) -> Service {
        with(typed("NodePort"), |s| {
            s.traffic_distribution = Some(distribution.into())
        })
    }

    fn annotated(annotations: &[(&str, &str)]) -> Service {
        let mut svc = web();
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

    /// 10.1.0.1 and 10.1.0.3 are meant for zone-1, 10.1.0.2 for zone-2.
    fn hinted() -> Vec<Endpoint> {
        vec![
            ready_in("10.1.0.1", &["zone-1"]),
            ready_in("10.1.0.2", &["zone-2"]),
            ready_in("10.1.0.3", &["zone-3", "zone-1"]),
        ]
    }

    /// One slice of the `hinted` endpoints and `extra`.
    fn hinted_plus(extra: &[Endpoint]) -> [EndpointSlice; 1] {
        [web_slice(&[hinted(), extra.to_vec()].concat())]
    }

    const ALL: &[&str] = &["10.1.0.1", "10.1.0.2", "10.1.0.3"];
    const SAME_ZONE: &[&str] = &["10.1.0.1", "10.1.0.3"];

    /// On node-a in zone-1 (`zone_1`): a PreferClose NodePort Service with
    /// the `hinted` endpoints.
    fn on_zone_1(name: &'static str) -> Case {
        Case::new(name)
            .nodes(zone_1())
            .services([distributed("PreferClose")])
            .slices([web_slice(&hinted())])
    }

    /// Which frontends Services get; and the Services left alone on purpose,
    /// as kube-proxy leaves them, and not rejected either.
    #[test]
    fn frontends_of_services() {
        run(vec![
            Case::new("empty state, no node name").no_node_name(),
            Case::new("one ClusterIP frontend per port")
                .services([web_ports(&[
                    service_port("http", 80, "TCP"),
                    service_port("dns", 53, "UDP"),
                    service_port("sig", 9000, "SCTP"),
                ])])
                .frontends(&[
                    "10.0.0.1:53/UDP ClusterIp ns/web:dns",
                    "10.0.0.1:80/TCP ClusterIp ns/web:http",
                    "10.0.0.1:9000/SCTP ClusterIp ns/web:sig",
                ]),
            Case::new("an absent protocol is TCP")
                .services([web()])
                .frontends(&[WEB]),
            Case::new("dual-stack: one frontend per cluster IP")
                .services([with(
                    service(
                        "ns",
                        "web",
                        &["10.0.0.1", "fd00::1"],
                        &[service_port("", 80, "TCP")],
                    ),
                    |s| s.ip_families = list(&["IPv4", "IPv6"]),
                )])
                .frontends(&[WEB, "[fd00::1]:80/TCP ClusterIp ns/web"]),
            Case::new("clusterIP is used when clusterIPs is absent")
                .services([with(web(), |s| s.cluster_ips = None)])
                .frontends(&[WEB]),
            Case::new("clusterIP is used when clusterIPs is empty")
                .services([with(web(), |s| s.cluster_ips = Some(vec![]))])
                .frontends(&[WEB]),
            Case::new("left alone: headless")
                .services([simple_service("ns", "headless", "None", 80)])
                .slices([simple_slice(
                    "ns",
                    "headless-1",
                    "headless",
                    8080,
                    &["10.1.0.1"],
                )]),
            Case::new("left alone: ExternalName").services([with(
                simple_service("ns", "ext", "10.0.0.1", 80),
                |s| {
                    s.type_ = Some("ExternalName".into());
                    s.external_name = Some("example.com".into());
                },
            )]),
            Case::new("left alone: no spec, an empty spec, no cluster IP allocated yet").services(
                [
                    Service {
                        spec: None,
                        ..simple_service("ns", "a", "10.0.0.1", 80)
                    },
                    Service {
                        spec: Some(ServiceSpec::default()),
                        ..simple_service("ns", "b", "10.0.0.1", 80)
                    },
                    simple_service("ns", "c", "", 80),
                ],
            ),
            // Even a broken one: its owner judges it.
            Case::new("left alone: another proxy's").services([{
                let mut svc = simple_service("ns", "other", "not-an-ip", 80);
                svc.metadata.labels = Some(BTreeMap::from([(
                    "service.kubernetes.io/service-proxy-name".into(),
                    String::new(),
                )]));
                svc
            }]),
            Case::new("NodePort: a node port frontend per family")
                .services([with(
                    service(
                        "ns",
                        "web",
                        &["10.0.0.1", "fd00::1"],
                        &[with_node_port(service_port("", 80, ""), 30080)],
                    ),
                    |s| s.type_ = Some("NodePort".into()),
                )])
                .slices([web_slice(&[endpoint("10.1.0.1")]), web_v6_slice()])
                .frontends(&[
                    "0.0.0.0:30080/TCP NodePort ns/web -> 10.1.0.1:8080",
                    WEB_1,
                    "[::]:30080/TCP NodePort ns/web -> [fd01::1]:8080",
                    "[fd00::1]:80/TCP ClusterIp ns/web -> [fd01::1]:8080",
                ]),
            Case::new("no node port frontend for a ClusterIP Service or an unallocated one")
                .services([
                    with(
                        typed_service("ns", "a", "ClusterIP", "10.0.0.1", 80, 30080),
                        |s| s.type_ = None,
                    ),
                    with(
                        typed_service("ns", "b", "LoadBalancer", "10.0.0.2", 80, 0),
                        |s| {
                            s.allocate_load_balancer_node_ports = Some(false);
                            s.ports = Some(vec![service_port("", 80, "")]);
                        },
                    ),
                ])
                .frontends(&[
                    "10.0.0.1:80/TCP ClusterIp ns/a",
                    "10.0.0.2:80/TCP ClusterIp ns/b",
                ]),
            Case::new("externalIPs get frontends and bad ones are rejected alone")
                .services([with(web(), |s| {
                    s.external_ips =
                        list(&["192.0.2.1", "2001:db8::1", "nope", "0.0.0.0", "192.0.2.2"])
                })])
                .slices([web_slice(&[endpoint("10.1.0.1")])])
                .reasons(&[
                    "Service ns/web: spec.externalIPs[1]: \"2001:db8::1\" is IPv6, which is not a \
                     family of the Service's cluster IPs",
                    "Service ns/web: spec.externalIPs[2]: \"nope\" is not an IP address",
                    "Service ns/web: spec.externalIPs[3]: \"0.0.0.0\" is the unspecified address",
                ])
                .frontends(&[
                    WEB_1,
                    "192.0.2.1:80/TCP ExternalIp ns/web -> 10.1.0.1:8080",
                    "192.0.2.2:80/TCP ExternalIp ns/web -> 10.1.0.1:8080",
                ]),
            Case::new("load balancer ingress IPs get frontends like kube-proxy")
                .services([with_ingress(
                    typed("LoadBalancer"),
                    vec![
                        lb_ingress("192.0.2.10", "", ""),
                        lb_ingress("", "lb.example.com", ""),
                        lb_ingress("192.0.2.11", "", "Proxy"),
                        lb_ingress("192.0.2.12", "", "VIP"),
                        lb_ingress("192.0.2.300", "", ""),
                        lb_ingress("fd02::1", "", ""),
                    ],
                )])
                .slices([web_slice(&[endpoint("10.1.0.1")])])
                .reasons(&[
                    "Service ns/web: status.loadBalancer.ingress[4].ip: \"192.0.2.300\" is not an \
                     IP address",
                    "Service ns/web: status.loadBalancer.ingress[5].ip: \"fd02::1\" is IPv6, which \
                     is not a family of the Service's cluster IPs",
                ])
                .frontends(&[
                    "0.0.0.0:30080/TCP NodePort ns/web -> 10.1.0.1:8080",
                    WEB_1,
                    "192.0.2.10:80/TCP LoadBalancer ns/web -> 10.1.0.1:8080",
                    "192.0.2.12:80/TCP LoadBalancer ns/web -> 10.1.0.1:8080",
                ]),
            Case::new("load balancer status of other types is ignored")
                .services([with_ingress(web(), vec![lb_ingress("192.0.2.10", "", "")])])
                .frontends(&[WEB]),
            Case::new("source ranges apply to load balancer frontends only")
                .services([with_ingress(
                    with(typed("LoadBalancer"), |s| {
                        s.external_ips = list(&["192.0.2.1"]);
                        s.load_balancer_source_ranges =
                            list(&[" 203.0.113.0/24 ", "not-a-cidr", "198.51.100.7/16"]);
                    }),
                    vec![lb_ingress("192.0.2.10", "", "")],
                )])
                .reasons(&[
                    "Service ns/web: spec.loadBalancerSourceRanges[1]: \"not-a-cidr\" is not a \
                     CIDR",
                ])
                .frontends(&[
                    "0.0.0.0:30080/TCP NodePort ns/web",
                    WEB,
                    "192.0.2.1:80/TCP ExternalIp ns/web",
                    "192.0.2.10:80/TCP LoadBalancer ns/web from 198.51.0.0/16, 203.0.113.0/24",
                ]),
            Case::new("all invalid source ranges leave the load balancer frontends out")
                .services([with_ingress(
                    with(typed("LoadBalancer"), |s| {
                        s.load_balancer_source_ranges = list(&["bad"])
                    }),
                    vec![lb_ingress("192.0.2.10", "", "")],
                )])
                .reasons(&[
                    "Service ns/web: spec.loadBalancerSourceRanges: no valid range; the load \
                     balancer addresses are left out rather than opened to every source",
                    "Service ns/web: spec.loadBalancerSourceRanges[0]: \"bad\" is not a CIDR",
                ])
                .frontends(&["0.0.0.0:30080/TCP NodePort ns/web", WEB]),
            Case::new("legacy IPv4 with leading zeros is read as decimal")
                .services([simple_service("ns", "web", "010.000.000.001", 80)])
                .slices([simple_slice(
                    "ns",
                    "web-1",
                    "web",
                    8080,
                    &["010.001.000.010"],
                )])
                .frontends(&["10.0.0.1:80/TCP ClusterIp ns/web -> 10.1.0.10:8080"]),
            // Objects the API server accepted before it tightened validation
            // spell IPv4 octets with leading zeros; kube-proxy reads them as
            // the plain (decimal) address, everywhere an address or range is
            // given.
            Case::new("leading zeros are read as the plain address everywhere")
                .services([with_ingress(
                    with(
                        typed_service("ns", "web", "LoadBalancer", "172.30.0.041", 80, 30080),
                        |s| {
                            s.cluster_ips = list(&["172.30.0.041"]);
                            s.external_ips = list(&["192.0.002.1"]);
                            s.load_balancer_source_ranges = list(&["203.0.113.000/24"]);
                        },
                    ),
                    vec![lb_ingress("192.0.2.010", "", "")],
                )])
                .slices([ipv4_slice(
                    "web-1",
                    &[slice_port("", 8080, "TCP")],
                    &[endpoint("10.001.0.1")],
                )])
                .frontends(&[
                    "0.0.0.0:30080/TCP NodePort ns/web -> 10.1.0.1:8080",
                    "172.30.0.41:80/TCP ClusterIp ns/web -> 10.1.0.1:8080",
                    "192.0.2.1:80/TCP ExternalIp ns/web -> 10.1.0.1:8080",
                    "192.0.2.10:80/TCP LoadBalancer ns/web from 203.0.113.0/24 -> 10.1.0.1:8080",
                ]),
            Case::new("IPv4-mapped IPv6 counts as IPv4")
                .services([simple_service("ns", "web", "::ffff:10.0.0.1", 80)])
                .slices([simple_slice(
                    "ns",
                    "web-1",
                    "web",
                    8080,
                    &["::ffff:10.1.0.1"],
                )])
                .frontends(&[WEB_1]),
        ]);
    }

    /// Broken Services, or broken parts of them: what is left out, and why.
    #[test]
    fn rejected_services() {
        let families = |ips: &[&str], families: &[&str]| {
            let svc = service("ns", "web", ips, &[service_port("", 80, "")]);
            with(svc, |s| s.ip_families = list(families))
        };
        let unnamed_port = [service_port("", 80, "")];
        let named = |name: &str| simple_service("ns", name, "10.0.0.1", 80);
        run(vec![
            Case::new("unknown IP family")
                .services([families(&["10.0.0.1"], &["IPv4", "IPX"])])
                .reasons(&["Service ns/web: spec.ipFamilies[1]: \"IPX\" is not IPv4 or IPv6"]),
            Case::new("two cluster IPs of one family")
                .services([service(
                    "ns",
                    "web",
                    &["10.0.0.1", "10.0.0.2"],
                    &unnamed_port,
                )])
                .reasons(&[
                    "Service ns/web: spec.clusterIPs[1]: \"10.0.0.2\" is a second IPv4 address (at \
                     most one per family)",
                ]),
            Case::new("a cluster IP of a family ipFamilies does not list")
                .services([families(&["10.0.0.1", "fd00::1"], &["IPv4"])])
                .reasons(&[
                    "Service ns/web: spec.clusterIPs[1]: \"fd00::1\" is IPv6, which \
                     spec.ipFamilies does not list",
                ]),
            Case::new("unspecified cluster IPs")
                .services([
                    simple_service("ns", "v4", "0.0.0.0", 80),
                    simple_service("ns", "v6", "::", 80),
                ])
                .reasons(&[
                    "Service ns/v4: spec.clusterIPs[0]: \"0.0.0.0\" is the unspecified address",
                    "Service ns/v6: spec.clusterIPs[0]: \"::\" is the unspecified address",
                ]),
            Case::new("an unparsable cluster IP rejects only that Service")
                .services([
                    service("ns", "broken", &["10.0.0.2", "10.0.0.300"], &unnamed_port),
                    simple_service("ns", "fine", "10.0.0.1", 80),
                ])
                .slices([simple_slice("ns", "fine-1", "fine", 8080, &["10.1.0.1"])])
                .reasons(&[
                    "Service ns/broken: spec.clusterIPs[1]: \"10.0.0.300\" is not an IP address",
                ])
                .frontends(&["10.0.0.1:80/TCP ClusterIp ns/fine -> 10.1.0.1:8080"]),
            Case::new("an unparsable fallback cluster IP names the clusterIP field")
                .services([with(simple_service("ns", "web", "nope", 80), |s| {
                    s.cluster_ips = None
                })])
                .reasons(&["Service ns/web: spec.clusterIP: \"nope\" is not an IP address"]),
            Case::new("None as a secondary cluster IP")
                .services([service("ns", "web", &["10.0.0.1", "None"], &unnamed_port)])
                .reasons(&["Service ns/web: spec.clusterIPs[1]: \"None\" is not an IP address"]),
            Case::new("clusterIP differing from the first clusterIPs entry")
                .services([with(web(), |s| s.cluster_ip = Some("10.0.0.2".into()))])
                .reasons(&[
                    "Service ns/web: spec.clusterIP: \"10.0.0.2\" differs from spec.clusterIPs[0] \
                     \"10.0.0.1\"",
                ]),
            Case::new("an out of range port is skipped alone")
                .services([web_ports(&[
                    service_port("a", 0, ""),
                    service_port("b", 80, ""),
                    service_port("c", 65536, ""),
                    service_port("d", -1, ""),
                ])])
                .reasons(&[
                    "Service ns/web: spec.ports[0].port: 0 is outside 1..=65535",
                    "Service ns/web: spec.ports[2].port: 65536 is outside 1..=65535",
                    "Service ns/web: spec.ports[3].port: -1 is outside 1..=65535",
                ])
                .frontends(&["10.0.0.1:80/TCP ClusterIp ns/web:b"]),
            Case::new("an unknown protocol skips that port only")
                .services([web_ports(&[
                    service_port("a", 80, "HTTP"),
                    service_port("b", 81, "tcp"),
                    service_port("c", 82, "TCP"),
                ])])
                .reasons(&[
                    "Service ns/web: spec.ports[0].protocol: \"HTTP\" is not TCP, UDP or SCTP",
                    "Service ns/web: spec.ports[1].protocol: \"tcp\" is not TCP, UDP or SCTP",
                ])
                .frontends(&["10.0.0.1:82/TCP ClusterIp ns/web:c"]),
            Case::new("a duplicate port and protocol keeps the first")
                .services([web_ports(&[
                    service_port("first", 80, "TCP"),
                    service_port("udp", 80, "UDP"),
                    service_port("second", 80, ""),
                ])])
                .reasons(&["Service ns/web: spec.ports[2]: 80/TCP duplicates spec.ports[0]"])
                .frontends(&[
                    "10.0.0.1:80/TCP ClusterIp ns/web:first",
                    "10.0.0.1:80/UDP ClusterIp ns/web:udp",
                ]),
            Case::new("a bad node port loses only its node port frontend")
                .services([typed_service(
                    "ns", "web", "NodePort", "10.0.0.1", 80, 70000,
                )])
                .reasons(&["Service ns/web: spec.ports[0].nodePort: 70000 is outside 1..=65535"])
                .frontends(&[WEB]),
            // The loser keeps its other frontend.
            Case::new("a frontend conflict goes to the smaller name")
                .services([
                    named("a"),
                    service(
                        "ns",
                        "b",
                        &["10.0.0.1"],
                        &[service_port("x", 80, ""), service_port("y", 81, "")],
                    ),
                ])
                .slices([
                    simple_slice("ns", "a-1", "a", 8080, &["10.1.0.1"]),
                    slice(
                        "ns",
                        "b-1",
                        "b",
                        "IPv4",
                        &[slice_port("x", 9090, ""), slice_port("y", 9091, "")],
                        &[endpoint("10.2.0.1")],
                    ),
                ])
                .reasons(&[
                    "Service ns/b: spec.ports[0]: 10.0.0.1:80/TCP is already claimed by Service \
                     ns/a",
                ])
                .frontends(&[
                    "10.0.0.1:80/TCP ClusterIp ns/a -> 10.1.0.1:8080",
                    "10.0.0.1:81/TCP ClusterIp ns/b:y -> 10.2.0.1:9091",
                ]),
            Case::new("a frontend conflict goes to the older Service, whatever its name")
                .services([
                    created(
                        simple_service("ns", "a", "10.0.0.1", 80),
                        "2026-12-07T10:00:01Z",
                    ),
                    created(
                        simple_service("ns", "z", "10.0.0.1", 80),
                        "2026-12-07T10:00:00Z",
                    ),
                    // Unknown age: after every known one.
                    simple_service("ns", "0", "10.0.0.1", 80),
                ])
                .reasons(&[
                    "Service ns/0: spec.ports[0]: 10.0.0.1:80/TCP is already claimed by Service \
                     ns/z",
                    "Service ns/a: spec.ports[0]: 10.0.0.1:80/TCP is already claimed by Service \
                     ns/z",
                ])
                .frontends(&["10.0.0.1:80/TCP ClusterIp ns/z"]),
            Case::new("no ClusterIP in the cluster CIDR or on the node's address")
                .cluster_cidrs(&["10.244.0.0/16"])
                .nodes([
                    node_with_address("node-a", "192.168.1.10"),
                    node_with_address("node-b", "192.168.1.11"),
                ])
                .services([
                    simple_service("ns", "pod", "10.244.1.5", 80),
                    simple_service("ns", "node", "192.168.1.10", 80),
                    // Another node's address is not this node's concern.
                    simple_service("ns", "other", "192.168.1.11", 80),
                    service(
                        "ns",
                        "dual",
                        &["10.244.0.9", "fd00::1"],
                        &[service_port("", 80, "")],
                    ),
                ])
                .reasons(&[
                    "Service ns/dual: spec.clusterIPs[0]: 10.244.0.9 is inside the cluster CIDR \
                     10.244.0.0/16, the pods' addresses; not proxied on it",
                    "Service ns/node: spec.clusterIPs[0]: 192.168.1.10 is the address of this \
                     node (node-a); not proxied on it",
                    "Service ns/pod: spec.clusterIPs[0]: 10.244.1.5 is inside the cluster CIDR \
                     10.244.0.0/16, the pods' addresses; not proxied on it",
                ])
                .frontends(&[
                    "192.168.1.11:80/TCP ClusterIp ns/other",
                    "[fd00::1]:80/TCP ClusterIp ns/dual",
                ]),
            Case::new("a node port conflict goes to the smaller name")
                .services([
                    typed_service("ns", "a", "NodePort", "10.0.0.1", 80, 30080),
                    typed_service("ns", "b", "NodePort", "10.0.0.2", 80, 30080),
                ])
                .reasons(&[
                    "Service ns/b: spec.ports[0].nodePort: 0.0.0.0:30080/TCP is already claimed \
                     by Service ns/a",
                ])
                .frontends(&[
                    "0.0.0.0:30080/TCP NodePort ns/a",
                    "10.0.0.1:80/TCP ClusterIp ns/a",
                    "10.0.0.2:80/TCP ClusterIp ns/b",
                ]),
            Case::new("differing Services with one name are all rejected")
                .services([web(), simple_service("ns", "web", "10.0.0.2", 80)])
                .reasons(&[
                    "Service ns/web: metadata.name: 2 Service objects share this namespace/name \
                     and differ; all are ignored",
                ]),
            Case::new("identical copies of a Service count as one")
                .services([web(), web()])
                .frontends(&[WEB]),
            Case::new("nameless objects")
                .nodes([node(""), node("node-a")])
                .services([simple_service("ns", "", "10.0.0.1", 80)])
                .slices([simple_slice("ns", "", "web", 8080, &["10.1.0.1"])])
                .reasons(&[
                    "EndpointSlice ns/: metadata.name: missing",
                    "Node /: metadata.name: missing",
                    "Service ns/: metadata.name: missing",
                ]),
            Case::new("unknown traffic policies or affinity")
                .services([
                    with(named("internal"), |s| {
                        s.internal_traffic_policy = Some("local".into())
                    }),
                    with(named("external"), |s| {
                        s.external_traffic_policy = Some("Nope".into())
                    }),
                    with(named("affinity"), |s| {
                        s.session_affinity = Some("Cookie".into())
                    }),
                ])
                .reasons(&[
                    "Service ns/affinity: spec.sessionAffinity: \"Cookie\" is not None or \
                     ClientIP; the Service is ignored",
                    "Service ns/external: spec.externalTrafficPolicy: \"Nope\" is not Cluster or \
                     Local; the Service is ignored",
                    "Service ns/internal: spec.internalTrafficPolicy: \"local\" is not Cluster or \
                     Local; the Service is ignored",
                ]),
            Case::new("rejections of several objects")
                .services([
                    simple_service("z", "svc", "bad", 80),
                    simple_service("a", "svc", "10.0.0.1", 0),
                    simple_service("m", "svc", "10.0.0.2", 80),
                ])
                .slices([
                    simple_slice("m", "s2", "svc", 8080, &["x"]),
                    simple_slice("m", "s1", "svc", 70000, &["10.1.0.1"]),
                ])
                .reasons(&[
                    "EndpointSlice m/s1: ports[0].port: 70000 is outside 1..=65535",
                    "EndpointSlice m/s2: endpoints[0].addresses[0]: \"x\" is not an IP address",
                    "Service a/svc: spec.ports[0].port: 0 is outside 1..=65535",
                    "Service z/svc: spec.clusterIPs[0]: \"bad\" is not an IP address",
                ])
                .frontends(&["10.0.0.2:80/TCP ClusterIp m/svc"]),
        ]);
    }

    /// Which endpoints of which EndpointSlices become a frontend's backends.
    #[test]
    fn backends_from_endpoint_slices() {
        let no_conditions = Endpoint {
            conditions: None,
            ..endpoint("10.1.0.4")
        };
        let mut unlabelled = simple_slice("ns", "loose", "web", 8080, &["10.1.0.9"]);
        unlabelled.metadata.labels = None;
        let draining = [
            terminating_on("10.1.0.2", ""),
            // nil serving defers to ready (false here): not a fallback.
            endpoint_full("10.1.0.3", Some(false), None, Some(true), ""),
            // nil terminating is false: serving but not terminating is no
            // fallback.
            endpoint_full("10.1.0.4", Some(false), Some(true), None, ""),
        ];
        let web_1 = || [simple_slice("ns", "web-1", "web", 8080, &["10.1.0.1"])];
        let unnamed_port = EndpointPort {
            name: Some(String::new()),
            ..slice_port("", 8080, "")
        };
        let one = [endpoint("10.1.0.1")];
        run(vec![
            Case::new("slice ports match Service ports by name")
                .services([web_ports(&[
                    service_port("http", 80, ""),
                    service_port("https", 443, ""),
                ])])
                .slices([ipv4_slice(
                    "web-1",
                    &[slice_port("https", 8443, ""), slice_port("http", 8080, "")],
                    &one,
                )])
                .frontends(&[
                    "10.0.0.1:80/TCP ClusterIp ns/web:http -> 10.1.0.1:8080",
                    "10.0.0.1:443/TCP ClusterIp ns/web:https -> 10.1.0.1:8443",
                ]),
            Case::new("an absent slice port name matches an unnamed port")
                .services([web()])
                .slices([ipv4_slice("s", &[slice_port("", 8080, "")], &one)])
                .frontends(&[WEB_1]),
            Case::new("an empty slice port name matches an unnamed port")
                .services([web()])
                .slices([ipv4_slice("s", &[unnamed_port], &one)])
                .frontends(&[WEB_1]),
            Case::new("a differently named slice port does not match")
                .services([web_ports(&[service_port("http", 80, "")])])
                .slices([ipv4_slice(
                    "s",
                    &[slice_port("metrics", 9090, ""), slice_port("", 8080, "")],
                    &one,
                )])
                .frontends(&["10.0.0.1:80/TCP ClusterIp ns/web:http"]),
            Case::new("the slice port protocol must match and defaults to TCP")
                .services([service(
                    "ns",
                    "dns",
                    &["10.0.0.10"],
                    &[
                        service_port("dns", 53, "UDP"),
                        service_port("dns-tcp", 53, ""),
                    ],
                )])
                .slices([slice(
                    "ns",
                    "dns-1",
                    "dns",
                    "IPv4",
                    &[
                        // Same name, wrong protocol: must not feed the UDP
                        // frontend.
                        slice_port("dns", 5353, "TCP"),
                        slice_port("dns-tcp", 5354, ""),
                    ],
                    &one,
                )])
                .frontends(&[
                    "10.0.0.10:53/TCP ClusterIp ns/dns:dns-tcp -> 10.1.0.1:5354",
                    "10.0.0.10:53/UDP ClusterIp ns/dns:dns",
                ]),
            Case::new("only ready endpoints are backends, and nil means ready")
                .services([web()])
                .slices([web_slice(&[
                    endpoint_with(&["10.1.0.1"], Some(true)),
                    endpoint_with(&["10.1.0.2"], Some(false)),
                    endpoint_with(&["10.1.0.3"], None),
                    no_conditions,
                ])])
                .frontends(&[
                    "10.0.0.1:80/TCP ClusterIp ns/web -> 10.1.0.1:8080, 10.1.0.3:8080, \
                     10.1.0.4:8080",
                ]),
            Case::new("only the first address of an endpoint is used")
                .services([web()])
                .slices([web_slice(&[endpoint_with(
                    &["10.1.0.1", "10.1.0.2"],
                    Some(true),
                )])])
                .frontends(&[WEB_1]),
            Case::new("backends follow the frontend address family")
                .services([service(
                    "ns",
                    "web",
                    &["10.0.0.1", "fd00::1"],
                    &[service_port("", 80, "")],
                )])
                .slices([web_slice_named("web-v4", &one), web_v6_slice()])
                .frontends(&[WEB_1, "[fd00::1]:80/TCP ClusterIp ns/web -> [fd01::1]:8080"]),
            Case::new("an IPv6 slice does not feed a single-stack IPv4 Service")
                .services([web()])
                .slices([web_v6_slice()])
                .frontends(&[WEB]),
            Case::new("FQDN slices are ignored")
                .services([web()])
                .slices([slice(
                    "ns",
                    "web-fqdn",
                    "web",
                    "FQDN",
                    &[slice_port("", 8080, "")],
                    &[endpoint("backend.example.com")],
                )])
                .frontends(&[WEB]),
            Case::new("an address of the wrong type: only its endpoint is skipped")
                .services([web()])
                .slices([web_slice(&[endpoint("fd01::1"), endpoint("10.1.0.2")])])
                .reasons(&[
                    "EndpointSlice ns/web-1: endpoints[0].addresses[0]: \"fd01::1\" is not an IPv4 \
                     address as addressType requires",
                ])
                .frontends(&["10.0.0.1:80/TCP ClusterIp ns/web -> 10.1.0.2:8080"]),
            Case::new("unparsable endpoint addresses: only their endpoints are skipped")
                .services([web()])
                .slices([web_slice(&[
                    endpoint("10.1.0.1"),
                    endpoint("10.1.0.256"),
                    endpoint_with(&["10.1.0.3", "garbage"], Some(true)),
                    endpoint_with(&[], Some(true)),
                ])])
                .reasons(&[
                    "EndpointSlice ns/web-1: endpoints[1].addresses[0]: \"10.1.0.256\" is not an \
                     IP address",
                    "EndpointSlice ns/web-1: endpoints[2].addresses[1]: \"garbage\" is not an IP \
                     address",
                    "EndpointSlice ns/web-1: endpoints[3].addresses: empty",
                ])
                .frontends(&[WEB_1]),
            Case::new("an unknown address type rejects the slice")
                .services([web()])
                .slices([slice(
                    "ns",
                    "web-1",
                    "web",
                    "IPv5",
                    &[slice_port("", 8080, "")],
                    &one,
                )])
                .reasons(&[
                    "EndpointSlice ns/web-1: addressType: \"IPv5\" is not IPv4, IPv6 or FQDN",
                ])
                .frontends(&[WEB]),
            Case::new("bad slice ports are rejected and skipped")
                .services([web_ports(&[
                    service_port("a", 80, ""),
                    service_port("b", 81, ""),
                    service_port("c", 82, ""),
                    service_port("d", 83, ""),
                    service_port("e", 84, ""),
                ])])
                .slices([ipv4_slice(
                    "web-1",
                    &[
                        slice_port("a", 8080, ""),
                        slice_port("b", 0, ""),
                        EndpointPort {
                            port: None,
                            ..slice_port("c", 0, "")
                        },
                        slice_port("d", 65536, ""),
                        slice_port("e", 8084, "HTTP"),
                    ],
                    &one,
                )])
                .reasons(&[
                    "EndpointSlice ns/web-1: ports[1].port: 0 is outside 1..=65535",
                    "EndpointSlice ns/web-1: ports[2].port: missing (\"all ports\" is not \
                     supported)",
                    "EndpointSlice ns/web-1: ports[3].port: 65536 is outside 1..=65535",
                    "EndpointSlice ns/web-1: ports[4].protocol: \"HTTP\" is not TCP, UDP or SCTP",
                ])
                .frontends(&[
                    "10.0.0.1:80/TCP ClusterIp ns/web:a -> 10.1.0.1:8080",
                    "10.0.0.1:81/TCP ClusterIp ns/web:b",
                    "10.0.0.1:82/TCP ClusterIp ns/web:c",
                    "10.0.0.1:83/TCP ClusterIp ns/web:d",
                    "10.0.0.1:84/TCP ClusterIp ns/web:e",
                ]),
            Case::new("backends are merged across slices without duplicates")
                .services([web()])
                .slices([
                    simple_slice("ns", "web-2", "web", 8080, &["10.1.0.3", "10.1.0.1"]),
                    simple_slice("ns", "web-1", "web", 8080, &["10.1.0.2", "10.1.0.1"]),
                ])
                .frontends(&[
                    "10.0.0.1:80/TCP ClusterIp ns/web -> 10.1.0.1:8080, 10.1.0.2:8080, \
                     10.1.0.3:8080",
                ]),
            Case::new("slices of other Services or namespaces, or unlabelled, are not used")
                .services([web()])
                .slices([
                    simple_slice("other", "web-1", "web", 8080, &["10.1.0.1"]),
                    simple_slice("ns", "api-1", "api", 8080, &["10.1.0.2"]),
                    unlabelled,
                ])
                .frontends(&[WEB]),
            Case::new("an absent namespace means default")
                .services([simple_service("", "web", "10.0.0.1", 80)])
                .slices([simple_slice("default", "web-1", "web", 8080, &["10.1.0.1"])])
                .frontends(&["10.0.0.1:80/TCP ClusterIp default/web -> 10.1.0.1:8080"]),
            Case::new("serving terminating endpoints are not used beside a ready one")
                .services([web()])
                .slices([web_slice(&[&one[..], &draining].concat())])
                .frontends(&[WEB_1]),
            Case::new("serving terminating endpoints are used when none is ready")
                .services([web()])
                .slices([web_slice(&draining)])
                .frontends(&["10.0.0.1:80/TCP ClusterIp ns/web -> 10.1.0.2:8080"]),
            // Nodes and the node name do not change a Cluster policy table.
            Case::new("Cluster policy, no node name and no Nodes")
                .no_node_name()
                .services([web()])
                .slices(web_1())
                .frontends(&[WEB_1]),
            Case::new("Cluster policy, on node-a with Nodes")
                .nodes([node("node-a"), node("node-b")])
                .services([web()])
                .slices(web_1())
                .frontends(&[WEB_1]),
        ]);
    }

    /// `internalTrafficPolicy` and `externalTrafficPolicy`: Local.
    #[test]
    fn local_traffic_policies() {
        // The local endpoint is hinted for another zone.
        let hinted_elsewhere = [web_slice(&[
            for_zones(endpoint_on("10.1.0.1", "node-a"), &["zone-2"]),
            for_zones(endpoint_on("10.1.0.2", "node-b"), &["zone-1"]),
            for_zones(endpoint_on("10.1.0.3", "node-b"), &["zone-2"]),
        ])];
        let local_lb = with_ingress(
            with(typed("LoadBalancer"), |s| {
                s.traffic_distribution = Some("PreferClose".into());
                s.external_traffic_policy = Some("Local".into());
            }),
            vec![lb_ingress("192.0.2.10", "", "")],
        );
        run(vec![
            Case::new("internal Local keeps local endpoints for the ClusterIP frontend only")
                .services([with(typed("NodePort"), |s| {
                    s.internal_traffic_policy = Some("Local".into())
                })])
                .slices([web_slice(&[
                    endpoint_on("10.1.0.1", "node-a"),
                    endpoint_on("10.1.0.2", "node-b"),
                    endpoint("10.1.0.3"),
                ])])
                .frontends(&[
                    "0.0.0.0:30080/TCP NodePort ns/web -> 10.1.0.1:8080, 10.1.0.2:8080, \
                     10.1.0.3:8080",
                    "10.0.0.1:80/TCP ClusterIp ns/web local -> 10.1.0.1:8080; cluster -> \
                     10.1.0.1:8080, 10.1.0.2:8080, 10.1.0.3:8080",
                ]),
            // The only local endpoint terminates: the local set falls back to
            // it while the cluster-wide set still has a ready one elsewhere.
            Case::new("external Local applies to external frontends")
                .services([with_ingress(
                    with(typed("LoadBalancer"), |s| {
                        s.external_traffic_policy = Some("Local".into());
                        s.external_ips = list(&["192.0.2.1"]);
                    }),
                    vec![lb_ingress("192.0.2.10", "", "")],
                )])
                .slices([web_slice(&[
                    terminating_on("10.1.0.1", "node-a"),
                    endpoint_on("10.1.0.2", "node-b"),
                ])])
                .frontends(&[
                    "0.0.0.0:30080/TCP NodePort ns/web local -> 10.1.0.1:8080; cluster -> \
                     10.1.0.2:8080",
                    "10.0.0.1:80/TCP ClusterIp ns/web -> 10.1.0.2:8080",
                    "192.0.2.1:80/TCP ExternalIp ns/web local -> 10.1.0.1:8080; cluster -> \
                     10.1.0.2:8080",
                    "192.0.2.10:80/TCP LoadBalancer ns/web local -> 10.1.0.1:8080; cluster -> \
                     10.1.0.2:8080",
                ]),
            Case::new("external Local on a ClusterIP Service covers its externalIPs")
                .services([with(web(), |s| {
                    s.external_traffic_policy = Some("Local".into());
                    s.external_ips = list(&["192.0.2.1"]);
                })])
                .slices([web_slice(&[endpoint_on("10.1.0.2", "node-b")])])
                .frontends(&[
                    "10.0.0.1:80/TCP ClusterIp ns/web -> 10.1.0.2:8080",
                    "192.0.2.1:80/TCP ExternalIp ns/web local; cluster -> 10.1.0.2:8080",
                ]),
            Case::new("Local ignores topology, but its cluster backends follow it")
                .nodes(zone_1())
                .services([local_lb.clone()])
                .slices(hinted_elsewhere.clone())
                .frontends(&[
                    "0.0.0.0:30080/TCP NodePort ns/web local -> 10.1.0.1:8080; cluster -> \
                     10.1.0.2:8080",
                    "10.0.0.1:80/TCP ClusterIp ns/web -> 10.1.0.2:8080",
                    "192.0.2.10:80/TCP LoadBalancer ns/web local -> 10.1.0.1:8080; cluster -> \
                     10.1.0.2:8080",
                ]),
            Case::new("internal Local keeps the ClusterIP frontend to the local endpoint too")
                .nodes(zone_1())
                .services([with(local_lb, |s| {
                    s.internal_traffic_policy = Some("Local".into())
                })])
                .slices(hinted_elsewhere)
                .frontends(&[
                    "0.0.0.0:30080/TCP NodePort ns/web local -> 10.1.0.1:8080; cluster -> \
                     10.1.0.2:8080",
                    "10.0.0.1:80/TCP ClusterIp ns/web local -> 10.1.0.1:8080; cluster -> \
                     10.1.0.2:8080",
                    "192.0.2.10:80/TCP LoadBalancer ns/web local -> 10.1.0.1:8080; cluster -> \
                     10.1.0.2:8080",
                ]),
        ]);
    }

    #[test]
    fn client_ip_affinity_sets_the_timeout_on_every_frontend() {
        use k8s_openapi::api::core::v1::{ClientIPConfig, SessionAffinityConfig};
        let with_timeout = |timeout: Option<i32>| {
            let svc = with(typed("NodePort"), |spec| {
                spec.session_affinity = Some("ClientIP".into());
                spec.session_affinity_config = timeout.map(|secs| SessionAffinityConfig {
                    client_ip: Some(ClientIPConfig {
                        timeout_seconds: Some(secs),
                    }),
                });
            });
            build_table(&state(vec![svc], vec![]), &config())
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

    /// Topology-aware routing; unless a row says otherwise this agent runs on
    /// node-a, in zone-1, for a PreferClose Service (`on_zone_1`).
    #[test]
    fn topology_hints() {
        // Ready endpoints hinted for a node and a zone.
        let for_node =
            |address: &str, node: &str, zone: &str| for_nodes(ready_in(address, &[zone]), &[node]);
        let same_node = [
            for_node("10.1.0.1", "node-a", "zone-1"),
            for_node("10.1.0.2", "node-c", "zone-1"),
            for_node("10.1.0.3", "node-b", "zone-2"),
        ];
        let mut no_node_hint = same_node.clone();
        no_node_hint[2] = ready_in("10.1.0.3", &["zone-2"]);
        let mut node_elsewhere = same_node.clone();
        node_elsewhere[0] = for_node("10.1.0.1", "node-d", "zone-1");
        let mut empty_names = hinted();
        empty_names[1] = ready_in("10.1.0.2", &[""]);
        empty_names.push(for_nodes(ready_in("10.1.0.4", &["", "zone-1"]), &[""]));
        let mut empty_beside_good = empty_names.clone();
        empty_beside_good.remove(1);
        let prefer_same_node = || [distributed("PreferSameNode")];
        let mode = |value| annotated(&[(TOPOLOGY_MODE_ANNOTATION, value)]);
        let hints = |value| annotated(&[(TOPOLOGY_AWARE_HINTS_ANNOTATION, value)]);
        run(vec![
            on_zone_1("PreferClose with complete hints keeps same-zone endpoints")
                .backends(SAME_ZONE),
            on_zone_1("PreferSameZone with complete hints keeps same-zone endpoints")
                .services([distributed("PreferSameZone")])
                .backends(SAME_ZONE),
            on_zone_1("PreferSameNode with zone hints only keeps same-zone endpoints")
                .services(prefer_same_node())
                .backends(SAME_ZONE),
            on_zone_1("incomplete hints fall back to every endpoint")
                .slices(hinted_plus(&[endpoint("10.1.0.4")]))
                .backends(&["10.1.0.1", "10.1.0.2", "10.1.0.3", "10.1.0.4"]),
            on_zone_1("hints are required of ready endpoints only, as in kube-proxy")
                .slices(hinted_plus(&[
                    terminating_on("10.1.0.4", "node-b"),
                    endpoint_with(&["10.1.0.5"], Some(false)),
                ]))
                .backends(SAME_ZONE),
            on_zone_1("hints split across slices are all considered")
                .slices([
                    web_slice(&hinted()[..2]),
                    web_slice_named("web-2", &[endpoint("10.1.0.4")]),
                ])
                .backends(&["10.1.0.1", "10.1.0.2", "10.1.0.4"]),
            // Its unhinted listing makes the hints incomplete.
            on_zone_1("the same endpoint in two slices, hinted in one only")
                .slices([
                    web_slice(&hinted()),
                    web_slice_named("web-2", &[endpoint("10.1.0.2")]),
                ])
                .backends(ALL),
            on_zone_1("no endpoint for our zone falls back to every endpoint")
                .slices([web_slice(&[
                    ready_in("10.1.0.1", &["zone-2"]),
                    ready_in("10.1.0.2", &["zone-3"]),
                ])])
                .backends(&["10.1.0.1", "10.1.0.2"]),
            on_zone_1("our Node has no zone label")
                .nodes([node("node-a")])
                .backends(ALL),
            on_zone_1("our Node has an empty zone label")
                .nodes([node_in_zone("node-a", "")])
                .backends(ALL),
            on_zone_1("no Node object of ours")
                .nodes([node_in_zone("node-b", "zone-1")])
                .backends(ALL),
            on_zone_1("without a node name, no Node is this node's")
                .no_node_name()
                .backends(ALL),
            on_zone_1("differing copies of our Node give no zone")
                .nodes([
                    node_in_zone("node-a", "zone-1"),
                    node_in_zone("node-a", "zone-2"),
                ])
                .reasons(&[
                    "Node /node-a: metadata.labels[topology.kubernetes.io/zone]: 2 Node objects \
                     share this name and differ in it; topology hints are not used",
                ])
                .backends(ALL),
            on_zone_1("identical copies of our Node are one Node")
                .nodes([
                    node_in_zone("node-a", "zone-1"),
                    node_in_zone("node-a", "zone-1"),
                ])
                .backends(SAME_ZONE),
            on_zone_1("a Service that does not ask for topology ignores hints")
                .services([web()])
                .backends(ALL),
            on_zone_1("topology-mode Disabled")
                .services([mode("Disabled")])
                .backends(ALL),
            on_zone_1("topology-aware-hints disabled")
                .services([hints("disabled")])
                .backends(ALL),
            on_zone_1("topology-mode is read first")
                .services([annotated(&[
                    (TOPOLOGY_MODE_ANNOTATION, "Disabled"),
                    (TOPOLOGY_AWARE_HINTS_ANNOTATION, "Auto"),
                ])])
                .backends(ALL),
            on_zone_1("topology-mode Auto")
                .services([mode("Auto")])
                .backends(SAME_ZONE),
            on_zone_1("topology-mode auto")
                .services([mode("auto")])
                .backends(SAME_ZONE),
            on_zone_1("topology-aware-hints Auto")
                .services([hints("Auto")])
                .backends(SAME_ZONE),
            on_zone_1("topology-aware-hints auto")
                .services([hints("auto")])
                .backends(SAME_ZONE),
            on_zone_1("an empty topology-mode defers to the older annotation")
                .services([annotated(&[
                    (TOPOLOGY_MODE_ANNOTATION, ""),
                    (TOPOLOGY_AWARE_HINTS_ANNOTATION, "auto"),
                ])])
                .backends(SAME_ZONE),
            on_zone_1("unknown topology requests are reported and ignored")
                .services([with(mode("Custom"), |s| {
                    s.traffic_distribution = Some("Nearby".into())
                })])
                .reasons(&[
                    "Service ns/web: metadata.annotations[service.kubernetes.io/topology-mode]: \
                     \"Custom\" is not Auto or Disabled; topology hints are not used for it",
                    "Service ns/web: spec.trafficDistribution: \"Nearby\" is not PreferClose, \
                     PreferSameZone or PreferSameNode; it is ignored",
                ])
                .backends(ALL),
            on_zone_1("either topology request is enough")
                .services([with(mode("Custom"), |s| {
                    s.traffic_distribution = Some("PreferClose".into())
                })])
                .reasons(&[
                    "Service ns/web: metadata.annotations[service.kubernetes.io/topology-mode]: \
                     \"Custom\" is not Auto or Disabled; topology hints are not used for it",
                ])
                .backends(SAME_ZONE),
            // Rather than to the terminating one in our zone.
            on_zone_1("a ready endpoint only in another zone is used")
                .slices([web_slice(&[
                    for_zones(terminating_on("10.1.0.1", "node-a"), &["zone-1"]),
                    ready_in("10.1.0.2", &["zone-2"]),
                ])])
                .backends(&["10.1.0.2"]),
            // As kube-proxy does.
            on_zone_1("nothing ready: every serving terminating endpoint, whatever its hints")
                .slices([web_slice(&[
                    for_zones(terminating_on("10.1.0.1", "node-a"), &["zone-1"]),
                    for_zones(terminating_on("10.1.0.2", "node-b"), &["zone-2"]),
                    terminating_on("10.1.0.3", "node-b"),
                ])])
                .backends(ALL),
            on_zone_1("ready endpoints in our zone win over a terminating one there")
                .slices(hinted_plus(&[for_zones(
                    terminating_on("10.1.0.4", "node-a"),
                    &["zone-1"],
                )]))
                .backends(SAME_ZONE),
            on_zone_1("same-node hints come before zone hints")
                .services(prefer_same_node())
                .slices([web_slice(&same_node)])
                .backends(&["10.1.0.1"]),
            on_zone_1("no endpoint for this node: zone hints decide")
                .services(prefer_same_node())
                .slices([web_slice(&node_elsewhere)])
                .backends(&["10.1.0.1", "10.1.0.2"]),
            on_zone_1("a ready endpoint without a node hint: zone hints decide")
                .services(prefer_same_node())
                .slices([web_slice(&no_node_hint)])
                .backends(&["10.1.0.1", "10.1.0.2"]),
            on_zone_1("node hints need no zone label on the Node")
                .nodes([node("node-a")])
                .services(prefer_same_node())
                .slices([web_slice(&same_node)])
                .backends(&["10.1.0.1"]),
            // 10.1.0.2 lacks a usable hint, so the hints are incomplete.
            on_zone_1("empty hint names are reported and count as no hint")
                .slices([web_slice(&empty_names)])
                .reasons(&[
                    "EndpointSlice ns/web-1: endpoints[1].hints.forZones[0].name: empty; the \
                     hint is ignored",
                    "EndpointSlice ns/web-1: endpoints[3].hints.forNodes[0].name: empty; the \
                     hint is ignored",
                    "EndpointSlice ns/web-1: endpoints[3].hints.forZones[0].name: empty; the \
                     hint is ignored",
                ])
                .backends(&["10.1.0.1", "10.1.0.2", "10.1.0.3", "10.1.0.4"]),
            on_zone_1("a good hint beside an empty one still counts")
                .slices([web_slice(&empty_beside_good)])
                .reasons(&[
                    "EndpointSlice ns/web-1: endpoints[2].hints.forNodes[0].name: empty; the \
                     hint is ignored",
                    "EndpointSlice ns/web-1: endpoints[2].hints.forZones[0].name: empty; the \
                     hint is ignored",
                ])
                .backends(&["10.1.0.1", "10.1.0.3", "10.1.0.4"]),
        ]);
    }

    /// Health check node ports count this node's ready endpoints.
    #[test]
    fn health_check_node_ports() {
        let local = |svc: Service, port: i32| {
            with(svc, |s| {
                s.external_traffic_policy = Some("Local".into());
                s.health_check_node_port = Some(port);
            })
        };
        let lb = |policy: &str, port: i32| {
            let svc = web_ports(&[
                with_node_port(service_port("http", 80, ""), 30080),
                with_node_port(service_port("https", 443, ""), 30443),
            ]);
            with(local(svc, port), |s| {
                s.type_ = Some("LoadBalancer".into());
                s.external_traffic_policy = Some(policy.into());
            })
        };
        let dual_stack = service(
            "ns",
            "web",
            &["10.0.0.1", "fd00::1"],
            &[with_node_port(service_port("http", 80, ""), 30080)],
        );
        let http = [slice_port("http", 8080, "")];
        run(vec![
            Case::new("a dual-stack pod counts once")
                .services([with(local(dual_stack, 31000), |s| {
                    s.type_ = Some("NodePort".into())
                })])
                .slices([
                    ipv4_slice(
                        "web-1",
                        &http,
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
                        &http,
                        &[
                            endpoint_on("fd00:1::1", "node-a"),
                            endpoint_on("fd00:1::2", "node-a"),
                            endpoint_on("fd00:1::3", "node-b"),
                        ],
                    ),
                ])
                .health(&["ns/web: port 31000, 2 local"]),
            Case::new("local ready endpoint addresses are counted")
                .services([lb("Local", 31000)])
                .slices([ipv4_slice(
                    "web-1",
                    &[slice_port("http", 8080, ""), slice_port("https", 8443, "")],
                    &[
                        endpoint_on("10.1.0.1", "node-a"),
                        endpoint_on("10.1.0.2", "node-a"),
                        endpoint_on("10.1.0.3", "node-b"),
                        terminating_on("10.1.0.4", "node-a"),
                    ],
                )])
                .health(&["ns/web: port 31000, 2 local"]),
            Case::new("none for the Cluster policy")
                .services([lb("Cluster", 31000)])
                .health(&[]),
            Case::new("none for a bad port")
                .services([lb("Local", 0)])
                .reasons(&["Service ns/web: spec.healthCheckNodePort: 0 is outside 1..=65535"])
                .health(&[]),
            Case::new("counts ignore topology")
                .nodes(zone_1())
                .services([with(local(typed("LoadBalancer"), 31000), |s| {
                    s.traffic_distribution = Some("PreferClose".into())
                })])
                .slices([web_slice(&[
                    for_zones(endpoint_on("10.1.0.1", "node-a"), &["zone-2"]),
                    for_zones(endpoint_on("10.1.0.2", "node-b"), &["zone-1"]),
                ])])
                .health(&["ns/web: port 31000, 1 local"]),
        ]);
    }
}
