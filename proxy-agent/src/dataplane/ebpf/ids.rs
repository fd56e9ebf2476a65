//! Allocation of the small integer IDs of backends and frontend views.
use std::collections::BTreeSet;

/// Allocates small integer IDs, reusing freed ones.
#[derive(Debug)]
pub(super) struct IdAllocator {
    free: Vec<u32>,
    next: u32,
}

impl Default for IdAllocator {
    fn default() -> Self {
        Self {
            free: Vec::new(),
            next: 1,
        }
    }
}

impl IdAllocator {
    pub(super) fn alloc(&mut self) -> Option<u32> {
        if let Some(id) = self.free.pop() {
            return Some(id);
        }
        let id = self.next;
        self.next = self.next.checked_add(1)?;
        Some(id)
    }

    pub(super) fn release(&mut self, id: u32) {
        self.free.push(id);
    }

    /// Restarts after IDs `used` were adopted from the kernel: everything
    /// below the highest one that is not used is free.
    pub(super) fn reset(&mut self, used: &BTreeSet<u32>) {
        self.next = used.iter().next_back().map_or(1, |m| m + 1);
        self.free = (1..self.next)
            .filter(|id| !used.contains(id))
            .rev()
            .collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_from_one_and_reuses_released_ids() {
        let mut ids = IdAllocator::default();
        assert_eq!(
            (ids.alloc(), ids.alloc(), ids.alloc()),
            (Some(1), Some(2), Some(3))
        );
        ids.release(2);
        assert_eq!(ids.alloc(), Some(2));
        assert_eq!(ids.alloc(), Some(4));
    }

    #[test]
    fn reset_frees_the_gaps_below_the_highest_adopted_id() {
        let mut ids = IdAllocator::default();
        ids.reset(&BTreeSet::from([2, 5]));
        let next: Vec<_> = std::iter::repeat_with(|| ids.alloc())
            .take(4)
            .flatten()
            .collect();
        assert_eq!(next, [1, 3, 4, 6]);
        ids.reset(&BTreeSet::new());
        assert_eq!(ids.alloc(), Some(1));
    }
}
