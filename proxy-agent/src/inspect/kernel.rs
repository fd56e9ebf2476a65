//! Reading a mode's kernel state for `list` and `trace`, whichever mode it
//! is: the modes' readers behind one call, and the flow and affinity
//! entries that pin a client.
use std::{
    collections::BTreeSet,
    net::IpAddr,
    path::{Path, PathBuf},
};

use super::trace::{Pins, Query};
use crate::{
    dataplane::{
        DataplaneError, Mode, conntrack, ebpf, held::HeldTable, iptables, ipvs,
        mode::IptablesBackendChoice, nftables,
    },
    model::{Backend, FrontendKey},
};

/// Where the modes keep their state.
#[derive(Clone, Debug)]
pub struct KernelOptions {
    /// `--bpf-root` of the ebpf mode.
    pub bpf_root: PathBuf,
    pub iptables_backend: IptablesBackendChoice,
}

/// What `mode` holds in the kernel now. `nodeport_addresses`: the node's
/// (IPVS holds a NodePort as one virtual server per address).
pub fn held(
    mode: Mode,
    options: &KernelOptions,
    nodeport_addresses: &BTreeSet<IpAddr>,
) -> Result<HeldTable, DataplaneError> {
    Ok(match mode {
        Mode::Ebpf => ebpf::held::held(&options.bpf_root)?,
        Mode::Nftables => nftables::held::held()?,
        Mode::Iptables => iptables::held::held(options.iptables_backend.resolve())?,
        Mode::Ipvs => ipvs::held::held(nodeport_addresses).map_err(DataplaneError::Ipvs)?,
    })
}

/// The flow and affinity entries `mode` holds for the client of `query`
/// at `frontend`, whose affinity (timeout, and the backends a new
/// connection may go to) is `affinity`. What cannot be read is said in
/// the notes, not failed.
pub fn pins(
    mode: Mode,
    bpf_root: &Path,
    query: &Query,
    frontend: &FrontendKey,
    affinity: Option<(u32, &[Backend])>,
) -> Pins {
    let mut pins = Pins::default();
    match mode {
        Mode::Ebpf => {
            let tuple = ebpf::held::Tuple {
                src: query.from,
                sport: query.from_port.unwrap_or(0),
                dst: query.to,
                dport: query.to_port,
                protocol: query.protocol,
            };
            match ebpf::held::pins(bpf_root, &tuple, frontend) {
                Ok((flow, affinity)) => {
                    pins.flow = flow;
                    pins.affinity = affinity;
                }
                Err(e) => pins
                    .notes
                    .push(format!("the flow maps could not be read: {e}")),
            }
            pins.notes.push(
                "a pod's or the node's connection that a socket hook translated at connect() \
                 has no flow entry: it goes to the backend its socket is connected to"
                    .into(),
            );
        }
        Mode::Nftables | Mode::Iptables | Mode::Ipvs => {
            if let Some(sport) = query.from_port {
                match conntrack::translated_destination(
                    query.from,
                    sport,
                    query.to,
                    query.to_port,
                    query.protocol.number(),
                ) {
                    Ok(found) => pins.flow = found.map(|(ip, port)| Backend { ip, port }),
                    Err(e) => pins
                        .notes
                        .push(format!("the conntrack table could not be read: {e}")),
                }
            }
            if let Some((timeout, backends)) = affinity {
                pins.affinity = match mode {
                    Mode::Iptables => {
                        iptables::held::affinity_backend(frontend, backends, query.from)
                    }
                    Mode::Nftables => {
                        nftables::held::affinity_backend(frontend, backends, timeout, query.from)
                    }
                    _ => ipvs::held::affinity_backend(query.to, query.to_port, query.from),
                };
            }
        }
    }
    pins
}

/// The modes that hold state on this node, in a fixed order: normally
/// one, two while a mode switch hands over.
pub fn modes_holding_state(
    options: &KernelOptions,
    nodeport_addresses: &BTreeSet<IpAddr>,
) -> Vec<(Mode, Result<HeldTable, DataplaneError>)> {
    [Mode::Ebpf, Mode::Nftables, Mode::Iptables, Mode::Ipvs]
        .into_iter()
        .map(|mode| (mode, held(mode, options, nodeport_addresses)))
        .filter(|(_, held)| held.as_ref().map_or(true, |h| !h.frontends.is_empty()))
        .collect()
}
