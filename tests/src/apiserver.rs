//! An in-process fake Kubernetes API server for integration tests.
//!
//! It speaks enough of the real API over plain HTTP/1.1 that the unmodified
//! `kube` client (typed `Api<K>`, `kube::runtime::watcher`,
//! `kube::runtime::events::Recorder`) works against it:
//!
//! * Services and EndpointSlices (namespaced and cluster-wide paths), Nodes
//!   (cluster-scoped), `events.k8s.io/v1` and core `v1` Events: get, list,
//!   watch, create, update (PUT), merge patch, delete.
//! * One global resourceVersion counter; every write stamps
//!   `metadata.resourceVersion`, creates also set `uid` and
//!   `creationTimestamp`. An update that changes nothing is a no-op, as on
//!   the real server.
//! * Lists honour label and field selectors, `limit`/`continue` (a continue
//!   token names a snapshot taken by the first page, so pages are consistent
//!   like etcd's), and answer 410 Expired for a `resourceVersion` older than
//!   the retained history when `resourceVersionMatch` is given.
//! * Watches replay the event history after `resourceVersion`, then stream
//!   live events; a too-old version gets HTTP 200 and an `ERROR` event with a
//!   410 `Status`, as the real server does. Objects that start or stop
//!   matching the selectors are sent as `ADDED`/`DELETED`. Bookmarks are sent
//!   once right after the replay and then periodically.
//!
//! Differences from the real server, on purpose or for brevity:
//! * no authentication, authorization, admission, validation of object
//!   schemas, defaulting, `generation`, finalizers or graceful deletion;
//! * lists always serve the latest state (or a continue snapshot): an
//!   `Exact` list of an older, still retained version is not reconstructed;
//! * a watch from a version newer than the current one starts from that
//!   version instead of waiting; slow watchers are buffered, never dropped;
//! * bookmarks come much more often (default every second, and one right
//!   away) so tests need not wait a minute for them;
//! * strategic-merge patches are applied as JSON merge patches; JSON patch
//!   and server-side apply are refused with 415;
//! * [`ApiServer::compact`] expires every resourceVersion handed out so far
//!   (it also bumps the counter so a fresh list returns a usable version).
//!   Watches that are already streaming are unaffected, as with etcd
//!   compaction; combine with [`ApiServer::drop_watches`] to force a relist.
//!
//! The server runs on its own tokio runtime, so the test-facing
//! [`ApiServer`] methods are synchronous and can be called from plain
//! `#[test]` functions as well as from inside another runtime.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde_json::{Map, Value, json};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tokio::time::Instant;

/// How many write events the server remembers for watch replay by default.
const DEFAULT_HISTORY_LIMIT: usize = 100_000;
/// How many paginated list snapshots are kept for `continue` tokens.
const SNAPSHOT_LIMIT: usize = 64;
/// The annotation that marks the end of `sendInitialEvents`.
const INITIAL_EVENTS_END: &str = "k8s.io/initial-events-end";

type RespBody = UnsyncBoxBody<Bytes, Infallible>;

// ---------------------------------------------------------------------------
// Resource kinds
// ---------------------------------------------------------------------------

/// The resource types the fake serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Kind {
    Service,
    EndpointSlice,
    Node,
    /// `events.k8s.io/v1` Event.
    Event,
    /// Core `v1` Event.
    CoreEvent,
    /// `networking.k8s.io/v1` ServiceCIDR (cluster-scoped).
    ServiceCidr,
}

impl Kind {
    const ALL: [Kind; 6] = [
        Kind::Service,
        Kind::EndpointSlice,
        Kind::Node,
        Kind::Event,
        Kind::CoreEvent,
        Kind::ServiceCidr,
    ];

    fn group(self) -> &'static str {
        match self {
            Kind::EndpointSlice => "discovery.k8s.io",
            Kind::Event => "events.k8s.io",
            Kind::ServiceCidr => "networking.k8s.io",
            Kind::Service | Kind::Node | Kind::CoreEvent => "",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Kind::EndpointSlice => "discovery.k8s.io/v1",
            Kind::Event => "events.k8s.io/v1",
            Kind::ServiceCidr => "networking.k8s.io/v1",
            Kind::Service | Kind::Node | Kind::CoreEvent => "v1",
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
            Kind::Event | Kind::CoreEvent => "Event",
            Kind::ServiceCidr => "ServiceCIDR",
        }
    }

    fn plural(self) -> &'static str {
        match self {
            Kind::Service => "services",
            Kind::EndpointSlice => "endpointslices",
            Kind::Node => "nodes",
            Kind::Event | Kind::CoreEvent => "events",
            Kind::ServiceCidr => "servicecidrs",
        }
    }

    fn namespaced(self) -> bool {
        !matches!(self, Kind::Node | Kind::ServiceCidr)
    }

    fn from_path(group: &str, version: &str, plural: &str) -> Option<Kind> {
        Kind::ALL
            .into_iter()
            .find(|k| k.group() == group && version == "v1" && k.plural() == plural)
    }

    fn from_type(api_version: &str, kind: &str) -> Option<Kind> {
        Kind::ALL
            .into_iter()
            .find(|k| k.api_version() == api_version && k.kind() == kind)
    }

    fn of<K: k8s_openapi::Resource>() -> anyhow::Result<Kind> {
        Kind::from_type(K::API_VERSION, K::KIND)
            .with_context(|| format!("the fake API server does not serve {}", K::KIND))
    }
}

// ---------------------------------------------------------------------------
// Errors as Kubernetes Status objects
// ---------------------------------------------------------------------------

/// A failed request, rendered as a `Status` object.
#[derive(Debug, Clone)]
struct ApiError {
    code: u16,
    reason: &'static str,
    message: String,
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            code,
            reason,
            message: message.into(),
        }
    }
    fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(400, "BadRequest", message)
    }
    fn not_found(message: impl Into<String>) -> Self {
        ApiError::new(404, "NotFound", message)
    }
    fn expired(message: impl Into<String>) -> Self {
        ApiError::new(410, "Expired", message)
    }
    fn status(&self) -> Value {
        json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        })
    }
}

// ---------------------------------------------------------------------------
// Selectors
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
enum Requirement {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// A parsed label selector: a conjunction of requirements.
#[derive(Debug, Clone, Default, PartialEq)]
struct LabelSelector(Vec<Requirement>);

fn valid_label_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 316
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'))
}

fn valid_label_value(value: &str) -> bool {
    value.len() <= 63
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// Splits on commas that are not inside parentheses.
fn split_top_level(input: &str) -> Result<Vec<&str>, String> {
    let mut parts = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in input.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.checked_sub(1).ok_or("unbalanced parentheses")?,
            ',' if depth == 0 => {
                parts.push(&input[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err("unbalanced parentheses".into());
    }
    parts.push(&input[start..]);
    Ok(parts)
}

impl LabelSelector {
    fn parse(input: &str) -> Result<Self, String> {
        let mut reqs = Vec::new();
        if input.trim().is_empty() {
            return Ok(LabelSelector(reqs));
        }
        for part in split_top_level(input)? {
            reqs.push(Self::parse_requirement(part.trim())?);
        }
        Ok(LabelSelector(reqs))
    }

    fn parse_requirement(part: &str) -> Result<Requirement, String> {
        let key_checked = |key: &str| -> Result<String, String> {
            let key = key.trim();
            if valid_label_key(key) {
                Ok(key.to_string())
            } else {
                Err(format!("invalid label key {key:?}"))
            }
        };
        let value_checked = |value: &str| -> Result<String, String> {
            let value = value.trim();
            if valid_label_value(value) {
                Ok(value.to_string())
            } else {
                Err(format!("invalid label value {value:?}"))
            }
        };
        if part.is_empty() {
            return Err("empty requirement".into());
        }
        if let Some(rest) = part.strip_prefix('!') {
            return Ok(Requirement::NotExists(key_checked(rest)?));
        }
        if let Some((key, value)) = part.split_once("!=") {
            return Ok(Requirement::NotEq(key_checked(key)?, value_checked(value)?));
        }
        if let Some((key, value)) = part.split_once("==") {
            return Ok(Requirement::Eq(key_checked(key)?, value_checked(value)?));
        }
        if let Some((key, value)) = part.split_once('=') {
            return Ok(Requirement::Eq(key_checked(key)?, value_checked(value)?));
        }
        if part.contains('(') {
            // `key in (a,b)` / `key notin (a,b)`
            let (head, set) = part
                .split_once('(')
                .ok_or_else(|| format!("cannot parse {part:?}"))?;
            let set = set
                .trim_end()
                .strip_suffix(')')
                .ok_or_else(|| format!("missing ')' in {part:?}"))?;
            let mut words = head.split_whitespace();
            let (Some(key), Some(op), None) = (words.next(), words.next(), words.next()) else {
                return Err(format!("cannot parse {part:?}"));
            };
            let values = set
                .split(',')
                .map(value_checked)
                .collect::<Result<Vec<_>, _>>()?;
            return match op {
                "in" => Ok(Requirement::In(key_checked(key)?, values)),
                "notin" => Ok(Requirement::NotIn(key_checked(key)?, values)),
                _ => Err(format!("unknown operator {op:?}")),
            };
        }
        Ok(Requirement::Exists(key_checked(part)?))
    }

    fn matches(&self, obj: &Value) -> bool {
        let labels = obj.pointer("/metadata/labels").and_then(Value::as_object);
        let get = |key: &str| labels.and_then(|l| l.get(key)).and_then(Value::as_str);
        self.0.iter().all(|req| match req {
            Requirement::Eq(k, v) => get(k) == Some(v.as_str()),
            Requirement::NotEq(k, v) => get(k) != Some(v.as_str()),
            Requirement::In(k, vs) => get(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            Requirement::NotIn(k, vs) => !get(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            Requirement::Exists(k) => get(k).is_some(),
            Requirement::NotExists(k) => get(k).is_none(),
        })
    }
}

/// A parsed field selector; only `metadata.name` and `metadata.namespace`.
#[derive(Debug, Clone, Default)]
struct FieldSelector(Vec<(&'static str, bool, String)>);

impl FieldSelector {
    fn parse(input: &str) -> Result<Self, String> {
        let mut reqs = Vec::new();
        if input.trim().is_empty() {
            return Ok(FieldSelector(reqs));
        }
        for part in input.split(',') {
            let (field, equal, value) = if let Some((f, v)) = part.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = part.split_once("==") {
                (f, true, v)
            } else if let Some((f, v)) = part.split_once('=') {
                (f, true, v)
            } else {
                return Err(format!("invalid field selector requirement {part:?}"));
            };
            let pointer = match field.trim() {
                "metadata.name" => "/metadata/name",
                "metadata.namespace" => "/metadata/namespace",
                other => return Err(format!("field label not supported: {other}")),
            };
            reqs.push((pointer, equal, value.trim().to_string()));
        }
        Ok(FieldSelector(reqs))
    }

    fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|(pointer, equal, value)| {
            let actual = obj.pointer(pointer).and_then(Value::as_str).unwrap_or("");
            (actual == value) == *equal
        })
    }
}

/// What a list or watch selects: a kind, optionally a namespace, selectors.
#[derive(Debug, Clone)]
struct Filter {
    kind: Kind,
    namespace: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
}

impl Filter {
    fn matches(&self, obj: &Value) -> bool {
        if let Some(ns) = &self.namespace
            && obj.pointer("/metadata/namespace").and_then(Value::as_str) != Some(ns.as_str())
        {
            return false;
        }
        self.labels.matches(obj) && self.fields.matches(obj)
    }
}

// ---------------------------------------------------------------------------
// The store
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChangeType {
    Added,
    Modified,
    Deleted,
}

/// One write, as kept in the history and fanned out to live watches.
#[derive(Debug)]
struct Change {
    rv: u64,
    kind: Kind,
    change: ChangeType,
    /// The new state (for a delete: the last state, stamped with the delete's RV).
    object: Arc<Value>,
    /// The state before a modification.
    old: Option<Arc<Value>>,
}

/// A list result kept for `continue` tokens.
struct Snapshot {
    rv: u64,
    items: Vec<Arc<Value>>,
}

/// What tests can read back about one Event object.
#[derive(Debug, Clone, Default)]
pub struct EventRecord {
    /// The Event as stored now (create with every patch merged in).
    pub object: Value,
    /// POST requests that created it (1 unless it was deleted and recreated).
    pub creates: usize,
    /// PATCH and PUT requests applied to it.
    pub patches: usize,
}

/// One HTTP request the server answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    /// Kubernetes RBAC verb: get, list, watch, create, update, patch, delete,
    /// deletecollection; for non-resource URLs the lower-case HTTP method.
    pub verb: String,
    /// API group, "" for core.
    pub group: String,
    /// Resource (plural), "" for non-resource URLs such as `/version`.
    pub resource: String,
    pub namespace: Option<String>,
    pub name: Option<String>,
    /// Path and query exactly as received.
    pub uri: String,
    /// HTTP status of the response (200 for a watch that ended with an ERROR event).
    pub status: u16,
}

struct Store {
    rv: u64,
    /// Watches must start at or after this version; older ones get 410.
    floor: u64,
    objects: BTreeMap<Kind, BTreeMap<(String, String), Arc<Value>>>,
    history: VecDeque<Arc<Change>>,
    history_limit: usize,
    watchers: Vec<mpsc::UnboundedSender<Arc<Change>>>,
    snapshots: BTreeMap<u64, Snapshot>,
    next_snapshot: u64,
    next_uid: u64,
    server_id: u64,
    event_counts: BTreeMap<(Kind, String, String), (usize, usize)>,
    requests: Vec<RequestRecord>,
}

/// Which kind of write a test or a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WriteMode {
    Create,
    Update,
    Upsert,
}

fn now_rfc3339() -> String {
    // Kubernetes `Time` has second precision.
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    i64::try_from(secs)
        .ok()
        .and_then(|s| k8s_openapi::jiff::Timestamp::from_second(s).ok())
        .map(|t| t.to_string())
        .unwrap_or_else(|| "1970-01-01T00:00:00Z".to_string())
}

fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    obj.get("metadata")?.get(field)?.as_str()
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(target) = target {
        for (key, value) in patch {
            if value.is_null() {
                target.remove(key);
            } else {
                merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
    }
}

/// The object without the fields the server owns, to detect no-op updates.
fn comparable(obj: &Value) -> Value {
    let mut obj = obj.clone();
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        for field in [
            "resourceVersion",
            "uid",
            "creationTimestamp",
            "managedFields",
        ] {
            meta.remove(field);
        }
    }
    obj
}

impl Store {
    fn new(server_id: u64) -> Self {
        Store {
            rv: 1,
            floor: 0,
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            history_limit: DEFAULT_HISTORY_LIMIT,
            watchers: Vec::new(),
            snapshots: BTreeMap::new(),
            next_snapshot: 0,
            next_uid: 0,
            server_id,
            event_counts: BTreeMap::new(),
            requests: Vec::new(),
        }
    }

    fn record(&mut self, change: Change) {
        let change = Arc::new(change);
        self.history.push_back(change.clone());
        while self.history.len() > self.history_limit {
            if let Some(old) = self.history.pop_front() {
                self.floor = old.rv;
            }
        }
        self.watchers.retain(|tx| tx.send(change.clone()).is_ok());
    }

    fn compact(&mut self) {
        self.history.clear();
        self.snapshots.clear();
        self.rv += 1;
        self.floor = self.rv;
    }

    /// Checks and completes an incoming object: type fields, name, namespace.
    fn normalize(
        &self,
        kind: Kind,
        path_ns: Option<&str>,
        mut obj: Value,
    ) -> Result<(String, String, Value), ApiError> {
        let Some(map) = obj.as_object_mut() else {
            return Err(ApiError::bad_request("the body is not a JSON object"));
        };
        for (field, expected) in [("apiVersion", kind.api_version()), ("kind", kind.kind())] {
            match map.get(field) {
                None | Some(Value::Null) => {
                    map.insert(field.into(), expected.into());
                }
                Some(Value::String(s)) if s == expected => {}
                Some(other) => {
                    return Err(ApiError::bad_request(format!(
                        "{field} {other} does not match the request ({expected})"
                    )));
                }
            }
        }
        let meta = map
            .entry("metadata")
            .or_insert_with(|| Value::Object(Map::new()));
        let Some(meta) = meta.as_object_mut() else {
            return Err(ApiError::bad_request("metadata is not an object"));
        };
        let name = match meta.get("name").and_then(Value::as_str) {
            Some(name) if !name.is_empty() => name.to_string(),
            _ => match meta.get("generateName").and_then(Value::as_str) {
                Some(prefix) if !prefix.is_empty() => {
                    let name = format!("{prefix}{:05x}", self.next_uid & 0xfffff);
                    meta.insert("name".into(), name.clone().into());
                    name
                }
                _ => {
                    return Err(ApiError::new(
                        422,
                        "Invalid",
                        "metadata.name: Required value: name or generateName is required",
                    ));
                }
            },
        };
        let body_ns = meta
            .get("namespace")
            .and_then(Value::as_str)
            .filter(|ns| !ns.is_empty())
            .map(str::to_string);
        let ns = if kind.namespaced() {
            let ns = match (path_ns, body_ns) {
                (Some(p), Some(b)) if p != b => {
                    return Err(ApiError::bad_request(
                        "the namespace of the provided object does not match the namespace sent on the request",
                    ));
                }
                (Some(p), _) => p.to_string(),
                (None, Some(b)) => b,
                (None, None) => "default".to_string(),
            };
            meta.insert("namespace".into(), ns.clone().into());
            ns
        } else {
            meta.remove("namespace");
            String::new()
        };
        Ok((ns, name, obj))
    }

    /// Creates or replaces one object; returns the stored state.
    fn write(
        &mut self,
        kind: Kind,
        path_ns: Option<&str>,
        obj: Value,
        mode: WriteMode,
        check_rv: bool,
    ) -> Result<Arc<Value>, ApiError> {
        let (ns, name, mut obj) = self.normalize(kind, path_ns, obj)?;
        let key = (ns.clone(), name.clone());
        let existing = self.objects.get(&kind).and_then(|m| m.get(&key)).cloned();
        let resource = kind.plural();
        match (&existing, mode) {
            (Some(_), WriteMode::Create) => {
                return Err(ApiError::new(
                    409,
                    "AlreadyExists",
                    format!("{resource} \"{name}\" already exists"),
                ));
            }
            (None, WriteMode::Update) => {
                return Err(ApiError::not_found(format!(
                    "{resource} \"{name}\" not found"
                )));
            }
            _ => {}
        }
        let new_rv = self.rv + 1;
        let change = if let Some(old) = &existing {
            let old_rv = meta_str(old, "resourceVersion").unwrap_or("");
            if check_rv
                && let Some(sent) = meta_str(&obj, "resourceVersion").filter(|s| !s.is_empty())
                && sent != old_rv
            {
                return Err(ApiError::new(
                    409,
                    "Conflict",
                    format!(
                        "Operation cannot be fulfilled on {resource} \"{name}\": the object has been modified; please apply your changes to the latest version and try again"
                    ),
                ));
            }
            // The server owns these: keep the stored ones.
            if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
                for field in ["uid", "creationTimestamp"] {
                    match old.get("metadata").and_then(|m| m.get(field)) {
                        Some(v) => meta.insert(field.into(), v.clone()),
                        None => meta.remove(field),
                    };
                }
            }
            if comparable(&obj) == comparable(old) {
                return Ok(old.clone());
            }
            ChangeType::Modified
        } else {
            self.next_uid += 1;
            if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
                meta.insert(
                    "uid".into(),
                    format!(
                        "{:08x}-0000-4000-8000-{:012x}",
                        self.server_id & 0xffff_ffff,
                        self.next_uid
                    )
                    .into(),
                );
                if !meta.get("creationTimestamp").is_some_and(Value::is_string) {
                    meta.insert("creationTimestamp".into(), now_rfc3339().into());
                }
            }
            ChangeType::Added
        };
        if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.insert("resourceVersion".into(), new_rv.to_string().into());
        }
        self.rv = new_rv;
        let obj = Arc::new(obj);
        self.objects
            .entry(kind)
            .or_default()
            .insert(key, obj.clone());
        self.record(Change {
            rv: new_rv,
            kind,
            change,
            object: obj.clone(),
            old: existing,
        });
        Ok(obj)
    }

    fn delete(&mut self, kind: Kind, ns: &str, name: &str) -> Result<Arc<Value>, ApiError> {
        let ns = if kind.namespaced() { ns } else { "" };
        let Some(old) = self
            .objects
            .get_mut(&kind)
            .and_then(|m| m.remove(&(ns.to_string(), name.to_string())))
        else {
            return Err(ApiError::not_found(format!(
                "{} \"{name}\" not found",
                kind.plural()
            )));
        };
        self.rv += 1;
        // Like the real server, the DELETED event carries the deletion's version.
        let mut last = (*old).clone();
        if let Some(meta) = last.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.insert("resourceVersion".into(), self.rv.to_string().into());
        }
        let last = Arc::new(last);
        self.record(Change {
            rv: self.rv,
            kind,
            change: ChangeType::Deleted,
            object: last.clone(),
            old: Some(old),
        });
        Ok(last)
    }

    fn get(&self, kind: Kind, ns: &str, name: &str) -> Option<Arc<Value>> {
        let ns = if kind.namespaced() { ns } else { "" };
        self.objects
            .get(&kind)?
            .get(&(ns.to_string(), name.to_string()))
            .cloned()
    }

    fn select(&self, filter: &Filter) -> Vec<Arc<Value>> {
        self.objects
            .get(&filter.kind)
            .map(|m| m.values().filter(|o| filter.matches(o)).cloned().collect())
            .unwrap_or_default()
    }
}

// ---------------------------------------------------------------------------
// Query strings
// ---------------------------------------------------------------------------

fn percent_decode(input: &str) -> Result<String, ApiError> {
    let bytes = input.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| ApiError::bad_request("malformed percent-encoding in query"))?;
                out.push(hex);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| ApiError::bad_request("query is not UTF-8"))
}

struct Query(HashMap<String, String>);

impl Query {
    fn parse(query: &str) -> Result<Self, ApiError> {
        let mut map = HashMap::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            map.insert(percent_decode(k)?, percent_decode(v)?);
        }
        Ok(Query(map))
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    fn flag(&self, key: &str) -> Result<bool, ApiError> {
        match self.get(key) {
            None | Some("" | "false" | "0") => Ok(false),
            Some("true" | "1") => Ok(true),
            Some(other) => Err(ApiError::bad_request(format!(
                "{key}: invalid value {other:?}"
            ))),
        }
    }

    fn number(&self, key: &str) -> Result<Option<u64>, ApiError> {
        match self.get(key) {
            None | Some("") => Ok(None),
            Some(v) => v
                .parse()
                .map(Some)
                .map_err(|_| ApiError::bad_request(format!("{key}: invalid value {v:?}"))),
        }
    }

    fn filter(&self, kind: Kind, namespace: Option<&str>) -> Result<Filter, ApiError> {
        let labels = LabelSelector::parse(self.get("labelSelector").unwrap_or(""))
            .map_err(|e| ApiError::bad_request(format!("unable to parse labelSelector: {e}")))?;
        let fields = FieldSelector::parse(self.get("fieldSelector").unwrap_or(""))
            .map_err(|e| ApiError::bad_request(format!("unable to parse fieldSelector: {e}")))?;
        Ok(Filter {
            kind,
            namespace: namespace.map(str::to_string),
            labels,
            fields,
        })
    }
}

fn encode_continue(id: u64, rv: u64, offset: usize) -> String {
    format!("{id}:{rv}:{offset}")
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn decode_continue(token: &str) -> Option<(u64, usize)> {
    if !token.len().is_multiple_of(2) || !token.is_ascii() {
        return None;
    }
    let bytes = (0..token.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&token[i..i + 2], 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    let text = String::from_utf8(bytes).ok()?;
    let mut parts = text.split(':');
    let id = parts.next()?.parse().ok()?;
    let _rv: u64 = parts.next()?.parse().ok()?;
    let offset = parts.next()?.parse().ok()?;
    Some((id, offset))
}

// ---------------------------------------------------------------------------
// Shared server state and the test handle
// ---------------------------------------------------------------------------

struct ConnEntry {
    abort: AbortHandle,
    /// Watch responses currently streaming on this connection.
    watches: Arc<AtomicUsize>,
}

struct Shared {
    store: Mutex<Store>,
    conns: Mutex<HashMap<u64, ConnEntry>>,
    next_conn: AtomicU64,
    accepting: AtomicBool,
    open_watches: AtomicUsize,
    bookmark_interval_ms: AtomicU64,
    /// Off: ServiceCIDRs answer 404, as before Kubernetes 1.33.
    serves_service_cidrs: AtomicBool,
}

impl Shared {
    fn store(&self) -> MutexGuard<'_, Store> {
        // A panic while holding the lock leaves consistent data (every write
        // is applied in full before anything can panic), so keep going.
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn conns(&self) -> MutexGuard<'_, HashMap<u64, ConnEntry>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running fake API server; see the module docs.
pub struct ApiServer {
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
    port: u16,
    accept: Mutex<Option<AbortHandle>>,
}

impl ApiServer {
    /// Starts a server on `127.0.0.1` with a free port.
    pub fn start() -> anyhow::Result<ApiServer> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("fake-apiserver")
            .enable_all()
            .build()
            .context("building the fake API server runtime")?;
        let listener =
            std::net::TcpListener::bind("127.0.0.1:0").context("binding the fake API server")?;
        let port = listener.local_addr()?.port();
        let server_id = u64::from(std::process::id()) << 16 | u64::from(port);
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::new(server_id)),
            conns: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(0),
            accepting: AtomicBool::new(false),
            open_watches: AtomicUsize::new(0),
            bookmark_interval_ms: AtomicU64::new(1000),
            serves_service_cidrs: AtomicBool::new(true),
        });
        let server = ApiServer {
            shared,
            runtime: Some(runtime),
            port,
            accept: Mutex::new(None),
        };
        server.serve(listener)?;
        Ok(server)
    }

    fn handle(&self) -> anyhow::Result<&tokio::runtime::Handle> {
        Ok(self
            .runtime
            .as_ref()
            .context("the fake API server runtime is gone")?
            .handle())
    }

    fn serve(&self, listener: std::net::TcpListener) -> anyhow::Result<()> {
        listener.set_nonblocking(true)?;
        let handle = self.handle()?;
        let listener = {
            let _guard = handle.enter();
            tokio::net::TcpListener::from_std(listener)?
        };
        self.shared.accepting.store(true, Ordering::SeqCst);
        let task = handle.spawn(accept_loop(self.shared.clone(), listener));
        *self.accept.lock().unwrap_or_else(|e| e.into_inner()) = Some(task.abort_handle());
        Ok(())
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The listening address (stable across `stop`/`resume`).
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Writes `dir/kubeconfig` pointing at this server without credentials.
    pub fn kubeconfig(&self, dir: &Path) -> anyhow::Result<PathBuf> {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\n\
             current-context: fake\nusers:\n- name: fake\n  user: {{}}\npreferences: {{}}\n",
            self.url()
        );
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// How often watches with `allowWatchBookmarks=true` get a BOOKMARK
    /// (default 1 s); applies to watches started afterwards.
    pub fn set_bookmark_interval(&self, interval: Duration) {
        let ms = u64::try_from(interval.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        self.shared.bookmark_interval_ms.store(ms, Ordering::SeqCst);
    }

    /// How many writes are kept for watch replay (default 100 000); older
    /// versions get 410 Expired.
    pub fn set_history_limit(&self, limit: usize) {
        let mut store = self.shared.store();
        store.history_limit = limit;
        while store.history.len() > limit {
            if let Some(old) = store.history.pop_front() {
                store.floor = old.rv;
            }
        }
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.store().rv
    }

    fn write_typed<K: k8s_openapi::Resource + Serialize>(
        &self,
        obj: &K,
        mode: WriteMode,
    ) -> anyhow::Result<Value> {
        let kind = Kind::of::<K>()?;
        let value = serde_json::to_value(obj)?;
        let stored = self
            .shared
            .store()
            .write(kind, None, value, mode, false)
            .map_err(|e| anyhow::anyhow!("{} ({})", e.message, e.code))?;
        Ok((*stored).clone())
    }

    /// Creates an object (namespace "default" if unset); fails if it exists.
    /// Returns the stored object.
    pub fn create<K: k8s_openapi::Resource + Serialize>(&self, obj: &K) -> anyhow::Result<Value> {
        self.write_typed(obj, WriteMode::Create)
    }

    /// Replaces an existing object, whatever its resourceVersion.
    pub fn update<K: k8s_openapi::Resource + Serialize>(&self, obj: &K) -> anyhow::Result<Value> {
        self.write_typed(obj, WriteMode::Update)
    }

    /// Creates or replaces an object.
    pub fn apply<K: k8s_openapi::Resource + Serialize>(&self, obj: &K) -> anyhow::Result<Value> {
        self.write_typed(obj, WriteMode::Upsert)
    }

    /// Creates or replaces many objects under one lock (one version each).
    pub fn apply_all<K: k8s_openapi::Resource + Serialize>(
        &self,
        objs: &[K],
    ) -> anyhow::Result<()> {
        let kind = Kind::of::<K>()?;
        let values = objs
            .iter()
            .map(serde_json::to_value)
            .collect::<Result<Vec<_>, _>>()?;
        let mut store = self.shared.store();
        for value in values {
            store
                .write(kind, None, value, WriteMode::Upsert, false)
                .map_err(|e| anyhow::anyhow!("{} ({})", e.message, e.code))?;
        }
        Ok(())
    }

    /// Creates or replaces an object given as JSON with `apiVersion` and `kind`.
    pub fn apply_json(&self, obj: Value) -> anyhow::Result<Value> {
        let api_version = obj.get("apiVersion").and_then(Value::as_str).unwrap_or("");
        let kind_name = obj.get("kind").and_then(Value::as_str).unwrap_or("");
        let kind = Kind::from_type(api_version, kind_name).with_context(|| {
            format!("the fake API server does not serve {api_version}/{kind_name}")
        })?;
        let stored = self
            .shared
            .store()
            .write(kind, None, obj, WriteMode::Upsert, false)
            .map_err(|e| anyhow::anyhow!("{} ({})", e.message, e.code))?;
        Ok((*stored).clone())
    }

    /// Deletes an object; `namespace` is ignored for cluster-scoped kinds.
    pub fn delete<K: k8s_openapi::Resource>(
        &self,
        namespace: &str,
        name: &str,
    ) -> anyhow::Result<()> {
        let kind = Kind::of::<K>()?;
        self.shared
            .store()
            .delete(kind, namespace, name)
            .map_err(|e| anyhow::anyhow!("{} ({})", e.message, e.code))?;
        Ok(())
    }

    /// The stored object, if any.
    pub fn get<K: k8s_openapi::Resource>(&self, namespace: &str, name: &str) -> Option<Value> {
        let kind = Kind::of::<K>().ok()?;
        self.shared
            .store()
            .get(kind, namespace, name)
            .map(|v| (*v).clone())
    }

    /// Aborts every connection that is streaming a watch (the client sees
    /// the response end without the final chunk).
    pub fn drop_watches(&self) {
        let victims: Vec<u64> = self
            .shared
            .conns()
            .iter()
            .filter(|(_, c)| c.watches.load(Ordering::SeqCst) > 0)
            .map(|(id, c)| {
                c.abort.abort();
                *id
            })
            .collect();
        self.wait_until(|| {
            let conns = self.shared.conns();
            victims.iter().all(|id| !conns.contains_key(id))
        });
    }

    /// Forgets the event history: a watch or a `resourceVersionMatch` list
    /// from any version handed out so far gets 410 Expired, and so do
    /// outstanding `continue` tokens. Streaming watches are not affected.
    pub fn compact(&self) {
        self.shared.store().compact();
    }

    /// Stops listening and kills every open connection; connecting to the
    /// port is refused until [`ApiServer::resume`].
    pub fn stop(&self) {
        if let Some(accept) = self.accept.lock().unwrap_or_else(|e| e.into_inner()).take() {
            accept.abort();
        }
        self.wait_until(|| !self.shared.accepting.load(Ordering::SeqCst));
        for conn in self.shared.conns().values() {
            conn.abort.abort();
        }
        self.wait_until(|| self.shared.conns().is_empty());
    }

    /// Listens again on the same port after [`ApiServer::stop`].
    pub fn resume(&self) -> anyhow::Result<()> {
        if self.shared.accepting.load(Ordering::SeqCst) {
            return Ok(());
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        // std sets SO_REUSEADDR on Unix, so only a racing user of the port
        // can make this fail; retry briefly in case that is transient.
        let listener = loop {
            match std::net::TcpListener::bind(self.addr()) {
                Ok(l) => break l,
                Err(e) if std::time::Instant::now() >= deadline => {
                    return Err(e).with_context(|| format!("rebinding {}", self.addr()));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        self.serve(listener)
    }

    fn wait_until(&self, mut done: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !done() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The recorded Events (both `events.k8s.io/v1` and core `v1`), as stored now.
    pub fn events(&self) -> Vec<Value> {
        self.event_records().into_iter().map(|r| r.object).collect()
    }

    /// The recorded Events with how many creates and patches they received.
    pub fn event_records(&self) -> Vec<EventRecord> {
        let store = self.shared.store();
        let mut out = Vec::new();
        for kind in [Kind::Event, Kind::CoreEvent] {
            for ((ns, name), obj) in store.objects.get(&kind).into_iter().flatten() {
                let (creates, patches) = store
                    .event_counts
                    .get(&(kind, ns.clone(), name.clone()))
                    .copied()
                    .unwrap_or_default();
                out.push(EventRecord {
                    object: (**obj).clone(),
                    creates,
                    patches,
                });
            }
        }
        out
    }

    /// Every request answered so far, in order.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared.store().requests.clone()
    }

    /// The distinct `(verb, apiGroup, resource)` triples used, to compare
    /// with a ClusterRole. Non-resource URLs are left out.
    pub fn rbac_usage(&self) -> BTreeSet<(String, String, String)> {
        self.shared
            .store()
            .requests
            .iter()
            .filter(|r| !r.resource.is_empty())
            .map(|r| (r.verb.clone(), r.group.clone(), r.resource.clone()))
            .collect()
    }

    fn count<K: k8s_openapi::Resource>(&self, verb: &str) -> usize {
        self.shared
            .store()
            .requests
            .iter()
            .filter(|r| r.verb == verb && r.group == K::GROUP && r.resource == K::URL_PATH_SEGMENT)
            .count()
    }

    /// From now on, answer requests for ServiceCIDRs 404, as an API server
    /// that does not serve them (before Kubernetes 1.33).
    pub fn stop_serving_service_cidrs(&self) {
        self.shared
            .serves_service_cidrs
            .store(false, Ordering::SeqCst);
    }

    /// List requests (every page counts) for resource `K`.
    pub fn list_count<K: k8s_openapi::Resource>(&self) -> usize {
        self.count::<K>("list")
    }

    /// Watch requests for resource `K`.
    pub fn watch_count<K: k8s_openapi::Resource>(&self) -> usize {
        self.count::<K>("watch")
    }

    /// Watch responses streaming right now.
    pub fn open_watches(&self) -> usize {
        self.shared.open_watches.load(Ordering::SeqCst)
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        // `shutdown_background` because tests may drop this inside another
        // runtime, where a blocking shutdown would panic.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

// ---------------------------------------------------------------------------
// Connections
// ---------------------------------------------------------------------------

/// Clears a flag or a registry entry when the owning task ends or is aborted.
struct OnDrop<F: FnMut()>(F);

impl<F: FnMut()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        (self.0)();
    }
}

async fn accept_loop(shared: Arc<Shared>, listener: tokio::net::TcpListener) {
    let flag = shared.clone();
    let _accepting = OnDrop(move || flag.accepting.store(false, Ordering::SeqCst));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // EMFILE and the like: back off instead of spinning.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let id = shared.next_conn.fetch_add(1, Ordering::SeqCst);
        let watches = Arc::new(AtomicUsize::new(0));
        // Hold the registry lock across spawn so the task cannot deregister
        // itself before it is registered.
        let mut conns = shared.conns();
        let task = tokio::spawn(serve_connection(
            shared.clone(),
            id,
            stream,
            watches.clone(),
        ));
        conns.insert(
            id,
            ConnEntry {
                abort: task.abort_handle(),
                watches,
            },
        );
    }
}

async fn serve_connection(
    shared: Arc<Shared>,
    id: u64,
    stream: tokio::net::TcpStream,
    watches: Arc<AtomicUsize>,
) {
    let registry = shared.clone();
    let _registered = OnDrop(move || {
        registry.conns().remove(&id);
    });
    let service = hyper::service::service_fn(move |req| {
        let shared = shared.clone();
        let watches = watches.clone();
        async move { Ok::<_, Infallible>(handle(shared, watches, req).await) }
    });
    // Errors here are client disconnects; nothing to report.
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

fn json_response(code: u16, body: &impl Serialize) -> Response<RespBody> {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut resp = Response::new(Full::new(Bytes::from(bytes)).boxed_unsync());
    *resp.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}

fn error_response(err: &ApiError) -> Response<RespBody> {
    json_response(err.code, &err.status())
}

/// A request path split into its API parts.
#[derive(Debug, Default)]
struct Target {
    group: String,
    version: String,
    resource: String,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

/// Splits `/api/v1/...` and `/apis/GROUP/VERSION/...`; `None` for
/// non-resource paths.
fn parse_target(path: &str) -> Option<Target> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segs.as_slice() {
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return None,
    };
    let mut target = Target {
        group: group.to_string(),
        version: version.to_string(),
        ..Target::default()
    };
    let rest = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => {
            target.namespace = Some(ns.to_string());
            rest
        }
        rest => rest,
    };
    match rest {
        [] => return None,
        [resource] => target.resource = resource.to_string(),
        [resource, name] => {
            target.resource = resource.to_string();
            target.name = Some(name.to_string());
        }
        [resource, name, sub] => {
            target.resource = resource.to_string();
            target.name = Some(name.to_string());
            target.subresource = Some(sub.to_string());
        }
        _ => target.resource = rest.join("/"),
    }
    Some(target)
}

async fn handle(
    shared: Arc<Shared>,
    conn_watches: Arc<AtomicUsize>,
    req: Request<Incoming>,
) -> Response<RespBody> {
    let method = req.method().clone();
    let uri = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let path = req.uri().path().to_string();
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let query = Query::parse(req.uri().query().unwrap_or(""));
    let body = req.into_body().collect().await.map(|b| b.to_bytes());

    let target = parse_target(&path);
    let watch = query
        .as_ref()
        .ok()
        .and_then(|q| q.flag("watch").ok())
        .unwrap_or(false);
    let verb = match (&target, &method) {
        (None, m) => m.as_str().to_ascii_lowercase(),
        (Some(t), &Method::GET) if t.name.is_some() => "get".into(),
        (Some(_), &Method::GET) if watch => "watch".into(),
        (Some(_), &Method::GET) => "list".into(),
        (Some(_), &Method::POST) => "create".into(),
        (Some(_), &Method::PUT) => "update".into(),
        (Some(_), &Method::PATCH) => "patch".into(),
        (Some(t), &Method::DELETE) if t.name.is_some() => "delete".into(),
        (Some(_), &Method::DELETE) => "deletecollection".into(),
        (Some(_), m) => m.as_str().to_ascii_lowercase(),
    };

    let result = match (query, body) {
        (Err(e), _) => Err(e),
        (_, Err(_)) => Err(ApiError::bad_request("could not read the request body")),
        (Ok(query), Ok(body)) => match &target {
            None => Ok(non_resource(&path)),
            Some(target) => {
                dispatch(
                    &shared,
                    &conn_watches,
                    &verb,
                    target,
                    &query,
                    &content_type,
                    &body,
                )
                .await
            }
        },
    };
    let resp = result.unwrap_or_else(|e| error_response(&e));
    let record = RequestRecord {
        verb,
        group: target.as_ref().map(|t| t.group.clone()).unwrap_or_default(),
        resource: target
            .as_ref()
            .map(|t| match &t.subresource {
                Some(sub) => format!("{}/{sub}", t.resource),
                None => t.resource.clone(),
            })
            .unwrap_or_default(),
        namespace: target.as_ref().and_then(|t| t.namespace.clone()),
        name: target.as_ref().and_then(|t| t.name.clone()),
        uri,
        status: resp.status().as_u16(),
    };
    shared.store().requests.push(record);
    resp
}

/// Discovery and health endpoints, for clients that probe them.
fn non_resource(path: &str) -> Response<RespBody> {
    let resource_list = |group_version: &str, kinds: &[Kind]| {
        let resources: Vec<Value> = kinds
            .iter()
            .map(|k| {
                json!({
                    "name": k.plural(),
                    "singularName": k.kind().to_ascii_lowercase(),
                    "namespaced": k.namespaced(),
                    "kind": k.kind(),
                    "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
                })
            })
            .collect();
        json!({
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": group_version,
            "resources": resources,
        })
    };
    let group = |name: &str| {
        let gv = format!("{name}/v1");
        json!({
            "name": name,
            "versions": [{"groupVersion": gv, "version": "v1"}],
            "preferredVersion": {"groupVersion": gv, "version": "v1"},
        })
    };
    match path.trim_end_matches('/') {
        "/version" => json_response(
            200,
            &json!({
                "major": "1", "minor": "33", "gitVersion": "v1.33.0-fake",
                "gitCommit": "", "gitTreeState": "clean", "buildDate": "1970-01-01T00:00:00Z",
                "goVersion": "", "compiler": "", "platform": "linux/amd64",
            }),
        ),
        "/api" => json_response(
            200,
            &json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}),
        ),
        "/apis" => json_response(
            200,
            &json!({
                "kind": "APIGroupList", "apiVersion": "v1",
                "groups": [
                    group("discovery.k8s.io"),
                    group("events.k8s.io"),
                    group("networking.k8s.io"),
                ],
            }),
        ),
        "/api/v1" => json_response(
            200,
            &resource_list("v1", &[Kind::Service, Kind::Node, Kind::CoreEvent]),
        ),
        "/apis/discovery.k8s.io/v1" => json_response(
            200,
            &resource_list("discovery.k8s.io/v1", &[Kind::EndpointSlice]),
        ),
        "/apis/networking.k8s.io/v1" => json_response(
            200,
            &resource_list("networking.k8s.io/v1", &[Kind::ServiceCidr]),
        ),
        "/apis/events.k8s.io/v1" => {
            json_response(200, &resource_list("events.k8s.io/v1", &[Kind::Event]))
        }
        "/healthz" | "/livez" | "/readyz" => {
            let mut resp = Response::new(Full::new(Bytes::from_static(b"ok")).boxed_unsync());
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain"),
            );
            resp
        }
        _ => error_response(&ApiError::not_found(format!(
            "the server could not find the requested resource ({path})"
        ))),
    }
}

fn parse_body(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))
}

async fn dispatch(
    shared: &Arc<Shared>,
    conn_watches: &Arc<AtomicUsize>,
    verb: &str,
    target: &Target,
    query: &Query,
    content_type: &str,
    body: &[u8],
) -> Result<Response<RespBody>, ApiError> {
    let not_found = || {
        ApiError::not_found(format!(
            "the server could not find the requested resource ({}/{} {})",
            target.group, target.version, target.resource
        ))
    };
    let kind =
        Kind::from_path(&target.group, &target.version, &target.resource).ok_or_else(not_found)?;
    if kind == Kind::ServiceCidr && !shared.serves_service_cidrs.load(Ordering::SeqCst) {
        return Err(not_found());
    }
    if target.subresource.is_some() || (target.namespace.is_some() && !kind.namespaced()) {
        return Err(not_found());
    }
    // A named namespaced object needs its namespace in the path.
    if target.name.is_some() && kind.namespaced() && target.namespace.is_none() {
        return Err(not_found());
    }
    let ns = target.namespace.as_deref();
    let name = target.name.as_deref().unwrap_or("");
    match verb {
        "get" => {
            let obj = shared
                .store()
                .get(kind, ns.unwrap_or(""), name)
                .ok_or_else(|| {
                    ApiError::not_found(format!("{} \"{name}\" not found", kind.plural()))
                })?;
            Ok(json_response(200, &*obj))
        }
        "list" => list(shared, kind, ns, query),
        "watch" => watch(shared, conn_watches, kind, ns, query),
        "create" => {
            let obj = parse_body(body)?;
            let stored = shared
                .store()
                .write(kind, ns, obj, WriteMode::Create, false)?;
            bump_event_count(shared, kind, &stored, true);
            Ok(json_response(201, &*stored))
        }
        "update" => {
            let obj = parse_body(body)?;
            if meta_str(&obj, "name").is_some_and(|n| n != name) {
                return Err(ApiError::bad_request(
                    "the name of the object does not match the name on the URL",
                ));
            }
            let stored = shared
                .store()
                .write(kind, ns, obj, WriteMode::Update, true)?;
            bump_event_count(shared, kind, &stored, false);
            Ok(json_response(200, &*stored))
        }
        "patch" => {
            let media = content_type.split(';').next().unwrap_or("").trim();
            if media != "application/merge-patch+json"
                && media != "application/strategic-merge-patch+json"
            {
                return Err(ApiError::new(
                    415,
                    "UnsupportedMediaType",
                    format!("the fake API server only supports merge patches, not {media:?}"),
                ));
            }
            let patch = parse_body(body)?;
            let mut store = shared.store();
            let current = store.get(kind, ns.unwrap_or(""), name).ok_or_else(|| {
                ApiError::not_found(format!("{} \"{name}\" not found", kind.plural()))
            })?;
            let mut obj = (*current).clone();
            merge_patch(&mut obj, &patch);
            // Identity fields come from the URL, whatever the patch says.
            if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
                meta.insert("name".into(), name.into());
                if let Some(ns) = ns {
                    meta.insert("namespace".into(), ns.into());
                }
            }
            let stored = store.write(kind, ns, obj, WriteMode::Update, true)?;
            drop(store);
            bump_event_count(shared, kind, &stored, false);
            Ok(json_response(200, &*stored))
        }
        "delete" => {
            let gone = shared.store().delete(kind, ns.unwrap_or(""), name)?;
            Ok(json_response(200, &*gone))
        }
        _ => Err(ApiError::new(
            405,
            "MethodNotAllowed",
            format!("{verb} is not supported by the fake API server"),
        )),
    }
}

fn bump_event_count(shared: &Shared, kind: Kind, obj: &Value, create: bool) {
    if !matches!(kind, Kind::Event | Kind::CoreEvent) {
        return;
    }
    let key = (
        kind,
        meta_str(obj, "namespace").unwrap_or("").to_string(),
        meta_str(obj, "name").unwrap_or("").to_string(),
    );
    let mut store = shared.store();
    let counts = store.event_counts.entry(key).or_default();
    if create {
        counts.0 += 1;
    } else {
        counts.1 += 1;
    }
}

/// Parses `resourceVersion`: `None` for "" and "0" ("any"/"now").
fn parse_rv(query: &Query) -> Result<Option<u64>, ApiError> {
    match query.get("resourceVersion") {
        None | Some("" | "0") => Ok(None),
        Some(v) => v
            .parse()
            .map(Some)
            .map_err(|_| ApiError::bad_request(format!("resourceVersion: Invalid value: {v:?}"))),
    }
}

fn list(
    shared: &Shared,
    kind: Kind,
    ns: Option<&str>,
    query: &Query,
) -> Result<Response<RespBody>, ApiError> {
    let filter = query.filter(kind, ns)?;
    let limit = query.number("limit")?.unwrap_or(0);
    let rv_match = query.get("resourceVersionMatch").filter(|m| !m.is_empty());
    let rv = parse_rv(query)?;
    let mut store = shared.store();
    let (snapshot_id, list_rv, items, offset) = match query
        .get("continue")
        .filter(|c| !c.is_empty())
    {
        Some(token) => {
            if query.get("resourceVersion").is_some_and(|v| !v.is_empty()) {
                return Err(ApiError::bad_request(
                    "specifying resource version is not allowed when using continue",
                ));
            }
            let (id, offset) = decode_continue(token)
                .ok_or_else(|| ApiError::bad_request("continue key is not valid"))?;
            let snapshot = store.snapshots.get(&id).ok_or_else(|| {
                ApiError::expired(
                    "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
                )
            })?;
            (Some(id), snapshot.rv, snapshot.items.clone(), offset)
        }
        None => {
            match (rv_match, rv) {
                (Some(m), _) if m != "NotOlderThan" && m != "Exact" => {
                    return Err(ApiError::bad_request(format!(
                        "resourceVersionMatch: Unsupported value: {m:?}"
                    )));
                }
                (Some(_), None) if query.get("resourceVersion").is_none() => {
                    return Err(ApiError::bad_request(
                        "resourceVersionMatch is forbidden unless resourceVersion is provided",
                    ));
                }
                (Some(_), Some(r)) if r < store.floor => {
                    return Err(ApiError::expired(format!(
                        "too old resource version: {r} ({})",
                        store.floor
                    )));
                }
                (_, Some(r)) if r > store.rv => {
                    return Err(ApiError::new(
                        504,
                        "Timeout",
                        format!("Too large resource version: {r}, current: {}", store.rv),
                    ));
                }
                _ => {}
            }
            (None, store.rv, store.select(&filter), 0)
        }
    };
    let offset = offset.min(items.len());
    let end = if limit == 0 {
        items.len()
    } else {
        offset
            .saturating_add(usize::try_from(limit).unwrap_or(usize::MAX))
            .min(items.len())
    };
    let mut metadata = Map::new();
    metadata.insert("resourceVersion".into(), list_rv.to_string().into());
    if end < items.len() {
        let id = match snapshot_id {
            Some(id) => id,
            None => {
                let id = store.next_snapshot;
                store.next_snapshot += 1;
                store.snapshots.insert(
                    id,
                    Snapshot {
                        rv: list_rv,
                        items: items.clone(),
                    },
                );
                while store.snapshots.len() > SNAPSHOT_LIMIT {
                    store.snapshots.pop_first();
                }
                id
            }
        };
        metadata.insert("continue".into(), encode_continue(id, list_rv, end).into());
        metadata.insert("remainingItemCount".into(), (items.len() - end).into());
    }
    drop(store);

    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct List<'a> {
        kind: String,
        api_version: &'static str,
        metadata: Map<String, Value>,
        items: Vec<&'a Value>,
    }
    let list = List {
        kind: format!("{}List", kind.kind()),
        api_version: kind.api_version(),
        metadata,
        items: items[offset..end].iter().map(|v| v.as_ref()).collect(),
    };
    Ok(json_response(200, &list))
}

// ---------------------------------------------------------------------------
// Watches
// ---------------------------------------------------------------------------

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = format!("{{\"type\":\"{kind}\",\"object\":").into_bytes();
    // Serializing a Value into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut line, object);
    line.extend_from_slice(b"}\n");
    Bytes::from(line)
}

struct WatchSpec {
    filter: Filter,
    bookmarks: bool,
    send_initial: bool,
    timeout: Duration,
    interval: Duration,
}

impl WatchSpec {
    /// What this watch sees of a change, after the selectors.
    fn render(&self, change: &Change) -> Option<Bytes> {
        if change.kind != self.filter.kind {
            return None;
        }
        let now = self.filter.matches(&change.object);
        let before = change.old.as_ref().is_some_and(|o| self.filter.matches(o));
        match change.change {
            ChangeType::Added if now => Some(event_line("ADDED", &change.object)),
            ChangeType::Deleted if before => Some(event_line("DELETED", &change.object)),
            ChangeType::Modified => match (before, now) {
                (true, true) => Some(event_line("MODIFIED", &change.object)),
                (false, true) => Some(event_line("ADDED", &change.object)),
                (true, false) => {
                    // Gone from this watcher's view: the last visible state,
                    // at the new version so the client's cursor moves on.
                    let mut last = change.old.as_deref().cloned().unwrap_or(Value::Null);
                    if let Some(meta) = last.get_mut("metadata").and_then(Value::as_object_mut) {
                        meta.insert("resourceVersion".into(), change.rv.to_string().into());
                    }
                    Some(event_line("DELETED", &last))
                }
                (false, false) => None,
            },
            _ => None,
        }
    }

    fn bookmark(&self, rv: u64, initial_end: bool) -> Bytes {
        let mut metadata = json!({"resourceVersion": rv.to_string()});
        if initial_end {
            metadata["annotations"] = json!({INITIAL_EVENTS_END: "true"});
        }
        let kind = self.filter.kind;
        event_line(
            "BOOKMARK",
            &json!({"kind": kind.kind(), "apiVersion": kind.api_version(), "metadata": metadata}),
        )
    }
}

fn watch(
    shared: &Arc<Shared>,
    conn_watches: &Arc<AtomicUsize>,
    kind: Kind,
    ns: Option<&str>,
    query: &Query,
) -> Result<Response<RespBody>, ApiError> {
    let filter = query.filter(kind, ns)?;
    let bookmarks = query.flag("allowWatchBookmarks")?;
    let send_initial = query.flag("sendInitialEvents")?;
    if send_initial && (query.get("resourceVersionMatch") != Some("NotOlderThan") || !bookmarks) {
        return Err(ApiError::new(
            422,
            "Invalid",
            "sendInitialEvents requires resourceVersionMatch=NotOlderThan and allowWatchBookmarks=true",
        ));
    }
    let timeout = Duration::from_secs(query.number("timeoutSeconds")?.unwrap_or(1800));
    let rv = parse_rv(query)?;
    let spec = WatchSpec {
        filter,
        bookmarks,
        send_initial,
        timeout,
        interval: Duration::from_millis(shared.bookmark_interval_ms.load(Ordering::SeqCst)),
    };

    // Replay and registration happen under one lock so no write falls
    // between them.
    let mut store = shared.store();
    let mut initial = Vec::new();
    let mut live = None;
    let mut cursor = store.rv;
    match rv {
        Some(r) if r < store.floor => {
            let err = ApiError::expired(format!("too old resource version: {r} ({})", store.floor));
            initial.push(event_line("ERROR", &err.status()));
        }
        _ => {
            if rv.is_none() || send_initial {
                initial.extend(
                    store
                        .select(&spec.filter)
                        .iter()
                        .map(|o| event_line("ADDED", o)),
                );
            }
            if let Some(r) = rv.filter(|_| !send_initial) {
                let start = store.history.partition_point(|c| c.rv <= r);
                initial.extend(
                    store
                        .history
                        .iter()
                        .skip(start)
                        .filter_map(|c| spec.render(c)),
                );
                cursor = cursor.max(r);
            }
            let (tx, rx) = mpsc::unbounded_channel();
            store.watchers.push(tx);
            live = Some(rx);
        }
    }
    drop(store);

    let (tx, mut rx) = mpsc::channel::<Bytes>(64);
    tokio::spawn(run_watch(spec, initial, live, cursor, tx));

    conn_watches.fetch_add(1, Ordering::SeqCst);
    shared.open_watches.fetch_add(1, Ordering::SeqCst);
    let (counter, shared) = (conn_watches.clone(), shared.clone());
    let guard = OnDrop(move || {
        counter.fetch_sub(1, Ordering::SeqCst);
        shared.open_watches.fetch_sub(1, Ordering::SeqCst);
    });
    let stream = futures::stream::poll_fn(move |cx| {
        let _alive = &guard;
        rx.poll_recv(cx)
            .map(|line| line.map(|l| Ok::<_, Infallible>(Frame::data(l))))
    });
    let mut resp = Response::new(StreamBody::new(stream).boxed_unsync());
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}

/// Feeds one watch response: replay, first bookmark, then live changes and
/// periodic bookmarks until the timeout or the client goes away.
async fn run_watch(
    spec: WatchSpec,
    initial: Vec<Bytes>,
    live: Option<mpsc::UnboundedReceiver<Arc<Change>>>,
    mut cursor: u64,
    tx: mpsc::Sender<Bytes>,
) {
    let deadline = Instant::now() + spec.timeout;
    for line in initial {
        if tx.send(line).await.is_err() {
            return;
        }
    }
    // Without a live feed this was an ERROR response: end it.
    let Some(mut live) = live else { return };
    if spec.bookmarks
        && tx
            .send(spec.bookmark(cursor, spec.send_initial))
            .await
            .is_err()
    {
        return;
    }
    let mut next_bookmark = Instant::now() + spec.interval;
    loop {
        tokio::select! {
            change = live.recv() => {
                let Some(change) = change else { return };
                if change.rv <= cursor {
                    continue;
                }
                cursor = change.rv;
                if let Some(line) = spec.render(&change)
                    && tx.send(line).await.is_err()
                {
                    return;
                }
            }
            _ = tokio::time::sleep_until(next_bookmark), if spec.bookmarks => {
                if tx.send(spec.bookmark(cursor, false)).await.is_err() {
                    return;
                }
                next_bookmark = Instant::now() + spec.interval;
            }
            _ = tokio::time::sleep_until(deadline) => return,
            _ = tx.closed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use k8s_openapi::api::core::v1::{Node, ObjectReference, Service};
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use kube::api::{
        Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, VersionMatch, WatchEvent,
        WatchParams,
    };
    use kube::runtime::events::{Event, EventType, Recorder, Reporter};
    use kube::runtime::watcher;

    const WAIT: Duration = Duration::from_secs(5);

    fn client(server: &ApiServer) -> anyhow::Result<kube::Client> {
        let config = kube::Config::new(server.url().parse()?);
        Ok(kube::Client::try_from(config)?)
    }

    fn service(ns: &str, name: &str, labels: &[(&str, &str)]) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(ns.into()),
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..ObjectMeta::default()
            },
            ..Service::default()
        }
    }

    fn api_code<T: std::fmt::Debug>(result: Result<T, kube::Error>) -> u16 {
        match result {
            Err(kube::Error::Api(status)) => status.code,
            other => panic!("expected an API error, got {other:?}"),
        }
    }

    /// A watcher event reduced to what the tests compare.
    #[derive(Debug, Clone, PartialEq)]
    enum Seen {
        Init,
        InitApply(String),
        InitDone,
        Apply(String),
        Delete(String),
        Error(String),
    }

    /// Runs `kube::runtime::watcher` in a task and collects what it yields.
    struct Watch {
        rx: mpsc::UnboundedReceiver<Seen>,
        log: Vec<Seen>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Watch {
        fn start(api: Api<Service>, config: watcher::Config) -> Watch {
            let (tx, rx) = mpsc::unbounded_channel();
            let task = tokio::spawn(async move {
                let mut stream = watcher(api, config).boxed();
                while let Some(event) = stream.next().await {
                    let failed = event.is_err();
                    let seen = match event {
                        Ok(watcher::Event::Init) => Seen::Init,
                        Ok(watcher::Event::InitApply(o)) => {
                            Seen::InitApply(o.metadata.name.unwrap_or_default())
                        }
                        Ok(watcher::Event::InitDone) => Seen::InitDone,
                        Ok(watcher::Event::Apply(o)) => {
                            Seen::Apply(o.metadata.name.unwrap_or_default())
                        }
                        Ok(watcher::Event::Delete(o)) => {
                            Seen::Delete(o.metadata.name.unwrap_or_default())
                        }
                        Err(e) => Seen::Error(e.to_string()),
                    };
                    if tx.send(seen).is_err() {
                        return;
                    }
                    if failed {
                        // A crude backoff so a stopped server is not hammered.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            });
            Watch {
                rx,
                log: Vec::new(),
                task,
            }
        }

        /// Waits until `done(log)` holds, for at most [`WAIT`].
        async fn until(
            &mut self,
            what: &str,
            done: impl Fn(&[Seen]) -> bool,
        ) -> anyhow::Result<()> {
            let deadline = Instant::now() + WAIT;
            while !done(&self.log) {
                if Instant::now() >= deadline {
                    anyhow::bail!("timed out waiting for {what}; saw {:?}", self.log);
                }
                // Wake up now and then: `done` may look at the server too.
                let tick = Instant::now() + Duration::from_millis(20);
                match tokio::time::timeout_at(tick.min(deadline), self.rx.recv()).await {
                    Ok(Some(seen)) => self.log.push(seen),
                    Ok(None) => anyhow::bail!("watcher ended while waiting for {what}"),
                    Err(_) => {}
                }
            }
            Ok(())
        }

        fn count(&self, seen: &Seen) -> usize {
            self.log.iter().filter(|s| *s == seen).count()
        }

        /// The object names a reflector would hold after the log.
        fn state(&self) -> BTreeSet<String> {
            let (mut state, mut buffer) = (BTreeSet::new(), BTreeSet::new());
            for seen in &self.log {
                match seen {
                    Seen::Init => buffer.clear(),
                    Seen::InitApply(n) => {
                        buffer.insert(n.clone());
                    }
                    Seen::InitDone => state = std::mem::take(&mut buffer),
                    Seen::Apply(n) => {
                        state.insert(n.clone());
                    }
                    Seen::Delete(n) => {
                        state.remove(n);
                    }
                    Seen::Error(_) => {}
                }
            }
            state
        }
    }

    impl Drop for Watch {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    fn names(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn selectors_parse_and_match() {
        let sel = LabelSelector::parse("a=b, c==d,e!=f,g,!h,i in (x, y),j notin (z)").unwrap();
        assert_eq!(sel.0.len(), 7);
        let obj = |labels: Value| json!({"metadata": {"labels": labels}});
        assert!(sel.matches(&obj(
            json!({"a": "b", "c": "d", "g": "", "i": "y", "j": "w"})
        )));
        assert!(!sel.matches(&obj(json!({"a": "b", "c": "d", "g": "", "i": "z"}))));
        assert!(!sel.matches(&obj(
            json!({"a": "b", "c": "d", "g": "", "i": "x", "h": "1"})
        )));
        assert!(!sel.matches(&obj(
            json!({"a": "b", "c": "d", "e": "f", "g": "", "i": "x"})
        )));
        assert!(LabelSelector::parse("").unwrap().matches(&json!({})));
        for bad in [
            "a in (x",
            "a >= b",
            "in (x)",
            "a foo (x)",
            ",",
            "a=b=c",
            "!",
        ] {
            assert!(
                LabelSelector::parse(bad).is_err(),
                "{bad:?} should not parse"
            );
        }
        let fields =
            FieldSelector::parse("metadata.name=x,metadata.namespace!=kube-system").unwrap();
        assert!(fields.matches(&json!({"metadata": {"name": "x", "namespace": "default"}})));
        assert!(!fields.matches(&json!({"metadata": {"name": "x", "namespace": "kube-system"}})));
        assert!(FieldSelector::parse("spec.clusterIP=None").is_err());
        assert_eq!(
            decode_continue(&encode_continue(7, 42, 500)),
            Some((7, 500))
        );
        assert_eq!(decode_continue("zz"), None);
    }

    #[tokio::test]
    async fn watcher_sees_creates_updates_and_deletes() -> anyhow::Result<()> {
        let server = ApiServer::start()?;
        server.create(&service("default", "a", &[]))?;
        server.create(&service("default", "b", &[]))?;
        server.create(&service("other", "elsewhere", &[]))?;
        assert!(server.create(&service("default", "a", &[])).is_err());
        let client = client(&server)?;
        let mut w = Watch::start(
            Api::namespaced(client.clone(), "default"),
            watcher::Config::default(),
        );
        w.until("the initial list", |log| log.contains(&Seen::InitDone))
            .await?;
        assert_eq!(w.log[..1], [Seen::Init]);
        assert_eq!(w.state(), names(&["a", "b"]));

        server.create(&service("default", "c", &[]))?;
        w.until("c added", |log| log.contains(&Seen::Apply("c".into())))
            .await?;
        server.update(&service("default", "a", &[("app", "web")]))?;
        w.until("a modified", |log| log.contains(&Seen::Apply("a".into())))
            .await?;
        // An update that changes nothing is no event (and no new version).
        let rv = server.resource_version();
        server.apply(&service("default", "a", &[("app", "web")]))?;
        assert_eq!(server.resource_version(), rv);
        server.delete::<Service>("default", "b")?;
        w.until("b deleted", |log| log.contains(&Seen::Delete("b".into())))
            .await?;
        assert_eq!(w.state(), names(&["a", "c"]));
        assert_eq!(w.count(&Seen::Apply("a".into())), 1);

        let stored: Service = Api::namespaced(client.clone(), "default").get("a").await?;
        let meta = &stored.metadata;
        assert!(meta.uid.is_some() && meta.creation_timestamp.is_some());
        assert_eq!(
            meta.resource_version.as_deref(),
            Some(rv.to_string().as_str())
        );
        let all: Api<Service> = Api::all(client.clone());
        assert_eq!(all.list(&ListParams::default()).await?.items.len(), 3);
        assert_eq!(
            api_code(Api::<Service>::namespaced(client, "default").get("b").await),
            404
        );
        Ok(())
    }

    #[tokio::test]
    async fn label_selector_filters_and_relabelling_moves_objects() -> anyhow::Result<()> {
        let server = ApiServer::start()?;
        let proxy_name = "service.kubernetes.io/service-proxy-name";
        let headless = "service.kubernetes.io/headless";
        server.create(&service("default", "plain", &[]))?;
        server.create(&service("default", "proxied", &[(proxy_name, "other")]))?;
        server.create(&service("default", "headless", &[(headless, "")]))?;
        let client = client(&server)?;
        let selector = format!("!{proxy_name},!{headless}");
        let mut w = Watch::start(
            Api::all(client.clone()),
            watcher::Config::default().labels(&selector),
        );
        w.until("the initial list", |log| log.contains(&Seen::InitDone))
            .await?;
        assert_eq!(w.state(), names(&["plain"]));

        // Starting to match the excluding label: DELETED for this watcher.
        server.update(&service("default", "plain", &[(proxy_name, "other")]))?;
        w.until("plain leaves", |log| {
            log.contains(&Seen::Delete("plain".into()))
        })
        .await?;
        // Stopping to match it: ADDED.
        server.update(&service("default", "proxied", &[]))?;
        w.until("proxied joins", |log| {
            log.contains(&Seen::Apply("proxied".into()))
        })
        .await?;
        assert_eq!(w.state(), names(&["proxied"]));

        let api: Api<Service> = Api::all(client);
        let set = api
            .list(&ListParams::default().labels(&format!("{proxy_name} in (other,x)")))
            .await?;
        assert_eq!(set.items.len(), 1);
        assert_eq!(set.items[0].metadata.name.as_deref(), Some("plain"));
        let by_name = api
            .list(&ListParams::default().fields("metadata.name=headless"))
            .await?;
        assert_eq!(by_name.items.len(), 1);
        assert_eq!(
            api_code(api.list(&ListParams::default().labels("a in (b")).await),
            400
        );
        assert_eq!(
            api_code(api.list(&ListParams::default().fields("spec.type=x")).await),
            400
        );
        Ok(())
    }

    #[tokio::test]
    async fn watcher_paginates_a_large_list() -> anyhow::Result<()> {
        let server = ApiServer::start()?;
        let services: Vec<Service> = (0..1200)
            .map(|i| service("default", &format!("svc-{i:04}"), &[]))
            .collect();
        server.apply_all(&services)?;
        let mut w = Watch::start(Api::all(client(&server)?), watcher::Config::default());
        w.until("the initial list", |log| log.contains(&Seen::InitDone))
            .await?;
        let applied = w
            .log
            .iter()
            .filter(|s| matches!(s, Seen::InitApply(_)))
            .count();
        assert_eq!(applied, 1200);
        assert_eq!(w.state().len(), 1200);
        assert_eq!(server.list_count::<Service>(), 3);
        let lists: Vec<String> = server
            .requests()
            .into_iter()
            .filter(|r| r.verb == "list")
            .map(|r| r.uri)
            .collect();
        assert!(lists.iter().all(|u| u.contains("limit=500")), "{lists:?}");
        assert!(
            lists[1..].iter().all(|u| u.contains("continue=")),
            "{lists:?}"
        );

        // Pages come from the first page's snapshot even if writes interleave.
        let api: Api<Service> = Api::all(client(&server)?);
        let first = api.list(&ListParams::default().limit(1000)).await?;
        server.delete::<Service>("default", "svc-1199")?;
        let token = first.metadata.continue_.clone().unwrap_or_default();
        let second = api
            .list(&ListParams::default().limit(1000).continue_token(&token))
            .await?;
        assert_eq!(second.items.len(), 200);
        assert_eq!(
            second.metadata.resource_version,
            first.metadata.resource_version
        );
        server.compact();
        let expired = api
            .list(&ListParams::default().limit(1000).continue_token(&token))
            .await;
        assert_eq!(api_code(expired), 410);
        Ok(())
    }

    #[tokio::test]
    async fn compaction_and_dropped_watches_force_a_relist() -> anyhow::Result<()> {
        let server = ApiServer::start()?;
        for name in ["a", "b", "c"] {
            server.create(&service("default", name, &[]))?;
        }
        let mut w = Watch::start(Api::all(client(&server)?), watcher::Config::default());
        w.until("the initial list", |log| log.contains(&Seen::InitDone))
            .await?;
        w.until("the watch", |_| server.open_watches() == 1).await?;
        let lists = server.list_count::<Service>();

        server.delete::<Service>("default", "c")?;
        server.compact();
        server.drop_watches();
        server.create(&service("default", "d", &[]))?;
        w.until("a second initial list", |log| {
            log.iter().filter(|s| **s == Seen::InitDone).count() == 2
        })
        .await?;
        assert_eq!(w.count(&Seen::Init), 2);
        assert!(
            w.log
                .iter()
                .any(|s| matches!(s, Seen::Error(e) if e.contains("410") || e.contains("Expired"))),
            "{:?}",
            w.log
        );
        assert!(server.list_count::<Service>() > lists);
        assert_eq!(w.state(), names(&["a", "b", "d"]));
        server.create(&service("default", "e", &[]))?;
        w.until("e added", |log| log.contains(&Seen::Apply("e".into())))
            .await?;
        assert_eq!(w.state(), names(&["a", "b", "d", "e"]));
        Ok(())
    }

    #[tokio::test]
    async fn watcher_recovers_after_stop_and_resume() -> anyhow::Result<()> {
        let server = ApiServer::start()?;
        server.create(&service("default", "a", &[]))?;
        let mut w = Watch::start(Api::all(client(&server)?), watcher::Config::default());
        w.until("the initial list", |log| log.contains(&Seen::InitDone))
            .await?;

        server.stop();
        assert!(tokio::net::TcpStream::connect(server.addr()).await.is_err());
        server.create(&service("default", "b", &[]))?;
        w.until("an error while stopped", |log| {
            log.iter().any(|s| matches!(s, Seen::Error(_)))
        })
        .await?;
        server.resume()?;
        w.until("b after resume", |log| {
            log.contains(&Seen::Apply("b".into()))
        })
        .await?;
        assert_eq!(w.state(), names(&["a", "b"]));
        // History survived, so this was a resumed watch, not a relist.
        assert_eq!(w.count(&Seen::Init), 1);
        Ok(())
    }

    #[tokio::test]
    async fn recorder_creates_then_patches_an_event() -> anyhow::Result<()> {
        let server = ApiServer::start()?;
        let recorder = Recorder::new(
            client(&server)?,
            Reporter {
                controller: "proxy-agent".into(),
                instance: Some("node-1".into()),
            },
        );
        let reference = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Service".into()),
            name: Some("web".into()),
            namespace: Some("default".into()),
            uid: Some("1234".into()),
            ..ObjectReference::default()
        };
        let event = Event {
            type_: EventType::Warning,
            reason: "NoEndpoints".into(),
            note: Some("no ready endpoints".into()),
            action: "Program".into(),
            secondary: None,
        };
        recorder.publish(&event, &reference).await?;
        recorder.publish(&event, &reference).await?;

        let records = server.event_records();
        assert_eq!(records.len(), 1, "{records:?}");
        assert_eq!((records[0].creates, records[0].patches), (1, 1));
        let ev = &server.events()[0];
        assert_eq!(ev["reason"], "NoEndpoints");
        assert_eq!(ev["type"], "Warning");
        assert_eq!(ev["regarding"]["name"], "web");
        assert_eq!(ev["reportingController"], "proxy-agent");
        assert_eq!(ev["series"]["count"], 2);
        assert_eq!(ev["metadata"]["namespace"], "default");
        let usage = server.rbac_usage();
        let triple = |v: &str| {
            (
                v.to_string(),
                "events.k8s.io".to_string(),
                "events".to_string(),
            )
        };
        assert_eq!(
            usage,
            [triple("create"), triple("patch")].into_iter().collect()
        );
        Ok(())
    }

    #[tokio::test]
    async fn requests_are_recorded_with_rbac_verbs() -> anyhow::Result<()> {
        let server = ApiServer::start()?;
        let dir = tempfile::tempdir()?;
        let kubeconfig = kube::config::Kubeconfig::read_from(server.kubeconfig(dir.path())?)?;
        let config = kube::Config::from_custom_kubeconfig(
            kubeconfig,
            &kube::config::KubeConfigOptions::default(),
        )
        .await?;
        let client = kube::Client::try_from(config)?;

        let api: Api<Service> = Api::default_namespaced(client.clone());
        api.create(&PostParams::default(), &service("default", "x", &[]))
            .await?;
        let mut svc = api.get("x").await?;
        assert_eq!(api.list(&ListParams::default()).await?.items.len(), 1);
        let stale = svc.clone();
        svc.metadata.labels = Some([("a".to_string(), "b".to_string())].into());
        api.replace("x", &PostParams::default(), &svc).await?;
        assert_eq!(
            api_code(api.replace("x", &PostParams::default(), &stale).await),
            409
        );
        let patch = json!({"metadata": {"labels": {"c": "d"}}});
        let patched = api
            .patch("x", &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        assert_eq!(patched.metadata.labels.map(|l| l.len()), Some(2));
        let mut stream = api
            .watch(&WatchParams::default().timeout(1), "0")
            .await?
            .boxed();
        assert!(matches!(
            stream.next().await,
            Some(Ok(WatchEvent::Added(_)))
        ));
        drop(stream);
        api.delete("x", &DeleteParams::default()).await?;

        let node = Node {
            metadata: ObjectMeta {
                name: Some("node-1".into()),
                ..ObjectMeta::default()
            },
            ..Node::default()
        };
        server.apply(&node)?;
        let slice = EndpointSlice {
            metadata: ObjectMeta {
                name: Some("x-abc".into()),
                namespace: Some("default".into()),
                ..ObjectMeta::default()
            },
            address_type: "IPv4".into(),
            ..EndpointSlice::default()
        };
        server.apply(&slice)?;
        let nodes = Api::<Node>::all(client.clone())
            .list(&ListParams::default())
            .await?;
        assert_eq!(nodes.items.len(), 1);
        assert!(nodes.items[0].metadata.namespace.is_none());
        let slices = Api::<EndpointSlice>::all(client.clone())
            .list(&ListParams::default())
            .await?;
        assert_eq!(slices.items[0].address_type, "IPv4");

        let triple = |v: &str, g: &str, r: &str| (v.to_string(), g.to_string(), r.to_string());
        let expected: BTreeSet<_> = [
            triple("create", "", "services"),
            triple("get", "", "services"),
            triple("list", "", "services"),
            triple("update", "", "services"),
            triple("patch", "", "services"),
            triple("watch", "", "services"),
            triple("delete", "", "services"),
            triple("list", "", "nodes"),
            triple("list", "discovery.k8s.io", "endpointslices"),
        ]
        .into_iter()
        .collect();
        assert_eq!(server.rbac_usage(), expected);
        let conflict = server
            .requests()
            .into_iter()
            .filter(|r| r.status == 409)
            .count();
        assert_eq!(conflict, 1);
        assert_eq!(server.watch_count::<Service>(), 1);
        Ok(())
    }

    #[tokio::test]
    async fn errors_are_status_objects() -> anyhow::Result<()> {
        let server = ApiServer::start()?;
        server.create(&service("default", "a", &[]))?;
        let client = client(&server)?;
        let api: Api<Service> = Api::all(client.clone());
        let old = server.resource_version().to_string();
        server.compact();

        // Watch from an expired version: HTTP 200, then an ERROR event.
        let mut stream = api.watch(&WatchParams::default(), &old).await?.boxed();
        match stream.next().await {
            Some(Ok(WatchEvent::Error(status))) => {
                assert_eq!((status.code, status.reason.as_str()), (410, "Expired"));
            }
            other => panic!("expected a 410 ERROR event, got {other:?}"),
        }
        assert!(stream.next().await.is_none());
        // A list pinned to it: HTTP 410.
        let pinned = ListParams::default()
            .at(&old)
            .matching(VersionMatch::NotOlderThan);
        assert_eq!(api_code(api.list(&pinned).await), 410);
        let namespaced: Api<Service> = Api::namespaced(client.clone(), "default");
        let dup = namespaced
            .create(&PostParams::default(), &service("default", "a", &[]))
            .await;
        assert_eq!(api_code(dup), 409);

        let raw = |method: &str, uri: &str, body: &[u8]| {
            hyper::Request::builder()
                .method(method)
                .uri(uri)
                .header("content-type", "application/json")
                .body(body.to_vec())
        };
        let cases = [
            ("GET", "/apis/example.com/v1/widgets", &b""[..], 404),
            ("GET", "/api/v1/namespaces/default/pods", b"", 404),
            ("GET", "/api/v1/services?limit=ten", b"", 400),
            ("GET", "/api/v1/services?labelSelector=%zz", b"", 400),
            (
                "GET",
                "/api/v1/services?watch=true&resourceVersion=abc",
                b"",
                400,
            ),
            (
                "POST",
                "/api/v1/namespaces/default/services",
                b"{not json",
                400,
            ),
            ("POST", "/api/v1/namespaces/default/services", b"[1]", 400),
            (
                "POST",
                "/api/v1/namespaces/default/services",
                b"{\"kind\":\"Node\"}",
                400,
            ),
            (
                "POST",
                "/api/v1/namespaces/default/services",
                b"{\"metadata\":{}}",
                422,
            ),
            ("PATCH", "/api/v1/namespaces/default/services/a", b"[]", 415),
            ("DELETE", "/api/v1/nodes/nope", b"", 404),
        ];
        for (method, uri, body, code) in cases {
            let result = client.request_text(raw(method, uri, body)?).await;
            assert_eq!(api_code(result), code, "{method} {uri}");
        }
        let version = client.apiserver_version().await?;
        assert_eq!(version.major, "1");
        Ok(())
    }

    #[tokio::test]
    async fn watches_send_bookmarks_and_honour_timeouts() -> anyhow::Result<()> {
        let server = ApiServer::start()?;
        server.set_bookmark_interval(Duration::from_millis(200));
        server.create(&service("default", "a", &[]))?;
        let client = client(&server)?;
        let api: Api<Service> = Api::all(client.clone());
        let start = Instant::now();
        let events: Vec<_> = tokio::time::timeout(
            Duration::from_secs(3),
            api.watch(&WatchParams::default().timeout(1), "0")
                .await?
                .collect::<Vec<_>>(),
        )
        .await?;
        assert!(start.elapsed() >= Duration::from_millis(900));
        let added = events
            .iter()
            .filter(|e| matches!(e, Ok(WatchEvent::Added(_))))
            .count();
        let bookmarks = events
            .iter()
            .filter(|e| matches!(e, Ok(WatchEvent::Bookmark(_))))
            .count();
        assert_eq!(added, 1);
        assert!(bookmarks >= 3, "{bookmarks} bookmarks");

        // Streaming lists finish their initial phase on the annotated bookmark.
        let mut w = Watch::start(api, watcher::Config::default().streaming_lists());
        w.until("the initial stream", |log| log.contains(&Seen::InitDone))
            .await?;
        assert_eq!(
            w.log,
            [Seen::Init, Seen::InitApply("a".into()), Seen::InitDone]
        );
        assert_eq!(server.list_count::<Service>(), 0);
        server.create(&service("default", "b", &[]))?;
        w.until("b", |log| log.contains(&Seen::Apply("b".into())))
            .await?;
        Ok(())
    }
}
