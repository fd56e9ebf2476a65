//! Socket-level load balancing (cgroup `sock_addr` hooks): a `connect()` or
//! `sendmsg()` to a service frontend is given a backend's address before
//! any packet exists, and `recvmsg()` / `getpeername()` give the frontend's
//! address back.
//!
//! Two kinds of socket are translated, told apart by their network
//! namespace (the cgroup hooks see every namespace of the cgroup):
//! - The node's own (the agent's namespace). Its traffic never crosses the
//!   TC hooks of a pod interface on its way out (a ClusterIP is routed out
//!   of the node's uplink, and a NodePort on a local address goes over
//!   loopback), so without these hooks host processes and hostNetwork pods
//!   could not reach services, nor localhost NodePorts.
//! - This node's pods' (the namespaces in `PA_SOCK_PODS`), for the frontends
//!   whose flows need nothing of the packet path: no masquerade, no source
//!   ranges, no session affinity, and a backend other than the pod itself.
//!   Their packets then carry the backend's address from the first one, so
//!   they need no per-packet translation and no connection-tracking entry,
//!   and the client's kernel picks a source port for the real backend.
//!   Everything else keeps the packet path, which decides it as before.
use aya_ebpf::{
    EbpfContext,
    bindings::bpf_sock_addr,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    macros::{cgroup_sock, cgroup_sock_addr},
    programs::{SockAddrContext, SockContext},
};
use proxy_common::{
    Addr, AffinityValue, BackendValue, FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP, SCOPE_INTERNAL,
    SOCK_POD_V4, SOCK_POD_V6, SVC_AFFINITY, SVC_INTERNAL_SCOPE, SVC_MASQUERADE, SVC_SOURCE_RANGES,
    ServiceKey, ServiceValue, SockPod, SockRevKey, SockRevValue, stat,
};

use crate::maps::{
    PA_AFFINITY, PA_SERVICES, PA_SOCK_NETNS, PA_SOCK_PODS, PA_SOCK_REVNAT, affinity_backend,
    affinity_key, config, count, count_flow, in_service_cidr, lookup_frontend, may_be_backend_port,
    now, pick_slot, snat_addr, source_admitted, use_internal_view,
};
use crate::packet::{v4_addr, v4_raw};

const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;
const ECONNREFUSED: i32 = 111;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

/// What a hook does with the socket call.
enum Outcome {
    /// Not a service (or not ours to translate): the call goes on as is.
    Untouched,
    /// The address was rewritten to a backend; the stat to count.
    Translated(u32),
    /// A service without endpoints, one whose source ranges leave the node
    /// out, or an address of a ServiceCIDR no frontend serves: the call
    /// fails with ECONNREFUSED.
    Refused,
}

/// Whose socket a call is on.
enum Owner {
    /// The node's (the agent's network namespace).
    Node,
    /// One of this node's pods (its entry in the map: a pointer, so that no
    /// variant leaves bytes the verifier sees uninitialised).
    Pod(&'static SockPod),
}

/// Whose socket a call is on; `None`: a namespace not ours to translate.
#[inline(always)]
fn owner(ctx: &SockAddrContext) -> Option<Owner> {
    // SAFETY: the context pointer is this program's.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if let Some(&node) = PA_SOCK_NETNS.get(0)
        && node != 0
        && netns == node
    {
        return Some(Owner::Node);
    }
    // SAFETY: copied out at once; plain data.
    unsafe { PA_SOCK_PODS.get(&netns) }.map(Owner::Pod)
}

#[inline(always)]
fn protocol(sa: &bpf_sock_addr) -> Option<u8> {
    match sa.protocol {
        IPPROTO_TCP => Some(PROTO_TCP),
        IPPROTO_UDP => Some(PROTO_UDP),
        _ => None,
    }
}

/// Picks a backend for a call to `addr:port` (`port` as in memory,
/// network order) and records the way back for this socket.
#[inline(always)]
fn balance(
    ctx: &SockAddrContext,
    family: u8,
    proto: u8,
    addr: &Addr,
    port: u16,
) -> Result<BackendValue, Outcome> {
    let Some((mut key, mut svc)) = lookup_frontend(family, proto, addr, port) else {
        // An address of a ServiceCIDR that no Service holds, or a port of a
        // ClusterIP that no Service has: refused, as the packet path
        // refuses (or drops) them.
        if in_service_cidr(family, addr) {
            return Err(Outcome::Refused);
        }
        return Err(Outcome::Untouched);
    };
    // A node process may reach a frontend restricted by source ranges when
    // a range holds the node's address: the plan then admits the
    // frontend's own address (kube-proxy's allowFromNode), which stands in
    // for the node here, as the socket's source is not chosen yet.
    if svc.flags & SVC_SOURCE_RANGES != 0 && !source_admitted(svc.svc_id, family, addr) {
        return Err(Outcome::Refused);
    }
    // The node is inside the cluster: an external Local frontend serves it
    // from every endpoint, as kube-proxy does for node-local traffic.
    if svc.flags & SVC_INTERNAL_SCOPE != 0 {
        key.scope = SCOPE_INTERNAL;
        // SAFETY: copied out at once; plain data.
        if let Some(internal) = unsafe { PA_SERVICES.get(&key) } {
            svc = *internal;
        }
    }
    if svc.count == 0 {
        return Err(Outcome::Refused);
    }
    let client = node_identity(family);
    let Some(backend) = choose(&svc, &key, family, client.as_ref()) else {
        return Err(Outcome::Untouched);
    };
    remember(ctx, family, &backend, addr, port);
    Ok(backend)
}

/// Picks a backend for a pod's call to `addr:port`, when the flow needs
/// nothing of the packet path; `None`: the packet path takes the flow (and
/// decides, as for any pod, what happens to it).
#[inline(always)]
fn balance_pod(
    ctx: &SockAddrContext,
    pod: &SockPod,
    family: u8,
    proto: u8,
    addr: &Addr,
    port: u16,
) -> Option<BackendValue> {
    let own = if family == FAMILY_V4 {
        (pod.flags & SOCK_POD_V4 != 0).then_some(&pod.v4)
    } else {
        (pod.flags & SOCK_POD_V6 != 0).then_some(&pod.v6)
    };
    // Without an address in the cluster CIDR the pod counts as outside.
    let own = own?;
    let (mut key, mut svc) = lookup_frontend(family, proto, addr, port)?;
    if svc.flags & SVC_SOURCE_RANGES != 0 {
        return None;
    }
    // The pod is inside the cluster: the view the packet path gives it.
    if svc.flags & SVC_INTERNAL_SCOPE != 0 {
        use_internal_view(&mut key, &mut svc);
    }
    // Masquerade and affinity (keyed by the client's address, which a
    // socket has not chosen yet) are the packet path's; so are the
    // answers of an empty frontend (reject or drop).
    if svc.flags & (SVC_MASQUERADE | SVC_AFFINITY) != 0 || svc.count == 0 {
        return None;
    }
    let (_, backend) = pick_slot(&svc, &key)?;
    // Hairpin is masqueraded, so that the pod answers itself through the
    // node.
    if backend.addr == *own {
        return None;
    }
    // A backend that is itself a frontend (another Service's external IP
    // on a pod's address): the node's ingress hook would translate its
    // packets again. The packet path translates the flow once and marks it.
    if lookup_frontend(family, proto, &backend.addr, backend.port).is_some() {
        return None;
    }
    remember(ctx, family, &backend, addr, port);
    count_flow(svc.svc_id);
    Some(backend)
}

/// Records, for this socket and `backend`, the frontend `addr:port` it
/// asked for, which `recvmsg()` and `getpeername()` give back.
#[inline(always)]
fn remember(ctx: &SockAddrContext, family: u8, backend: &BackendValue, addr: &Addr, port: u16) {
    // SAFETY: the context pointer is this program's.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let rev_key = SockRevKey::new(cookie, family, backend.addr, backend.port);
    let rev = SockRevValue {
        addr: *addr,
        port,
        _pad0: [0; 6],
    };
    // A lost entry only costs the reply its frontend address.
    let _ = PA_SOCK_REVNAT.insert(&rev_key, &rev, 0);
}

/// A backend for a call of `owner` to `addr:port`.
#[inline(always)]
fn translate(
    ctx: &SockAddrContext,
    owner: &Owner,
    family: u8,
    proto: u8,
    addr: &Addr,
    port: u16,
) -> Result<BackendValue, Outcome> {
    match owner {
        Owner::Node => balance(ctx, family, proto, addr, port),
        Owner::Pod(pod) => {
            balance_pod(ctx, pod, family, proto, addr, port).ok_or(Outcome::Untouched)
        }
    }
}

/// The stat a translation of `owner`'s call counts under.
#[inline(always)]
fn translated(owner: &Owner) -> Outcome {
    match owner {
        Owner::Node => Outcome::Translated(stat::SOCK_TRANSLATED),
        Owner::Pod(_) => Outcome::Translated(stat::SOCK_POD_TRANSLATED),
    }
}

/// The client address the node's own traffic has in the affinity map: the
/// node's masquerade address of the family (what a backend sees).
#[inline(always)]
fn node_identity(family: u8) -> Option<Addr> {
    snat_addr(config(), family)
}

#[inline(always)]
fn choose(
    svc: &ServiceValue,
    key: &ServiceKey,
    family: u8,
    client: Option<&Addr>,
) -> Option<BackendValue> {
    let affinity = svc.flags & SVC_AFFINITY != 0;
    let now = now();
    if affinity
        && let Some(client) = client
        && let Some(found) = affinity_backend(svc, family, client, now)
    {
        count(stat::AFFINITY_HIT);
        count_flow(svc.svc_id);
        return Some(found.1);
    }
    let (id, backend) = pick_slot(svc, key)?;
    if affinity && let Some(client) = client {
        let value = AffinityValue {
            backend_id: id,
            _pad0: 0,
            last_seen_ns: now,
        };
        let _ = PA_AFFINITY.insert(&affinity_key(svc.svc_id, family, client), &value, 0);
    }
    count_flow(svc.svc_id);
    Some(backend)
}

#[inline(always)]
fn finish(outcome: Outcome) -> i32 {
    match outcome {
        Outcome::Untouched => 1,
        Outcome::Translated(counter) => {
            count(counter);
            1
        }
        Outcome::Refused => {
            count(stat::SOCK_REFUSED);
            // SAFETY: only sets this call's return value.
            unsafe { bpf_set_retval(-ECONNREFUSED) };
            0
        }
    }
}

/// `connect()` and `sendmsg()` over IPv4.
#[inline(always)]
fn forward4(ctx: &SockAddrContext) -> i32 {
    // SAFETY: the context pointer is valid for the program's run.
    let sa = unsafe { &mut *ctx.sock_addr };
    let Some(owner) = owner(ctx) else {
        return 1;
    };
    let Some(proto) = protocol(sa) else {
        return 1;
    };
    let addr = v4_addr(sa.user_ip4.to_ne_bytes());
    let port = sa.user_port as u16;
    match translate(ctx, &owner, FAMILY_V4, proto, &addr, port) {
        Ok(backend) => {
            sa.user_ip4 = v4_raw(&backend.addr);
            sa.user_port = backend.port as u32;
            finish(translated(&owner))
        }
        Err(outcome) => finish(outcome),
    }
}

/// Reads the IPv6 address of `sa`.
#[inline(always)]
fn user_ip6(sa: &bpf_sock_addr) -> Addr {
    addr_of_words(&sa.user_ip6)
}

/// An IPv6 address of a socket context, read as four 32-bit loads (the
/// verifier requires them of these contexts).
#[inline(always)]
fn addr_of_words(words: &[u32; 4]) -> Addr {
    let mut addr = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let word = words[i].to_ne_bytes();
        addr[i * 4] = word[0];
        addr[i * 4 + 1] = word[1];
        addr[i * 4 + 2] = word[2];
        addr[i * 4 + 3] = word[3];
        i += 1;
    }
    addr
}

#[inline(always)]
fn set_user_ip6(sa: &mut bpf_sock_addr, addr: &Addr) {
    let mut i = 0;
    while i < 4 {
        sa.user_ip6[i] = u32::from_ne_bytes([
            addr[i * 4],
            addr[i * 4 + 1],
            addr[i * 4 + 2],
            addr[i * 4 + 3],
        ]);
        i += 1;
    }
}

/// `::ffff:a.b.c.d`: an IPv4 peer of a dual-stack socket.
#[inline(always)]
fn v4_mapped(addr: &Addr) -> bool {
    let mut i = 0;
    while i < 10 {
        if addr[i] != 0 {
            return false;
        }
        i += 1;
    }
    addr[10] == 0xff && addr[11] == 0xff
}

/// The family and address a dual-stack socket's peer really has: an
/// IPv4-mapped address is IPv4. The last value says it was mapped.
#[inline(always)]
fn unmap(full: &Addr) -> (u8, Addr, bool) {
    if !v4_mapped(full) {
        return (FAMILY_V6, *full, false);
    }
    (
        FAMILY_V4,
        v4_addr([full[12], full[13], full[14], full[15]]),
        true,
    )
}

/// `addr` as the socket must see it: mapped again if its peer was.
#[inline(always)]
fn remap(addr: &Addr, mapped: bool) -> Addr {
    if !mapped {
        return *addr;
    }
    let mut out = [0u8; 16];
    out[10] = 0xff;
    out[11] = 0xff;
    out[12] = addr[0];
    out[13] = addr[1];
    out[14] = addr[2];
    out[15] = addr[3];
    out
}

/// `connect()` and `sendmsg()` over IPv6, IPv4-mapped peers included.
#[inline(always)]
fn forward6(ctx: &SockAddrContext) -> i32 {
    // SAFETY: the context pointer is valid for the program's run.
    let sa = unsafe { &mut *ctx.sock_addr };
    let Some(owner) = owner(ctx) else {
        return 1;
    };
    let Some(proto) = protocol(sa) else {
        return 1;
    };
    let full = user_ip6(sa);
    let port = sa.user_port as u16;
    let (family, addr, mapped) = unmap(&full);
    match translate(ctx, &owner, family, proto, &addr, port) {
        Ok(backend) => {
            set_user_ip6(sa, &remap(&backend.addr, mapped));
            sa.user_port = backend.port as u32;
            finish(translated(&owner))
        }
        Err(outcome) => finish(outcome),
    }
}

/// The frontend a socket of ours reached `addr:port` through, if any. A
/// peer on a port no backend has was never translated: most calls (a
/// server's `accept()` asks for its client's name) end there.
#[inline(always)]
fn reverse(ctx: &SockAddrContext, family: u8, addr: &Addr, port: u16) -> Option<SockRevValue> {
    if !may_be_backend_port(port) {
        return None;
    }
    // SAFETY: the context pointer is this program's.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: copied out at once; plain data.
    unsafe { PA_SOCK_REVNAT.get(&SockRevKey::new(cookie, family, *addr, port)) }.copied()
}

/// `recvmsg()` and `getpeername()` over IPv4: the backend's address
/// becomes the frontend's again.
#[inline(always)]
fn backward4(ctx: &SockAddrContext) -> i32 {
    // SAFETY: the context pointer is valid for the program's run.
    let sa = unsafe { &mut *ctx.sock_addr };
    let addr = v4_addr(sa.user_ip4.to_ne_bytes());
    if let Some(rev) = reverse(ctx, FAMILY_V4, &addr, sa.user_port as u16) {
        sa.user_ip4 = v4_raw(&rev.addr);
        sa.user_port = rev.port as u32;
        count(stat::SOCK_REVNAT);
    }
    1
}

#[inline(always)]
fn backward6(ctx: &SockAddrContext) -> i32 {
    // SAFETY: the context pointer is valid for the program's run.
    let sa = unsafe { &mut *ctx.sock_addr };
    let full = user_ip6(sa);
    let port = sa.user_port as u16;
    let (family, addr, mapped) = unmap(&full);
    if let Some(rev) = reverse(ctx, family, &addr, port) {
        set_user_ip6(sa, &remap(&rev.addr, mapped));
        sa.user_port = rev.port as u32;
        count(stat::SOCK_REVNAT);
    }
    1
}

#[cgroup_sock_addr(connect4)]
pub fn pa_connect4(ctx: SockAddrContext) -> i32 {
    forward4(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn pa_sendmsg4(ctx: SockAddrContext) -> i32 {
    forward4(&ctx)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn pa_recvmsg4(ctx: SockAddrContext) -> i32 {
    backward4(&ctx)
}

#[cgroup_sock_addr(getpeername4)]
pub fn pa_getpeername4(ctx: SockAddrContext) -> i32 {
    backward4(&ctx)
}

#[cgroup_sock_addr(connect6)]
pub fn pa_connect6(ctx: SockAddrContext) -> i32 {
    forward6(&ctx)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn pa_sendmsg6(ctx: SockAddrContext) -> i32 {
    forward6(&ctx)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn pa_recvmsg6(ctx: SockAddrContext) -> i32 {
    backward6(&ctx)
}

#[cgroup_sock_addr(getpeername6)]
pub fn pa_getpeername6(ctx: SockAddrContext) -> i32 {
    backward6(&ctx)
}

/// A socket closes: its reverse entry goes with it, so that the entries of
/// connected sockets, one per `connect()`, never fill the map and make
/// each new one evict an old one. (An unconnected UDP socket's entries,
/// one per backend it sent to, age out of the LRU map.)
#[cgroup_sock(sock_release)]
pub fn pa_sock_release(ctx: SockContext) -> i32 {
    // SAFETY: the context pointer is valid for the program's run.
    let sk = unsafe { &*ctx.sock };
    let port = sk.dst_port;
    if !may_be_backend_port(port) {
        return 1;
    }
    let (family, addr) = if sk.family == AF_INET {
        (FAMILY_V4, v4_addr(sk.dst_ip4.to_ne_bytes()))
    } else if sk.family == AF_INET6 {
        let (family, addr, _) = unmap(&addr_of_words(&sk.dst_ip6));
        (family, addr)
    } else {
        return 1;
    };
    // SAFETY: the context pointer is this program's.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let _ = PA_SOCK_REVNAT.remove(&SockRevKey::new(cookie, family, addr, port));
    1
}
