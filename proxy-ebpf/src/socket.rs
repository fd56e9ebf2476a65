//! Socket-level load balancing for the node's own processes (cgroup
//! `sock_addr` hooks): a `connect()` or `sendmsg()` to a service frontend is
//! given a backend's address before any packet exists, and `recvmsg()` /
//! `getpeername()` give the frontend's address back.
//!
//! The node's own traffic never crosses the TC hooks of a pod interface on
//! its way out (a ClusterIP is routed out of the node's uplink, and a
//! NodePort on a local address goes over loopback), so without these hooks
//! host processes and hostNetwork pods could not reach services, nor
//! localhost NodePorts when `--nodeport-addresses` asks for them.
//!
//! Only sockets of the agent's own network namespace are translated (the
//! cgroup hooks see every namespace of the cgroup): pods keep the packet
//! path, where masquerade, source ranges and hairpin are decided.
use aya_ebpf::{
    EbpfContext,
    bindings::bpf_sock_addr,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use proxy_common::{
    Addr, AffinityValue, BackendValue, FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP, SCOPE_INTERNAL,
    SVC_AFFINITY, SVC_INTERNAL_SCOPE, SVC_SOURCE_RANGES, ServiceKey, ServiceValue, SockRevKey,
    SockRevValue, stat,
};

use crate::maps::{
    PA_AFFINITY, PA_SERVICES, PA_SOCK_NETNS, PA_SOCK_REVNAT, affinity_backend, affinity_key,
    config, count, in_service_cidr, lookup_frontend, now, pick_slot, snat_addr, source_admitted,
};
use crate::packet::{v4_addr, v4_raw};

const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;
const ECONNREFUSED: i32 = 111;

/// What a hook does with the socket call.
enum Outcome {
    /// Not a service (or not ours to translate): the call goes on as is.
    Untouched,
    /// The address was rewritten to a backend.
    Translated,
    /// A service without endpoints, one whose source ranges leave the node
    /// out, or an address of a ServiceCIDR no frontend serves: the call
    /// fails with ECONNREFUSED.
    Refused,
}

/// Whether this socket lives in the agent's network namespace.
#[inline(always)]
fn ours(ctx: &SockAddrContext) -> bool {
    let Some(&netns) = PA_SOCK_NETNS.get(0) else {
        return false;
    };
    // SAFETY: the context pointer is this program's.
    netns != 0 && unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } == netns
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
    // SAFETY: the context pointer is this program's.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let rev_key = SockRevKey {
        cookie,
        addr: backend.addr,
        port: backend.port,
        family,
        _pad0: [0; 5],
    };
    let rev = SockRevValue {
        addr: *addr,
        port,
        _pad0: [0; 6],
    };
    // A lost entry only costs the reply its frontend address.
    let _ = PA_SOCK_REVNAT.insert(&rev_key, &rev, 0);
    Ok(backend)
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
    Some(backend)
}

#[inline(always)]
fn finish(outcome: Outcome) -> i32 {
    match outcome {
        Outcome::Untouched => 1,
        Outcome::Translated => {
            count(stat::SOCK_TRANSLATED);
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
    if !ours(ctx) {
        return 1;
    }
    let Some(proto) = protocol(sa) else {
        return 1;
    };
    let addr = v4_addr(sa.user_ip4.to_ne_bytes());
    let port = sa.user_port as u16;
    match balance(ctx, FAMILY_V4, proto, &addr, port) {
        Ok(backend) => {
            sa.user_ip4 = v4_raw(&backend.addr);
            sa.user_port = backend.port as u32;
            finish(Outcome::Translated)
        }
        Err(outcome) => finish(outcome),
    }
}

/// Reads the IPv6 address of `sa` (four 32-bit loads, as the verifier
/// requires of this context).
#[inline(always)]
fn user_ip6(sa: &bpf_sock_addr) -> Addr {
    let mut addr = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let word = sa.user_ip6[i].to_ne_bytes();
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
    if !ours(ctx) {
        return 1;
    }
    let Some(proto) = protocol(sa) else {
        return 1;
    };
    let full = user_ip6(sa);
    let port = sa.user_port as u16;
    let (family, addr, mapped) = unmap(&full);
    match balance(ctx, family, proto, &addr, port) {
        Ok(backend) => {
            set_user_ip6(sa, &remap(&backend.addr, mapped));
            sa.user_port = backend.port as u32;
            finish(Outcome::Translated)
        }
        Err(outcome) => finish(outcome),
    }
}

/// The frontend a socket of ours reached `addr:port` through, if any.
#[inline(always)]
fn reverse(ctx: &SockAddrContext, family: u8, addr: &Addr, port: u16) -> Option<SockRevValue> {
    // SAFETY: the context pointer is this program's.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = SockRevKey {
        cookie,
        addr: *addr,
        port,
        family,
        _pad0: [0; 5],
    };
    // SAFETY: copied out at once; plain data.
    unsafe { PA_SOCK_REVNAT.get(&key) }.copied()
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
