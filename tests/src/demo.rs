//! `cargo xtask demo`: the agent serving the ClusterIP of
//! `examples/manifests` to a client, with three pods, all in network
//! namespaces on this machine.
use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
};

use anyhow::{Context, bail};

use crate::{
    client::{ClientReport, Protocol},
    manifests::{ManifestsDir, ServiceSpec},
    netns::{BpfFs, POD_TCP_PORT, POD_UDP_PORT, READY_TIMEOUT, ToolPaths, Topology},
};

/// The example Service, `demo/echo`; `examples/manifests` must agree (a unit
/// test checks).
pub const DEMO_NAMESPACE: &str = "demo";
pub const DEMO_SERVICE: &str = "echo";
pub const DEMO_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
pub const DEMO_TCP_PORT: u16 = 80;
pub const DEMO_UDP_PORT: u16 = 53;
/// The Node the demo's agent runs as.
pub const DEMO_NODE: &str = "demo-node";
/// Pods behind the Service.
pub const DEMO_PODS: usize = 3;
/// Exchanges per protocol.
const REQUESTS: u64 = 300;

/// The example Service as a spec.
pub fn demo_service() -> ServiceSpec {
    ServiceSpec::cluster_ip(DEMO_NAMESPACE, DEMO_SERVICE, IpAddr::V4(DEMO_CLUSTER_IP))
        .tcp(DEMO_TCP_PORT, POD_TCP_PORT)
        .udp(DEMO_UDP_PORT, POD_UDP_PORT)
}

/// `<workspace>/examples/manifests`.
pub fn example_manifests_dir() -> PathBuf {
    crate::agent::workspace_dir().join("examples/manifests")
}

/// Builds the topology, runs the agent on the example manifests, sends
/// TCP and UDP requests to the ClusterIP and prints which pod answered.
/// Everything is torn down on return, error or not.
pub fn run(agent_bin: &Path) -> anyhow::Result<()> {
    if let Some(reason) = crate::privileged_skip_reason() {
        bail!("the demo {reason}");
    }
    // pod-server/pod-client are built next to the agent by `cargo xtask demo`.
    let tools = agent_bin
        .parent()
        .map(ToolPaths::in_dir)
        .filter(|tools| tools.pod_server.is_file() && tools.pod_client.is_file())
        .map_or_else(ToolPaths::locate, Ok)?;

    println!("Creating namespaces: a node, a client and {DEMO_PODS} pods ...");
    let topology = Topology::builder()
        .backends(DEMO_PODS)
        .node_name(DEMO_NODE)
        .tools(tools)
        .build()
        .context("building the demo topology")?;
    let bpffs = BpfFs::mount()?;
    let manifests = ManifestsDir::new()?;
    manifests.copy_from(&example_manifests_dir())?;

    println!(
        "Starting {} run --mode=ebpf in {} on a copy of {} ...",
        agent_bin.display(),
        topology.node_ns(),
        example_manifests_dir().display()
    );
    let mut agent = topology.start_agent(agent_bin, &bpffs, &manifests)?;
    let vip = IpAddr::V4(DEMO_CLUSTER_IP);
    let result = (|| {
        let waited = topology.wait_reachable(
            &mut agent,
            Protocol::Tcp,
            SocketAddr::new(vip, DEMO_TCP_PORT),
            READY_TIMEOUT,
        )?;
        println!("ClusterIP {vip} answered after {waited:.2?}.");
        let tcp = topology.client_tcp(vip, DEMO_TCP_PORT, REQUESTS)?;
        let udp = topology.client_udp(vip, DEMO_UDP_PORT, REQUESTS)?;
        print_table(&topology, &tcp, &udp);
        anyhow::ensure!(
            tcp.failed == 0 && udp.failed == 0,
            "some requests failed: TCP {:?}, UDP {:?}",
            tcp.errors,
            udp.errors
        );
        Ok(())
    })();
    if result.is_err() {
        eprintln!(
            "---- proxy-agent log ----\n{}---- end of proxy-agent log ----",
            agent.log()
        );
    }
    drop(agent);
    println!("Stopped the agent, ran proxy-agent cleanup, removing the namespaces.");
    result
}

fn print_table(topology: &Topology, tcp: &ClientReport, udp: &ClientReport) {
    println!();
    println!(
        "Service {DEMO_NAMESPACE}/{DEMO_SERVICE}, ClusterIP {DEMO_CLUSTER_IP}: \
         {REQUESTS} TCP connections to port {DEMO_TCP_PORT}, {REQUESTS} UDP datagrams to port {DEMO_UDP_PORT}"
    );
    println!("{:<8} {:<14} {:>6} {:>6}", "pod", "address", "TCP", "UDP");
    for pod in topology.pods() {
        println!(
            "{:<8} {:<14} {:>6} {:>6}",
            pod.name,
            pod.ip.to_string(),
            tcp.count(&pod.name),
            udp.count(&pod.name)
        );
    }
    println!(
        "{:<8} {:<14} {:>6} {:>6}",
        "failed", "", tcp.failed, udp.failed
    );
    println!();
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;
    use crate::netns::{pod_ip, pod_name};

    /// The shipped example must be exactly what the harness would write for
    /// the demo topology, so the demo's addresses and the files agree.
    #[test]
    fn example_manifests_match_the_demo_topology() {
        let mut generated = ManifestsDir::new().unwrap();
        generated
            .write_node(DEMO_NODE, IpAddr::V4(crate::netns::NODE_IP))
            .unwrap();
        let spec = demo_service();
        generated.write_service(&spec).unwrap();
        let endpoints: Vec<_> = (0..DEMO_PODS)
            .map(|i| crate::manifests::Endpoint {
                pod: pod_name(i),
                ip: IpAddr::V4(pod_ip(i)),
            })
            .collect();
        generated.write_endpoint_slice(&spec, &endpoints).unwrap();

        let read_dir = |dir: &Path| -> Vec<(String, Value)> {
            let mut files: Vec<_> = std::fs::read_dir(dir)
                .unwrap()
                .map(|entry| {
                    let path = entry.unwrap().path();
                    let text = std::fs::read_to_string(&path).unwrap();
                    let value: Value = serde_saphyr::from_str(&text)
                        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                    (
                        path.file_name().unwrap().to_string_lossy().into_owned(),
                        value,
                    )
                })
                .collect();
            files.sort_by(|a, b| a.0.cmp(&b.0));
            files
        };
        assert_eq!(
            read_dir(&example_manifests_dir()),
            read_dir(generated.path()),
            "examples/manifests differs from what the demo topology needs"
        );
    }
}
