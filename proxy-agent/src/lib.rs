//! proxy-agent: a kube-proxy replacement.
//!
//! Layers, top to bottom; a lower layer never depends on a higher one:
//! - [`source`]: where Services, EndpointSlices and Nodes come from.
//! - [`model`]: pure functions from those objects to the desired [`model::ServiceTable`].
//! - [`dataplane`]: one trait, one module per backend, applying table differences.
//! - kernel: the eBPF programs (crate `proxy-ebpf`), sharing map types through `proxy-common`.
pub mod config;
pub mod dataplane;
pub mod inspect;

/// The config of a "never panics on bad input" property test: `default`
/// cases in the test suite, `PROXY_FUZZ_CASES` when `cargo xtask fuzz` runs
/// them long.
#[cfg(test)]
pub(crate) fn fuzz_config(default: u32) -> proptest::prelude::ProptestConfig {
    let cases = std::env::var("PROXY_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    proptest::prelude::ProptestConfig::with_cases(cases)
}
pub mod model;
pub mod serve;
pub mod source;
pub mod sync;
