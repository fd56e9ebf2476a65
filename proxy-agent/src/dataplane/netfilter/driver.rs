//! The skeleton every rule-writing mode shares (nftables, iptables, and
//! IPVS when it comes): a shadow of what is programmed per frontend, the
//! base objects written once, a diff written as the frontends it touches,
//! a reconcile that reads the kernel and rewrites every frontend when it
//! drifted or when [`FULL_REWRITE_PERIOD`] has passed (else only the
//! frontends that differ), and a change of the node's network. One
//! [`Driver`] does that for a [`RuleBackend`], which is what a mode has of
//! its own: its syntax, how it reads the kernel and how it splits a write.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Debug,
    time::Instant,
};

use super::{
    FULL_REWRITE_PERIOD, FrontendPlan, NodeNetwork, allow_localhost_nodeports, comment_of,
    forget_stale_udp_flows, plan, wanted_of,
};
use crate::{
    dataplane::{ApplyStats, Dataplane, DataplaneError, ReconcileReport},
    model::{Frontend, FrontendKey, ServiceTable, TableDiff},
};

/// What is programmed (or wanted) for one frontend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Programmed<R> {
    pub frontend: Frontend,
    pub plan: FrontendPlan,
    /// [`comment_of`] the frontend, on its rules.
    pub comment: String,
    /// What the mode made of the plan ([`RuleBackend::render`]).
    pub rendered: R,
}

/// What is programmed (or wanted), per frontend.
pub type Shadow<R> = BTreeMap<FrontendKey, Programmed<R>>;

/// Takes into `programmed` what a write of `wanted` for `keys` made (a key
/// missing from `wanted` was removed).
pub fn commit<R: Clone>(programmed: &mut Shadow<R>, keys: &[FrontendKey], wanted: &Shadow<R>) {
    for key in keys {
        match wanted.get(key) {
            Some(p) => {
                programmed.insert(*key, p.clone());
            }
            None => {
                programmed.remove(key);
            }
        }
    }
}

/// What a [`RuleBackend::write`] covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// The frontends a diff touches, or those that differ from the shadow.
    Changes,
    /// Every frontend, written again after the node's network changed:
    /// what they share (iptables' top-level chains) is written whole too.
    Everything,
}

/// A frontend as the driver hands it to a mode to render: its plan, the
/// frontend, and the comment its rules carry.
pub struct Planned<'a> {
    pub plan: &'a FrontendPlan,
    pub frontend: &'a Frontend,
    pub comment: &'a str,
}

/// What a rule-writing mode has of its own. The [`Driver`] keeps the
/// shadow and passes it in: a method that writes updates it with what
/// reached the kernel ([`commit`]), so that on an error it holds what was
/// written before the failure.
pub trait RuleBackend: Send {
    /// [`Dataplane::name`].
    const NAME: &'static str;
    /// What the mode keeps of a frontend besides its plan.
    type Rendered: Clone + Debug + PartialEq + Send;
    /// What a reconcile's reading of the kernel found that rewriting every
    /// frontend needs (what to delete).
    type Found;
    type Error: Into<DataplaneError>;

    /// What the mode makes of `frontend`'s plan under `network`.
    fn render(&self, planned: &Planned<'_>, network: &NodeNetwork) -> Self::Rendered;

    /// Writes the objects that hold no frontend (tables, base chains and
    /// their hooks, the node network's), whatever the kernel holds.
    fn ensure_base(&mut self, network: &NodeNetwork) -> Result<(), Self::Error>;

    /// Writes `wanted` in place of what `programmed` holds for `keys` (a
    /// key missing from `wanted` is removed).
    fn write(
        &mut self,
        programmed: &mut Shadow<Self::Rendered>,
        keys: &[FrontendKey],
        wanted: &Shadow<Self::Rendered>,
        network: &NodeNetwork,
        scope: Scope,
    ) -> Result<(), Self::Error>;

    /// Reads the kernel for a reconcile, makes sure the base objects are
    /// there, and counts into `stats` what differs from `wanted` (drift:
    /// `kernel_writes` for what is missing, `kernel_deletes` for what is
    /// extra). Returns what [`RuleBackend::rewrite`] needs when every
    /// frontend is to be rewritten: when `due` (the first reconcile, then
    /// every [`FULL_REWRITE_PERIOD`]) or when the kernel drifted from
    /// `programmed`; `None` when it holds what `programmed` says, and only
    /// the frontends that differ from `wanted` are written. A mode may
    /// read less when not `due`.
    fn read_kernel(
        &mut self,
        programmed: &Shadow<Self::Rendered>,
        wanted: &Shadow<Self::Rendered>,
        network: &NodeNetwork,
        due: bool,
        stats: &mut ApplyStats,
    ) -> Result<Option<Self::Found>, Self::Error>;

    /// Deletes what `found` holds that `wanted` lacks and writes every
    /// frontend of `wanted`; `programmed` starts empty.
    fn rewrite(
        &mut self,
        programmed: &mut Shadow<Self::Rendered>,
        wanted: &Shadow<Self::Rendered>,
        network: &NodeNetwork,
        found: Self::Found,
    ) -> Result<(), Self::Error>;

    /// Writes the objects of the node's network (the NodePort addresses)
    /// after it changed from `old` to `network`. Returns whether what the
    /// mode renders of every frontend depends on what changed beyond the
    /// plans, so that every frontend is written again.
    fn write_node_network(
        &mut self,
        old: &NodeNetwork,
        network: &NodeNetwork,
    ) -> Result<bool, Self::Error>;
}

/// A rule-writing mode's [`Dataplane`]: the skeleton, around its
/// [`RuleBackend`].
pub struct Driver<B: RuleBackend> {
    pub(in crate::dataplane) rules: B,
    pub(in crate::dataplane) network: NodeNetwork,
    /// What the kernel holds, per frontend.
    pub(in crate::dataplane) programmed: Shadow<B::Rendered>,
    /// Whether the base objects are known to exist.
    based: bool,
    /// When every frontend was last rewritten by a reconcile (`None`: not
    /// since start).
    last_rewrite: Option<Instant>,
}

impl<B: RuleBackend> Driver<B> {
    pub fn with_rules(rules: B) -> Self {
        Driver {
            rules,
            network: NodeNetwork::default(),
            programmed: Shadow::new(),
            based: false,
            last_rewrite: None,
        }
    }

    pub(in crate::dataplane) fn program(
        &self,
        key: &FrontendKey,
        frontend: &Frontend,
    ) -> Programmed<B::Rendered> {
        let plan = plan(key, frontend, &self.network);
        let comment = comment_of(frontend);
        let planned = Planned {
            plan: &plan,
            frontend,
            comment: &comment,
        };
        let rendered = self.rules.render(&planned, &self.network);
        Programmed {
            frontend: frontend.clone(),
            plan,
            comment,
            rendered,
        }
    }

    /// The keys `diff` touches, and what is wanted for those it keeps.
    pub(in crate::dataplane) fn wanted_of(
        &self,
        diff: &TableDiff,
    ) -> (Vec<FrontendKey>, Shadow<B::Rendered>) {
        wanted_of(diff, |k, f| self.program(k, f))
    }

    fn ensure_base(&mut self) -> Result<(), B::Error> {
        self.rules.ensure_base(&self.network)?;
        self.based = true;
        Ok(())
    }

    /// Writes the frontends `diff` touches. `kernel_writes` and
    /// `kernel_deletes` count the frontends entered and removed.
    pub(in crate::dataplane) fn apply_diff(
        &mut self,
        diff: &TableDiff,
    ) -> Result<ApplyStats, B::Error> {
        if !self.based {
            self.ensure_base()?;
        }
        let mut stats = ApplyStats {
            frontends_added: diff.added.len(),
            frontends_changed: diff.changed.len(),
            frontends_removed: diff.removed.len(),
            ..ApplyStats::default()
        };
        let (keys, wanted) = self.wanted_of(diff);
        for key in &keys {
            match (self.programmed.contains_key(key), wanted.contains_key(key)) {
                (false, true) => stats.kernel_writes += 1,
                (true, false) => stats.kernel_deletes += 1,
                _ => {}
            }
        }
        self.write_changes(&keys, &wanted)?;
        Ok(stats)
    }

    /// Writes `wanted` in place of what is programmed for `keys`.
    fn write_changes(
        &mut self,
        keys: &[FrontendKey],
        wanted: &Shadow<B::Rendered>,
    ) -> Result<(), B::Error> {
        self.rules.write(
            &mut self.programmed,
            keys,
            wanted,
            &self.network,
            Scope::Changes,
        )
    }

    /// Makes the kernel equal to `desired` ([`RuleBackend::read_kernel`]):
    /// either every frontend is rewritten (`frontends_added`: all of
    /// them), or the frontends that differ from what is programmed are
    /// written (`frontends_changed`: how many).
    pub(in crate::dataplane) fn reconcile_table(
        &mut self,
        desired: &ServiceTable,
    ) -> Result<ApplyStats, B::Error> {
        let wanted: Shadow<B::Rendered> = desired
            .iter()
            .map(|(k, f)| (*k, self.program(k, f)))
            .collect();
        let due = self
            .last_rewrite
            .is_none_or(|at| at.elapsed() >= FULL_REWRITE_PERIOD);
        let mut stats = ApplyStats::default();
        let found =
            self.rules
                .read_kernel(&self.programmed, &wanted, &self.network, due, &mut stats)?;
        self.based = true;
        let Some(found) = found else {
            // The kernel holds what we programmed: write what differs.
            let mut keys: BTreeSet<FrontendKey> = wanted.keys().copied().collect();
            keys.extend(self.programmed.keys().copied());
            let keys: Vec<FrontendKey> = keys.into_iter().collect();
            stats.frontends_changed = keys
                .iter()
                .filter(|k| self.programmed.get(k) != wanted.get(k))
                .count();
            self.write_changes(&keys, &wanted)?;
            return Ok(stats);
        };
        // Forget what we believe is programmed and rewrite every wanted
        // frontend.
        self.last_rewrite = None;
        self.programmed.clear();
        self.rules
            .rewrite(&mut self.programmed, &wanted, &self.network, found)?;
        self.last_rewrite = Some(Instant::now());
        stats.frontends_added = wanted.len();
        Ok(stats)
    }

    /// Takes `network` in: writes its objects, and every frontend again
    /// when that changes their plans ([`NodeNetwork::changes_plans`]) or
    /// what the mode renders of them.
    pub(in crate::dataplane) fn set_network(
        &mut self,
        network: &NodeNetwork,
    ) -> Result<(), B::Error> {
        allow_localhost_nodeports(network);
        let replan = self.network.changes_plans(network);
        let old = std::mem::replace(&mut self.network, network.clone());
        if !self.based {
            return self.ensure_base();
        }
        let rerender = self.rules.write_node_network(&old, &self.network)?;
        if replan || rerender {
            let wanted: Shadow<B::Rendered> = self
                .programmed
                .iter()
                .map(|(k, p)| (*k, self.program(k, &p.frontend)))
                .collect();
            let keys: Vec<FrontendKey> = wanted.keys().copied().collect();
            self.rules.write(
                &mut self.programmed,
                &keys,
                &wanted,
                &self.network,
                Scope::Everything,
            )?;
        }
        Ok(())
    }
}

impl<B: RuleBackend> Dataplane for Driver<B> {
    fn name(&self) -> &'static str {
        B::NAME
    }

    fn apply(&mut self, diff: &TableDiff) -> Result<ApplyStats, DataplaneError> {
        let mut stats = self.apply_diff(diff).map_err(Into::into)?;
        stats.conntrack = forget_stale_udp_flows(diff)?;
        Ok(stats)
    }

    fn reconcile(&mut self, desired: &ServiceTable) -> Result<ReconcileReport, DataplaneError> {
        let stats = self.reconcile_table(desired).map_err(Into::into)?;
        Ok(ReconcileReport::of_repairs(stats))
    }

    fn set_node_network(&mut self, network: &NodeNetwork) -> Result<(), DataplaneError> {
        self.set_network(network).map_err(Into::into)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        dataplane::nftables::NftablesError,
        model::test_support::{backend, frontend, ip, key},
    };

    /// (frontends added, frontends removed, kernel writes, kernel deletes)
    fn counts(stats: &ApplyStats) -> (usize, usize, usize, usize) {
        (
            stats.frontends_added,
            stats.frontends_removed,
            stats.kernel_writes,
            stats.kernel_deletes,
        )
    }

    /// A mode that records what the driver asks of it, and renders the
    /// masquerading of a frontend's main view.
    #[derive(Default)]
    struct Recorder {
        log: Vec<String>,
        /// What `write_node_network` answers.
        rerender: bool,
        /// Whether `read_kernel` finds drift.
        drift: bool,
    }

    impl RuleBackend for Recorder {
        const NAME: &'static str = "recorder";
        type Rendered = String;
        type Found = ();
        type Error = NftablesError;

        fn render(&self, planned: &Planned<'_>, _network: &NodeNetwork) -> String {
            format!("{:?}", planned.plan.view.masquerade)
        }

        fn ensure_base(&mut self, _network: &NodeNetwork) -> Result<(), NftablesError> {
            self.log.push("base".into());
            Ok(())
        }

        fn write(
            &mut self,
            programmed: &mut Shadow<String>,
            keys: &[FrontendKey],
            wanted: &Shadow<String>,
            _network: &NodeNetwork,
            scope: Scope,
        ) -> Result<(), NftablesError> {
            self.log.push(format!("write {scope:?} {}", keys.len()));
            commit(programmed, keys, wanted);
            Ok(())
        }

        fn read_kernel(
            &mut self,
            _programmed: &Shadow<String>,
            _wanted: &Shadow<String>,
            _network: &NodeNetwork,
            due: bool,
            stats: &mut ApplyStats,
        ) -> Result<Option<()>, NftablesError> {
            self.log.push(format!("read due={due}"));
            if self.drift {
                stats.kernel_writes += 1;
            }
            Ok((due || self.drift).then_some(()))
        }

        fn rewrite(
            &mut self,
            programmed: &mut Shadow<String>,
            wanted: &Shadow<String>,
            _network: &NodeNetwork,
            _found: (),
        ) -> Result<(), NftablesError> {
            self.log.push(format!(
                "rewrite {} over {}",
                wanted.len(),
                programmed.len()
            ));
            let keys: Vec<FrontendKey> = wanted.keys().copied().collect();
            commit(programmed, &keys, wanted);
            Ok(())
        }

        fn write_node_network(
            &mut self,
            _old: &NodeNetwork,
            _network: &NodeNetwork,
        ) -> Result<bool, NftablesError> {
            self.log.push("node network".into());
            Ok(self.rerender)
        }
    }

    fn network() -> NodeNetwork {
        NodeNetwork {
            cluster_cidrs: vec!["10.1.0.0/16".parse().unwrap()],
            nodeport_addresses: [ip("192.0.2.1")].into_iter().collect(),
            ..NodeNetwork::default()
        }
    }

    fn log(dp: &mut Driver<Recorder>) -> Vec<String> {
        std::mem::take(&mut dp.rules.log)
    }

    #[test]
    fn diffs_write_their_frontends_and_reconciles_rewrite_all_only_when_due_or_drifted() {
        let mut dp = Driver::with_rules(Recorder::default());
        let (a, b) = (key("10.96.0.1", 80), key("10.96.0.2", 80));
        let fa = frontend("ns", "a", &[backend("10.1.0.1", 80)]);
        let fb = frontend("ns", "b", &[backend("10.1.0.2", 80)]);
        let diff = TableDiff {
            added: vec![(a, fa.clone().into())],
            ..TableDiff::default()
        };
        let stats = dp.apply_diff(&diff).unwrap();
        assert_eq!(counts(&stats), (1, 0, 1, 0));
        assert_eq!(log(&mut dp), ["base", "write Changes 1"], "the base once");
        dp.apply_diff(&TableDiff::default()).unwrap();
        assert_eq!(log(&mut dp), ["write Changes 0"]);

        // The first reconcile rewrites everything, over an empty shadow.
        let mut table = ServiceTable::new();
        table.insert(a, fa.clone());
        table.insert(b, fb);
        let stats = dp.reconcile_table(&table).unwrap();
        assert_eq!(stats.frontends_added, 2);
        assert_eq!(log(&mut dp), ["read due=true", "rewrite 2 over 0"]);
        // Then, without drift, only what differs from the shadow.
        table.remove(&b);
        let stats = dp.reconcile_table(&table).unwrap();
        assert_eq!((stats.frontends_added, stats.frontends_changed), (0, 1));
        assert_eq!(log(&mut dp), ["read due=false", "write Changes 2"]);
        assert_eq!(dp.programmed.keys().collect::<Vec<_>>(), [&a]);
        // With drift, everything again.
        dp.rules.drift = true;
        let stats = dp.reconcile_table(&table).unwrap();
        assert_eq!((stats.frontends_added, stats.kernel_writes), (1, 1));
        assert_eq!(log(&mut dp), ["read due=false", "rewrite 1 over 0"]);

        let diff = TableDiff {
            removed: vec![(a, fa.into())],
            ..TableDiff::default()
        };
        let stats = dp.apply_diff(&diff).unwrap();
        assert_eq!(counts(&stats), (0, 1, 0, 1));
        assert!(dp.programmed.is_empty());
    }

    #[test]
    fn a_node_network_that_changes_plans_or_renderings_rewrites_every_frontend() {
        let mut dp = Driver::with_rules(Recorder::default());
        dp.set_network(&network()).unwrap();
        assert_eq!(log(&mut dp), ["base"]);
        let a = key("10.96.0.1", 80);
        let diff = TableDiff {
            added: vec![(a, frontend("ns", "a", &[backend("10.1.0.1", 80)]).into())],
            ..TableDiff::default()
        };
        dp.apply_diff(&diff).unwrap();
        assert_eq!(dp.programmed[&a].rendered, "SourceOutside(10.1.0.0/16)");
        log(&mut dp);

        // Another NodePort address changes no plan.
        let mut n = network();
        n.nodeport_addresses.insert(ip("192.0.2.2"));
        dp.set_network(&n).unwrap();
        assert_eq!(log(&mut dp), ["node network"]);
        // --masquerade-all does: every frontend is planned and written again.
        n.masquerade_all = true;
        dp.set_network(&n).unwrap();
        assert_eq!(log(&mut dp), ["node network", "write Everything 1"]);
        assert_eq!(dp.programmed[&a].rendered, "Always");
        // So does the node's address (source ranges may admit it).
        n.snat_v4 = Some("192.0.2.1".parse().unwrap());
        dp.set_network(&n).unwrap();
        assert_eq!(log(&mut dp), ["node network", "write Everything 1"]);
        // And any change when what the mode renders depends on it.
        dp.rules.rerender = true;
        n.nodeport_addresses.remove(&ip("192.0.2.2"));
        dp.set_network(&n).unwrap();
        assert_eq!(log(&mut dp), ["node network", "write Everything 1"]);
    }
}
