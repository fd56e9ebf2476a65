//! The pods of this node, as the socket hooks know them: the network
//! namespaces whose sockets get socket-level load balancing.
//!
//! A pod is a network namespace that is the peer of one of the node's
//! links (a veth whose other end is in it: its `link-netnsid` here) and
//! holds an address in the cluster CIDR. The peer test keeps out the
//! namespaces of other nodes that share the kernel (test clusters), the
//! address test keeps out namespaces that are not pods (an external
//! client's, a second node's). Namespaces are found where they are kept
//! alive: `/proc/<pid>/ns/net` of every process, and the bind mounts of
//! `/run/netns` (`ip netns`, and container runtimes' sandboxes).
//!
//! Cookies are never reused, so a pod that is gone only leaves an entry
//! that matches nothing until the next scan removes it.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    io,
    net::IpAddr,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use aya::maps::{HashMap as BpfHashMap, MapData};
use futures::StreamExt;
use ipnet::IpNet;
use proxy_common::{SOCK_POD_V4, SOCK_POD_V6, SockPod};
use rtnetlink::packet_core::{NLM_F_REQUEST, NetlinkMessage, NetlinkPayload};
use rtnetlink::packet_route::{
    RouteNetlinkMessage,
    link::LinkAttribute,
    nsid::{NsidAttribute, NsidMessage},
};

use super::{
    EbpfError, encode::addr_of, sockets::own_netns_cookie, writer::remove_ignoring_missing,
};

/// Where `ip netns` and container runtimes keep named namespaces.
const NETNS_DIRS: [&str; 2] = ["/run/netns", "/var/run/netns"];

/// The pods' namespaces map, and what was written to it.
pub struct PodSockets {
    map: BpfHashMap<MapData, u64, SockPod>,
    cluster_cidrs: Vec<IpNet>,
    /// Namespace inode -> the pod found there.
    known: BTreeMap<u64, Pod>,
    namespaces: PodNamespaces,
    /// Entering a namespace was refused once (said once in the log).
    denied: bool,
}

/// A pod found: its namespace's cookie and entry, and the namespace itself.
#[derive(Clone)]
struct Pod {
    cookie: u64,
    entry: SockPod,
    netns: Arc<File>,
}

/// The pods' network namespaces as the last scan found them, shared with
/// the dataplane, which ends their stale sockets.
#[derive(Clone, Default)]
pub struct PodNamespaces(Arc<Mutex<Vec<Arc<File>>>>);

impl PodNamespaces {
    pub fn all(&self) -> Vec<Arc<File>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, namespaces: Vec<Arc<File>>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = namespaces;
    }
}

/// A namespace the scan may look into.
struct Candidate {
    inode: u64,
    file: Arc<File>,
}

impl PodSockets {
    /// Takes the map; an earlier run's entries are kept until the first
    /// scan decides on them.
    pub fn new(
        map: BpfHashMap<MapData, u64, SockPod>,
        cluster_cidrs: Vec<IpNet>,
        namespaces: PodNamespaces,
    ) -> Self {
        Self {
            map,
            cluster_cidrs,
            known: BTreeMap::new(),
            namespaces,
            denied: false,
        }
    }

    /// Empties the map: pods' sockets are not translated.
    pub fn clear(map: &mut BpfHashMap<MapData, u64, SockPod>) -> Result<(), EbpfError> {
        let cookies: Vec<u64> = map.keys().filter_map(Result::ok).collect();
        for cookie in cookies {
            remove_ignoring_missing(map, &cookie)?;
        }
        Ok(())
    }

    /// Finds this node's pods and writes the map to match. Returns how many
    /// pods there are.
    pub async fn scan(&mut self, handle: &rtnetlink::Handle) -> Result<usize, EbpfError> {
        let peers = peer_nsids(handle).await?;
        let mut found = BTreeMap::new();
        for candidate in candidates() {
            if let Some(pod) = self.known.get(&candidate.inode) {
                found.insert(candidate.inode, pod.clone());
                continue;
            }
            let Some(nsid) = nsid_of(handle, &candidate.file).await else {
                continue;
            };
            if !peers.contains(&nsid) {
                continue;
            }
            let cidrs = self.cluster_cidrs.clone();
            let netns = candidate.file.clone();
            let inspected = tokio::task::spawn_blocking(move || inspect(netns, cidrs)).await;
            match inspected {
                Ok(Ok(Some((cookie, entry)))) => {
                    let netns = candidate.file;
                    found.insert(
                        candidate.inode,
                        Pod {
                            cookie,
                            entry,
                            netns,
                        },
                    );
                }
                Ok(Ok(None)) => {}
                Ok(Err(e)) if e.kind() == io::ErrorKind::PermissionDenied => {
                    if !self.denied {
                        tracing::warn!(error = %e, "cannot enter the pods' network namespaces (setns needs CAP_SYS_ADMIN); pods keep the packet path");
                        self.denied = true;
                    }
                }
                Ok(Err(e)) => {
                    tracing::debug!(inode = candidate.inode, error = %e, "could not look into a network namespace");
                }
                Err(e) => tracing::warn!(error = %e, "namespace inspection panicked"),
            }
        }
        self.write(found)
    }

    fn write(&mut self, found: BTreeMap<u64, Pod>) -> Result<usize, EbpfError> {
        let wanted: BTreeMap<u64, SockPod> =
            found.values().map(|pod| (pod.cookie, pod.entry)).collect();
        let present: Vec<u64> = self.map.keys().filter_map(Result::ok).collect();
        for cookie in present {
            if !wanted.contains_key(&cookie) {
                remove_ignoring_missing(&mut self.map, &cookie)?;
            }
        }
        for (cookie, pod) in &wanted {
            if self.map.get(cookie, 0).ok() != Some(*pod) {
                self.map.insert(cookie, pod, 0)?;
            }
        }
        for (inode, pod) in &found {
            if !self.known.contains_key(inode) {
                tracing::debug!(inode, cookie = pod.cookie, "pod network namespace found");
            }
        }
        self.namespaces
            .set(found.values().map(|pod| pod.netns.clone()).collect());
        self.known = found;
        Ok(wanted.len())
    }
}

/// The namespace IDs (in this namespace) of the peers of the node's links.
async fn peer_nsids(handle: &rtnetlink::Handle) -> Result<BTreeSet<i32>, EbpfError> {
    let mut peers = BTreeSet::new();
    let mut links = handle.link().get().execute();
    while let Some(msg) = links.next().await {
        let msg = msg.map_err(|e| EbpfError::Rtnetlink(e.to_string()))?;
        for attr in &msg.attributes {
            if let LinkAttribute::LinkNetNsId(id) = attr
                && *id >= 0
            {
                peers.insert(*id);
            }
        }
    }
    Ok(peers)
}

/// The ID this namespace gives the namespace of `file`, if it has one (a
/// namespace holding a peer of one of our links has).
async fn nsid_of(handle: &rtnetlink::Handle, file: &File) -> Option<i32> {
    let mut message = NsidMessage::default();
    message
        .attributes
        .push(NsidAttribute::Fd(file.as_raw_fd() as u32));
    let mut request = NetlinkMessage::from(RouteNetlinkMessage::GetNsId(message));
    request.header.flags = NLM_F_REQUEST;
    let mut handle = handle.clone();
    let mut replies = handle.request(request).ok()?;
    while let Some(reply) = replies.next().await {
        if let NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNsId(msg)) = reply.payload {
            return msg.attributes.iter().find_map(|a| match a {
                NsidAttribute::Id(id) if *id >= 0 => Some(*id),
                _ => None,
            });
        }
    }
    None
}

/// The inode of a namespace link's target (`net:[4026532000]`).
fn ns_inode(link: &Path) -> Option<u64> {
    let target = std::fs::read_link(link).ok()?;
    let text = target.to_str()?;
    text.strip_prefix("net:[")?.strip_suffix(']')?.parse().ok()
}

/// Every network namespace a process or a bind mount keeps alive, but
/// this process's own, once each.
fn candidates() -> Vec<Candidate> {
    let own = ns_inode(Path::new("/proc/self/ns/net"));
    let mut seen: BTreeSet<u64> = own.into_iter().collect();
    let mut out = Vec::new();
    let mut consider = |path: PathBuf, inode: Option<u64>| {
        let Some(inode) = inode else {
            return;
        };
        if !seen.insert(inode) {
            return;
        }
        if let Ok(file) = File::open(&path) {
            out.push(Candidate {
                inode,
                file: Arc::new(file),
            });
        }
    };
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let name = entry.file_name();
            if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let link = entry.path().join("ns/net");
            let inode = ns_inode(&link);
            consider(link, inode);
        }
    }
    for dir in NETNS_DIRS {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            // A bind mount of the namespace: its inode is the namespace's.
            let inode = std::os::unix::fs::MetadataExt::ino(&match entry.metadata() {
                Ok(m) => m,
                Err(_) => continue,
            });
            consider(entry.path(), Some(inode));
        }
    }
    out
}

/// Runs `f` on a thread of its own that has entered the network namespace
/// `netns` (entering a namespace is per thread, and the thread ends with
/// it).
pub(super) fn in_namespace<T: Send>(
    netns: &File,
    f: impl FnOnce() -> io::Result<T> + Send,
) -> io::Result<T> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                nix::sched::setns(netns, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(io::Error::from)?;
                f()
            })
            .join()
            .map_err(|_| io::Error::other("a thread in another network namespace panicked"))?
    })
}

/// Looks into a namespace: its cookie, and its addresses in the cluster
/// CIDR. `None`: it has none, so it is no pod.
fn inspect(file: Arc<File>, cidrs: Vec<IpNet>) -> io::Result<Option<(u64, SockPod)>> {
    in_namespace(&file, || {
        let cookie = own_netns_cookie()?;
        let addrs = nix::ifaddrs::getifaddrs().map_err(io::Error::from)?;
        let ips = addrs.filter_map(|a| {
            let addr = a.address?;
            if let Some(v4) = addr.as_sockaddr_in() {
                return Some(IpAddr::V4(v4.ip()));
            }
            addr.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
        });
        Ok(pod_entry(ips, &cidrs).map(|pod| (cookie, pod)))
    })
}

/// The entry of a namespace with addresses `ips`: its first address of
/// each family in the cluster CIDR; `None` when it has none.
fn pod_entry(ips: impl IntoIterator<Item = IpAddr>, cluster_cidrs: &[IpNet]) -> Option<SockPod> {
    let mut pod = SockPod::default();
    for ip in ips {
        if !cluster_cidrs.iter().any(|c| c.contains(&ip)) {
            continue;
        }
        let (flag, slot) = match ip {
            IpAddr::V4(_) => (SOCK_POD_V4, &mut pod.v4),
            IpAddr::V6(_) => (SOCK_POD_V6, &mut pod.v6),
        };
        if pod.flags & flag == 0 {
            pod.flags |= flag;
            *slot = addr_of(ip).0;
        }
    }
    (pod.flags != 0).then_some(pod)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_pod_is_a_namespace_with_an_address_in_the_cluster_cidr() {
        let cidrs: Vec<IpNet> = vec![
            "10.244.0.0/16".parse().unwrap(),
            "fd00:10:244::/56".parse().unwrap(),
        ];
        assert_eq!(
            pod_entry([ip("127.0.0.1"), ip("192.168.1.2"), ip("::1")], &cidrs),
            None
        );
        let pod = pod_entry(
            [
                ip("127.0.0.1"),
                ip("10.244.1.7"),
                ip("10.244.1.8"),
                ip("fe80::1"),
                ip("fd00:10:244::7"),
            ],
            &cidrs,
        )
        .unwrap();
        assert_eq!(pod.flags, SOCK_POD_V4 | SOCK_POD_V6);
        assert_eq!(pod.v4, addr_of(ip("10.244.1.7")).0);
        assert_eq!(pod.v6, addr_of(ip("fd00:10:244::7")).0);
        let v4_only = pod_entry([ip("10.244.1.7")], &cidrs).unwrap();
        assert_eq!(v4_only.flags, SOCK_POD_V4);
        assert_eq!(pod_entry([ip("10.244.1.7")], &[]), None);
    }

    #[test]
    fn namespace_inodes_are_read_from_their_links() {
        assert!(ns_inode(Path::new("/proc/self/ns/net")).is_some());
        assert_eq!(ns_inode(Path::new("/proc/self/ns/nonexistent")), None);
    }
}
