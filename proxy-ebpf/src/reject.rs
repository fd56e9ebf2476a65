//! Refusing a connection to a frontend without endpoints: the packet is
//! turned, in place, into a TCP reset or an ICMP port-unreachable and sent
//! back out of the interface it came in on.
use aya_ebpf::{
    bindings::TC_ACT_SHOT,
    helpers::{bpf_redirect, bpf_skb_change_tail, bpf_skb_load_bytes},
    programs::TcContext,
};
use proxy_common::{FAMILY_V4, PROTO_TCP, stat};

use crate::csum::{fold, sum16};
use crate::datapath::Verdict;
use crate::packet::{ETH_HLEN, IP6_HLEN, v4_raw};
use crate::parse::{
    IP_DADDR, IP_SADDR, IP6_DADDR, IP6_SADDR, L4_DPORT, L4_SPORT, Packet, TCP_ACK, TCP_ACK_SEQ,
    TCP_CSUM, TCP_RST, TCP_SEQ, TCP_SYN, TCP_WINDOW, ifindex,
};

const TC_ACT_REDIRECT: i32 = 7;

/// Refuses a connection to a service without any endpoint, so the client
/// fails at once instead of waiting for a timeout: a TCP SYN gets a reset,
/// a UDP or SCTP packet an ICMP port-unreachable, sent back out of the
/// interface it came in on. Other TCP packets are dropped.
#[inline(always)]
pub(crate) fn reject(ctx: &mut TcContext, pkt: &Packet) -> Verdict {
    let done = if pkt.proto == PROTO_TCP {
        if pkt.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) != TCP_SYN {
            return (TC_ACT_SHOT as i32, stat::REJECT);
        }
        tcp_reset(ctx, pkt)
    } else if pkt.family == FAMILY_V4 {
        icmp4_unreachable(ctx, pkt)
    } else {
        icmp6_unreachable(ctx, pkt)
    };
    if done.is_err() {
        return (TC_ACT_SHOT as i32, stat::ERR_REJECT);
    }
    let ifindex = ifindex(ctx);
    // SAFETY: bpf_redirect only records the target; no memory is passed.
    let action = unsafe { bpf_redirect(ifindex, 0) };
    if action as i32 != TC_ACT_REDIRECT {
        return (TC_ACT_SHOT as i32, stat::ERR_REJECT);
    }
    (TC_ACT_REDIRECT, stat::REJECT)
}

/// Swaps the Ethernet addresses, so the frame goes back to its sender.
#[inline(always)]
fn swap_macs(ctx: &mut TcContext) -> Result<(), i64> {
    let macs: [u8; 12] = ctx.load(0)?;
    let mut swapped = [0u8; 12];
    let mut i = 0;
    while i < 6 {
        swapped[i] = macs[i + 6];
        swapped[i + 6] = macs[i];
        i += 1;
    }
    ctx.store(0, &swapped, 0)
}

/// Turns a SYN into the matching RST+ACK in place. Swapping addresses and
/// ports leaves every checksum unchanged, and the other fields are updated
/// incrementally, so this is correct whatever checksum offload state the
/// packet is in. Options stay (Linux ignores them on a reset).
#[inline(never)]
fn tcp_reset(ctx: &mut TcContext, pkt: &Packet) -> Result<(), i64> {
    let l4 = pkt.l4_off;
    let csum = l4 + TCP_CSUM;
    let seq: u32 = ctx.load(l4 + TCP_SEQ)?;
    let old_ack: u32 = ctx.load(l4 + TCP_ACK_SEQ)?;
    let new_ack = u32::from_be(seq).wrapping_add(1).to_be();
    let old_flags: u16 = ctx.load(l4 + 12)?;
    let mut flag_bytes = old_flags.to_ne_bytes();
    flag_bytes[1] = TCP_RST | TCP_ACK;
    let new_flags = u16::from_ne_bytes(flag_bytes);
    let old_window: u16 = ctx.load(l4 + TCP_WINDOW)?;
    ctx.l4_csum_replace(csum, seq as u64, 0, 4)?;
    ctx.store(l4 + TCP_SEQ, &0u32, 0)?;
    ctx.l4_csum_replace(csum, old_ack as u64, new_ack as u64, 4)?;
    ctx.store(l4 + TCP_ACK_SEQ, &new_ack, 0)?;
    ctx.l4_csum_replace(csum, old_flags as u64, new_flags as u64, 2)?;
    ctx.store(l4 + 12, &new_flags, 0)?;
    ctx.l4_csum_replace(csum, old_window as u64, 0, 2)?;
    ctx.store(l4 + TCP_WINDOW, &0u16, 0)?;
    ctx.store(l4 + L4_SPORT, &pkt.dport, 0)?;
    ctx.store(l4 + L4_DPORT, &pkt.sport, 0)?;
    if pkt.family == FAMILY_V4 {
        ctx.store(ETH_HLEN + IP_SADDR, &v4_raw(&pkt.daddr), 0)?;
        ctx.store(ETH_HLEN + IP_DADDR, &v4_raw(&pkt.saddr), 0)?;
    } else {
        ctx.store(ETH_HLEN + IP6_SADDR, &pkt.daddr, 0)?;
        ctx.store(ETH_HLEN + IP6_DADDR, &pkt.saddr, 0)?;
    }
    swap_macs(ctx)
}

/// Copies exactly `dst.len()` bytes from `off` of the packet, or fails.
/// (aya's `load_bytes` clamps the length to what is left of the packet,
/// which the verifier refuses as a possibly zero-sized read.)
#[inline(always)]
fn load_exact(ctx: &TcContext, off: usize, dst: &mut [u8]) -> Result<(), i64> {
    // SAFETY: `dst` is a live buffer of `dst.len()` bytes on this program's
    // stack; the helper writes at most that many and checks the packet side.
    let ret = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb as *const _,
            off as u32,
            dst.as_mut_ptr() as *mut _,
            dst.len() as u32,
        )
    };
    if ret < 0 { Err(ret) } else { Ok(()) }
}

/// Resizes the packet to `len` bytes (Ethernet header included).
#[inline(always)]
fn set_len(ctx: &mut TcContext, len: u32) -> Result<(), i64> {
    // SAFETY: the skb pointer is this program's context.
    let ret = unsafe { bpf_skb_change_tail(ctx.skb.skb, len, 0) };
    if ret < 0 { Err(ret) } else { Ok(()) }
}

/// Replaces an IPv4 packet with an ICMP port-unreachable quoting its IP
/// header and first 8 bytes, from the address it was sent to.
///
/// The checksums are written whole. An skb whose L4 checksum the sender
/// left to offload (CHECKSUM_PARTIAL) only comes from a local virtual
/// device, and goes back out of that same device, whose peer does not
/// check it.
#[inline(never)]
fn icmp4_unreachable(ctx: &mut TcContext, pkt: &Packet) -> Result<(), i64> {
    if pkt.l4_off != ETH_HLEN + 20 {
        // IP options: too rare to quote; the caller drops the packet.
        return Err(-1);
    }
    let mut buf = [0u8; 56];
    load_exact(ctx, ETH_HLEN, &mut buf[28..56])?;
    buf[0] = 0x45;
    buf[1] = 0xc0;
    buf[2] = 0;
    buf[3] = 56;
    buf[8] = 64;
    buf[9] = 1; // ICMP
    let mut i = 0;
    while i < 4 {
        buf[12 + i] = pkt.daddr[i];
        buf[16 + i] = pkt.saddr[i];
        i += 1;
    }
    let ip_csum = fold(sum16(&buf[0..20], 0));
    buf[10] = (ip_csum >> 8) as u8;
    buf[11] = ip_csum as u8;
    buf[20] = 3; // destination unreachable
    buf[21] = 3; // port unreachable
    let icmp_csum = fold(sum16(&buf[20..56], 0));
    buf[22] = (icmp_csum >> 8) as u8;
    buf[23] = icmp_csum as u8;
    swap_macs(ctx)?;
    set_len(ctx, (ETH_HLEN + 56) as u32)?;
    ctx.store(ETH_HLEN, &buf, 0)
}

/// The IPv6 counterpart: ICMPv6 destination unreachable, port unreachable.
#[inline(never)]
fn icmp6_unreachable(ctx: &mut TcContext, pkt: &Packet) -> Result<(), i64> {
    if pkt.l4_off != ETH_HLEN + IP6_HLEN {
        return Err(-1);
    }
    let mut buf = [0u8; 96];
    load_exact(ctx, ETH_HLEN, &mut buf[48..96])?;
    buf[0] = 0x60;
    buf[4] = 0;
    buf[5] = 56; // payload length
    buf[6] = 58; // ICMPv6
    buf[7] = 64;
    let mut i = 0;
    while i < 16 {
        buf[8 + i] = pkt.daddr[i];
        buf[24 + i] = pkt.saddr[i];
        i += 1;
    }
    buf[40] = 1; // destination unreachable
    buf[41] = 4; // port unreachable
    // Pseudo-header: addresses, upper-layer length, next header.
    let mut acc = sum16(&buf[8..40], 0);
    acc += 56 + 58;
    let csum = fold(sum16(&buf[40..96], acc));
    buf[42] = (csum >> 8) as u8;
    buf[43] = csum as u8;
    swap_macs(ctx)?;
    set_len(ctx, (ETH_HLEN + 96) as u32)?;
    ctx.store(ETH_HLEN, &buf, 0)
}
