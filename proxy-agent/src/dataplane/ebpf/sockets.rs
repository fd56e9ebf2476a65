//! The socket hooks (cgroup `sock_addr` programs) that translate the
//! node's own connections to services: attaching them to a cgroup v2 with
//! pinned links, and telling them which network namespace is ours.
use std::{
    fs::File,
    io,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    maps::Array,
    programs::{CgroupAttachMode, CgroupSock, CgroupSockAddr, links::FdLink},
};
use proxy_common::{MAP_SOCK_NETNS, PROG_SOCK_RELEASE, PROGS_SOCKET};

use super::{EbpfError, PinLayout, attach::remove_pin};

/// `SO_NETNS_COOKIE` (Linux 5.14): the cookie of a socket's namespace.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The cookie of the network namespace this process runs in.
pub fn own_netns_cookie() -> io::Result<u64> {
    let socket =
        std::net::UdpSocket::bind("0.0.0.0:0").or_else(|_| std::net::UdpSocket::bind("[::]:0"))?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` are valid for writes of the sizes given;
    // the descriptor is open for the duration of the call.
    let ret = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// The first cgroup v2 mount of this process's mount namespace (from
/// `/proc/self/mountinfo`), where the socket hooks go by default.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    cgroup2_mount_in(&text)
}

/// Where the agent mounts a cgroup v2 when its mount namespace has none (as
/// Cilium mounts one at `/run/cilium/cgroupv2`).
pub const OWN_CGROUP2_MOUNT: &str = "/run/proxy-agent/cgroupv2";

/// Mounts the cgroup v2 hierarchy at `at` (creating it) unless one is
/// there already. Its root is the root of this process's cgroup namespace:
/// on a node, the cgroup every pod's processes are below.
pub fn mount_cgroup2(at: &Path) -> io::Result<()> {
    std::fs::create_dir_all(at)?;
    if nix::sys::statfs::statfs(at)?.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC {
        return Ok(());
    }
    nix::mount::mount(
        Some("cgroup2"),
        at,
        Some("cgroup2"),
        nix::mount::MsFlags::MS_NOSUID
            | nix::mount::MsFlags::MS_NODEV
            | nix::mount::MsFlags::MS_NOEXEC,
        None::<&str>,
    )?;
    Ok(())
}

/// The mount point of the first `cgroup2` filesystem in a mountinfo text.
fn cgroup2_mount_in(mountinfo: &str) -> Option<PathBuf> {
    super::bpffs::mounts(mountinfo)
        .find(|m| m.fstype == "cgroup2")
        .map(|m| PathBuf::from(m.point))
}

fn pin_path(layout: &PinLayout, prog: &str) -> PathBuf {
    layout.socket_links().join(prog)
}

/// Pins `link` as `prog`'s, in place of the pin an earlier run left: the
/// new link is pinned beside it first, and renaming it over the old pin
/// drops the last reference to the old link, which detaches it.
fn replace_pin(layout: &PinLayout, prog: &str, link: FdLink) -> Result<(), EbpfError> {
    let pin = pin_path(layout, prog);
    // bpffs refuses names with a dot.
    let fresh = layout.socket_links().join(format!("{prog}-new"));
    remove_pin(&fresh)?;
    drop(link.pin(&fresh)?);
    std::fs::rename(&fresh, &pin).map_err(|e| EbpfError::Io(pin.clone(), e))
}

/// Makes the socket hooks act on this network namespace, and attaches them
/// to `cgroup`. Links are pinned, so the hooks outlive the agent like the
/// TC programs do. A hook left by an earlier run is replaced make-before-
/// break: the new link is attached before the old one's pin goes, and for
/// that moment the second hook sees a backend, not a frontend, so nothing
/// is translated twice.
pub fn attach(ebpf: &mut Ebpf, layout: &PinLayout, cgroup: &Path) -> Result<(), EbpfError> {
    let cookie = own_netns_cookie().map_err(EbpfError::Netlink)?;
    let mut netns: Array<_, u64> = Array::try_from(
        ebpf.map_mut(MAP_SOCK_NETNS)
            .ok_or(EbpfError::MissingMap(MAP_SOCK_NETNS))?,
    )?;
    netns.set(0, cookie, 0)?;
    let cgroup_file = File::open(cgroup).map_err(|e| EbpfError::Io(cgroup.to_path_buf(), e))?;
    let dir = layout.socket_links();
    std::fs::create_dir_all(&dir).map_err(|e| EbpfError::Io(dir.clone(), e))?;
    for name in PROGS_SOCKET {
        let prog: &mut CgroupSockAddr = ebpf
            .program_mut(name)
            .ok_or(EbpfError::MissingProgram(name))?
            .try_into()?;
        // A cgroup *link* always coexists with other programs, and takes no
        // flags (aya passes the mode as flags: `Single` is 0).
        let id = prog.attach(cgroup_file.as_fd(), CgroupAttachMode::Single)?;
        let link: FdLink = prog.take_link(id)?.try_into().map_err(EbpfError::Link)?;
        replace_pin(layout, name, link)?;
    }
    let release: &mut CgroupSock = ebpf
        .program_mut(PROG_SOCK_RELEASE)
        .ok_or(EbpfError::MissingProgram(PROG_SOCK_RELEASE))?
        .try_into()?;
    let id = release.attach(cgroup_file.as_fd(), CgroupAttachMode::Single)?;
    let link: FdLink = release.take_link(id)?.try_into().map_err(EbpfError::Link)?;
    replace_pin(layout, PROG_SOCK_RELEASE, link)?;
    tracing::info!(cgroup = %cgroup.display(), netns_cookie = cookie, "socket hooks attached");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount() {
        let hybrid = "\
35 24 0:30 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
36 35 0:31 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw
37 35 0:32 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu
";
        assert_eq!(
            cgroup2_mount_in(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified = "29 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount_in(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(
            cgroup2_mount_in("1 2 0:3 / /proc rw - proc proc rw\n"),
            None
        );
        assert_eq!(cgroup2_mount_in("garbage"), None);
    }

    #[test]
    fn reads_a_netns_cookie() {
        // Non-zero, and the same every time in one namespace.
        let a = own_netns_cookie().expect("SO_NETNS_COOKIE");
        assert_ne!(a, 0);
        assert_eq!(own_netns_cookie().unwrap(), a);
    }
}
