//! The ipvs mode: kube-proxy's IPVS layout.
pub mod netlink;
