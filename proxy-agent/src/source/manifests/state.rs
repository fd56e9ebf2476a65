//! The synchronous core: per-file state (a fingerprint of the last
//! content, the last good objects, the current error) and the merged,
//! deterministic set of objects.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    hash::{DefaultHasher, Hasher},
    io::{self, Read},
    path::{Path, PathBuf},
};

use super::parse::{
    MAX_FILE_SIZE, ManifestObject, ObjectKey, is_manifest_file_name, parse_manifest,
};
use crate::model::ClusterState;

/// What one directory scan saw for one file: its bytes or why it could not
/// be read.
pub type FileRead = io::Result<Vec<u8>>;

/// Reads the manifest files directly in `dir` (not recursively), following
/// symlinks, skipping hidden and editor files, directories and anything else
/// that is not a regular file. Fails only when the directory itself cannot be
/// listed; a file that cannot be read is returned as its error.
pub fn read_manifest_dir(dir: &Path) -> io::Result<BTreeMap<PathBuf, FileRead>> {
    let mut files = BTreeMap::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if !is_manifest_file_name(&entry.file_name()) {
            continue;
        }
        let path = entry.path();
        match fs::metadata(&path) {
            Ok(meta) if meta.is_file() => {
                let read = read_file(&path);
                files.insert(path, read);
            }
            // Directories, FIFOs (reading one would block), sockets...
            Ok(_) => {}
            // Deleted since the listing: not there.
            Err(e)
                if e.kind() == io::ErrorKind::NotFound && fs::symlink_metadata(&path).is_err() => {}
            // A dangling symlink, a permission problem...: a broken file.
            Err(e) => {
                files.insert(path, Err(e));
            }
        }
    }
    Ok(files)
}

fn read_file(path: &Path) -> FileRead {
    let mut bytes = Vec::new();
    fs::File::open(path)?
        .take(MAX_FILE_SIZE + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_FILE_SIZE {
        return Err(io::Error::other(format!(
            "file is larger than {} MiB",
            MAX_FILE_SIZE / (1024 * 1024)
        )));
    }
    Ok(bytes)
}

/// The same object defined more than once; `kept` wins, being the lexically
/// first file (or, within one file, the first definition).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Duplicate {
    pub key: ObjectKey,
    pub kept: PathBuf,
    pub ignored: PathBuf,
}

/// Something worth telling the operator about, from one [`DirectoryState::update`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScanEvent {
    /// A new or changed file parsed and validated; its objects apply.
    Loaded { path: PathBuf, objects: usize },
    /// A file that was broken is good again; its objects apply.
    Recovered { path: PathBuf, objects: usize },
    /// A new or changed file is broken and skipped. `kept_last_good` says
    /// whether an earlier good version of it still applies, `saved` that
    /// this version is the copy a previous run saved (see
    /// [`DirectoryState::seed_saved`]).
    Broken {
        path: PathBuf,
        reason: String,
        kept_last_good: bool,
        saved: bool,
    },
    /// A file disappeared; its objects no longer apply.
    Removed { path: PathBuf },
    /// A newly seen duplicate definition.
    Duplicate(Duplicate),
}

/// The outcome of one [`DirectoryState::update`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScanReport {
    /// Whether the merged set of objects changed (so a new state is due).
    pub changed: bool,
    pub events: Vec<ScanEvent>,
}

/// What was last seen of a file: used to skip unchanged files (and not log
/// the same problem again).
#[derive(Debug, PartialEq, Eq)]
enum FileInput {
    Content(Fingerprint),
    ReadError(String),
    /// Not read yet: the good version is a saved copy.
    Saved,
}

/// A file's content as far as telling a change goes: its length and a
/// 64-bit SipHash of it. Keeping the bytes themselves cost as much memory
/// as the manifests (60 MB at 30 000 Services with their slices) for a
/// comparison that this answers as well: an edit that keeps both the
/// length and the hash has a chance of one in 2^64.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
struct Fingerprint {
    len: usize,
    hash: u64,
}

impl Fingerprint {
    fn of(bytes: &[u8]) -> Self {
        // Fixed keys: the same content gives the same hash in every scan.
        let mut hasher = DefaultHasher::new();
        hasher.write(bytes);
        Fingerprint {
            len: bytes.len(),
            hash: hasher.finish(),
        }
    }
}

#[derive(Debug)]
struct FileState {
    input: FileInput,
    /// Objects of the last version of the file that parsed and validated.
    good: Option<Vec<ManifestObject>>,
    /// Why the current version is broken, if it is.
    error: Option<String>,
}

/// The manifest directory as last scanned: per-file state and the merged
/// objects. Feed it complete scans with [`update`](Self::update).
#[derive(Debug, Default)]
pub struct DirectoryState {
    files: BTreeMap<PathBuf, FileState>,
    merged: BTreeMap<ObjectKey, ManifestObject>,
    /// The file each merged object comes from: it keeps the object while
    /// it defines it, whatever file defines it too later.
    merged_from: BTreeMap<ObjectKey, PathBuf>,
    duplicates: BTreeSet<Duplicate>,
    /// When each Service without a `creationTimestamp` was first seen; it
    /// stands in for one (see [`ServiceObject::first_seen_at`]).
    first_seen: BTreeMap<ObjectKey, jiff::Timestamp>,
}

impl DirectoryState {
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes a complete scan of the directory (every manifest file's path and
    /// content; paths not present are gone). Only files whose content (or
    /// read error) changed since the previous scan are parsed again.
    pub fn update(&mut self, scan: &BTreeMap<PathBuf, FileRead>) -> ScanReport {
        self.update_at(scan, jiff::Timestamp::now())
    }

    /// [`update`](Self::update) at time `now` (the first-seen time of the
    /// Services it finds without a creation time).
    pub fn update_at(
        &mut self,
        scan: &BTreeMap<PathBuf, FileRead>,
        now: jiff::Timestamp,
    ) -> ScanReport {
        let mut events = Vec::new();
        let removed: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|p| !scan.contains_key(*p))
            .cloned()
            .collect();
        let mut touched = !removed.is_empty();
        for path in removed {
            self.files.remove(&path);
            events.push(ScanEvent::Removed { path });
        }

        for (path, read) in scan {
            let path = path.clone();
            let input = match read {
                Ok(bytes) => FileInput::Content(Fingerprint::of(bytes)),
                Err(e) => FileInput::ReadError(e.to_string()),
            };
            if self.files.get(&path).is_some_and(|f| f.input == input) {
                continue;
            }
            let previous = self.files.remove(&path);
            touched = true;
            let was_broken = previous.as_ref().is_some_and(|p| p.error.is_some());
            let saved = previous
                .as_ref()
                .is_some_and(|p| p.input == FileInput::Saved);
            let last_good = previous.and_then(|p| p.good);
            let parsed = match &read {
                Ok(bytes) => parse_manifest(&path, bytes),
                Err(e) => Err(format!("cannot read file: {e}")),
            };
            let state = match parsed {
                Ok(objects) => {
                    let objects = self.stamp(objects, now);
                    let objects_len = objects.len();
                    events.push(if was_broken {
                        ScanEvent::Recovered {
                            path: path.clone(),
                            objects: objects_len,
                        }
                    } else {
                        ScanEvent::Loaded {
                            path: path.clone(),
                            objects: objects_len,
                        }
                    });
                    FileState {
                        input,
                        good: Some(objects),
                        error: None,
                    }
                }
                Err(reason) => {
                    events.push(ScanEvent::Broken {
                        path: path.clone(),
                        reason: reason.clone(),
                        kept_last_good: last_good.is_some(),
                        saved: saved && last_good.is_some(),
                    });
                    FileState {
                        input,
                        good: last_good,
                        error: Some(reason),
                    }
                }
            };
            self.files.insert(path, state);
        }

        if !touched {
            return ScanReport {
                changed: false,
                events,
            };
        }
        let changed = self.merge(&mut events);
        ScanReport { changed, events }
    }

    /// Takes `bytes`, the last good version of `path` that a previous run
    /// saved, as the version to keep should the file be broken at the next
    /// [`update`](Self::update); a file that is fine there replaces it.
    /// Returns how many objects it holds, or why it does not parse (then
    /// nothing is kept). Only before the file's first update. Its Services
    /// without a creation time are first seen at `now`, as an update's are.
    pub fn seed_saved(
        &mut self,
        path: PathBuf,
        bytes: &[u8],
        now: jiff::Timestamp,
    ) -> Result<usize, String> {
        if self.files.contains_key(&path) {
            return Err("the file was read already".to_string());
        }
        let objects = parse_manifest(&path, bytes)?;
        let objects = self.stamp(objects, now);
        let count = objects.len();
        self.files.insert(
            path,
            FileState {
                input: FileInput::Saved,
                good: Some(objects),
                error: None,
            },
        );
        Ok(count)
    }

    /// Gives the Services of `objects` that have no creation time the one
    /// they were first seen at (`now` for those new).
    fn stamp(&mut self, objects: Vec<ManifestObject>, now: jiff::Timestamp) -> Vec<ManifestObject> {
        objects
            .into_iter()
            .map(|object| match &object {
                ManifestObject::Service(service) if service.created().is_none() => {
                    let at = *self.first_seen.entry(object.key()).or_insert(now);
                    ManifestObject::Service(std::sync::Arc::new(service.first_seen_at(at)))
                }
                _ => object,
            })
            .collect()
    }

    /// Recomputes the merged objects; returns whether they changed.
    fn merge(&mut self, events: &mut Vec<ScanEvent>) -> bool {
        let mut merged: BTreeMap<ObjectKey, (&Path, &ManifestObject)> = BTreeMap::new();
        let mut duplicates = BTreeSet::new();
        // The file that held an object keeps it while it defines it (a new
        // file never moves a live object); otherwise, BTreeMap order: the
        // lexically first file wins.
        for (path, file) in &self.files {
            for object in file.good.iter().flatten() {
                let key = object.key();
                let Some((kept, _)) = merged.get(&key) else {
                    merged.insert(key, (path, object));
                    continue;
                };
                let (kept, ignored) =
                    if *kept != path.as_path() && self.merged_from.get(&key) == Some(path) {
                        let earlier = kept.to_path_buf();
                        merged.insert(key.clone(), (path, object));
                        (path.clone(), earlier)
                    } else {
                        (kept.to_path_buf(), path.clone())
                    };
                duplicates.insert(Duplicate { key, kept, ignored });
            }
        }
        self.merged_from = merged
            .iter()
            .map(|(k, (path, _))| (k.clone(), path.to_path_buf()))
            .collect();
        let merged: BTreeMap<ObjectKey, ManifestObject> = merged
            .into_iter()
            .map(|(k, (_, o))| (k, o.clone()))
            .collect();
        self.first_seen.retain(|key, _| merged.contains_key(key));
        events.extend(
            duplicates
                .difference(&self.duplicates)
                .cloned()
                .map(ScanEvent::Duplicate),
        );
        self.duplicates = duplicates;
        let changed = merged != self.merged;
        self.merged = merged;
        changed
    }

    /// The merged objects, sorted by kind, namespace and name.
    pub fn objects(&self) -> impl Iterator<Item = (&ObjectKey, &ManifestObject)> {
        self.merged.iter()
    }

    /// The files whose current version is broken, with the reason.
    pub fn broken_files(&self) -> impl Iterator<Item = (&Path, &str)> {
        self.files
            .iter()
            .filter_map(|(p, f)| f.error.as_deref().map(|e| (p.as_path(), e)))
    }

    /// The merged objects as a [`ClusterState`]; each list is sorted by
    /// namespace and name.
    pub fn cluster_state(&self) -> ClusterState {
        let mut state = ClusterState::default();
        for object in self.merged.values() {
            match object {
                ManifestObject::Service(s) => state.services.push(s.clone()),
                ManifestObject::EndpointSlice(e) => state.endpoint_slices.push(e.clone()),
                ManifestObject::Node(n) => state.nodes.push(n.clone()),
                ManifestObject::ServiceCidr(c) => state.service_cidrs.push(c.clone()),
            }
        }
        state
    }
}

#[cfg(test)]
mod tests {
    use super::super::parse::tests::{NODE_1, SERVICE_A, SLICE_A, service};
    use super::*;

    fn scan(files: &[(&str, &str)]) -> BTreeMap<PathBuf, FileRead> {
        files
            .iter()
            .map(|(p, c)| (PathBuf::from(p), Ok(c.as_bytes().to_vec())))
            .collect()
    }

    fn keys(state: &DirectoryState) -> Vec<String> {
        state.objects().map(|(k, _)| k.to_string()).collect()
    }

    fn cluster_ip(state: &DirectoryState, name: &str) -> Option<String> {
        state
            .cluster_state()
            .services
            .iter()
            .find(|s| s.identity.name.as_deref() == Some(name))
            .and_then(|s| Some(s.cluster_ips().first()?.to_string()))
    }

    fn broken(report: &ScanReport) -> Vec<(&Path, &str, bool)> {
        report
            .events
            .iter()
            .filter_map(|e| match e {
                ScanEvent::Broken {
                    path,
                    reason,
                    kept_last_good,
                    ..
                } => Some((path.as_path(), reason.as_str(), *kept_last_good)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn merges_files_sorted_by_kind_namespace_name() {
        let mut state = DirectoryState::new();
        let b = format!(
            "{}---\n{}",
            service("z", "10.96.0.3"),
            service("b", "10.96.0.2")
        );
        let report = state.update(&scan(&[
            ("d/1.yaml", NODE_1),
            ("d/2.yaml", SLICE_A),
            ("d/3.yaml", &b),
            ("d/4.yaml", SERVICE_A),
        ]));
        assert!(report.changed);
        assert_eq!(
            keys(&state),
            [
                "Service default/a",
                "Service default/b",
                "Service default/z",
                "EndpointSlice default/a-1",
                "Node node-1"
            ]
        );
        let cs = state.cluster_state();
        let names: Vec<_> = cs
            .services
            .iter()
            .filter_map(|s| s.identity.name.as_deref())
            .collect();
        assert_eq!(names, ["a", "b", "z"]);
        assert_eq!(cs.endpoint_slices.len(), 1);
        assert_eq!(cs.nodes.len(), 1);
        assert_eq!(state.broken_files().count(), 0);
    }

    #[test]
    fn unchanged_scan_reports_nothing() {
        let mut state = DirectoryState::new();
        assert!(state.update(&scan(&[("d/a.yaml", SERVICE_A)])).changed);
        let again = state.update(&scan(&[("d/a.yaml", SERVICE_A)]));
        assert_eq!(again, ScanReport::default());
        // A change that does not change the objects (a comment) is no change.
        let commented = format!("# hello\n{SERVICE_A}");
        let report = state.update(&scan(&[("d/a.yaml", &commented)]));
        assert!(!report.changed);
        // An empty directory at the start is not a change either (the shell
        // publishes the first scan regardless).
        assert!(!DirectoryState::new().update(&BTreeMap::new()).changed);
    }

    #[test]
    fn an_edit_that_keeps_the_length_is_seen() {
        // Only a fingerprint of each file is kept: an edit of the same
        // length must still be parsed again.
        let mut state = DirectoryState::new();
        assert!(state.update(&scan(&[("d/a.yaml", SERVICE_A)])).changed);
        let edited = SERVICE_A.replace("10.96.0.10", "10.96.0.11");
        assert_eq!(edited.len(), SERVICE_A.len());
        assert!(state.update(&scan(&[("d/a.yaml", &edited)])).changed);
        assert_eq!(cluster_ip(&state, "a").as_deref(), Some("10.96.0.11"));
        // And going back is a change too.
        assert!(state.update(&scan(&[("d/a.yaml", SERVICE_A)])).changed);
        assert_eq!(cluster_ip(&state, "a").as_deref(), Some("10.96.0.10"));
    }

    #[test]
    fn unknown_kind_breaks_the_whole_file() {
        let mut state = DirectoryState::new();
        let mixed =
            format!("{SERVICE_A}---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: c}}\n");
        let report = state.update(&scan(&[("d/mixed.yaml", &mixed), ("d/node.yaml", NODE_1)]));
        assert_eq!(keys(&state), ["Node node-1"]);
        let b = broken(&report);
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].0, Path::new("d/mixed.yaml"));
        assert!(b[0].1.contains("v1/ConfigMap"), "{}", b[0].1);
        assert!(!b[0].2);
        let listed: Vec<_> = state.broken_files().map(|(p, _)| p.to_path_buf()).collect();
        assert_eq!(listed, [PathBuf::from("d/mixed.yaml")]);
    }

    #[test]
    fn bad_yaml_is_skipped() {
        let mut state = DirectoryState::new();
        let report = state.update(&scan(&[
            ("d/bad.yaml", "kind: [unclosed\n"),
            ("d/a.yaml", SERVICE_A),
        ]));
        assert!(report.changed);
        assert_eq!(keys(&state), ["Service default/a"]);
        assert_eq!(broken(&report).len(), 1);
    }

    #[test]
    fn invalid_ip_is_skipped() {
        let mut state = DirectoryState::new();
        let report = state.update(&scan(&[
            ("d/bad.yaml", &service("bad", "10.96.0.256")),
            ("d/a.yaml", SERVICE_A),
        ]));
        assert_eq!(keys(&state), ["Service default/a"]);
        let b = broken(&report);
        assert_eq!(b.len(), 1);
        assert!(b[0].1.contains("Service default/bad"), "{}", b[0].1);
    }

    #[test]
    fn read_error_breaks_the_file() {
        let mut state = DirectoryState::new();
        let mut files = scan(&[("d/a.yaml", SERVICE_A)]);
        files.insert(
            "d/b.yaml".into(),
            Err(io::Error::other("permission denied")),
        );
        let report = state.update(&files);
        assert_eq!(keys(&state), ["Service default/a"]);
        assert!(broken(&report)[0].1.contains("permission denied"));
    }

    #[test]
    fn broken_file_keeps_last_good_objects_until_fixed() {
        let mut state = DirectoryState::new();
        state.update(&scan(&[("d/a.yaml", &service("a", "10.96.0.1"))]));
        assert_eq!(cluster_ip(&state, "a").as_deref(), Some("10.96.0.1"));

        // Broken: the old version stays, no change, one warning.
        let report = state.update(&scan(&[(
            "d/a.yaml",
            "apiVersion: v1\nkind: Service\nspec: [",
        )]));
        assert!(!report.changed);
        assert_eq!(broken(&report).len(), 1);
        assert!(broken(&report)[0].2, "kept last good");
        assert_eq!(cluster_ip(&state, "a").as_deref(), Some("10.96.0.1"));

        // Same broken content again: nothing new to say.
        let report = state.update(&scan(&[(
            "d/a.yaml",
            "apiVersion: v1\nkind: Service\nspec: [",
        )]));
        assert_eq!(report, ScanReport::default());

        // Broken differently (invalid IP): a new warning, still the old version.
        let report = state.update(&scan(&[("d/a.yaml", &service("a", "not-an-ip"))]));
        assert_eq!(broken(&report).len(), 1);
        assert_eq!(cluster_ip(&state, "a").as_deref(), Some("10.96.0.1"));

        // Fixed with new content: applies, and says it recovered.
        let report = state.update(&scan(&[("d/a.yaml", &service("a", "10.96.0.2"))]));
        assert!(report.changed);
        assert_eq!(
            report.events,
            [ScanEvent::Recovered {
                path: "d/a.yaml".into(),
                objects: 1
            }]
        );
        assert_eq!(cluster_ip(&state, "a").as_deref(), Some("10.96.0.2"));
        assert_eq!(state.broken_files().count(), 0);
    }

    #[test]
    fn file_that_never_parsed_contributes_nothing_until_fixed() {
        let mut state = DirectoryState::new();
        state.update(&scan(&[("d/a.yaml", "{{{")]));
        assert!(keys(&state).is_empty());
        let report = state.update(&scan(&[("d/a.yaml", SERVICE_A)]));
        assert!(report.changed);
        assert!(matches!(report.events[..], [ScanEvent::Recovered { .. }]));
        assert_eq!(keys(&state), ["Service default/a"]);
    }

    #[test]
    fn removed_file_removes_its_objects() {
        let mut state = DirectoryState::new();
        state.update(&scan(&[("d/a.yaml", SERVICE_A), ("d/n.yaml", NODE_1)]));
        let report = state.update(&scan(&[("d/n.yaml", NODE_1)]));
        assert!(report.changed);
        assert_eq!(
            report.events,
            [ScanEvent::Removed {
                path: "d/a.yaml".into()
            }]
        );
        assert_eq!(keys(&state), ["Node node-1"]);

        // Removing a broken file drops its last good objects too.
        state.update(&scan(&[("d/n.yaml", NODE_1), ("d/a.yaml", SERVICE_A)]));
        state.update(&scan(&[("d/n.yaml", NODE_1), ("d/a.yaml", "{{{")]));
        assert_eq!(keys(&state).len(), 2);
        assert!(state.update(&scan(&[("d/n.yaml", NODE_1)])).changed);
        assert_eq!(keys(&state), ["Node node-1"]);
        assert_eq!(state.broken_files().count(), 0);
    }

    #[test]
    fn duplicates_keep_the_file_that_had_them_else_the_lexically_first() {
        let mut state = DirectoryState::new();
        let first = service("a", "10.96.0.1");
        let second = service("a", "10.96.0.2");
        let report = state.update(&scan(&[("d/b.yaml", &second), ("d/a.yaml", &first)]));
        assert_eq!(cluster_ip(&state, "a").as_deref(), Some("10.96.0.1"));
        let dup = Duplicate {
            key: ObjectKey {
                kind: super::super::parse::ObjectKind::Service,
                namespace: "default".into(),
                name: "a".into(),
            },
            kept: "d/a.yaml".into(),
            ignored: "d/b.yaml".into(),
        };
        assert!(report.events.contains(&ScanEvent::Duplicate(dup.clone())));

        // Not reported again while it persists, even if other files change.
        let report = state.update(&scan(&[
            ("d/b.yaml", &second),
            ("d/a.yaml", &first),
            ("d/n.yaml", NODE_1),
        ]));
        assert!(
            !report
                .events
                .iter()
                .any(|e| matches!(e, ScanEvent::Duplicate(_)))
        );

        // Remove the winner: the other definition takes over.
        let report = state.update(&scan(&[("d/b.yaml", &second), ("d/n.yaml", NODE_1)]));
        assert!(report.changed);
        assert_eq!(cluster_ip(&state, "a").as_deref(), Some("10.96.0.2"));

        // A file added later never takes an object over, even one whose
        // name sorts first; it does once the holder goes.
        let report = state.update(&scan(&[
            ("d/b.yaml", &second),
            ("d/0.yaml", &first),
            ("d/n.yaml", NODE_1),
        ]));
        assert!(!report.changed);
        assert_eq!(cluster_ip(&state, "a").as_deref(), Some("10.96.0.2"));
        assert!(report.events.contains(&ScanEvent::Duplicate(Duplicate {
            kept: "d/b.yaml".into(),
            ignored: "d/0.yaml".into(),
            ..dup.clone()
        })));
        state.update(&scan(&[("d/0.yaml", &first), ("d/n.yaml", NODE_1)]));
        assert_eq!(cluster_ip(&state, "a").as_deref(), Some("10.96.0.1"));

        // Within one file, the first definition wins, in later scans too.
        let both = format!("{first}---\n{second}");
        let mut state = DirectoryState::new();
        let report = state.update(&scan(&[("d/x.yaml", &both)]));
        assert_eq!(cluster_ip(&state, "a").as_deref(), Some("10.96.0.1"));
        state.update(&scan(&[("d/x.yaml", &both), ("d/n.yaml", NODE_1)]));
        assert_eq!(cluster_ip(&state, "a").as_deref(), Some("10.96.0.1"));
        assert!(
            report
                .events
                .iter()
                .any(|e| matches!(e, ScanEvent::Duplicate(_)))
        );
    }

    #[test]
    fn services_without_a_creation_time_get_the_time_they_were_first_seen() {
        let mut state = DirectoryState::new();
        let t = |s: &str| -> jiff::Timestamp { s.parse().unwrap() };
        let created = |state: &DirectoryState, name: &str| {
            state
                .cluster_state()
                .services
                .iter()
                .find(|s| s.identity.name.as_deref() == Some(name))
                .and_then(|s| s.created())
        };
        let a = service("a", "10.96.0.1");
        state.update_at(&scan(&[("d/a.yaml", &a)]), t("2026-01-01T00:00:00Z"));
        let b = service("b", "10.96.0.1");
        let edited = service("a", "10.96.0.9");
        state.update_at(
            &scan(&[("d/a.yaml", &edited), ("d/b.yaml", &b)]),
            t("2026-01-01T00:01:00Z"),
        );
        // An edit keeps the first time; the newcomer is younger.
        assert_eq!(created(&state, "a"), Some(t("2026-01-01T00:00:00Z")));
        assert_eq!(created(&state, "b"), Some(t("2026-01-01T00:01:00Z")));
        // Gone, then back: new again.
        state.update_at(&scan(&[("d/b.yaml", &b)]), t("2026-01-01T00:02:00Z"));
        state.update_at(
            &scan(&[("d/a.yaml", &a), ("d/b.yaml", &b)]),
            t("2026-01-01T00:03:00Z"),
        );
        assert_eq!(created(&state, "a"), Some(t("2026-01-01T00:03:00Z")));
        // A saved copy applied for a broken file is dated like the rest.
        let mut seeded = DirectoryState::new();
        seeded
            .seed_saved(
                "d/s.yaml".into(),
                service("s", "10.96.0.5").as_bytes(),
                t("2026-01-01T00:05:00Z"),
            )
            .unwrap();
        seeded.update_at(&scan(&[("d/s.yaml", "{{{")]), t("2026-01-01T00:06:00Z"));
        assert_eq!(created(&seeded, "s"), Some(t("2026-01-01T00:05:00Z")));
        // A creation time in the file stands.
        let dated = service("c", "10.96.0.3").replace(
            "metadata:",
            "metadata:\n  creationTimestamp: \"2020-01-01T00:00:00Z\"",
        );
        state.update_at(&scan(&[("d/c.yaml", &dated)]), t("2026-01-01T00:04:00Z"));
        assert_eq!(created(&state, "c"), Some(t("2020-01-01T00:00:00Z")));
    }

    #[test]
    fn reads_directory_skipping_hidden_temp_and_non_files() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for name in ["a.yaml", "b.yml", "c.json", "D.YAML"] {
            fs::write(d.join(name), "").unwrap();
        }
        for name in [
            ".hidden.yaml",
            "a.yaml~",
            ".a.yaml.swp",
            "a.yaml.swp",
            "notes.txt",
            "#a.yaml#",
        ] {
            fs::write(d.join(name), "garbage: [").unwrap();
        }
        fs::create_dir(d.join("sub.yaml")).unwrap();
        fs::write(d.join("nested.yaml"), "").unwrap();
        fs::create_dir(d.join("sub")).unwrap();
        fs::write(d.join("sub/deep.yaml"), SERVICE_A).unwrap();
        std::os::unix::fs::symlink(d.join("sub/deep.yaml"), d.join("link.yaml")).unwrap();
        std::os::unix::fs::symlink(d.join("missing.yaml"), d.join("dangling.yaml")).unwrap();

        let files = read_manifest_dir(d).unwrap();
        let names: Vec<_> = files
            .keys()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "D.YAML",
                "a.yaml",
                "b.yml",
                "c.json",
                "dangling.yaml",
                "link.yaml",
                "nested.yaml"
            ]
        );
        assert!(files[&d.join("dangling.yaml")].is_err());
        assert_eq!(
            files[&d.join("link.yaml")].as_ref().unwrap(),
            SERVICE_A.as_bytes()
        );

        let mut state = DirectoryState::new();
        let report = state.update(&files);
        assert_eq!(keys(&state), ["Service default/a"]);
        let b = broken(&report);
        assert_eq!(b.len(), 1, "{b:?}");
        assert_eq!(b[0].0, d.join("dangling.yaml"));

        assert!(read_manifest_dir(&d.join("nope")).is_err());
    }
}
