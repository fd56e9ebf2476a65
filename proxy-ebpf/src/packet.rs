//! Header constants and address conversions every program family uses.
use proxy_common::Addr;

pub(crate) const ETH_HLEN: usize = 14;
pub(crate) const ETH_P_IP: u16 = 0x0800;
pub(crate) const ETH_P_IPV6: u16 = 0x86DD;
pub(crate) const IP6_HLEN: usize = 40;

/// An IPv4 address as an [`Addr`]: its four bytes first, the rest zero.
#[inline(always)]
pub(crate) fn v4_addr(b: [u8; 4]) -> Addr {
    let mut addr = [0u8; 16];
    addr[0] = b[0];
    addr[1] = b[1];
    addr[2] = b[2];
    addr[3] = b[3];
    addr
}

/// The IPv4 address of an [`Addr`] as it sits in a header (network order
/// in memory).
#[inline(always)]
pub(crate) fn v4_raw(addr: &Addr) -> u32 {
    u32::from_ne_bytes([addr[0], addr[1], addr[2], addr[3]])
}
