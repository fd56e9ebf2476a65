//! Many writes to one hash map in few system calls (`BPF_MAP_UPDATE_BATCH`,
//! Linux 5.6): a full sync at tens of thousands of services writes hundreds
//! of thousands of entries, and one call each is most of its time.
use std::{
    io,
    os::fd::{AsFd, AsRawFd},
};

use aya::{
    Pod,
    maps::{HashMap as BpfHashMap, IterableMap, MapData, MapError},
};

/// The kernel's own "operation not supported" (not in libc).
const ENOTSUPP: i32 = 524;

/// `enum bpf_cmd`: BPF_MAP_UPDATE_BATCH.
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// Entries per call: the kernel copies keys and values in; this bounds the
/// time one call holds the CPU.
const PER_CALL: usize = 4_096;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// From this many entries on, a write is split over two threads.
const PARALLEL_FROM: usize = 4 * PER_CALL;

/// Writes `entries` into `map` in batches; where the kernel cannot batch
/// (before 5.6), one write each. Returns when all are written.
///
/// A large write (a full sync) goes on two threads: the kernel's hash map
/// takes concurrent updates (its buckets have their own locks), and the
/// agent has nothing else for the second core to do then. The order of
/// the entries within one call is not kept; callers that need an order
/// (make-before-break) make one call per step.
pub(super) fn insert_all<K: Pod + Sync, V: Pod + Sync>(
    map: &mut BpfHashMap<MapData, K, V>,
    entries: &[(K, V)],
) -> Result<(), MapError> {
    let outcome = if entries.len() >= PARALLEL_FROM {
        let (first, second) = entries.split_at(entries.len() / 2);
        let data = map.map();
        std::thread::scope(|scope| {
            let other = scope.spawn(|| write_batches(data, second));
            let here = write_batches(data, first);
            let other = other
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            here.and(other)
        })
    } else {
        write_batches(map.map(), entries)
    };
    match outcome {
        Ok(()) => Ok(()),
        Err(Batching::Unsupported) => {
            // Batching not understood: one by one (writing again what a
            // part may have written is harmless).
            for (k, v) in entries {
                map.insert(*k, *v, 0)?;
            }
            Ok(())
        }
        Err(Batching::Failed(io_error)) => Err(MapError::SyscallError(aya::sys::SyscallError {
            call: "bpf_map_update_batch",
            io_error,
        })),
    }
}

/// Why [`write_batches`] stopped.
enum Batching {
    /// The kernel does not batch updates of this map.
    Unsupported,
    Failed(io::Error),
}

/// `entries` in calls of [`PER_CALL`].
fn write_batches<K: Pod, V: Pod>(map: &MapData, entries: &[(K, V)]) -> Result<(), Batching> {
    for chunk in entries.chunks(PER_CALL) {
        match update_batch(map, chunk) {
            Ok(()) => {}
            Err((_, e))
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP)
                ) =>
            {
                return Err(Batching::Unsupported);
            }
            Err((_, e)) => return Err(Batching::Failed(e)),
        }
    }
    Ok(())
}

/// One `BPF_MAP_UPDATE_BATCH` of `entries`; on failure, how many were
/// written before it.
fn update_batch<K: Pod, V: Pod>(
    map: &MapData,
    entries: &[(K, V)],
) -> Result<(), (usize, io::Error)> {
    let keys: Vec<K> = entries.iter().map(|(k, _)| *k).collect();
    let values: Vec<V> = entries.iter().map(|(_, v)| *v).collect();
    let Ok(count) = u32::try_from(entries.len()) else {
        return Err((0, io::Error::from_raw_os_error(libc::E2BIG)));
    };
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count,
        // Descriptors are non-negative.
        map_fd: map.fd().as_fd().as_raw_fd() as u32,
        ..BatchAttr::default()
    };
    // SAFETY: `keys` and `values` hold `count` elements of the map's key
    // and value types (Pod, `#[repr(C)]`) and outlive the call; the kernel
    // only reads them.
    unsafe { bpf_batch(BPF_MAP_UPDATE_BATCH, &mut attr) }.map_err(|e| (attr.count as usize, e))
}

/// One batch command on `attr`; the kernel sets `attr.count` to the
/// elements it processed, also on failure.
///
/// # Safety
/// The pointers in `attr` must be valid for the command: keys and values
/// for `attr.count` elements of the map's types, batch tokens of its kind.
unsafe fn bpf_batch(cmd: libc::c_long, attr: &mut BatchAttr) -> io::Result<()> {
    // SAFETY: `attr` is a valid `bpf_attr.batch` of its own size, and its
    // pointers are valid as the caller promises.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut BatchAttr,
            std::mem::size_of::<BatchAttr>(),
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `enum bpf_cmd`: BPF_MAP_LOOKUP_BATCH.
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// Every entry of `map`, read in batches (one call per `PER_CALL`
/// entries, not two per entry as key-by-key iteration takes); where the
/// kernel cannot batch, key by key, skipping an entry removed between the
/// two calls.
pub(super) fn read_all<K: Pod, V: Pod>(
    map: &BpfHashMap<MapData, K, V>,
) -> Result<Vec<(K, V)>, MapError> {
    let mut entries = Vec::new();
    let batched = for_each_batch(map.map(), |keys: &mut Vec<K>, values: &mut Vec<V>| {
        entries.extend(keys.drain(..).zip(values.drain(..)));
    });
    match batched {
        Ok(()) => Ok(entries),
        Err(e) if unsupported(&e) => Ok(map.iter().filter_map(Result::ok).collect()),
        Err(io_error) => Err(lookup_error(io_error)),
    }
}

/// How many entries `map` holds, counted in batches as [`read_all`] reads
/// them, in memory of one batch (a full conntrack map is tens of MiB).
pub(super) fn count_all<K: Pod, V: Pod>(
    map: &BpfHashMap<MapData, K, V>,
) -> Result<usize, MapError> {
    let mut count = 0;
    let batched = for_each_batch(map.map(), |keys: &mut Vec<K>, values: &mut Vec<V>| {
        count += keys.len();
        keys.clear();
        values.clear();
    });
    match batched {
        Ok(()) => Ok(count),
        Err(e) if unsupported(&e) => Ok(map.keys().filter(Result::is_ok).count()),
        Err(io_error) => Err(lookup_error(io_error)),
    }
}

/// The kernel cannot batch lookups of this map (before 5.6, or its type).
fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP)
    )
}

fn lookup_error(io_error: io::Error) -> MapError {
    MapError::SyscallError(aya::sys::SyscallError {
        call: "bpf_map_lookup_batch",
        io_error,
    })
}

/// Reads `map` in batches of [`PER_CALL`], handing each to `visit` (which
/// empties the two vectors, or the next batch is added to them).
pub(super) fn for_each_batch<K: Pod, V: Pod>(
    map: &MapData,
    mut visit: impl FnMut(&mut Vec<K>, &mut Vec<V>),
) -> Result<(), io::Error> {
    let mut keys: Vec<K> = Vec::with_capacity(PER_CALL);
    let mut values: Vec<V> = Vec::with_capacity(PER_CALL);
    // A hash map's position is a bucket index.
    let mut position: u32 = 0;
    let mut next: u32 = 0;
    let mut first = true;
    loop {
        // Whatever `visit` did with them, room for a batch again.
        keys.clear();
        values.clear();
        keys.reserve(PER_CALL);
        values.reserve(PER_CALL);
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                &position as *const u32 as u64
            },
            out_batch: &mut next as *mut u32 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: PER_CALL as u32,
            // Descriptors are non-negative.
            map_fd: map.fd().as_fd().as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        // SAFETY: `keys` and `values` have room for `PER_CALL` elements of
        // the map's key and value types (Pod, `#[repr(C)]`), the kernel
        // writes at most `attr.count` of each, and `position`/`next` are the
        // u32 batch tokens of a hash map; all outlive the call.
        let result = unsafe { bpf_batch(BPF_MAP_LOOKUP_BATCH, &mut attr) };
        let done = match result.err() {
            None => false,
            // No more entries (those of this call are still copied).
            Some(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
            Some(e) => return Err(e),
        };
        let read = (attr.count as usize).min(PER_CALL);
        // SAFETY: the call succeeded or ended with ENOENT, and the kernel
        // wrote `attr.count` elements of each (capped to the room there is).
        unsafe {
            keys.set_len(read);
            values.set_len(read);
        }
        visit(&mut keys, &mut values);
        if done {
            return Ok(());
        }
        position = next;
        first = false;
    }
}
