//! The running agent's answers to `/debug/services` and `/debug/trace`:
//! the desired table of the source's latest state, the node network the
//! dataplane was last given, and the kernel read now.
use std::sync::{Arc, Mutex};

use super::{
    Desired,
    kernel::{self, KernelOptions},
    list,
    trace::{Query, trace},
};
use crate::{
    dataplane::{Mode, held::HeldTable},
    model::{
        Backend, ClusterState, FrontendKey, ModelConfig, NodeNetwork, ServiceTable, build_table,
    },
    serve::debug::{DebugError, DebugViews, query_value},
    source::StateReceiver,
};

/// What the agent knows, for its debug views.
pub struct AgentViews {
    pub mode: Mode,
    pub kernel: KernelOptions,
    pub cfg: ModelConfig,
    pub state: StateReceiver,
    /// Set by the sync loop ([`crate::sync::SyncObserver::node_network`]).
    pub network: Arc<Mutex<Option<NodeNetwork>>>,
}

impl AgentViews {
    /// The latest state and node network; an error before the first sync.
    fn snapshot(&self) -> Result<(Arc<crate::model::ClusterState>, NodeNetwork), DebugError> {
        let state = self.state.borrow().clone();
        let network = self
            .network
            .lock()
            .map_err(|_| DebugError::Failed("the node network lock is poisoned".into()))?
            .clone();
        match (state, network) {
            (Some(state), Some(network)) => Ok((state, network)),
            _ => Err(DebugError::Failed(
                "the agent has not synced yet: no table to compare with".into(),
            )),
        }
    }
}

/// The latest state and node network, the table the state gives, and
/// what the kernel holds now.
struct Read {
    state: Arc<ClusterState>,
    network: NodeNetwork,
    table: ServiceTable,
    held: HeldTable,
}

impl Read {
    fn desired<'a>(&'a self, cfg: &'a ModelConfig) -> Desired<'a> {
        Desired {
            table: &self.table,
            network: &self.network,
            state: &self.state,
            cfg,
        }
    }
}

impl AgentViews {
    fn read(&self) -> Result<Read, DebugError> {
        let (state, network) = self.snapshot()?;
        let table = build_table(&state, &self.cfg).table;
        let held = kernel::held(self.mode, &self.kernel, &network.nodeport_addresses)
            .map_err(|e| DebugError::Failed(format!("reading the kernel: {e}")))?;
        Ok(Read {
            state,
            network,
            table,
            held,
        })
    }
}

fn json<T: serde::Serialize>(value: &T) -> Result<String, DebugError> {
    serde_json::to_string_pretty(value).map_err(|e| DebugError::Failed(e.to_string()))
}

impl DebugViews for AgentViews {
    fn services(&self) -> Result<String, DebugError> {
        let read = self.read()?;
        json(&list(&read.held, Some(&read.desired(&self.cfg))))
    }

    fn trace(&self, query: &str) -> Result<String, DebugError> {
        let (Some(from), Some(to)) = (query_value(query, "from"), query_value(query, "to")) else {
            return Err(DebugError::BadRequest(
                "give from=IP[:PORT] and to=IP:PORT[/PROTO]".into(),
            ));
        };
        let query = Query::parse(&from, &to).map_err(DebugError::BadRequest)?;
        let read = self.read()?;
        let pins = |key: &FrontendKey, affinity: Option<(u32, &[Backend])>| {
            kernel::pins(self.mode, &self.kernel.bpf_root, &query, key, affinity)
        };
        json(&trace(
            query,
            self.mode,
            &read.desired(&self.cfg),
            &read.held,
            &pins,
        ))
    }
}
