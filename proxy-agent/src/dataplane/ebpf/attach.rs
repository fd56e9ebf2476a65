//! Attaching the TC programs (tcx) to interfaces, and following interfaces
//! as they come and go.
use std::{
    collections::BTreeMap,
    io,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use aya::{
    Ebpf,
    programs::{
        LinkOrder, SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
    },
};
use futures::StreamExt;
use proxy_common::{PROG_EGRESS, PROG_INGRESS};
use rtnetlink::{
    MulticastGroup,
    packet_core::NetlinkPayload,
    packet_route::{
        RouteNetlinkMessage,
        link::{LinkAttribute, LinkFlags, LinkMessage},
    },
};

use super::{EbpfError, bpffs::PinLayout, pods::PodSockets};

/// How often the pods' namespaces are looked for again, besides when a
/// link appears: a pod's addresses are set after its veth appears here.
const POD_SCAN_PERIOD: std::time::Duration = std::time::Duration::from_secs(5);

/// Which interfaces get the programs.
#[derive(Clone, Debug, Default)]
pub struct InterfaceFilter {
    /// When non-empty, only these interfaces.
    pub include: Vec<String>,
    pub exclude: Vec<String>,
}

impl InterfaceFilter {
    pub fn allows(&self, name: &str) -> bool {
        (self.include.is_empty() || self.include.iter().any(|i| i == name))
            && !self.exclude.iter().any(|e| e == name)
    }
}

const DIRECTIONS: [(&str, TcAttachType, &str); 2] = [
    (PROG_INGRESS, TcAttachType::Ingress, "ingress"),
    (PROG_EGRESS, TcAttachType::Egress, "egress"),
];

/// Owns the loaded programs and the set of interfaces they are attached to.
pub struct Attacher {
    ebpf: Ebpf,
    layout: PinLayout,
    filter: InterfaceFilter,
    /// ifindex -> name of every interface the programs are attached to.
    attached: BTreeMap<u32, String>,
    /// The pods whose sockets get socket-level load balancing, kept up to
    /// date by [`follow_links`]; `None`: pods keep the packet path.
    pods: Option<PodSockets>,
}

/// `<ifindex>-<ifname>-<direction>`: bpffs reserves dots in names (EPERM),
/// and interface names may hold them (VLANs), so they become underscores;
/// the ifindex keeps names unique.
fn pin_path(links_dir: &Path, ifindex: u32, ifname: &str, dir: &str) -> PathBuf {
    links_dir.join(format!("{ifindex}-{}-{dir}", ifname.replace('.', "_")))
}

fn pin_ifindex(file_name: &str) -> Option<u32> {
    file_name.split_once('-')?.0.parse().ok()
}

fn is_not_found(e: &aya::programs::links::LinkError) -> bool {
    matches!(e, aya::programs::links::LinkError::SyscallError(s) if s.io_error.kind() == io::ErrorKind::NotFound)
}

impl Attacher {
    pub(super) fn new(
        ebpf: Ebpf,
        layout: PinLayout,
        filter: InterfaceFilter,
        pods: Option<PodSockets>,
    ) -> Self {
        Self {
            ebpf,
            layout,
            filter,
            attached: BTreeMap::new(),
            pods,
        }
    }

    /// Names of the interfaces the programs are attached to.
    pub fn attached(&self) -> Vec<String> {
        self.attached.values().cloned().collect()
    }

    /// Attaches both programs to `ifname`. A link pinned by an earlier run is
    /// updated in place (atomic program replacement, no gap in service).
    pub fn attach(&mut self, ifindex: u32, ifname: &str) -> Result<(), EbpfError> {
        if !self.filter.allows(ifname) {
            return Ok(());
        }
        let links_dir = self.layout.links();
        for (prog_name, attach_type, dir) in DIRECTIONS {
            let prog: &mut SchedClassifier = self
                .ebpf
                .program_mut(prog_name)
                .ok_or(EbpfError::MissingProgram(prog_name))?
                .try_into()?;
            let pin = pin_path(&links_dir, ifindex, ifname, dir);
            let replaced = match PinnedLink::from_pin(&pin) {
                Ok(old) => {
                    let fd: FdLink = old.into();
                    match SchedClassifierLink::try_from(fd) {
                        Ok(link) => match prog.attach_to_link(link) {
                            Ok(id) => {
                                // The pin still names the (updated) link.
                                drop(prog.take_link(id)?);
                                true
                            }
                            Err(e) => {
                                tracing::info!(interface = ifname, direction = dir, error = %e, "pinned link is stale; attaching afresh");
                                remove_pin(&pin)?;
                                false
                            }
                        },
                        Err(e) => {
                            tracing::info!(interface = ifname, direction = dir, error = %e, "pinned object is not a tcx link; attaching afresh");
                            remove_pin(&pin)?;
                            false
                        }
                    }
                }
                Err(e) if is_not_found(&e) => false,
                Err(e) => return Err(EbpfError::Link(e)),
            };
            if !replaced {
                let id = prog.attach_with_options(
                    ifname,
                    attach_type,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )?;
                let link = prog.take_link(id)?;
                let fd: FdLink = link.try_into().map_err(EbpfError::Link)?;
                // Dropping the returned PinnedLink closes our fd; the pin keeps
                // the program attached across agent restarts.
                drop(fd.pin(&pin)?);
            }
        }
        tracing::info!(
            interface = ifname,
            ifindex,
            "programs attached (tcx ingress+egress)"
        );
        self.attached.insert(ifindex, ifname.to_string());
        Ok(())
    }

    /// Forgets an interface that went away and removes its pins (the kernel
    /// already detached the links with the device).
    pub fn forget(&mut self, ifindex: u32) -> Result<(), EbpfError> {
        if let Some(name) = self.attached.remove(&ifindex) {
            for (_, _, dir) in DIRECTIONS {
                remove_pin(&pin_path(&self.layout.links(), ifindex, &name, dir))?;
            }
            tracing::info!(interface = %name, ifindex, "interface removed; pins dropped");
        }
        Ok(())
    }

    /// Removes pins of interfaces that no longer exist (left by an earlier run).
    pub fn remove_stale_pins(&self, existing: &[(u32, String)]) -> Result<(), EbpfError> {
        let dir = self.layout.links();
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(EbpfError::Io(dir, e)),
        };
        for entry in entries.flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            let live = pin_ifindex(&file).and_then(|idx| {
                existing
                    .iter()
                    .find(|(i, _)| *i == idx)
                    .map(|(_, name)| name)
            });
            if live.is_none_or(|name| !self.attached.values().any(|a| a == name)) {
                tracing::info!(pin = %entry.path().display(), "removing stale link pin");
                remove_pin(&entry.path())?;
            }
        }
        Ok(())
    }
}

pub(super) fn remove_pin(path: &Path) -> Result<(), EbpfError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(EbpfError::Io(path.to_path_buf(), e)),
    }
}

fn link_name(msg: &LinkMessage) -> Option<String> {
    msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    })
}

fn is_candidate(msg: &LinkMessage) -> bool {
    !msg.header.flags.contains(LinkFlags::Loopback)
}

/// Attaches to every current interface, says so on `attached`, then follows
/// link events until the netlink socket fails. Subscribes before listing so
/// no interface that appears in between is missed.
///
/// Programming the maps should wait for `attached`: a flow translated at
/// the ingress of an attached interface and sent out of one not attached
/// yet would miss its source translation there (and a masqueraded flow to
/// another node would go out with the client's address).
pub async fn follow_links(
    attacher: Arc<Mutex<Attacher>>,
    attached: tokio::sync::oneshot::Sender<()>,
) -> Result<(), EbpfError> {
    let (conn, _mc_handle, mut events) =
        rtnetlink::new_multicast_connection(&[MulticastGroup::Link]).map_err(EbpfError::Netlink)?;
    tokio::spawn(conn);
    let (conn, handle, _) = rtnetlink::new_connection().map_err(EbpfError::Netlink)?;
    tokio::spawn(conn);

    let mut existing = Vec::new();
    let mut links = handle.link().get().execute();
    while let Some(msg) = links.next().await {
        let msg = msg.map_err(|e| EbpfError::Rtnetlink(e.to_string()))?;
        let Some(name) = link_name(&msg) else {
            continue;
        };
        existing.push((msg.header.index, name.clone()));
        if is_candidate(&msg) {
            lock(&attacher).attach(msg.header.index, &name)?;
        }
    }
    lock(&attacher).remove_stale_pins(&existing)?;
    let mut pods = lock(&attacher).pods.take();
    if let Some(pods) = &mut pods {
        scan_pods(pods, &handle).await;
    }
    // The receiver may have stopped waiting; that is its business.
    let _ = attached.send(());

    let mut rescan = tokio::time::interval(POD_SCAN_PERIOD);
    rescan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is due at once; the scan above was it.
    rescan.reset();
    loop {
        let message = tokio::select! {
            event = events.next() => match event {
                Some((message, _)) => message,
                None => break,
            },
            _ = rescan.tick(), if pods.is_some() => {
                if let Some(pods) = &mut pods {
                    scan_pods(pods, &handle).await;
                }
                continue;
            }
        };
        let NetlinkPayload::InnerMessage(inner) = message.payload else {
            continue;
        };
        match inner {
            RouteNetlinkMessage::NewLink(msg) if is_candidate(&msg) => {
                // A new pod's link: look for its namespace soon.
                if pods.is_some() && is_peer_link(&msg) {
                    rescan.reset_after(std::time::Duration::from_millis(200));
                }
                let Some(name) = link_name(&msg) else {
                    continue;
                };
                let mut a = lock(&attacher);
                // A link can vanish between the event and the attach.
                if a.attached.get(&msg.header.index) != Some(&name)
                    && let Err(e) = a.attach(msg.header.index, &name)
                {
                    tracing::warn!(interface = %name, error = %e, "attaching to new interface failed");
                }
            }
            RouteNetlinkMessage::DelLink(msg) => {
                lock(&attacher).forget(msg.header.index)?;
            }
            _ => {}
        }
    }
    Err(EbpfError::Rtnetlink("link event stream ended".into()))
}

/// Whether a link has its other end in another namespace (a pod's veth).
fn is_peer_link(msg: &LinkMessage) -> bool {
    msg.attributes
        .iter()
        .any(|a| matches!(a, LinkAttribute::LinkNetNsId(id) if *id >= 0))
}

/// Looks for the pods again; a failure is logged, and the next scan tries
/// again (until then the pods it would have found keep the packet path).
async fn scan_pods(pods: &mut PodSockets, handle: &rtnetlink::Handle) {
    match pods.scan(handle).await {
        Ok(count) => tracing::debug!(pods = count, "pods with socket-level load balancing"),
        Err(e) => tracing::warn!(error = %e, "looking for the pods' network namespaces failed"),
    }
}

fn lock(a: &Arc<Mutex<Attacher>>) -> std::sync::MutexGuard<'_, Attacher> {
    // A panic while holding the lock leaves the attach set consistent enough
    // (it only records what succeeded), so recover from poisoning.
    a.lock().unwrap_or_else(|p| p.into_inner())
}
