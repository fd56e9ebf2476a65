//! What eBPF state the agent left in the kernel: tcx attachments of a
//! namespace's interfaces, pinned objects, and whether an object still exists.
//!
//! The installed bpftool (7.1) neither lists tcx attachments in `net show`
//! nor tells which interface a tcx link belongs to, and links and programs
//! are global, so other agents on the machine show up in `bpftool link show`
//! too. So tcx attachments are queried directly (BPF_PROG_QUERY inside the
//! namespace), and objects are identified by id.
use std::{
    collections::BTreeSet,
    ffi::CStr,
    fs::File,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, bail};
use serde_json::Value;

/// A tcx hook of an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum TcxDirection {
    Ingress,
    Egress,
}

/// One program attached to one interface's tcx hook.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct TcxAttachment {
    pub interface: String,
    pub direction: TcxDirection,
    pub prog_id: u32,
    /// 0 when attached without a link.
    pub link_id: u32,
}

/// Every tcx attachment on every interface of network namespace `netns`.
pub fn tcx_attachments(netns: &str) -> anyhow::Result<Vec<TcxAttachment>> {
    let path = Path::new("/run/netns").join(netns);
    let ns = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    // setns changes only the calling thread's namespace, so do it on a
    // thread of its own that ends right after.
    std::thread::spawn(move || -> anyhow::Result<Vec<TcxAttachment>> {
        // SAFETY: `ns` is an open namespace file for the duration of the call.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error()).context("setns into the node namespace");
        }
        let mut attachments = Vec::new();
        for (index, interface) in interfaces()? {
            for direction in [TcxDirection::Ingress, TcxDirection::Egress] {
                for (prog_id, link_id) in query_tcx(index, direction)
                    .with_context(|| format!("querying tcx {direction:?} of {interface}"))?
                {
                    attachments.push(TcxAttachment {
                        interface: interface.clone(),
                        direction,
                        prog_id,
                        link_id,
                    });
                }
            }
        }
        Ok(attachments)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("tcx query thread panicked"))?
}

/// (ifindex, name) of the interfaces of the calling thread's namespace.
fn interfaces() -> anyhow::Result<Vec<(u32, String)>> {
    // SAFETY: if_nameindex returns an array terminated by a zero entry (or
    // null on error), which we free with if_freenameindex after copying.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return Err(std::io::Error::last_os_error()).context("listing interfaces");
        }
        let mut found = Vec::new();
        let mut entry = list;
        while (*entry).if_index != 0 {
            let name = CStr::from_ptr((*entry).if_name)
                .to_string_lossy()
                .into_owned();
            found.push(((*entry).if_index, name));
            entry = entry.add(1);
        }
        libc::if_freenameindex(list);
        Ok(found)
    }
}

const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_TCX_INGRESS: u32 = 46;
const BPF_TCX_EGRESS: u32 = 47;
/// More programs than any test attaches to one hook.
const MAX_QUERY: usize = 64;

/// The `query` member of `union bpf_attr` (linux/bpf.h), up to `revision`.
#[repr(C)]
#[derive(Default)]
struct ProgQueryAttr {
    target_ifindex: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    count: u32,
    _pad: u32,
    prog_attach_flags: u64,
    link_ids: u64,
    link_attach_flags: u64,
    revision: u64,
}

/// (prog id, link id) of each program on one tcx hook.
fn query_tcx(ifindex: u32, direction: TcxDirection) -> anyhow::Result<Vec<(u32, u32)>> {
    let mut prog_ids = [0u32; MAX_QUERY];
    let mut link_ids = [0u32; MAX_QUERY];
    let mut attr = ProgQueryAttr {
        target_ifindex: ifindex,
        attach_type: match direction {
            TcxDirection::Ingress => BPF_TCX_INGRESS,
            TcxDirection::Egress => BPF_TCX_EGRESS,
        },
        prog_ids: prog_ids.as_mut_ptr() as u64,
        link_ids: link_ids.as_mut_ptr() as u64,
        count: MAX_QUERY as u32,
        ..Default::default()
    };
    // SAFETY: attr is a valid, fully initialised bpf_attr prefix whose
    // pointers reference arrays of `count` u32s that outlive the call.
    let result = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_QUERY,
            &mut attr as *mut ProgQueryAttr,
            std::mem::size_of::<ProgQueryAttr>() as u32,
        )
    };
    if result != 0 {
        return Err(std::io::Error::last_os_error()).context("BPF_PROG_QUERY");
    }
    let count = (attr.count as usize).min(MAX_QUERY);
    Ok(prog_ids[..count]
        .iter()
        .copied()
        .zip(link_ids[..count].iter().copied())
        .collect())
}

/// A kind of eBPF object, as bpftool names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ObjectKind {
    Prog,
    Map,
    Link,
}

impl ObjectKind {
    fn bpftool_name(self) -> &'static str {
        match self {
            ObjectKind::Prog => "prog",
            ObjectKind::Map => "map",
            ObjectKind::Link => "link",
        }
    }
}

/// Runs `bpftool -j ARGS` and parses its JSON; `None` when bpftool fails
/// (e.g. no such object).
fn bpftool_json(args: &[&str]) -> anyhow::Result<Option<Value>> {
    let output = Command::new("bpftool")
        .arg("-j")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running bpftool (install it with `cargo xtask setup`)")?;
    if !output.status.success() {
        return Ok(None);
    }
    serde_json::from_slice(&output.stdout)
        .map(Some)
        .with_context(|| format!("parsing `bpftool -j {}`", args.join(" ")))
}

/// Whether the object with this id still exists.
pub fn object_exists(kind: ObjectKind, id: u32) -> anyhow::Result<bool> {
    Ok(bpftool_json(&[kind.bpftool_name(), "show", "id", &id.to_string()])?.is_some())
}

/// The maps a program uses.
pub fn prog_map_ids(prog_id: u32) -> anyhow::Result<Vec<u32>> {
    let Some(prog) = bpftool_json(&["prog", "show", "id", &prog_id.to_string()])? else {
        bail!("program {prog_id} does not exist");
    };
    Ok(ids(&prog["map_ids"]))
}

fn ids(value: &Value) -> Vec<u32> {
    value
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|id| id.as_u64().and_then(|id| u32::try_from(id).ok()))
        .collect()
}

/// Every file under `root` (a bpffs directory), recursively.
pub fn pinned_paths(root: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    if !root.exists() {
        return Ok(found);
    }
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?
        {
            let entry = entry.with_context(|| format!("reading {}", dir.display()))?;
            if entry.file_type()?.is_dir() {
                pending.push(entry.path());
            } else {
                found.push(entry.path());
            }
        }
    }
    found.sort();
    Ok(found)
}

/// The kind and id of the object pinned at `path`.
pub fn pinned_object(path: &Path) -> anyhow::Result<(ObjectKind, u32)> {
    let path_text = path.to_string_lossy();
    for kind in [ObjectKind::Map, ObjectKind::Prog, ObjectKind::Link] {
        if let Some(object) = bpftool_json(&[kind.bpftool_name(), "show", "pinned", &path_text])?
            && let Some(id) = object["id"].as_u64()
        {
            return Ok((kind, id as u32));
        }
    }
    bail!("{} is not a pinned map, program or link", path.display())
}

/// Every object an agent holds that can be found from outside: tcx
/// attachments in its namespace (programs and links), the maps those
/// programs use, and everything pinned under its bpf root.
pub fn agent_objects(netns: &str, bpf_root: &Path) -> anyhow::Result<BTreeSet<(ObjectKind, u32)>> {
    let mut objects = BTreeSet::new();
    for attachment in tcx_attachments(netns)? {
        objects.insert((ObjectKind::Prog, attachment.prog_id));
        if attachment.link_id != 0 {
            objects.insert((ObjectKind::Link, attachment.link_id));
        }
        for map in prog_map_ids(attachment.prog_id)? {
            objects.insert((ObjectKind::Map, map));
        }
    }
    for path in pinned_paths(bpf_root)? {
        objects.insert(pinned_object(&path)?);
    }
    Ok(objects)
}
