#![no_std]
// Empty on purpose: proxy-agent's build.rs depends on this crate so that cargo
// rebuilds the eBPF object when it (or proxy-common) changes.
