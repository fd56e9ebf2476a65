//! The BPF filesystem under which maps and links are pinned.
use std::{
    ffi::CString,
    io,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

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

fn statfs_type(path: &Path) -> io::Result<i64> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statfs writes into the zeroed struct we own; the path is a
    // valid NUL-terminated string.
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let rc = unsafe { libc::statfs(c_path.as_ptr(), &mut buf) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(buf.f_type as i64)
}

/// Whether `path` (which must exist) lies on a bpffs.
pub fn is_bpffs(path: &Path) -> io::Result<bool> {
    Ok(statfs_type(path)? == BPF_FS_MAGIC)
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
    let target = CString::new(root.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let fstype = c"bpf";
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the
    // call; no data argument is passed.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
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
    let target = CString::new(root.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: a valid NUL-terminated path.
    let rc = unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(true)
}
