//! What the packet-fixture tests (`datapath.rs`, `datapath_services.rs`)
//! and the packet benchmark (`proxy-bench`, which includes this directory
//! with `#[path]`) share: loading the real embedded object unpinned,
//! programming it through the real `EbpfDataplane`, running packets through
//! its programs with `BPF_PROG_TEST_RUN`, the packets themselves
//! ([`packet`]) and the table of named packet cases ([`cases`]). Needs root
//! (CAP_BPF + CAP_NET_ADMIN).
// Each user of this module uses its own part of it.
#![allow(dead_code)]

pub mod cases;
pub mod packet;

use std::time::Duration;

use aya::{
    Ebpf,
    maps::{HashMap, Map, MapData},
    programs::{SchedClassifier, TestRun, TestRunOptions},
};
use proxy_agent::{
    dataplane::{
        ApplyStats, Dataplane, NodeNetwork,
        ebpf::{EbpfDataplane, load_unpinned, load_unpinned_object},
    },
    model::ServiceTable,
};
use proxy_common::{
    AffinityKey, AffinityValue, CtKey, CtValue, MAP_AFFINITY, MAP_CONNTRACK, PROG_EGRESS,
    PROG_INGRESS, PROG_NEW_FLOW,
};

pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;

/// A loaded object with its own maps, and the table programmed into them.
pub struct Fixture {
    pub ebpf: Ebpf,
    pub dp: EbpfDataplane,
    pub table: ServiceTable,
}

impl Fixture {
    /// Loads the programs, with an empty table and no node network.
    pub fn load() -> Self {
        Self::load_object(None)
    }

    /// [`Fixture::load`] of another build's object (`None`: this build's).
    pub fn load_object(object: Option<&[u8]>) -> Self {
        let (dp, ebpf) = match object {
            Some(object) => load_unpinned_object(object),
            None => load_unpinned(),
        }
        .expect("load the eBPF object (are we root?)");
        Fixture {
            ebpf,
            dp,
            table: ServiceTable::new(),
        }
    }

    /// Programs `table` as the sync loop would: the diff from the last one.
    /// Applies the difference to `table`; returns what the apply did.
    pub fn set_table(&mut self, table: ServiceTable) -> ApplyStats {
        let diff = self.table.diff(&table);
        let stats = self.dp.apply(&diff).expect("apply diff");
        self.table = table;
        stats
    }

    pub fn set_network(&mut self, network: &NodeNetwork) {
        Dataplane::set_node_network(&mut self.dp, network).expect("set node network");
    }

    pub fn program(&self, name: &str) -> &SchedClassifier {
        self.ebpf
            .program(name)
            .expect("program present")
            .try_into()
            .expect("a TC program")
    }

    /// Runs `packet` through program `prog`: its verdict and the packet as
    /// it came out.
    pub fn run(&self, prog: &str, packet: &[u8]) -> (u32, Vec<u8>) {
        let (verdict, out, _) = self.run_timed(prog, packet);
        (verdict, out)
    }

    /// [`Fixture::run`], with the time the kernel measured for the run.
    pub fn run_timed(&self, prog: &str, packet: &[u8]) -> (u32, Vec<u8>, Duration) {
        self.try_run(prog, packet).expect("BPF_PROG_TEST_RUN")
    }

    /// [`Fixture::run_timed`], or the kernel's refusal to run `packet`.
    pub fn try_run(
        &self,
        prog: &str,
        packet: &[u8],
    ) -> Result<(u32, Vec<u8>, Duration), aya::programs::ProgramError> {
        let mut out = vec![0u8; packet.len() + 256];
        let result = self.program(prog).test_run(TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            ..Default::default()
        })?;
        out.truncate(result.data_size_out as usize);
        Ok((result.return_value, out, result.duration))
    }

    /// Runs `packet` through `prog` with `mark` as its skb mark: the
    /// verdict, the packet and the mark as they came out.
    pub fn run_marked(&self, prog: &str, packet: &[u8], mark: u32) -> (u32, Vec<u8>, u32) {
        // `struct __sk_buff`: `mark` is its third u32; the kernel takes a
        // shorter context and zero-fills the rest.
        const SKB_CTX_LEN: usize = 192;
        const MARK_AT: usize = 8;
        let mut ctx_in = [0u8; SKB_CTX_LEN];
        ctx_in[MARK_AT..MARK_AT + 4].copy_from_slice(&mark.to_ne_bytes());
        let mut ctx_out = [0u8; SKB_CTX_LEN];
        let mut out = vec![0u8; packet.len() + 256];
        let result = self
            .program(prog)
            .test_run(TestRunOptions {
                data_in: Some(packet),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx_in),
                ctx_out: Some(&mut ctx_out),
                ..Default::default()
            })
            .expect("BPF_PROG_TEST_RUN with a context");
        out.truncate(result.data_size_out as usize);
        let mark_out = u32::from_ne_bytes(
            ctx_out[MARK_AT..MARK_AT + 4]
                .try_into()
                .expect("four bytes"),
        );
        (result.return_value, out, mark_out)
    }

    pub fn ingress(&self, packet: &[u8]) -> (u32, Vec<u8>) {
        self.run(PROG_INGRESS, packet)
    }

    pub fn egress(&self, packet: &[u8]) -> (u32, Vec<u8>) {
        self.run(PROG_EGRESS, packet)
    }

    /// One packet counter, summed over CPUs.
    pub fn stat(&self, index: u32) -> u64 {
        self.dp.stats().expect("read stats")[index as usize]
    }

    /// A second handle on map `name` of the fixture's object, found
    /// through the map IDs of the program that writes the flows.
    pub fn map(&self, name: &str) -> MapData {
        let info = self.program(PROG_NEW_FLOW).info().expect("program info");
        for id in info.map_ids().expect("map ids").unwrap_or_default() {
            let data = MapData::from_id(id).expect("map by id");
            let found = data.info().expect("map info").name_as_str() == Some(name);
            if found {
                return data;
            }
        }
        panic!("no map {name} among the programs' maps");
    }

    /// A second handle on the connection-tracking map.
    pub fn conntrack(&self) -> HashMap<MapData, CtKey, CtValue> {
        HashMap::try_from(Map::LruHashMap(self.map(MAP_CONNTRACK))).expect("conntrack map")
    }

    /// Makes every flow entry `by` older, as if its flow had been silent
    /// that long (`BPF_PROG_TEST_RUN` runs at the kernel's own time).
    pub fn age_flows(&self, by: Duration) {
        let mut ct = self.conntrack();
        let all: Vec<(CtKey, CtValue)> = ct.iter().filter_map(Result::ok).collect();
        for (key, mut value) in all {
            let by = u64::try_from(by.as_nanos()).expect("a short age");
            assert!(value.last_seen_ns > by, "the kernel has been up longer");
            value.last_seen_ns -= by;
            ct.insert(key, value, 0).expect("age a flow entry");
        }
    }

    /// Forgets every flow and affinity entry: what packets write, so the
    /// object is as its table and node network left it (the counters go
    /// on; compare them with a reading taken after this).
    pub fn forget_flows(&self) {
        let mut ct = self.conntrack();
        let keys: Vec<CtKey> = ct.keys().filter_map(Result::ok).collect();
        for key in keys {
            ct.remove(&key).expect("remove a flow entry");
        }
        let mut affinity: HashMap<MapData, AffinityKey, AffinityValue> =
            HashMap::try_from(Map::LruHashMap(self.map(MAP_AFFINITY))).expect("affinity map");
        let keys: Vec<AffinityKey> = affinity.keys().filter_map(Result::ok).collect();
        for key in keys {
            affinity.remove(&key).expect("remove an affinity entry");
        }
        assert_eq!(self.dp.conntrack_len(), 0, "flows forgotten");
        assert_eq!(self.dp.affinity_len(), 0, "affinity forgotten");
    }
}
