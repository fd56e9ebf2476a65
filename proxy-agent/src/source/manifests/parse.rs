//! Parsing one manifest file into typed objects. Pure: bytes in, objects or
//! an error message out; never panics on file content.
use std::{ffi::OsStr, fmt, path::Path, sync::Arc};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
    networking::v1::ServiceCIDR,
};
use serde_json::{Map, Value};

use crate::model::{self, Rejection, ServiceObject, Slice};

/// Files larger than this are refused (a safety net against reading a huge
/// file by mistake, not a limit anyone should hit with manifests).
pub const MAX_FILE_SIZE: u64 = 64 * 1024 * 1024;

/// How many validation problems one warning lists before summarising.
const MAX_REASONS: usize = 5;

/// The kinds of object a manifest directory may hold, in state order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ObjectKind {
    Service,
    EndpointSlice,
    Node,
    ServiceCidr,
}

impl ObjectKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ObjectKind::Service => "Service",
            ObjectKind::EndpointSlice => "EndpointSlice",
            ObjectKind::Node => "Node",
            ObjectKind::ServiceCidr => "ServiceCIDR",
        }
    }
}

impl fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Identity of an object: kind, namespace ("" for Nodes) and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub kind: ObjectKind,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}",
            self.kind,
            qualified(&self.namespace, &self.name)
        )
    }
}

/// One object read from a manifest file.
#[derive(Clone, Debug, PartialEq)]
pub enum ManifestObject {
    // Shared: each published state refers to them without copying.
    // Services and EndpointSlices are kept as the model reads them.
    Service(Arc<ServiceObject>),
    EndpointSlice(Arc<Slice>),
    Node(Arc<Node>),
    ServiceCidr(Arc<ServiceCIDR>),
}

impl ManifestObject {
    pub fn kind(&self) -> ObjectKind {
        match self {
            ManifestObject::Service(_) => ObjectKind::Service,
            ManifestObject::EndpointSlice(_) => ObjectKind::EndpointSlice,
            ManifestObject::Node(_) => ObjectKind::Node,
            ManifestObject::ServiceCidr(_) => ObjectKind::ServiceCidr,
        }
    }

    /// The object's identity. Nodes and ServiceCIDRs are cluster-scoped:
    /// their namespace is "".
    pub fn key(&self) -> ObjectKey {
        let (namespace, name) = match self {
            ManifestObject::Service(s) => (s.identity.namespace.clone(), &s.identity.name),
            ManifestObject::EndpointSlice(e) => (e.identity.namespace.clone(), &e.identity.name),
            ManifestObject::Node(n) => (None, &n.metadata.name),
            ManifestObject::ServiceCidr(c) => (None, &c.metadata.name),
        };
        ObjectKey {
            kind: self.kind(),
            namespace: namespace.unwrap_or_default(),
            name: name.clone().unwrap_or_default(),
        }
    }

    fn validate(&self) -> Vec<Rejection> {
        match self {
            ManifestObject::Service(s) => s.rejections().to_vec(),
            ManifestObject::EndpointSlice(e) => e.rejections().to_vec(),
            ManifestObject::Node(n) => model::validate_node(n),
            ManifestObject::ServiceCidr(c) => {
                model::check_service_cidr(c).err().unwrap_or_default()
            }
        }
    }

    /// Defaults a missing namespace to "default" (as kubectl does) and
    /// requires a name.
    fn normalize(&mut self) -> Result<(), String> {
        let kind = self.kind();
        let (namespace, name) = match self {
            ManifestObject::Service(s) => {
                let id = &mut Arc::make_mut(s).identity;
                (&mut id.namespace, &id.name)
            }
            ManifestObject::EndpointSlice(e) => {
                let id = &mut Arc::make_mut(e).identity;
                (&mut id.namespace, &id.name)
            }
            ManifestObject::Node(n) => {
                let meta = &mut Arc::make_mut(n).metadata;
                (&mut meta.namespace, &meta.name)
            }
            ManifestObject::ServiceCidr(c) => {
                let meta = &mut Arc::make_mut(c).metadata;
                (&mut meta.namespace, &meta.name)
            }
        };
        let cluster_scoped = matches!(kind, ObjectKind::Node | ObjectKind::ServiceCidr);
        if !cluster_scoped && namespace.as_deref().is_none_or(str::is_empty) {
            *namespace = Some("default".to_owned());
        }
        if name.as_deref().is_none_or(str::is_empty) {
            let ns = namespace.as_deref().unwrap_or("");
            return Err(if ns.is_empty() || cluster_scoped {
                format!("{kind} without metadata.name")
            } else {
                format!("{kind} in namespace {ns} without metadata.name")
            });
        }
        Ok(())
    }
}

/// Whether a directory entry with this name is a manifest file: a `.yaml`,
/// `.yml` or `.json` extension (any case), not hidden (`.foo.yaml`, which
/// also covers Kubernetes' `..data` and editors' `.#foo` files) and not an
/// editor backup or swap file (those end in `~`, `.swp`, ... and so already
/// fail the extension test).
pub fn is_manifest_file_name(name: &OsStr) -> bool {
    let Some(name) = name.to_str() else {
        // Not UTF-8: decide on the lossy form, which keeps the extension.
        return is_manifest_file_name(OsStr::new(&*name.to_string_lossy()));
    };
    if name.starts_with('.') || name.ends_with('~') {
        return false;
    }
    let Some((stem, ext)) = name.rsplit_once('.') else {
        return false;
    };
    !stem.is_empty()
        && ["yaml", "yml", "json"]
            .iter()
            .any(|e| ext.eq_ignore_ascii_case(e))
}

/// Parses and validates one manifest file. JSON files (by extension) may hold
/// one or more concatenated JSON documents; anything else is read as YAML,
/// possibly with several `---`-separated documents. Empty documents are
/// skipped. The error names the document (1-based) and object at fault.
pub fn parse_manifest(path: &Path, bytes: &[u8]) -> Result<Vec<ManifestObject>, String> {
    // Contain any panic in the parsing libraries to this file.
    std::panic::catch_unwind(|| parse_manifest_inner(path, bytes))
        .unwrap_or_else(|_| Err("internal error while parsing (parser panicked)".to_owned()))
}

fn parse_manifest_inner(path: &Path, bytes: &[u8]) -> Result<Vec<ManifestObject>, String> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let is_json = path
        .extension()
        .and_then(OsStr::to_str)
        .is_some_and(|e| e.eq_ignore_ascii_case("json"));
    let mut objects = Vec::new();
    if is_json {
        let stream = serde_json::Deserializer::from_slice(bytes).into_iter::<Value>();
        for (i, doc) in stream.enumerate() {
            let loc = format!("document {}", i + 1);
            let value = doc.map_err(|e| format!("{loc}: invalid JSON: {e}"))?;
            collect_document(value, &loc, true, &mut objects)?;
        }
    } else {
        // The error names the line and column; empty documents are skipped
        // (and not counted).
        let docs: Vec<Value> = serde_saphyr::from_slice_multiple(bytes)
            .map_err(|e| format!("invalid YAML: {}", e.without_snippet()))?;
        for (i, value) in docs.into_iter().enumerate() {
            let loc = format!("document {}", i + 1);
            collect_document(value, &loc, true, &mut objects)?;
        }
    }
    for object in &mut objects {
        object.normalize()?;
    }
    let reasons: Vec<String> = objects
        .iter()
        .flat_map(ManifestObject::validate)
        .map(|r| {
            format!(
                "{} {}: {}",
                r.kind,
                qualified(&r.namespace, &r.name),
                r.reason
            )
        })
        .collect();
    if !reasons.is_empty() {
        let mut msg = reasons[..reasons.len().min(MAX_REASONS)].join("; ");
        if reasons.len() > MAX_REASONS {
            msg.push_str(&format!("; and {} more", reasons.len() - MAX_REASONS));
        }
        return Err(msg);
    }
    Ok(objects)
}

/// Adds the objects of one document (an object or a `v1` `List`) to `out`.
fn collect_document(
    value: Value,
    loc: &str,
    top_level: bool,
    out: &mut Vec<ManifestObject>,
) -> Result<(), String> {
    let mut map = match value {
        Value::Null if top_level => return Ok(()), // empty document
        Value::Object(map) => map,
        other => {
            return Err(format!(
                "{loc}: expected an object with apiVersion and kind, found {}",
                type_name(&other)
            ));
        }
    };
    let api_version = string_field(&map, "apiVersion", loc)?;
    let kind = string_field(&map, "kind", loc)?;
    match (api_version.as_str(), kind.as_str()) {
        ("v1", "Service") => {
            let service: Service = typed(map, loc)?;
            out.push(ManifestObject::Service(Arc::new(ServiceObject::new(
                &service,
            ))))
        }
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            let slice: EndpointSlice = typed(map, loc)?;
            out.push(ManifestObject::EndpointSlice(Arc::new(Slice::new(&slice))))
        }
        ("v1", "Node") => out.push(ManifestObject::Node(Arc::new(typed(map, loc)?))),
        ("networking.k8s.io/v1", "ServiceCIDR") => {
            out.push(ManifestObject::ServiceCidr(Arc::new(typed(map, loc)?)))
        }
        ("v1", "List") if top_level => match map.remove("items") {
            None | Some(Value::Null) => {}
            Some(Value::Array(items)) => {
                for (j, item) in items.into_iter().enumerate() {
                    collect_document(item, &format!("{loc}, item {}", j + 1), false, out)?;
                }
            }
            Some(other) => {
                return Err(format!(
                    "{loc}: List items must be an array, found {}",
                    type_name(&other)
                ));
            }
        },
        ("v1", "List") => return Err(format!("{loc}: nested List is not supported")),
        (api_version, kind) => {
            return Err(format!(
                "{loc}: unsupported apiVersion/kind {api_version}/{kind} (expected v1 Service, \
                 discovery.k8s.io/v1 EndpointSlice, v1 Node or v1 List)"
            ));
        }
    }
    Ok(())
}

fn string_field(map: &Map<String, Value>, field: &str, loc: &str) -> Result<String, String> {
    match map.get(field) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        Some(Value::String(_)) | None | Some(Value::Null) => Err(format!("{loc}: missing {field}")),
        Some(other) => Err(format!(
            "{loc}: {field} must be a string, found {}",
            type_name(other)
        )),
    }
}

/// Deserializes a document into its k8s-openapi type; the error names the
/// object when its metadata says who it is.
fn typed<T: serde::de::DeserializeOwned>(map: Map<String, Value>, loc: &str) -> Result<T, String> {
    let who = describe(&map);
    serde_json::from_value(Value::Object(map)).map_err(|e| format!("{loc}{who}: {e}"))
}

/// " (Service ns/name)" from raw metadata, or "" when it is not readable.
fn describe(map: &Map<String, Value>) -> String {
    let kind = map.get("kind").and_then(Value::as_str).unwrap_or("");
    let meta = map.get("metadata");
    let field = |f: &str| {
        meta.and_then(|m| m.get(f))
            .and_then(Value::as_str)
            .unwrap_or("")
    };
    let name = field("name");
    if name.is_empty() {
        return String::new();
    }
    format!(" ({kind} {})", qualified(field("namespace"), name))
}

fn qualified(namespace: &str, name: &str) -> String {
    if namespace.is_empty() {
        name.to_owned()
    } else {
        format!("{namespace}/{name}")
    }
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const SERVICE_A: &str = "\
apiVersion: v1
kind: Service
metadata:
  name: a
  namespace: default
spec:
  clusterIP: 10.96.0.10
  ports:
  - name: http
    port: 80
    protocol: TCP
    targetPort: 8080
";

    pub(crate) const SLICE_A: &str = "\
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: a-1
  namespace: default
  labels:
    kubernetes.io/service-name: a
addressType: IPv4
endpoints:
- addresses: [10.0.0.1]
  conditions: {ready: true}
ports:
- name: http
  port: 8080
  protocol: TCP
";

    pub(crate) const NODE_1: &str = "\
apiVersion: v1
kind: Node
metadata:
  name: node-1
";

    /// A Service named `name` in `default` with cluster IP `ip`.
    pub(crate) fn service(name: &str, ip: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\n\
             spec:\n  clusterIP: {ip}\n  ports:\n  - port: 80\n    protocol: TCP\n    targetPort: 8080\n"
        )
    }

    fn parse(name: &str, text: &str) -> Result<Vec<ManifestObject>, String> {
        parse_manifest(Path::new(name), text.as_bytes())
    }

    fn keys(objects: &[ManifestObject]) -> Vec<String> {
        objects.iter().map(|o| o.key().to_string()).collect()
    }

    #[test]
    fn multi_document_yaml() {
        let text =
            format!("---\n{SERVICE_A}---\n# just a comment\n---\n{SLICE_A}\n---\n{NODE_1}---\n");
        let objects = parse("all.yaml", &text).unwrap();
        assert_eq!(
            keys(&objects),
            [
                "Service default/a",
                "EndpointSlice default/a-1",
                "Node node-1"
            ]
        );
        let ManifestObject::Service(svc) = &objects[0] else {
            panic!("not a service");
        };
        assert_eq!(
            svc.cluster_ips(),
            ["10.96.0.10".parse::<std::net::IpAddr>().unwrap()]
        );
        assert!(svc.rejections().is_empty());
    }

    #[test]
    fn json_single_and_concatenated() {
        let svc = r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"j","namespace":"x"},
            "spec":{"clusterIP":"10.96.0.11","ports":[{"port":53,"protocol":"UDP"}]}}"#;
        let node = r#"{"apiVersion":"v1","kind":"Node","metadata":{"name":"n"}}"#;
        assert_eq!(keys(&parse("a.json", svc).unwrap()), ["Service x/j"]);
        let both = format!("{svc}\n{node}");
        assert_eq!(
            keys(&parse("a.JSON", &both).unwrap()),
            ["Service x/j", "Node n"]
        );
        assert!(parse("a.json", "").unwrap().is_empty());
        assert!(
            parse("a.json", "{\"apiVersion\": ")
                .unwrap_err()
                .contains("invalid JSON")
        );
    }

    #[test]
    fn list_kind() {
        let text = format!(
            "apiVersion: v1\nkind: List\nitems:\n- {}\n- {}\n",
            serde_json::to_string(&serde_saphyr::from_str::<Value>(SERVICE_A).unwrap()).unwrap(),
            serde_json::to_string(&serde_saphyr::from_str::<Value>(NODE_1).unwrap()).unwrap(),
        );
        let objects = parse("list.yml", &text).unwrap();
        assert_eq!(keys(&objects), ["Service default/a", "Node node-1"]);
        assert!(
            parse("l.yaml", "apiVersion: v1\nkind: List\nitems: []\n")
                .unwrap()
                .is_empty()
        );
        let nested =
            "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: List\n  items: []\n";
        assert!(parse("l.yaml", nested).unwrap_err().contains("nested List"));
        let bad_item = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Pod\n";
        let err = parse("l.yaml", bad_item).unwrap_err();
        assert!(err.contains("item 1") && err.contains("v1/Pod"), "{err}");
    }

    #[test]
    fn unknown_kind_or_api_version_is_an_error() {
        let err = parse("p.yaml", "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n").unwrap_err();
        assert!(err.contains("unsupported apiVersion/kind v1/Pod"), "{err}");
        let wrong_group = SLICE_A.replace("discovery.k8s.io/v1", "discovery.k8s.io/v1beta1");
        assert!(
            parse("s.yaml", &wrong_group)
                .unwrap_err()
                .contains("v1beta1")
        );
        assert!(
            parse("s.yaml", "kind: Service\n")
                .unwrap_err()
                .contains("missing apiVersion")
        );
        assert!(
            parse("s.yaml", "apiVersion: v1\n")
                .unwrap_err()
                .contains("missing kind")
        );
        assert!(
            parse("s.yaml", "- 1\n- 2\n")
                .unwrap_err()
                .contains("an array")
        );
        assert!(
            parse("s.yaml", "just text\n")
                .unwrap_err()
                .contains("a string")
        );
    }

    #[test]
    fn an_error_in_a_later_document_breaks_the_file() {
        let text = format!("{SERVICE_A}---\napiVersion: v1\nkind: Secret\n");
        let err = parse("x.yaml", &text).unwrap_err();
        assert!(err.starts_with("document 2:"), "{err}");
    }

    #[test]
    fn bad_yaml_and_bad_types() {
        let err = parse("b.yaml", "apiVersion: v1\nkind: Service\n  bad: [indent\n").unwrap_err();
        assert!(err.contains("invalid YAML"), "{err}");
        let wrong_type = SERVICE_A.replace("port: 80", "port: eighty");
        let err = parse("b.yaml", &wrong_type).unwrap_err();
        assert!(err.contains("Service default/a"), "{err}");
        assert!(parse("b.yaml", "\u{0}\u{1}\u{ff}").is_err());
    }

    #[test]
    fn empty_files_and_documents_are_fine() {
        assert!(parse("e.yaml", "").unwrap().is_empty());
        assert!(parse("e.yaml", "---\n---\n# nothing\n").unwrap().is_empty());
        assert!(parse("e.yaml", "\u{feff}").unwrap().is_empty());
    }

    #[test]
    fn namespace_defaults_and_name_is_required() {
        let no_ns = SERVICE_A.replace("  namespace: default\n", "");
        assert_eq!(
            keys(&parse("s.yaml", &no_ns).unwrap()),
            ["Service default/a"]
        );
        let no_name = SERVICE_A.replace("  name: a\n", "");
        let err = parse("s.yaml", &no_name).unwrap_err();
        assert!(err.contains("without metadata.name"), "{err}");
        let node_ns = NODE_1.replace("  name: node-1\n", "  name: node-1\n  namespace: x\n");
        assert_eq!(keys(&parse("n.yaml", &node_ns).unwrap()), ["Node node-1"]);
    }

    #[test]
    fn invalid_objects_fail_validation() {
        let err = parse("s.yaml", &service("bad", "10.96.0.300")).unwrap_err();
        assert!(err.contains("Service default/bad"), "{err}");
        let port = SERVICE_A.replace("port: 80", "port: 70000");
        let err = parse("s.yaml", &port).unwrap_err();
        assert!(err.contains("Service default/a"), "{err}");
        let ip = SLICE_A.replace("10.0.0.1", "10.0.0.999");
        let err = parse("e.yaml", &ip).unwrap_err();
        assert!(err.contains("EndpointSlice default/a-1"), "{err}");
    }

    #[test]
    fn manifest_file_names() {
        for ok in [
            "a.yaml",
            "a.yml",
            "a.json",
            "A.YAML",
            "svc.v2.yaml",
            "x-y_z.Json",
        ] {
            assert!(is_manifest_file_name(OsStr::new(ok)), "{ok}");
        }
        for skip in [
            ".a.yaml",
            "..data",
            ".#a.yaml",
            "a.yaml~",
            "a.yaml.swp",
            ".a.yaml.swp",
            "a.swp",
            "#a.yaml#",
            "a.yaml.tmp",
            "4913",
            "yaml",
            ".yaml",
            "a.txt",
            "README.md",
        ] {
            assert!(!is_manifest_file_name(OsStr::new(skip)), "{skip}");
        }
    }

    proptest::proptest! {
        #![proptest_config(crate::fuzz_config(256))]

        #[test]
        fn never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let _ = parse_manifest(Path::new("f.yaml"), &bytes);
            let _ = parse_manifest(Path::new("f.json"), &bytes);
        }

        #[test]
        fn never_panics_on_mutated_manifests(pos in 0usize..400, byte in proptest::num::u8::ANY) {
            let mut text = format!("{SERVICE_A}---\n{SLICE_A}").into_bytes();
            let pos = pos % text.len();
            text[pos] = byte;
            let _ = parse_manifest(Path::new("f.yaml"), &text);
        }
    }
}
