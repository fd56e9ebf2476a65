//! Operations on [`ServiceTable`] and its [`TableDiff`]s.
use std::{
    collections::{BTreeSet, HashMap},
    sync::Arc,
};

use super::{Backend, Frontend, FrontendChange, FrontendKey, Protocol, ServiceTable, TableDiff};

impl ServiceTable {
    pub fn new() -> ServiceTable {
        ServiceTable::default()
    }

    /// Sets the frontend for `key`, returning the one it replaces. Backends
    /// are sorted and de-duplicated, as [`Frontend`] promises.
    pub fn insert(&mut self, key: FrontendKey, mut frontend: Frontend) -> Option<Arc<Frontend>> {
        frontend.backends.sort_unstable();
        frontend.backends.dedup();
        frontend.cluster_backends.sort_unstable();
        frontend.cluster_backends.dedup();
        self.frontends.insert(key, Arc::new(frontend))
    }

    /// Sets the frontend for `key` to one shared with its maker, who keeps
    /// [`Frontend`]'s promise (backends sorted, without duplicates);
    /// returns the one it replaces.
    pub fn insert_shared(
        &mut self,
        key: FrontendKey,
        frontend: Arc<Frontend>,
    ) -> Option<Arc<Frontend>> {
        debug_assert!(frontend.backends.is_sorted() && frontend.cluster_backends.is_sorted());
        self.frontends.insert(key, frontend)
    }

    /// Removes the frontend for `key`, returning it.
    pub fn remove(&mut self, key: &FrontendKey) -> Option<Arc<Frontend>> {
        self.frontends.remove(key)
    }

    pub fn get(&self, key: &FrontendKey) -> Option<&Frontend> {
        self.frontends.get(key).map(|f| &**f)
    }

    /// Frontends in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&FrontendKey, &Frontend)> {
        self.frontends.iter().map(|(k, f)| (k, &**f))
    }

    /// Frontends in key order, to share.
    pub fn iter_shared(&self) -> impl Iterator<Item = (&FrontendKey, &Arc<Frontend>)> {
        self.frontends.iter()
    }

    /// Number of frontends.
    pub fn len(&self) -> usize {
        self.frontends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.frontends.is_empty()
    }

    /// Number of backends over all frontends (a backend serving two
    /// frontends counts twice, as it takes two dataplane entries).
    pub fn backend_count(&self) -> usize {
        self.frontends.values().map(|f| f.backends.len()).sum()
    }

    /// What must change to turn `self` (what is programmed) into `desired`.
    /// Every list is sorted by key.
    pub fn diff(&self, desired: &ServiceTable) -> TableDiff {
        let mut diff = TableDiff::default();
        for (key, new) in &desired.frontends {
            match self.frontends.get(key) {
                None => diff.added.push((*key, new.clone())),
                Some(old) if old != new => diff.changed.push(FrontendChange {
                    key: *key,
                    old: old.clone(),
                    new: new.clone(),
                }),
                Some(_) => {}
            }
        }
        for (key, old) in &self.frontends {
            if !desired.frontends.contains_key(key) {
                diff.removed.push((*key, old.clone()));
            }
        }
        diff
    }
}

/// The Service ports with a Local traffic policy and no endpoint on this
/// node, as kube-proxy's `sync_proxy_rules_no_local_endpoints_total`
/// counts them: per family, and per policy (`internal`: a ClusterIP's
/// `internalTrafficPolicy`; `external`: the `externalTrafficPolicy` of
/// the external frontends, one count for all of a port's).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NoLocalEndpoints {
    /// Indexed `[family][policy]`: family 0 IPv4, 1 IPv6; policy 0
    /// internal, 1 external.
    pub counts: [[usize; 2]; 2],
}

impl ServiceTable {
    /// [`NoLocalEndpoints`] of this table (a walk of every frontend; a
    /// table that changes keeps them with a [`NoLocalEndpointsTracker`]).
    pub fn no_local_endpoints(&self) -> NoLocalEndpoints {
        NoLocalEndpointsTracker::of(self).counts()
    }
}

/// One counted Service port: family, policy, Service, port name.
type NoLocalPort = (usize, usize, super::ServiceName, String);

/// [`NoLocalEndpoints`] kept up to date from each diff of a table, so that
/// a sync pays for what changed rather than for every frontend.
#[derive(Clone, Debug, Default)]
pub struct NoLocalEndpointsTracker {
    /// Frontends with a Local policy and no local endpoint, per Service
    /// port (a port's several external frontends count once).
    frontends: HashMap<NoLocalPort, usize>,
    counts: NoLocalEndpoints,
}

impl NoLocalEndpointsTracker {
    pub fn of(table: &ServiceTable) -> Self {
        let mut tracker = Self::default();
        for (key, f) in table.iter() {
            tracker.add(key, f);
        }
        tracker
    }

    /// Follows the table from the one `diff` was taken from to the next.
    pub fn apply(&mut self, diff: &TableDiff) {
        for (key, f) in &diff.removed {
            self.remove(key, f);
        }
        for change in &diff.changed {
            self.remove(&change.key, &change.old);
            self.add(&change.key, &change.new);
        }
        for (key, f) in &diff.added {
            self.add(key, f);
        }
    }

    pub fn counts(&self) -> NoLocalEndpoints {
        self.counts
    }

    fn port(key: &FrontendKey, f: &Frontend) -> Option<NoLocalPort> {
        (f.policy.local_only && f.backends.is_empty()).then(|| {
            (
                usize::from(key.ip.is_ipv6()),
                usize::from(f.kind.is_external()),
                f.service.clone(),
                f.port_name.clone(),
            )
        })
    }

    fn add(&mut self, key: &FrontendKey, f: &Frontend) {
        if let Some(port) = Self::port(key, f) {
            let (family, policy) = (port.0, port.1);
            let n = self.frontends.entry(port).or_insert(0);
            if *n == 0 {
                self.counts.counts[family][policy] += 1;
            }
            *n += 1;
        }
    }

    fn remove(&mut self, key: &FrontendKey, f: &Frontend) {
        let Some(port) = Self::port(key, f) else {
            return;
        };
        if let Some(n) = self.frontends.get_mut(&port) {
            *n -= 1;
            if *n == 0 {
                self.frontends.remove(&port);
                self.counts.counts[port.0][port.1] -= 1;
            }
        }
    }
}

impl TableDiff {
    /// True when applying the diff would change nothing.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.changed.is_empty() && self.removed.is_empty()
    }

    /// The UDP (frontend, backend) pairs the diff takes away, sorted: a
    /// frontend removed, or a backend in neither view of its frontend any
    /// more. Every mode forgets their flows, or a client that keeps
    /// sending from one socket stays on a backend that no longer exists
    /// (kube-proxy's conntrack cleanup). A change of source ranges forgets
    /// nothing: as in kube-proxy, whose firewall checks only new
    /// connections, ranges decide who may start a flow, not who may keep
    /// one. A NodePort's address is unspecified (any node address).
    pub fn stale_udp_flows(&self) -> Vec<(FrontendKey, Backend)> {
        let udp = |key: &FrontendKey| key.protocol == Protocol::Udp;
        let mut stale: Vec<(FrontendKey, Backend)> = Vec::new();
        for (key, old) in self.removed.iter().filter(|(key, _)| udp(key)) {
            stale.extend(old.all_backends().map(|b| (*key, *b)));
        }
        for change in self.changed.iter().filter(|c| udp(&c.key)) {
            let kept: BTreeSet<&Backend> = change.new.all_backends().collect();
            let gone = change.old.all_backends().filter(|b| !kept.contains(b));
            stale.extend(gone.map(|b| (change.key, *b)));
        }
        stale.sort_unstable();
        stale.dedup();
        stale
    }

    /// The UDP frontends the diff starts serving, sorted: added with a
    /// backend, or given one when neither view had any. A client that sent
    /// to such an address before (the Service did not exist yet, or the
    /// agent had not programmed it) has a connection-tracking entry that
    /// was never translated, and as long as it keeps sending from the same
    /// socket the kernel keeps that entry and never translates it: its
    /// datagrams go on missing the Service (kube-proxy deletes these
    /// entries too).
    pub fn udp_frontends_starting_service(&self) -> Vec<FrontendKey> {
        let serves = |f: &Frontend| f.all_backends().next().is_some();
        let added = self
            .added
            .iter()
            .filter(|(key, new)| key.protocol == Protocol::Udp && serves(new))
            .map(|(key, _)| *key);
        let changed = self
            .changed
            .iter()
            .filter(|c| c.key.protocol == Protocol::Udp && !serves(&c.old) && serves(&c.new))
            .map(|c| c.key);
        let mut keys: Vec<FrontendKey> = added.chain(changed).collect();
        keys.sort_unstable();
        keys.dedup();
        keys
    }
}

impl Frontend {
    /// The backends of both views (possibly with duplicates).
    pub fn all_backends(&self) -> impl Iterator<Item = &Backend> {
        self.backends.iter().chain(&self.cluster_backends)
    }
}

impl FrontendChange {
    /// Backends in `new` but not in `old`, sorted.
    pub fn added_backends(&self) -> Vec<Backend> {
        backends_missing_from(&self.new.backends, &self.old.backends)
    }

    /// Backends in `old` but not in `new`, sorted.
    pub fn removed_backends(&self) -> Vec<Backend> {
        backends_missing_from(&self.old.backends, &self.new.backends)
    }
}

/// The backends of `from` that `other` lacks, sorted and de-duplicated
/// (sets, because a Frontend built by hand may break the sorted promise).
fn backends_missing_from(from: &[Backend], other: &[Backend]) -> Vec<Backend> {
    let other: BTreeSet<&Backend> = other.iter().collect();
    let from: BTreeSet<&Backend> = from.iter().collect();
    from.difference(&other).map(|&&backend| backend).collect()
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{apply, backend, frontend, key};
    use super::*;

    fn table(entries: &[(FrontendKey, Frontend)]) -> ServiceTable {
        let mut table = ServiceTable::new();
        for (key, frontend) in entries {
            table.insert(*key, frontend.clone());
        }
        table
    }

    /// A LoadBalancer's NodePort and address count once; a ClusterIP with
    /// the internal Local policy counts apart; one with a local endpoint,
    /// or with the Cluster policy, not at all.
    #[test]
    fn service_ports_without_a_local_endpoint_count_once_per_policy_and_family() {
        let local = |kind: super::super::FrontendKind, backends: &[Backend]| {
            let mut f = frontend("ns", "a", backends);
            f.kind = kind;
            f.policy.local_only = true;
            f.cluster_backends = vec![backend("10.1.0.9", 80)];
            f
        };
        use super::super::FrontendKind::*;
        let t = table(&[
            (key("0.0.0.0", 30080), local(NodePort, &[])),
            (key("192.0.2.1", 80), local(LoadBalancer, &[])),
            (key("10.96.0.1", 80), local(ClusterIp, &[])),
            (key("fd00::1", 80), local(ClusterIp, &[])),
            (
                key("10.96.0.2", 80),
                local(ClusterIp, &[backend("10.1.0.1", 80)]),
            ),
            (key("10.96.0.3", 80), frontend("ns", "b", &[])),
        ]);
        assert_eq!(t.no_local_endpoints().counts, [[1, 1], [1, 0]]);

        // Kept from diffs, it agrees with a walk at every step: the
        // NodePort gets a local endpoint, the LoadBalancer goes, a second
        // frontend of the counted ClusterIP port comes and goes.
        let mut tracker = NoLocalEndpointsTracker::of(&t);
        let mut now = t.clone();
        // (frontend, what it becomes; None: removed)
        let steps: Vec<(FrontendKey, Option<Frontend>)> = vec![
            (
                key("0.0.0.0", 30080),
                Some(local(NodePort, &[backend("10.1.0.1", 80)])),
            ),
            (key("192.0.2.1", 80), None),
            (key("10.96.0.9", 81), Some(local(ClusterIp, &[]))),
            (key("10.96.0.9", 81), None),
            (key("10.96.0.1", 80), None),
        ];
        for (i, (k, becomes)) in steps.into_iter().enumerate() {
            let before = now.clone();
            match becomes {
                Some(f) => now.insert(k, f),
                None => now.remove(&k),
            };
            tracker.apply(&before.diff(&now));
            assert_eq!(tracker.counts(), now.no_local_endpoints(), "step {i}");
        }
        assert_eq!(tracker.counts().counts, [[0, 0], [1, 0]]);
    }

    #[test]
    fn new_table_is_empty() {
        let table = ServiceTable::new();
        assert!(table.is_empty());
        assert_eq!(table.len(), 0);
        assert_eq!(table.backend_count(), 0);
        assert_eq!(table.iter().count(), 0);
    }

    #[test]
    fn insert_sorts_and_dedups_backends_and_replaces() {
        let k = key("10.0.0.1", 80);
        let mut table = ServiceTable::new();
        let unsorted = frontend(
            "ns",
            "a",
            &[
                backend("10.1.0.2", 8080),
                backend("10.1.0.1", 8080),
                backend("10.1.0.2", 8080),
            ],
        );
        assert_eq!(table.insert(k, unsorted), None);
        let stored = table.get(&k).map(|f| f.backends.clone());
        assert_eq!(
            stored,
            Some(vec![backend("10.1.0.1", 8080), backend("10.1.0.2", 8080)])
        );
        assert_eq!(table.backend_count(), 2);

        let replaced = table.insert(k, frontend("ns", "a", &[]));
        assert_eq!(replaced.map(|f| f.backends.len()), Some(2));
        assert_eq!(table.len(), 1);
        assert_eq!(table.backend_count(), 0);
        assert!(table.remove(&k).is_some());
        assert!(table.is_empty());
    }

    #[test]
    fn iter_is_in_key_order() {
        let table = table(&[
            (key("10.0.0.2", 80), frontend("ns", "b", &[])),
            (key("10.0.0.1", 443), frontend("ns", "a", &[])),
            (key("10.0.0.1", 80), frontend("ns", "a", &[])),
        ]);
        let keys: Vec<FrontendKey> = table.iter().map(|(k, _)| *k).collect();
        assert_eq!(
            keys,
            vec![
                key("10.0.0.1", 80),
                key("10.0.0.1", 443),
                key("10.0.0.2", 80)
            ]
        );
    }

    #[test]
    fn diff_of_equal_tables_is_empty() {
        let a = table(&[(
            key("10.0.0.1", 80),
            frontend("ns", "a", &[backend("10.1.0.1", 8080)]),
        )]);
        assert!(a.diff(&a.clone()).is_empty());
        assert!(ServiceTable::new().diff(&ServiceTable::new()).is_empty());
    }

    #[test]
    fn diff_adds_new_frontends_in_key_order() {
        let old = ServiceTable::new();
        let new = table(&[
            (key("10.0.0.2", 80), frontend("ns", "b", &[])),
            (
                key("10.0.0.1", 80),
                frontend("ns", "a", &[backend("10.1.0.1", 8080)]),
            ),
        ]);
        let diff = old.diff(&new);
        let added: Vec<FrontendKey> = diff.added.iter().map(|(k, _)| *k).collect();
        assert_eq!(added, vec![key("10.0.0.1", 80), key("10.0.0.2", 80)]);
        assert!(diff.changed.is_empty() && diff.removed.is_empty());
        assert_eq!(apply(&old, &diff), new);
    }

    #[test]
    fn diff_removes_missing_frontends_with_their_old_state() {
        let gone = frontend("ns", "a", &[backend("10.1.0.1", 8080)]);
        let old = table(&[
            (key("10.0.0.1", 80), gone.clone()),
            (key("10.0.0.2", 80), frontend("ns", "b", &[])),
        ]);
        let new = table(&[(key("10.0.0.2", 80), frontend("ns", "b", &[]))]);
        let diff = old.diff(&new);
        assert_eq!(diff.removed, vec![(key("10.0.0.1", 80), gone.into())]);
        assert!(diff.added.is_empty() && diff.changed.is_empty());
        assert_eq!(apply(&old, &diff), new);
    }

    #[test]
    fn diff_reports_changed_backends() {
        let k = key("10.0.0.1", 80);
        let old = table(&[(
            k,
            frontend(
                "ns",
                "a",
                &[backend("10.1.0.1", 8080), backend("10.1.0.2", 8080)],
            ),
        )]);
        let new = table(&[(
            k,
            frontend(
                "ns",
                "a",
                &[backend("10.1.0.2", 8080), backend("10.1.0.3", 8080)],
            ),
        )]);
        let diff = old.diff(&new);
        assert!(diff.added.is_empty() && diff.removed.is_empty());
        let [change] = diff.changed.as_slice() else {
            panic!("expected one change, got {diff:?}");
        };
        assert_eq!(change.key, k);
        assert_eq!(change.added_backends(), vec![backend("10.1.0.3", 8080)]);
        assert_eq!(change.removed_backends(), vec![backend("10.1.0.1", 8080)]);
        assert_eq!(apply(&old, &diff), new);
    }

    #[test]
    fn diff_reports_change_of_owner_without_backend_change() {
        let k = key("10.0.0.1", 80);
        let old = table(&[(k, frontend("ns", "a", &[backend("10.1.0.1", 80)]))]);
        let new = table(&[(k, frontend("ns", "b", &[backend("10.1.0.1", 80)]))]);
        let diff = old.diff(&new);
        assert_eq!(diff.changed.len(), 1);
        assert!(diff.changed[0].added_backends().is_empty());
        assert!(diff.changed[0].removed_backends().is_empty());
        assert_eq!(apply(&old, &diff), new);
    }

    #[test]
    fn diff_mixes_add_change_remove() {
        let old = table(&[
            (key("10.0.0.1", 80), frontend("ns", "a", &[])),
            (
                key("10.0.0.2", 80),
                frontend("ns", "b", &[backend("10.1.0.1", 80)]),
            ),
        ]);
        let new = table(&[
            (
                key("10.0.0.2", 80),
                frontend("ns", "b", &[backend("10.1.0.9", 80)]),
            ),
            (key("10.0.0.3", 80), frontend("ns", "c", &[])),
        ]);
        let diff = old.diff(&new);
        assert_eq!(diff.added.len(), 1);
        assert_eq!(diff.changed.len(), 1);
        assert_eq!(diff.removed.len(), 1);
        assert!(!diff.is_empty());
        assert_eq!(apply(&old, &diff), new);
        assert!(new.diff(&apply(&old, &diff)).is_empty());
    }

    /// The diff of one frontend at `k`: added, changed or removed.
    fn one_change(k: FrontendKey, old: Option<&Frontend>, new: Option<&Frontend>) -> TableDiff {
        let arc = |f: &Frontend| Arc::new(f.clone());
        match (old, new) {
            (Some(old), Some(new)) => TableDiff {
                changed: vec![FrontendChange {
                    key: k,
                    old: arc(old),
                    new: arc(new),
                }],
                ..TableDiff::default()
            },
            (Some(old), None) => TableDiff {
                removed: vec![(k, arc(old))],
                ..TableDiff::default()
            },
            (None, Some(new)) => TableDiff {
                added: vec![(k, arc(new))],
                ..TableDiff::default()
            },
            (None, None) => TableDiff::default(),
        }
    }

    /// Rows: (what happens, old frontend, new frontend or None for
    /// removed, the backends whose flows go).
    #[test]
    fn stale_udp_flows_are_the_backends_that_left_both_views() {
        use super::super::test_support::key_proto;
        let dns = |backends: &[Backend]| frontend("ns", "dns", backends);
        let b1 = backend("10.1.0.1", 53);
        let b2 = backend("10.1.0.2", 53);
        let local = |backends: &[Backend], all: &[Backend]| {
            let mut f = dns(backends);
            f.policy.local_only = true;
            f.cluster_backends = all.to_vec();
            f
        };
        let narrowed = {
            let mut f = dns(&[b1, b2]);
            f.policy.source_ranges = vec!["198.51.100.0/24".parse().unwrap()];
            f
        };
        let rows: Vec<(&str, Frontend, Option<Frontend>, Vec<Backend>)> = vec![
            (
                "one backend leaves",
                dns(&[b1, b2]),
                Some(dns(&[b2])),
                vec![b1],
            ),
            ("the frontend goes", dns(&[b1, b2]), None, vec![b1, b2]),
            ("nothing leaves", dns(&[b1]), Some(dns(&[b1, b2])), vec![]),
            ("ranges narrow", dns(&[b1, b2]), Some(narrowed), vec![]),
            (
                "a local backend stays cluster-wide",
                local(&[b1], &[b1, b2]),
                Some(local(&[], &[b1, b2])),
                vec![],
            ),
            (
                "it leaves both views",
                local(&[b1], &[b1, b2]),
                Some(local(&[], &[b2])),
                vec![b1],
            ),
        ];
        for protocol in [Protocol::Udp, Protocol::Tcp] {
            let k = key_proto("10.96.0.10", 53, protocol);
            for (what, old, new, gone) in &rows {
                let diff = one_change(k, Some(old), new.as_ref());
                let expected: Vec<(FrontendKey, Backend)> = match protocol {
                    Protocol::Udp => gone.iter().map(|b| (k, *b)).collect(),
                    _ => Vec::new(),
                };
                assert_eq!(diff.stale_udp_flows(), expected, "{protocol}: {what}");
            }
        }
    }

    /// Rows: (what happens, old frontend or None for added, new frontend,
    /// whether its untranslated flows go).
    #[test]
    fn udp_frontends_starting_service_are_those_that_had_no_backend() {
        use super::super::test_support::key_proto;
        let dns = |backends: &[Backend]| frontend("ns", "dns", backends);
        let b1 = backend("10.1.0.1", 53);
        let b2 = backend("10.1.0.2", 53);
        let elsewhere = {
            let mut f = dns(&[]);
            f.policy.local_only = true;
            f.cluster_backends = vec![b1];
            f
        };
        let rows: Vec<(&str, Option<Frontend>, Frontend, bool)> = vec![
            ("added with a backend", None, dns(&[b1]), true),
            ("added without one", None, dns(&[]), false),
            ("its first backend", Some(dns(&[])), dns(&[b1]), true),
            ("another backend", Some(dns(&[b1])), dns(&[b1, b2]), false),
            ("a backend leaves", Some(dns(&[b1, b2])), dns(&[b1]), false),
            (
                "a backend elsewhere only",
                Some(dns(&[])),
                elsewhere.clone(),
                true,
            ),
            ("local again", Some(elsewhere), dns(&[b1]), false),
        ];
        for protocol in [Protocol::Udp, Protocol::Tcp] {
            let k = key_proto("10.96.0.10", 53, protocol);
            for (what, old, new, starts) in &rows {
                let diff = one_change(k, old.as_ref(), Some(new));
                let expected = match protocol {
                    Protocol::Udp if *starts => vec![k],
                    _ => Vec::new(),
                };
                assert_eq!(
                    diff.udp_frontends_starting_service(),
                    expected,
                    "{protocol}: {what}"
                );
            }
        }
    }
}
