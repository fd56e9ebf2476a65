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

/// Makes sure `root` exists on a bpffs, mounting one at `root` when none is
/// there (as under `ip netns exec`, which remounts /sys). Returns whether a
/// mount was made.
pub fn ensure_mounted(root: &Path) -> io::Result<bool> {
    if is_bpffs(existing_ancestor(root))? {
        std::fs::create_dir_all(root)?;
        return Ok(false);
    }
    std::fs::create_dir_all(root)?;
    nix::mount::mount(
        Some("bpf"),
        root,
        Some("bpf"),
        MsFlags::empty(),
        None::<&str>,
    )?;
    Ok(true)
}

/// Unmounts `root` if it is itself a bpffs mount point (the parent is on
/// another filesystem), i.e. one that [`ensure_mounted`] made.
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
