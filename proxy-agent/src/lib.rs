//! proxy-agent: a kube-proxy replacement.
//!
//! Layers, top to bottom; a lower layer never depends on a higher one:
//! - [`source`]: where Services, EndpointSlices and Nodes come from.
//! - [`model`]: pure functions from those objects to the desired [`model::ServiceTable`].
//! - [`dataplane`]: one trait, one module per backend, applying table differences.
//! - kernel: the eBPF programs (crate `proxy-ebpf`), sharing map types through `proxy-common`.
pub mod config;
pub mod dataplane;
pub mod model;
pub mod serve;
pub mod source;
pub mod sync;
