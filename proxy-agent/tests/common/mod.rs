//! What the packet-fixture tests (`datapath.rs`, `datapath_services.rs`)
//! share: loading the real embedded object unpinned, programming it through
//! the real `EbpfDataplane`, and running packets through its programs with
//! `BPF_PROG_TEST_RUN`. Needs root (CAP_BPF + CAP_NET_ADMIN).
// Each test crate uses its own part of this module.
#![allow(dead_code)]

use aya::{
    Ebpf,
    programs::{SchedClassifier, TestRun, TestRunOptions},
};
use proxy_agent::{
    dataplane::{
        Dataplane, NodeNetwork,
        ebpf::{EbpfDataplane, load_unpinned},
    },
    model::ServiceTable,
};
use proxy_common::{PROG_EGRESS, PROG_INGRESS};

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
        let (dp, ebpf) = load_unpinned().expect("load the eBPF object (are we root?)");
        Fixture {
            ebpf,
            dp,
            table: ServiceTable::new(),
        }
    }

    /// Programs `table` as the sync loop would: the diff from the last one.
    pub fn set_table(&mut self, table: ServiceTable) {
        let diff = self.table.diff(&table);
        self.dp.apply(&diff).expect("apply diff");
        self.table = table;
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
        let mut out = vec![0u8; packet.len() + 256];
        let result = self
            .program(prog)
            .test_run(TestRunOptions {
                data_in: Some(packet),
                data_out: Some(&mut out),
                ..Default::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        out.truncate(result.data_size_out as usize);
        (result.return_value, out)
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
}

/// The TCP segments the fixtures send.
#[derive(Clone, Copy, Debug)]
pub enum Tcp {
    Syn,
    Ack,
    SynAck,
    /// FIN with ACK: one side closes.
    Fin,
}
