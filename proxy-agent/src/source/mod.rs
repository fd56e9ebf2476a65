//! Sources: where Services, EndpointSlices and Nodes come from.
//!
//! A source publishes complete [`ClusterState`]s on a `watch` channel. The
//! channel holds `None` until the source has read everything once, so the
//! agent never programs a partial table; after that every change replaces the
//! value, which coalesces bursts for free (the consumer sees the latest).
use std::sync::Arc;

use futures::future::BoxFuture;
use tokio::sync::watch;

use crate::model::ClusterState;

pub mod api;
pub mod manifests;

/// The channel a source publishes on.
pub type StateSender = watch::Sender<Option<Arc<ClusterState>>>;
pub type StateReceiver = watch::Receiver<Option<Arc<ClusterState>>>;

/// A producer of cluster state.
pub trait Source: Send {
    /// Runs until an unrecoverable error, publishing every change on `tx`.
    fn run(self: Box<Self>, tx: StateSender) -> BoxFuture<'static, Result<(), SourceError>>;
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("manifest directory {path}: {source}")]
    Directory {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the API watch streams ended unexpectedly")]
    Ended,
    #[error("watching {path}: {source}")]
    Watch {
        path: std::path::PathBuf,
        #[source]
        source: notify::Error,
    },
}
