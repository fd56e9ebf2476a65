//! A directory of Kubernetes manifests for the agent's `--manifests`: one
//! object per file, written atomically so the agent never reads half a file.
use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::Context;
use serde_json::{Value, json};

use crate::client::Protocol;

/// A ClusterIP Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    pub namespace: String,
    pub name: String,
    pub cluster_ip: IpAddr,
    pub ports: Vec<ServicePort>,
}

/// One port of a Service and the port its endpoints serve it on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    pub target_port: u16,
}

/// One ready endpoint: a pod's name and address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub pod: String,
    pub ip: IpAddr,
}

impl ServiceSpec {
    /// A Service without ports; add them with [`ServiceSpec::tcp`] and
    /// [`ServiceSpec::udp`].
    pub fn cluster_ip(namespace: &str, name: &str, cluster_ip: IpAddr) -> Self {
        ServiceSpec {
            namespace: namespace.to_string(),
            name: name.to_string(),
            cluster_ip,
            ports: Vec::new(),
        }
    }

    /// Adds a TCP port named `tcp-<port>`.
    pub fn tcp(self, port: u16, target_port: u16) -> Self {
        self.port(Protocol::Tcp, port, target_port)
    }

    /// Adds a UDP port named `udp-<port>`.
    pub fn udp(self, port: u16, target_port: u16) -> Self {
        self.port(Protocol::Udp, port, target_port)
    }

    fn port(mut self, protocol: Protocol, port: u16, target_port: u16) -> Self {
        self.ports.push(ServicePort {
            name: format!("{protocol}-{port}"),
            protocol,
            port,
            target_port,
        });
        self
    }

    /// The Service object.
    pub fn service(&self) -> Value {
        let ports: Vec<Value> = self
            .ports
            .iter()
            .map(|p| {
                json!({
                    "name": p.name,
                    "protocol": kube_protocol(p.protocol),
                    "port": p.port,
                    "targetPort": p.target_port,
                })
            })
            .collect();
        let family = self.family();
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": { "namespace": self.namespace, "name": self.name },
            "spec": {
                "type": "ClusterIP",
                "clusterIP": self.cluster_ip.to_string(),
                "clusterIPs": [self.cluster_ip.to_string()],
                "ipFamilies": [family],
                "selector": { "app": self.name },
                "ports": ports,
            },
        })
    }

    /// The IP family name of the cluster IP, as the API spells it.
    fn family(&self) -> &'static str {
        if self.cluster_ip.is_ipv4() {
            "IPv4"
        } else {
            "IPv6"
        }
    }

    /// The Service's EndpointSlice listing `endpoints` (all ready, on node
    /// `node_name` if given).
    pub fn endpoint_slice(&self, endpoints: &[Endpoint], node_name: Option<&str>) -> Value {
        let endpoints: Vec<Value> = endpoints
            .iter()
            .map(|e| {
                let mut endpoint = json!({
                    "addresses": [e.ip.to_string()],
                    "conditions": { "ready": true, "serving": true, "terminating": false },
                    "targetRef": { "kind": "Pod", "namespace": self.namespace, "name": e.pod },
                });
                if let Some(node) = node_name {
                    endpoint["nodeName"] = json!(node);
                }
                endpoint
            })
            .collect();
        let ports: Vec<Value> = self
            .ports
            .iter()
            .map(|p| {
                json!({
                    "name": p.name,
                    "protocol": kube_protocol(p.protocol),
                    "port": p.target_port,
                })
            })
            .collect();
        let family = self.family();
        json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "namespace": self.namespace,
                "name": format!("{}-1", self.name),
                "labels": {
                    "kubernetes.io/service-name": self.name,
                    "endpointslice.kubernetes.io/managed-by": "proxy-tests",
                },
            },
            "addressType": family,
            "endpoints": endpoints,
            "ports": ports,
        })
    }
}

/// A Node object with its InternalIP.
pub fn node(name: &str, internal_ip: IpAddr) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": { "name": name },
        "status": {
            "addresses": [
                { "type": "InternalIP", "address": internal_ip.to_string() },
                { "type": "Hostname", "address": name },
            ],
        },
    })
}

fn kube_protocol(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Tcp => "TCP",
        Protocol::Udp => "UDP",
    }
}

/// A temporary manifests directory, removed on drop.
pub struct ManifestsDir {
    dir: tempfile::TempDir,
    /// Set by [`ManifestsDir::write_node`]; endpoints get it as `nodeName`.
    node_name: Option<String>,
}

impl ManifestsDir {
    pub fn new() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("proxy-tests-manifests-")
            .tempdir()
            .context("creating a manifests directory")?;
        Ok(ManifestsDir {
            dir,
            node_name: None,
        })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Copies every file of `source` (e.g. `examples/manifests`) in.
    pub fn copy_from(&self, source: &Path) -> anyhow::Result<()> {
        let entries =
            std::fs::read_dir(source).with_context(|| format!("reading {}", source.display()))?;
        for entry in entries {
            let entry = entry.with_context(|| format!("reading {}", source.display()))?;
            if entry.file_type()?.is_file() {
                let bytes = std::fs::read(entry.path())
                    .with_context(|| format!("reading {}", entry.path().display()))?;
                self.write_file(&entry.file_name().to_string_lossy(), &bytes)?;
            }
        }
        Ok(())
    }

    /// Writes the Node object this agent runs as.
    pub fn write_node(&mut self, name: &str, internal_ip: IpAddr) -> anyhow::Result<()> {
        self.write_object(&format!("node-{name}.yaml"), &node(name, internal_ip))?;
        self.node_name = Some(name.to_string());
        Ok(())
    }

    /// Writes (or rewrites) the Service.
    pub fn write_service(&self, spec: &ServiceSpec) -> anyhow::Result<()> {
        self.write_object(&service_file(spec), &spec.service())
    }

    /// Writes (or rewrites) the Service's EndpointSlice with `endpoints`.
    pub fn write_endpoint_slice(
        &self,
        spec: &ServiceSpec,
        endpoints: &[Endpoint],
    ) -> anyhow::Result<()> {
        let slice = spec.endpoint_slice(endpoints, self.node_name.as_deref());
        self.write_object(&endpoint_slice_file(spec), &slice)
    }

    /// Removes the Service's file (its EndpointSlice stays).
    pub fn remove_service(&self, spec: &ServiceSpec) -> anyhow::Result<()> {
        self.remove_file(&service_file(spec))
    }

    /// Removes the Service's EndpointSlice file.
    pub fn remove_endpoint_slice(&self, spec: &ServiceSpec) -> anyhow::Result<()> {
        self.remove_file(&endpoint_slice_file(spec))
    }

    /// The YAML of `object`, as written.
    pub fn to_yaml(object: &Value) -> anyhow::Result<String> {
        serde_yaml::to_string(object).context("encoding YAML")
    }

    fn write_object(&self, file_name: &str, object: &Value) -> anyhow::Result<()> {
        self.write_file(file_name, Self::to_yaml(object)?.as_bytes())
    }

    /// Writes a hidden temporary file and renames it into place, so a watcher
    /// sees either the old or the new content, never a partial file.
    fn write_file(&self, file_name: &str, bytes: &[u8]) -> anyhow::Result<()> {
        let path = self.file(file_name);
        let temporary = self.file(&format!(".{file_name}.tmp"));
        std::fs::write(&temporary, bytes)
            .with_context(|| format!("writing {}", temporary.display()))?;
        std::fs::rename(&temporary, &path)
            .with_context(|| format!("renaming {} to {}", temporary.display(), path.display()))
    }

    fn remove_file(&self, file_name: &str) -> anyhow::Result<()> {
        let path = self.file(file_name);
        std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))
    }

    fn file(&self, file_name: &str) -> PathBuf {
        self.dir.path().join(file_name)
    }
}

fn service_file(spec: &ServiceSpec) -> String {
    format!("service-{}-{}.yaml", spec.namespace, spec.name)
}

fn endpoint_slice_file(spec: &ServiceSpec) -> String {
    format!("endpointslice-{}-{}.yaml", spec.namespace, spec.name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_rewrites_and_removes_objects() {
        let spec = ServiceSpec::cluster_ip("default", "echo", "198.19.0.1".parse().unwrap())
            .tcp(80, 8080)
            .udp(53, 5353);
        let mut dir = ManifestsDir::new().unwrap();
        dir.write_node("n1", "198.18.0.1".parse().unwrap()).unwrap();
        dir.write_service(&spec).unwrap();
        let one = Endpoint {
            pod: "pod-0".into(),
            ip: "198.18.1.10".parse().unwrap(),
        };
        dir.write_endpoint_slice(&spec, &[one]).unwrap();

        let read = |name: &str| -> Value {
            serde_yaml::from_str(&std::fs::read_to_string(dir.path().join(name)).unwrap()).unwrap()
        };
        let slice = read("endpointslice-default-echo.yaml");
        assert_eq!(slice["endpoints"][0]["addresses"][0], "198.18.1.10");
        assert_eq!(slice["endpoints"][0]["nodeName"], "n1");
        assert_eq!(slice["ports"][1]["port"], 5353);
        assert_eq!(
            read("service-default-echo.yaml")["spec"]["ports"][0]["targetPort"],
            8080
        );

        dir.write_endpoint_slice(&spec, &[]).unwrap();
        assert_eq!(
            read("endpointslice-default-echo.yaml")["endpoints"],
            json!([])
        );

        dir.remove_service(&spec).unwrap();
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["endpointslice-default-echo.yaml", "node-n1.yaml"]);
    }
}
