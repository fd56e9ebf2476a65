//! The shadow of the backends map: every programmed backend, its ID and
//! how many frontend views use it.
//!
//! Kept by ID (a list, as IDs are small and dense) with a hash index of
//! the IDs by backend: a frontend's shadow then holds only the IDs its
//! service entries already carry, and finds the backend of each from here.
use std::hash::BuildHasher;

use hashbrown::HashTable;
use proxy_common::BackendId;

use super::encode::BackendRef;

#[derive(Debug, Default)]
pub(super) struct BackendTable {
    /// By ID: the backend and its references (`None`: the ID is not in use).
    slots: Vec<Option<(BackendRef, u32)>>,
    /// The IDs in use, found by their backend.
    index: HashTable<BackendId>,
    hasher: std::hash::RandomState,
}

impl BackendTable {
    /// The ID of `backend`, if it has one.
    pub(super) fn id_of(&self, backend: &BackendRef) -> Option<BackendId> {
        let hash = self.hasher.hash_one(backend);
        self.index
            .find(hash, |id| self.backend(*id) == Some(backend))
            .copied()
    }

    /// The backend with ID `id`.
    pub(super) fn backend(&self, id: BackendId) -> Option<&BackendRef> {
        let (backend, _) = self.slots.get(id as usize)?.as_ref()?;
        Some(backend)
    }

    /// Gives `backend` the ID `id` with `refs` references; the caller makes
    /// sure neither is in use.
    pub(super) fn insert(&mut self, backend: BackendRef, id: BackendId, refs: u32) {
        let at = id as usize;
        if self.slots.len() <= at {
            self.slots.resize(at + 1, None);
        }
        self.slots[at] = Some((backend, refs));
        let hash = self.hasher.hash_one(backend);
        self.index
            .insert_unique(hash, id, rehash(&self.slots, &self.hasher));
    }

    /// Takes one more reference on the backend with ID `id`.
    pub(super) fn take(&mut self, id: BackendId) {
        if let Some(Some((_, refs))) = self.slots.get_mut(id as usize) {
            *refs = refs.saturating_add(1);
        }
    }

    /// Drops one reference on the backend with ID `id`; returns the
    /// backend when that was its last, and its ID is no longer in use.
    pub(super) fn drop_ref(&mut self, id: BackendId) -> Option<BackendRef> {
        let slot = self.slots.get_mut(id as usize)?;
        let (backend, refs) = slot.as_mut()?;
        *refs = refs.saturating_sub(1);
        if *refs > 0 {
            return None;
        }
        let backend = *backend;
        *slot = None;
        let hash = self.hasher.hash_one(backend);
        if let Ok(entry) = self.index.find_entry(hash, |other| *other == id) {
            entry.remove();
        }
        Some(backend)
    }

    /// Every backend in use with its ID.
    pub(super) fn iter(&self) -> impl Iterator<Item = (BackendId, &BackendRef)> {
        (0..).zip(&self.slots).filter_map(|(id, slot)| {
            let (backend, _) = slot.as_ref()?;
            Some((id, backend))
        })
    }

    pub(super) fn len(&self) -> usize {
        self.index.len()
    }

    /// Gives back the room that growing one ID at a time left (after a
    /// full reconcile: the table then keeps its size for long).
    pub(super) fn shrink_to_fit(&mut self) {
        while self.slots.last().is_some_and(Option::is_none) {
            self.slots.pop();
        }
        self.slots.shrink_to_fit();
        self.index.shrink_to_fit(rehash(&self.slots, &self.hasher));
    }

    pub(super) fn clear(&mut self) {
        self.slots = Vec::new();
        self.index = HashTable::new();
    }
}

/// The hash of an ID in the index, for moving it when the index grows or
/// shrinks: its backend's.
fn rehash<'a>(
    slots: &'a [Option<(BackendRef, u32)>],
    hasher: &'a std::hash::RandomState,
) -> impl Fn(&BackendId) -> u64 + 'a {
    move |id| {
        slots
            .get(*id as usize)
            .and_then(Option::as_ref)
            .map_or(0, |(b, _)| hasher.hash_one(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Protocol;

    fn backend(last: u8) -> BackendRef {
        BackendRef {
            ip: [10, 0, 0, last].into(),
            port: 80,
            protocol: Protocol::Tcp,
        }
    }

    #[test]
    fn finds_backends_by_id_and_ids_by_backend() {
        let mut table = BackendTable::default();
        table.insert(backend(1), 3, 1);
        table.insert(backend(2), 1, 1);
        assert_eq!(table.id_of(&backend(1)), Some(3));
        assert_eq!(table.id_of(&backend(2)), Some(1));
        assert_eq!(table.id_of(&backend(3)), None);
        assert_eq!(table.backend(3), Some(&backend(1)));
        assert_eq!(table.backend(2), None);
        assert_eq!(table.len(), 2);
        let all: Vec<_> = table.iter().map(|(id, b)| (id, *b)).collect();
        assert_eq!(all, [(1, backend(2)), (3, backend(1))]);
    }

    #[test]
    fn the_last_reference_frees_the_id() {
        let mut table = BackendTable::default();
        table.insert(backend(1), 1, 1);
        table.take(1);
        assert_eq!(table.drop_ref(1), None);
        assert_eq!(table.id_of(&backend(1)), Some(1));
        assert_eq!(table.drop_ref(1), Some(backend(1)));
        assert_eq!(table.id_of(&backend(1)), None);
        assert_eq!(table.backend(1), None);
        assert_eq!(table.len(), 0);
        // The ID and the backend can be used again.
        table.insert(backend(1), 1, 1);
        assert_eq!(table.id_of(&backend(1)), Some(1));
    }

    #[test]
    fn many_backends_survive_the_index_growing_and_shrinking() {
        let mut table = BackendTable::default();
        for i in 0..2000u32 {
            let b = BackendRef {
                ip: std::net::Ipv4Addr::from(0x0a00_0000 + i).into(),
                port: 8080,
                protocol: Protocol::Udp,
            };
            table.insert(b, i + 1, 1);
        }
        for i in (0..2000u32).step_by(2) {
            assert!(table.drop_ref(i + 1).is_some());
        }
        table.shrink_to_fit();
        for i in 0..2000u32 {
            let b = BackendRef {
                ip: std::net::Ipv4Addr::from(0x0a00_0000 + i).into(),
                port: 8080,
                protocol: Protocol::Udp,
            };
            let want = (i % 2 == 1).then_some(i + 1);
            assert_eq!(table.id_of(&b), want);
        }
    }
}
