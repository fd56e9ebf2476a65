//! [`Objects`]: a list of shared objects that is cheap to copy and to
//! compare with an earlier copy, and [`ObjectSet`]: which objects of such a
//! list are new and which are gone since the last one.
use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

/// Objects per chunk of an [`Objects`] list.
const CHUNK: usize = 128;

/// A list of shared objects, in chunks that copies share: a copy costs one
/// reference count per chunk, not per object, and a change copies one
/// chunk. A source keeps its objects in one, replacing a changed object in
/// place, and publishes copies; comparing a copy with an earlier one skips
/// the chunks they share.
///
/// Every chunk is full but the last, so positions are stable: an object
/// keeps its position until it or the last object is removed.
pub struct Objects<T> {
    chunks: Vec<Arc<Vec<Arc<T>>>>,
    len: usize,
}

impl<T> Default for Objects<T> {
    fn default() -> Self {
        Objects {
            chunks: Vec::new(),
            len: 0,
        }
    }
}

impl<T> Clone for Objects<T> {
    fn clone(&self) -> Self {
        Objects {
            chunks: self.chunks.clone(),
            len: self.len,
        }
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for Objects<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl<T> Objects<T> {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<T>> + Clone {
        self.chunks.iter().flat_map(|chunk| chunk.iter())
    }

    /// Each object, to replace; a chunk shared with a copy is copied first.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Arc<T>> {
        self.chunks
            .iter_mut()
            .flat_map(|chunk| Arc::make_mut(chunk).iter_mut())
    }

    /// The objects in a plain list.
    pub fn to_vec(&self) -> Vec<Arc<T>> {
        self.iter().cloned().collect()
    }

    pub fn get(&self, at: usize) -> Option<&Arc<T>> {
        self.chunks.get(at / CHUNK)?.get(at % CHUNK)
    }

    pub fn push(&mut self, object: Arc<T>) {
        match self.chunks.last_mut() {
            Some(chunk) if chunk.len() < CHUNK => Arc::make_mut(chunk).push(object),
            _ => {
                let mut chunk = Vec::with_capacity(CHUNK);
                chunk.push(object);
                self.chunks.push(Arc::new(chunk));
            }
        }
        self.len += 1;
    }

    /// Replaces the object at `at`, returning the one it was.
    ///
    /// # Panics
    /// When `at` is out of bounds.
    pub fn set(&mut self, at: usize, object: Arc<T>) -> Arc<T> {
        std::mem::replace(&mut self[at], object)
    }

    /// Removes the object at `at`, moving the last one into its place.
    ///
    /// # Panics
    /// When `at` is out of bounds.
    pub fn swap_remove(&mut self, at: usize) -> Arc<T> {
        assert!(at < self.len, "swap_remove at {at} of {}", self.len);
        let last_chunk = self.chunks.len() - 1;
        let last = Arc::make_mut(&mut self.chunks[last_chunk])
            .pop()
            .unwrap_or_else(|| unreachable!("the last chunk is never empty"));
        if self.chunks[last_chunk].is_empty() {
            self.chunks.pop();
        }
        self.len -= 1;
        if at == self.len {
            last
        } else {
            self.set(at, last)
        }
    }

    /// The chunks, for comparing with an earlier copy.
    fn chunks(&self) -> &[Arc<Vec<Arc<T>>>] {
        &self.chunks
    }
}

impl<T> std::ops::Index<usize> for Objects<T> {
    type Output = Arc<T>;

    fn index(&self, at: usize) -> &Arc<T> {
        &self.chunks[at / CHUNK][at % CHUNK]
    }
}

impl<T> std::ops::IndexMut<usize> for Objects<T> {
    /// A chunk shared with a copy is copied first.
    fn index_mut(&mut self, at: usize) -> &mut Arc<T> {
        &mut Arc::make_mut(&mut self.chunks[at / CHUNK])[at % CHUNK]
    }
}

impl<T> FromIterator<Arc<T>> for Objects<T> {
    fn from_iter<I: IntoIterator<Item = Arc<T>>>(iter: I) -> Self {
        let mut objects = Objects::new();
        for object in iter {
            objects.push(object);
        }
        objects
    }
}

impl<T> From<Vec<Arc<T>>> for Objects<T> {
    fn from(list: Vec<Arc<T>>) -> Self {
        list.into_iter().collect()
    }
}

impl<'a, T> IntoIterator for &'a Objects<T> {
    type Item = &'a Arc<T>;
    type IntoIter = Box<dyn Iterator<Item = &'a Arc<T>> + 'a>;

    fn into_iter(self) -> Self::IntoIter {
        Box::new(self.iter())
    }
}

impl<'a, T> IntoIterator for &'a mut Objects<T> {
    type Item = &'a mut Arc<T>;
    type IntoIter = Box<dyn Iterator<Item = &'a mut Arc<T>> + 'a>;

    fn into_iter(self) -> Self::IntoIter {
        Box::new(self.iter_mut())
    }
}

/// The objects of the last list seen, by identity (`Arc` address), each with
/// a value derived from it once (a check, say).
///
/// Sources replace a changed object in place, so a new list usually
/// differs from the last in a few positions, in chunks the two lists do not
/// share: only those are compared, without touching the other objects.
/// Anything else (many changes, objects listed twice) falls back to one
/// lookup per object.
pub struct ObjectSet<K, V> {
    by_id: HashMap<usize, Entry<K, V>>,
    /// The last list: a copy, sharing its chunks with the source's list.
    last: Objects<K>,
    /// Whether `last` holds each identity once.
    unique: bool,
    /// Flips on every full refresh, to find the objects that are gone
    /// without a second map.
    epoch: bool,
}

struct Entry<K, V> {
    /// Held, so that the address is not reused while the entry lives.
    object: Arc<K>,
    value: V,
    epoch: bool,
}

/// What a refresh found: (identity, object, value) of each new and each
/// gone object.
pub struct ObjectDelta<K, V> {
    pub added: Vec<(usize, Arc<K>, V)>,
    pub removed: Vec<(usize, Arc<K>, V)>,
}

impl<K, V> Default for ObjectSet<K, V> {
    fn default() -> Self {
        ObjectSet {
            by_id: HashMap::new(),
            last: Objects::new(),
            unique: true,
            epoch: false,
        }
    }
}

fn id_of<K>(object: &Arc<K>) -> usize {
    Arc::as_ptr(object) as usize
}

/// At most one position in this many may differ for the positional path.
const POSITIONAL_SHARE: usize = 8;

impl<K, V: Clone> ObjectSet<K, V> {
    /// Brings the set to `objects`: derives the value of each new object
    /// with `derive`, forgets those gone, and says which they were. An
    /// object listed twice counts once.
    pub fn refresh(
        &mut self,
        objects: &Objects<K>,
        derive: impl Fn(&Arc<K>) -> V,
    ) -> ObjectDelta<K, V> {
        let delta = match self.refresh_in_place(objects, &derive) {
            Some(delta) => delta,
            None => self.refresh_all(objects, &derive),
        };
        self.last = objects.clone();
        delta
    }

    /// The positional path: each identity once, few positions differ, and
    /// every object at them is new, or moved among them.
    fn refresh_in_place(
        &mut self,
        objects: &Objects<K>,
        derive: &impl Fn(&Arc<K>) -> V,
    ) -> Option<ObjectDelta<K, V>> {
        if !self.unique {
            return None;
        }
        let limit = 2 * (objects.len().max(self.last.len()) / POSITIONAL_SHARE + 1);
        let (before, after) = (self.last.chunks(), objects.chunks());
        let mut old_ids: Vec<usize> = Vec::new();
        let mut new_objects: Vec<&Arc<K>> = Vec::new();
        for at in 0..before.len().max(after.len()) {
            let (old, new) = (before.get(at), after.get(at));
            if let (Some(old), Some(new)) = (old, new)
                && Arc::ptr_eq(old, new)
            {
                continue;
            }
            let old: &[Arc<K>] = old.map_or(&[], |chunk| chunk);
            let new: &[Arc<K>] = new.map_or(&[], |chunk| chunk);
            for i in 0..old.len().max(new.len()) {
                let (was, is) = (old.get(i), new.get(i));
                if was.map(id_of) == is.map(id_of) {
                    continue;
                }
                old_ids.extend(was.map(id_of));
                new_objects.extend(is);
                if old_ids.len() + new_objects.len() > limit {
                    return None;
                }
            }
        }
        let old: HashSet<usize> = old_ids.iter().copied().collect();
        let mut new: HashSet<usize> = HashSet::with_capacity(new_objects.len());
        for object in &new_objects {
            let id = id_of(object);
            // Listed twice, or still listed at a position that did not
            // change: not a plain replacement.
            if !new.insert(id) || (!old.contains(&id) && self.by_id.contains_key(&id)) {
                return None;
            }
        }
        let mut delta = ObjectDelta {
            added: Vec::new(),
            removed: Vec::new(),
        };
        for gone in old_ids {
            if !new.contains(&gone)
                && let Some(entry) = self.by_id.remove(&gone)
            {
                delta.removed.push((gone, entry.object, entry.value));
            }
        }
        for object in new_objects {
            let id = id_of(object);
            if old.contains(&id) {
                continue;
            }
            self.add(id, object, derive, self.epoch, &mut delta);
        }
        Some(delta)
    }

    /// Takes in a new object, marked with `epoch`, and reports it.
    fn add(
        &mut self,
        id: usize,
        object: &Arc<K>,
        derive: &impl Fn(&Arc<K>) -> V,
        epoch: bool,
        delta: &mut ObjectDelta<K, V>,
    ) {
        let value = derive(object);
        delta.added.push((id, object.clone(), value.clone()));
        self.by_id.insert(
            id,
            Entry {
                object: object.clone(),
                value,
                epoch,
            },
        );
    }

    /// One lookup per object; marks what is listed and sweeps the rest.
    fn refresh_all(
        &mut self,
        objects: &Objects<K>,
        derive: &impl Fn(&Arc<K>) -> V,
    ) -> ObjectDelta<K, V> {
        self.epoch = !self.epoch;
        let epoch = self.epoch;
        let mut delta = ObjectDelta {
            added: Vec::new(),
            removed: Vec::new(),
        };
        let mut seen = 0;
        for object in objects.iter() {
            let id = id_of(object);
            match self.by_id.get_mut(&id) {
                Some(entry) => {
                    if entry.epoch != epoch {
                        entry.epoch = epoch;
                        seen += 1;
                    }
                }
                None => {
                    seen += 1;
                    self.add(id, object, derive, epoch, &mut delta);
                }
            }
        }
        if self.by_id.len() > seen {
            let removed = &mut delta.removed;
            self.by_id.retain(|id, entry| {
                let keep = entry.epoch == epoch;
                if !keep {
                    removed.push((*id, entry.object.clone(), entry.value.clone()));
                }
                keep
            });
        }
        self.unique = self.by_id.len() == objects.len();
        delta
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Identities of the new and gone objects, sorted.
    fn ids(delta: &ObjectDelta<String, usize>) -> (Vec<String>, Vec<String>) {
        let mut added: Vec<String> = delta.added.iter().map(|(_, o, _)| (**o).clone()).collect();
        let mut removed: Vec<String> = delta
            .removed
            .iter()
            .map(|(_, o, _)| (**o).clone())
            .collect();
        added.sort();
        removed.sort();
        (added, removed)
    }

    fn strings(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn replacements_additions_moves_and_copies_are_found() {
        let mut set: ObjectSet<String, usize> = ObjectSet::default();
        let objects: Objects<String> = (0..300).map(|i| Arc::new(format!("o{i}"))).collect();
        let derive = |o: &Arc<String>| o.len();
        assert_eq!(ids(&set.refresh(&objects, derive)).0.len(), 300);
        // Nothing changed.
        assert_eq!(ids(&set.refresh(&objects, derive)), (vec![], vec![]));
        // One replaced in place (the positional path).
        let mut next = objects.clone();
        next[7] = Arc::new("o7'".into());
        assert_eq!(
            ids(&set.refresh(&next, derive)),
            (strings(&["o7'"]), strings(&["o7"]))
        );
        // Two swapped: moved, neither new nor gone.
        let third = next[3].clone();
        let fourth = next.set(4, third);
        next.set(3, fourth);
        assert_eq!(ids(&set.refresh(&next, derive)), (vec![], vec![]));
        // One appended, and one removed with the last moved into its
        // place.
        next.push(Arc::new("o300".into()));
        let gone = next.swap_remove(0);
        assert_eq!(
            ids(&set.refresh(&next, derive)),
            (strings(&["o300"]), vec![(*gone).clone()])
        );
        assert_eq!(next[0].as_str(), "o300");
        // Many replaced: the full path.
        let old: Vec<String> = (200..260).map(|i| (*next[i]).clone()).collect();
        for i in 200..260 {
            next.set(i, Arc::new(format!("n{i}")));
        }
        let mut new: Vec<String> = (200..260).map(|i| format!("n{i}")).collect();
        new.sort();
        let mut old_sorted = old.clone();
        old_sorted.sort();
        assert_eq!(ids(&set.refresh(&next, derive)), (new, old_sorted));
        // An object listed twice counts once, and its copy going is no
        // removal.
        let twice = next[5].clone();
        let mut doubled = next.clone();
        let replaced = std::mem::replace(&mut doubled[9], twice.clone());
        assert_eq!(
            ids(&set.refresh(&doubled, derive)),
            (vec![], vec![(*replaced).clone()])
        );
        doubled[9] = Arc::new("o9'".into());
        assert_eq!(
            ids(&set.refresh(&doubled, derive)),
            (strings(&["o9'"]), vec![])
        );
        // An object still listed elsewhere, placed over another: the other
        // is gone, nothing is new.
        let mut over = doubled.clone();
        let copy = over[21].clone();
        let lost = std::mem::replace(&mut over[20], copy);
        assert_eq!(
            ids(&set.refresh(&over, derive)),
            (vec![], vec![(*lost).clone()])
        );
    }

    /// Random edits, each checked against the set difference of the lists.
    #[test]
    fn every_refresh_gives_the_set_difference() {
        let mut set: ObjectSet<String, usize> = ObjectSet::default();
        let mut list: Objects<String> = (0..400).map(|i| Arc::new(format!("o{i}"))).collect();
        let mut rng: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next_name = 400;
        let mut before: Objects<String> = Objects::new();
        for round in 0..3_000 {
            let edits = if round % 50 == 0 { 80 } else { 1 + round % 3 };
            for _ in 0..edits {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let at = (rng >> 8) as usize % list.len();
                let other = (rng >> 20) as usize % list.len();
                match rng % 6 {
                    0..=2 => {
                        list.set(at, Arc::new(format!("o{next_name}")));
                        next_name += 1;
                    }
                    3 if list.len() > 2 => {
                        list.swap_remove(at);
                    }
                    4 => {
                        list.push(Arc::new(format!("o{next_name}")));
                        next_name += 1;
                    }
                    _ if rng & (1 << 40) == 0 => {
                        let moved = list[other].clone();
                        let back = list.set(at, moved);
                        list.set(other, back);
                    }
                    _ => {
                        let copy = list[other].clone();
                        list.set(at, copy);
                    }
                }
            }
            let delta = set.refresh(&list, |o| o.len());
            let set_of = |l: &Objects<String>| -> std::collections::BTreeSet<usize> {
                l.iter().map(id_of).collect()
            };
            let (old, new) = (set_of(&before), set_of(&list));
            let mut added: Vec<usize> = delta.added.iter().map(|(id, _, _)| *id).collect();
            let mut removed: Vec<usize> = delta.removed.iter().map(|(id, _, _)| *id).collect();
            added.sort();
            removed.sort();
            assert_eq!(
                added,
                new.difference(&old).copied().collect::<Vec<_>>(),
                "round {round}"
            );
            assert_eq!(
                removed,
                old.difference(&new).copied().collect::<Vec<_>>(),
                "round {round}"
            );
            before = list.clone();
        }
    }
}
