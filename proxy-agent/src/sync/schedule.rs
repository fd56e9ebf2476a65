//! When the sync loop syncs: a change waits `min_sync_period` after the
//! last apply (changes that arrive meanwhile coalesce into it), a full
//! reconcile comes every `sync_period`, and a failure is retried as a full
//! reconcile after a back-off that doubles up to `max_backoff`. Pure: every
//! decision takes the time as an argument, so tests need no clock.
use std::time::Duration;

use tokio::time::Instant;

use super::SyncOptions;

/// The loop's timers.
#[derive(Clone, Debug)]
pub(super) struct Schedule {
    opts: SyncOptions,
    next_full: Instant,
    retry_at: Option<Instant>,
    /// When a received change may be applied; `None` when nothing waits.
    pending_at: Option<Instant>,
    last_apply: Option<Instant>,
    backoff: Duration,
}

/// What is due at a moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Due {
    Nothing,
    /// Apply the difference from what is programmed.
    Change,
    /// Reconcile the whole table with the kernel.
    Full,
}

impl Schedule {
    pub(super) fn new(opts: &SyncOptions, now: Instant) -> Self {
        Schedule {
            opts: opts.clone(),
            next_full: now + opts.sync_period,
            retry_at: None,
            pending_at: None,
            last_apply: None,
            backoff: opts.retry_backoff,
        }
    }

    /// The next moment something may be due.
    pub(super) fn deadline(&self) -> Instant {
        [Some(self.next_full), self.retry_at, self.pending_at]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(self.next_full)
    }

    /// A new state arrived at `now`: it is due `min_sync_period` after the
    /// last apply, or at once; one already waiting keeps its time.
    pub(super) fn changed(&mut self, now: Instant) {
        if self.pending_at.is_none() {
            let earliest = self
                .last_apply
                .map_or(now, |t| t + self.opts.min_sync_period);
            self.pending_at = Some(earliest.max(now));
        }
    }

    /// Whether a change waits to be applied.
    pub(super) fn waiting(&self) -> bool {
        self.pending_at.is_some()
    }

    /// What is due at `now`; a due change stops waiting.
    pub(super) fn due(&mut self, now: Instant) -> Due {
        let full = self.next_full <= now || self.retry_at.is_some_and(|r| r <= now);
        let change = self.pending_at.is_some_and(|p| p <= now);
        if !full && !change {
            return Due::Nothing;
        }
        self.pending_at = None;
        if full { Due::Full } else { Due::Change }
    }

    /// Nothing could be synced (no state yet, or the state programs
    /// nothing new): a due full reconcile counts as done.
    pub(super) fn skipped(&mut self, now: Instant, due: Due) {
        self.retry_at = None;
        if due == Due::Full {
            self.next_full = now + self.opts.sync_period;
        }
    }

    /// The dataplane applied what was due, at `now`.
    pub(super) fn applied(&mut self, now: Instant, due: Due) {
        self.last_apply = Some(now);
        self.backoff = self.opts.retry_backoff;
        self.skipped(now, due);
    }

    /// The dataplane failed at `now`: a full reconcile is retried after the
    /// returned back-off, and the next one waits twice as long.
    pub(super) fn failed(&mut self, now: Instant) -> Duration {
        self.last_apply = Some(now);
        let backoff = self.backoff;
        self.retry_at = Some(now + backoff);
        self.backoff = (backoff * 2).min(self.opts.max_backoff);
        backoff
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> SyncOptions {
        SyncOptions {
            sync_period: Duration::from_secs(30),
            min_sync_period: Duration::from_secs(1),
            retry_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(2),
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_first_change_is_due_at_once_and_later_ones_after_the_min_period() {
        let t0 = Instant::now();
        let mut s = Schedule::new(&opts(), t0);
        assert_eq!(s.due(t0), Due::Nothing);
        s.changed(t0);
        assert_eq!(s.deadline(), t0);
        assert_eq!(s.due(t0), Due::Change);
        s.applied(t0, Due::Change);
        // Two changes 100 ms apart coalesce into one apply, 1 s after the last.
        s.changed(t0 + ms(100));
        s.changed(t0 + ms(200));
        assert_eq!(s.deadline(), t0 + ms(1000));
        assert_eq!(s.due(t0 + ms(999)), Due::Nothing);
        assert!(s.waiting());
        assert_eq!(s.due(t0 + ms(1000)), Due::Change);
        assert!(!s.waiting());
        // Long after the last apply, a change is due at once again.
        s.applied(t0 + ms(1000), Due::Change);
        s.changed(t0 + ms(5000));
        assert_eq!(s.due(t0 + ms(5000)), Due::Change);
    }

    #[test]
    fn a_full_reconcile_comes_every_sync_period_and_takes_a_waiting_change() {
        let t0 = Instant::now();
        let mut s = Schedule::new(&opts(), t0);
        assert_eq!(s.deadline(), t0 + Duration::from_secs(30));
        let at = t0 + Duration::from_secs(30);
        s.changed(at);
        assert_eq!(s.due(at), Due::Full);
        assert!(!s.waiting(), "the full reconcile programs the change too");
        s.applied(at, Due::Full);
        assert_eq!(s.deadline(), at + Duration::from_secs(30));
        // A state that programs nothing still moves the period on.
        let later = at + Duration::from_secs(30);
        assert_eq!(s.due(later), Due::Full);
        s.skipped(later, Due::Full);
        assert_eq!(s.deadline(), later + Duration::from_secs(30));
    }

    #[test]
    fn failures_retry_as_full_reconciles_with_doubling_back_off() {
        let t0 = Instant::now();
        let mut s = Schedule::new(&opts(), t0);
        s.changed(t0);
        assert_eq!(s.due(t0), Due::Change);
        let backoffs: Vec<Duration> = (0..4)
            .map(|_| {
                let now = s.deadline().max(t0);
                let backoff = s.failed(now);
                assert_eq!(s.due(now + backoff), Due::Full);
                backoff
            })
            .collect();
        assert_eq!(backoffs, [ms(500), ms(1000), ms(2000), ms(2000)]);
        // Success resets the back-off.
        let now = t0 + Duration::from_secs(10);
        s.applied(now, Due::Full);
        assert_eq!(s.failed(now), ms(500));
    }
}
