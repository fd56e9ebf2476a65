//! Checksums: the TCP/UDP checksum's place and flags, the one's-complement
//! difference of two addresses, the SCTP CRC32c fixed for a port change,
//! and whole one's-complement sums for packets built from scratch (Cilium's
//! `csum.h`, Katran's `csum_helpers.h`).
use aya_ebpf::{
    bindings::{__sk_buff, BPF_F_MARK_MANGLED_0},
    helpers::bpf_csum_diff,
    programs::TcContext,
};
use proxy_common::{Addr, FAMILY_V4, PROTO_TCP, PROTO_UDP};

use crate::packet::{ETH_HLEN, IP6_HLEN};
use crate::parse::{IP_TOT_LEN, IP6_PAYLOAD_LEN, Packet, SCTP_CSUM, TCP_CSUM, UDP_CSUM};

/// Offset of the L4 checksum, and the flags its updates need; `None` for
/// SCTP, whose CRC32c covers no IP pseudo-header.
#[inline(always)]
pub(crate) fn l4_csum(pkt: &Packet) -> Option<(usize, u64)> {
    if pkt.proto == PROTO_TCP {
        Some((pkt.l4_off + TCP_CSUM, 0))
    } else if pkt.proto == PROTO_UDP {
        // A zero UDP checksum over IPv4 means "none" and must stay zero.
        let mangled = if pkt.family == FAMILY_V4 {
            BPF_F_MARK_MANGLED_0 as u64
        } else {
            0
        };
        Some((pkt.l4_off + UDP_CSUM, mangled))
    } else {
        None
    }
}

/// The one's-complement difference between two 16-byte addresses, as
/// `bpf_l4_csum_replace` takes it.
#[inline(always)]
pub(crate) fn csum_diff16(old: &Addr, new: &Addr) -> Result<u64, i64> {
    let mut from = *old;
    let mut to = *new;
    // SAFETY: both buffers are 16 bytes on this program's stack, a multiple
    // of four as the helper requires; it only reads them.
    let diff = unsafe {
        bpf_csum_diff(
            from.as_mut_ptr() as *mut u32,
            16,
            to.as_mut_ptr() as *mut u32,
            16,
            0,
        )
    };
    if diff < 0 {
        return Err(diff);
    }
    Ok(diff as u64)
}

/// CRC32c (Castagnoli), reflected polynomial.
const CRC32C_POLY: u32 = 0x82F6_3B78;

/// `x^(2^k) mod P` for k = 0..32, in the reflected bit order, for shifting
/// a CRC over runs of zero bytes (the method of zlib's crc32_combine).
const X2N: [u32; 32] = x2n_table();

const fn multmodp(a: u32, mut b: u32) -> u32 {
    let mut m = 1u32 << 31;
    let mut p = 0u32;
    let mut i = 0;
    while i < 32 {
        if a & m != 0 {
            p ^= b;
        }
        m >>= 1;
        b = if b & 1 != 0 {
            (b >> 1) ^ CRC32C_POLY
        } else {
            b >> 1
        };
        i += 1;
    }
    p
}

const fn x2n_table() -> [u32; 32] {
    let mut table = [0u32; 32];
    let mut p = 1u32 << 30; // x^1
    let mut k = 0;
    while k < 32 {
        table[k] = p;
        p = multmodp(p, p);
        k += 1;
    }
    table
}

/// Rows of [`ZERO_SHIFT`]: runs of up to 2^24 - 1 zero bytes, more than
/// any packet has.
const ZERO_SHIFT_ROWS: usize = 24;

/// `ZERO_SHIFT[j][b][v]` = `(v << 8b) * x^(8 * 2^j) mod P`: multiplying by
/// the constant `x^(8 * 2^j)` is linear, so it is the XOR of one entry per
/// byte of the multiplicand. Four loads per set bit of a run's length
/// instead of a 32-step loop, which keeps the verifier's walk short.
static ZERO_SHIFT: [[[u32; 256]; 4]; ZERO_SHIFT_ROWS] = zero_shift_table();

const fn zero_shift_table() -> [[[u32; 256]; 4]; ZERO_SHIFT_ROWS] {
    let mut table = [[[0u32; 256]; 4]; ZERO_SHIFT_ROWS];
    let mut j = 0;
    while j < ZERO_SHIFT_ROWS {
        // 8 * 2^j = 2^(j + 3).
        let factor = X2N[j + 3];
        let mut b = 0;
        while b < 4 {
            let mut v = 0;
            while v < 256 {
                table[j][b][v] = multmodp(factor, (v as u32) << (8 * b));
                v += 1;
            }
            b += 1;
        }
        j += 1;
    }
    table
}

/// `crc * x^(8 * bytes) mod P`: the effect of `bytes` zero bytes following
/// the data a raw CRC was taken over. `None` past [`ZERO_SHIFT_ROWS`].
#[inline(always)]
fn crc_shift_zeros(crc: u32, bytes: u32) -> Option<u32> {
    if bytes >> ZERO_SHIFT_ROWS != 0 {
        return None;
    }
    let mut p = crc;
    let mut j = 0;
    while j < ZERO_SHIFT_ROWS {
        if bytes >> j == 0 {
            break;
        }
        if (bytes >> j) & 1 != 0 {
            let row = &ZERO_SHIFT[j];
            p = row[0][(p & 0xff) as usize]
                ^ row[1][((p >> 8) & 0xff) as usize]
                ^ row[2][((p >> 16) & 0xff) as usize]
                ^ row[3][(p >> 24) as usize];
        }
        j += 1;
    }
    Some(p)
}

/// Fixes the SCTP CRC32c for a port change. CRC is linear: the checksum of
/// the new packet is the old one XOR the raw CRC of the difference, which is
/// non-zero only in the changed port, followed by the rest of the packet as
/// zero bytes. That costs a few hundred instructions, independent of the
/// packet's size, instead of a pass over the whole payload.
///
/// `delta` is the XOR of the old and new port as they sit in memory, at
/// offset `port_at` of the SCTP header. Returns 0, or a helper's error.
#[inline(always)]
pub(crate) fn sctp_port_changed(
    ctx: &mut TcContext,
    pkt: &Packet,
    port_at: usize,
    delta: u16,
) -> i64 {
    pa_sctp_port_changed(
        ctx.skb.skb,
        pkt.l4_off as u32,
        port_at as u32,
        u32::from(delta),
        u32::from(pkt.family),
    )
}

/// [`sctp_port_changed`] as a global function: the verifier checks it once
/// per program, whatever the caller's state, instead of once for every
/// path that reaches it (its loops are most of the instructions a program
/// would otherwise take to verify). Its arguments are scalars and the
/// context, as a global function's must be.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn pa_sctp_port_changed(
    skb: *mut __sk_buff,
    l4_off: u32,
    port_at: u32,
    delta: u32,
    family: u32,
) -> i64 {
    // The calling program's own context, passed down unchanged.
    let ctx = TcContext::new(skb);
    let (l4_off, port_at) = (l4_off as usize & 0xffff, port_at as usize & 0xff);
    let delta = (delta as u16).to_ne_bytes();
    // Raw CRC (no init, no final xor) of the delta's bytes at the port's
    // place: the leading zero bytes leave the register at zero, so only
    // these two bytes and the zeros after them matter.
    let mut crc = 0u32;
    let mut i = 0;
    while i < 2 {
        crc ^= delta[i] as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ CRC32C_POLY
            } else {
                crc >> 1
            };
            bit += 1;
        }
        i += 1;
    }
    // The SCTP packet ends where the IP header says, not at the end of the
    // skb: at ingress a short frame still carries its Ethernet padding.
    let skb_end = ctx.len() as usize;
    let ip_end = if family == u32::from(FAMILY_V4) {
        match ctx.load::<u16>(ETH_HLEN + IP_TOT_LEN) {
            Ok(v) => ETH_HLEN + u16::from_be(v) as usize,
            Err(e) => return e,
        }
    } else {
        match ctx.load::<u16>(ETH_HLEN + IP6_PAYLOAD_LEN) {
            // Zero: a jumbogram, whose length is in an option; the skb's.
            Ok(0) => skb_end,
            Ok(v) => ETH_HLEN + IP6_HLEN + u16::from_be(v) as usize,
            Err(e) => return e,
        }
    };
    let end = if ip_end < skb_end { ip_end } else { skb_end };
    let sctp_len = end.saturating_sub(l4_off);
    let after = sctp_len.saturating_sub(port_at + 2) as u32;
    let Some(crc) = crc_shift_zeros(crc, after) else {
        return -1;
    };
    let off = l4_off + SCTP_CSUM;
    // The checksum field holds the CRC little-endian.
    let old: u32 = match ctx.load(off) {
        Ok(v) => v,
        Err(e) => return e,
    };
    let new = u32::from_le(old) ^ crc;
    match ctx.store(off, &new.to_le(), 0) {
        Ok(()) => 0,
        Err(e) => e,
    }
}

/// One's-complement sum of 16-bit big-endian words.
#[inline(always)]
pub(crate) fn sum16(bytes: &[u8], mut acc: u32) -> u32 {
    let mut i = 0;
    while i + 1 < bytes.len() {
        acc += ((bytes[i] as u32) << 8) | bytes[i + 1] as u32;
        i += 2;
    }
    acc
}

#[inline(always)]
pub(crate) fn fold(mut acc: u32) -> u16 {
    acc = (acc & 0xffff) + (acc >> 16);
    acc = (acc & 0xffff) + (acc >> 16);
    !(acc as u16)
}
