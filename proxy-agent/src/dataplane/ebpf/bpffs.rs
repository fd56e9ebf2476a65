//! The BPF filesystem under which maps and links are pinned.
use std::{
    io,
    path::{Path, PathBuf},
};

use nix::{
    mount::{MntFlags, MsFlags},
    sys::statfs::{BPF_FS_MAGIC, statfs},
};

/// Where pinned objects live below `--bpf-root`.
#[derive(Clone, Debug)]
pub struct PinLayout {
    pub root: PathBuf,
}

impl PinLayout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
    pub fn maps(&self) -> PathBuf {
        self.root.join("maps")
    }
    /// TC links, one pin per interface and direction.
    pub fn links(&self) -> PathBuf {
        self.root.join("links")
    }
    /// Cgroup links of the socket hooks, one pin per hook (apart from the
    /// TC links, which are pruned by interface).
    pub fn socket_links(&self) -> PathBuf {
        self.root.join("socket-links")
    }
}

/// Whether `path` (which must exist) lies on a bpffs.
pub fn is_bpffs(path: &Path) -> io::Result<bool> {
    Ok(statfs(path)?.filesystem_type() == BPF_FS_MAGIC)
}

/// The nearest existing ancestor of `path` (or `path` itself).
fn existing_ancestor(path: &Path) -> &Path {
    let mut p = path;
    while !p.exists() {
        match p.parent() {
            Some(parent) => p = parent,
            None => break,
        }
    }
    p
}

/// A bpffs mount [`ensure_mounted`] made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mounted {
    /// Where it was mounted: the parent of the root when that is an empty
    /// directory (`/sys/fs/bpf` of a fresh sysfs), else the root itself.
    pub at: PathBuf,
    /// Whether the mount lives only as long as this process's mount
    /// namespace: it does not propagate to another one (not `shared`), and
    /// the namespace is not the host's (as under `ip netns exec`). Pins in
    /// it then go when the agent exits, its tc links with them.
    pub private: bool,
}

/// Makes sure `root` exists on a bpffs. When its nearest existing ancestor
/// is not one (a host that mounts none, or `ip netns exec`, whose fresh
/// sysfs has an empty `/sys/fs/bpf` in which nothing can be created), one
/// is mounted as Cilium does: on the root's parent if that is an empty
/// directory, so `/sys/fs/bpf` becomes the bpffs it is meant to be, and on
/// the root itself otherwise, so a parent with other contents (`/tmp`) is
/// never covered.
pub fn ensure_mounted(root: &Path) -> io::Result<Option<Mounted>> {
    if is_bpffs(existing_ancestor(root))? {
        std::fs::create_dir_all(root)?;
        return Ok(None);
    }
    let at = match root.parent() {
        Some(parent) if parent != Path::new("") && parent != Path::new("/") => {
            if !parent.exists() {
                std::fs::create_dir_all(parent)?;
            }
            if is_empty_dir(parent)? {
                parent.to_path_buf()
            } else {
                std::fs::create_dir_all(root)?;
                root.to_path_buf()
            }
        }
        _ => {
            std::fs::create_dir_all(root)?;
            root.to_path_buf()
        }
    };
    nix::mount::mount(
        Some("bpf"),
        &at,
        Some("bpf"),
        MsFlags::empty(),
        None::<&str>,
    )?;
    std::fs::create_dir_all(root)?;
    let private = !mount_is_shared(&at) && !in_host_mount_namespace();
    Ok(Some(Mounted { at, private }))
}

fn is_empty_dir(path: &Path) -> io::Result<bool> {
    Ok(std::fs::read_dir(path)?.next().is_none())
}

/// Whether the last mount at `at` (in `/proc/self/mountinfo`) propagates
/// to peer namespaces.
fn mount_is_shared(at: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|text| mountinfo_shared(&text, at))
        .unwrap_or(false)
}

/// One line of `/proc/self/mountinfo`.
pub(super) struct Mount<'a> {
    pub point: &'a str,
    /// The optional fields: propagation tags (`shared:N`, `master:N`).
    pub tags: Vec<&'a str>,
    pub fstype: &'a str,
}

/// The mounts of a mountinfo text, in mount order; lines that do not parse
/// are skipped.
pub(super) fn mounts(mountinfo: &str) -> impl DoubleEndedIterator<Item = Mount<'_>> {
    mountinfo.lines().filter_map(|line| {
        // "<id> <parent> <dev> <root> <mount point> <options> [tags] - <fstype> ..."
        let (left, right) = line.split_once(" - ")?;
        let mut fields = left.split_whitespace();
        let point = fields.nth(4)?;
        Some(Mount {
            point,
            tags: fields.skip(1).collect(),
            fstype: right.split_whitespace().next()?,
        })
    })
}

/// Whether the last mount at `at` in a mountinfo text carries a `shared:`
/// propagation tag.
fn mountinfo_shared(mountinfo: &str, at: &Path) -> bool {
    mounts(mountinfo)
        .rev()
        .find(|m| Path::new(m.point) == at)
        .is_some_and(|m| m.tags.iter().any(|tag| tag.starts_with("shared:")))
}

/// Whether this process shares the mount namespace of its ancestors (PID 1
/// and the processes between): `ip netns exec` enters a new one before it
/// runs the agent, which then differs from the shell that started it.
/// Ancestors whose namespace cannot be read are skipped.
fn in_host_mount_namespace() -> bool {
    let Ok(own) = std::fs::read_link("/proc/self/ns/mnt") else {
        return true;
    };
    let mut pid = std::os::unix::process::parent_id();
    // Bounded: a process tree is not deeper than this in practice.
    for _ in 0..64 {
        if let Ok(theirs) = std::fs::read_link(format!("/proc/{pid}/ns/mnt"))
            && theirs != own
        {
            return false;
        }
        match parent_of(pid) {
            Some(parent) if parent > 0 && parent != pid => pid = parent,
            _ => break,
        }
    }
    true
}

/// The parent of `pid`, from `/proc/<pid>/stat` ("pid (comm) state ppid ...",
/// where comm may hold spaces and parentheses).
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Unmounts `root` if it is itself a bpffs mount point (the parent is on
/// another filesystem), i.e. one that [`ensure_mounted`] made there. A
/// bpffs it mounted on the parent (`/sys/fs/bpf`) stays, as the node's.
pub fn unmount_if_own(root: &Path) -> io::Result<bool> {
    let Some(parent) = root.parent() else {
        return Ok(false);
    };
    if !root.exists() || !is_bpffs(root)? || is_bpffs(parent)? {
        return Ok(false);
    }
    nix::mount::umount2(root, MntFlags::MNT_DETACH)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_a_shared_mount_from_a_private_one() {
        let mountinfo = "\
22 1 0:21 / /sys rw,nosuid - sysfs sysfs rw
40 22 0:35 / /sys/fs/bpf rw,relatime shared:12 - bpf bpf rw
51 30 0:40 / /run/netns/x rw - proc proc rw
60 22 0:45 / /sys/fs/bpf rw,relatime - bpf bpf rw
";
        // The later mount on the same point is the one in force.
        assert!(!mountinfo_shared(mountinfo, Path::new("/sys/fs/bpf")));
        let shared_last = mountinfo.replace(
            "60 22 0:45 / /sys/fs/bpf rw,relatime -",
            "60 22 0:45 / /sys/fs/bpf rw,relatime shared:30 master:2 -",
        );
        assert!(mountinfo_shared(&shared_last, Path::new("/sys/fs/bpf")));
        assert!(!mountinfo_shared(mountinfo, Path::new("/sys")));
        assert!(!mountinfo_shared(mountinfo, Path::new("/nowhere")));
    }
}
