//! The manifest-directory source: Services, EndpointSlices and Nodes read
//! from YAML/JSON files in one directory, for nodes outside Kubernetes, labs,
//! the demo and the integration tests.
//!
//! - Every `.yaml`, `.yml` and `.json` file directly in the directory is read
//!   (following symlinks, so a mounted ConfigMap works); hidden files and
//!   editor leftovers are ignored. Files may hold several `---` documents, a
//!   `v1` `List`, or (JSON) several concatenated objects.
//! - A file that cannot be read or parsed, holds an unsupported kind, or holds
//!   an object the model rejects is *broken*: it is skipped as a whole with a
//!   warning, and its last good version (if any) keeps applying, across
//!   restarts too: each file's last good version is copied under the state
//!   directory (`--state-dir`), and a file broken when the agent starts
//!   applies that copy. A removed file removes its objects. An object
//!   defined twice keeps the definition of the file that had it (at start,
//!   the lexically first file's). A Service without a creation time gets
//!   the time it was first seen, which decides who keeps a contested
//!   address in the model.
//! - The directory is watched with inotify: events are debounced briefly and
//!   the directory rescanned; a slow timer rescans too, in case an event was
//!   missed. A new state is published only when the merged objects change.
//!
//! The work is split between a synchronous, testable core
//! ([`DirectoryState`], [`parse_manifest`], [`read_manifest_dir`]) and the
//! async shell in this file ([`ManifestSource`]).
use std::{
    collections::BTreeMap,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use futures::future::BoxFuture;
use notify::{
    EventKind, RecommendedWatcher, RecursiveMode, Watcher,
    event::{AccessKind, AccessMode},
};
use tokio::{
    sync::mpsc,
    time::{Instant, MissedTickBehavior},
};
use tracing::{debug, info, warn};

use super::{Source, SourceError, StateSender};
use crate::model::ClusterState;

mod parse;
mod state;

pub use parse::{
    MAX_FILE_SIZE, ManifestObject, ObjectKey, ObjectKind, is_manifest_file_name, parse_manifest,
};
pub use state::{DirectoryState, Duplicate, FileRead, ScanEvent, ScanReport, read_manifest_dir};

/// How long the directory must be quiet after an event before it is rescanned.
pub const DEBOUNCE: Duration = Duration::from_millis(50);
/// The longest a rescan waits under a continuous stream of events.
pub const MAX_DEBOUNCE: Duration = Duration::from_millis(500);
/// How often a manifest directory missing at start is looked for.
const MISSING_DIR_POLL: Duration = Duration::from_secs(1);
/// How often the directory is rescanned without any event.
pub const DEFAULT_RESCAN_INTERVAL: Duration = Duration::from_secs(5);

/// A [`Source`] reading manifests from a directory and watching it.
#[derive(Clone, Debug)]
pub struct ManifestSource {
    dir: PathBuf,
    rescan_interval: Duration,
    saved: Option<PathBuf>,
}

impl ManifestSource {
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            rescan_interval: DEFAULT_RESCAN_INTERVAL,
            saved: None,
        }
    }

    /// Keeps a copy of each file's last good version under `state_dir`
    /// (in a directory named after the manifest directory), so that a file
    /// broken when the agent starts applies its last good version.
    pub fn with_state_dir(mut self, state_dir: &Path) -> Self {
        self.saved = Some(SavedCopies::dir_for(state_dir, &self.dir));
        self
    }

    /// Changes how often the directory is rescanned without any event
    /// (default [`DEFAULT_RESCAN_INTERVAL`]; zero is treated as 1 ms).
    pub fn with_rescan_interval(mut self, interval: Duration) -> Self {
        self.rescan_interval = interval.max(Duration::from_millis(1));
        self
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    async fn run_loop(self, tx: StateSender) -> Result<(), SourceError> {
        let dir = self.dir;
        // A directory not there yet (a volume mounted late, a path made by
        // a later step) is waited for: until it appears nothing is
        // published, so the agent is not ready and leaves the kernel's
        // state as it is.
        if !dir.exists() {
            warn!(
                dir = %dir.display(),
                "manifest directory does not exist; waiting for it (nothing is programmed until it does)"
            );
            let poll = self.rescan_interval.min(MISSING_DIR_POLL);
            while !dir.exists() {
                tokio::time::sleep(poll).await;
            }
            info!(dir = %dir.display(), "manifest directory appeared");
        }
        // Keep one sender so the receiver never reports "closed", even while
        // no watcher exists.
        let (signal_tx, mut signals) = mpsc::channel(64);
        let mut watch = DirWatch::new(dir.clone(), signal_tx);
        // Watch before the first scan so no change slips in between.
        watch.ensure()?;
        let saved = self.saved.map(|dir| Arc::new(SavedCopies::new(dir)));
        let mut initial = DirectoryState::new();
        if let Some(saved) = &saved {
            saved.seed(&dir, &mut initial);
        }
        let state = Arc::new(Mutex::new(initial));

        let (report, _) = scan(dir.clone(), state.clone(), saved.clone())
            .await
            .map_err(|source| SourceError::Directory {
                path: dir.clone(),
                source,
            })?;
        log_events(&report.events);
        let first = lock(&state).cluster_state();
        info!(
            dir = %dir.display(),
            services = first.services.len(),
            endpoint_slices = first.endpoint_slices.len(),
            nodes = first.nodes.len(),
            "manifest directory loaded"
        );
        tx.send_replace(Some(Arc::new(first)));

        let mut ticker =
            tokio::time::interval_at(Instant::now() + self.rescan_interval, self.rescan_interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // (fire at, fire no later than) of the pending debounced rescan.
        let mut pending: Option<(Instant, Instant)> = None;
        let mut dir_readable = true;
        loop {
            let fire_at = pending.map(|(quiet, cap)| quiet.min(cap));
            tokio::select! {
                signal = signals.recv() => {
                    if let Some(Signal::Error(e)) = &signal {
                        warn!(dir = %dir.display(), error = %e, "manifest directory watch error; rescanning");
                    }
                    let now = Instant::now();
                    pending = Some(match pending {
                        Some((_, cap)) => (now + DEBOUNCE, cap),
                        None => (now + DEBOUNCE, now + MAX_DEBOUNCE),
                    });
                    continue;
                }
                _ = tokio::time::sleep_until(fire_at.unwrap_or_else(Instant::now)), if fire_at.is_some() => {}
                _ = ticker.tick() => {
                    // A debounced rescan is due soon; a scan now could catch a
                    // file halfway through being written.
                    if pending.is_some() {
                        continue;
                    }
                }
            }
            pending = None;
            // Rewatch if the directory was replaced or watching had failed.
            watch.ensure_or_warn();
            rescan(&dir, &state, saved.as_ref(), &tx, &mut dir_readable).await;
        }
    }
}

/// Scans the directory again and publishes the state if it changed; logs
/// (once) that the directory cannot be read, and when it can again.
async fn rescan(
    dir: &Path,
    state: &Arc<Mutex<DirectoryState>>,
    saved: Option<&Arc<SavedCopies>>,
    tx: &StateSender,
    dir_readable: &mut bool,
) {
    match scan(dir.to_path_buf(), state.clone(), saved.cloned()).await {
        Ok((report, new_state)) => {
            if !*dir_readable {
                info!(dir = %dir.display(), "manifest directory is readable again");
                *dir_readable = true;
            }
            log_events(&report.events);
            if let Some(new_state) = new_state {
                debug!(
                    services = new_state.services.len(),
                    endpoint_slices = new_state.endpoint_slices.len(),
                    nodes = new_state.nodes.len(),
                    "manifest objects changed; publishing"
                );
                tx.send_replace(Some(Arc::new(new_state)));
            }
        }
        Err(e) => {
            if *dir_readable {
                warn!(
                    dir = %dir.display(),
                    error = %e,
                    "cannot read manifest directory; keeping the last state and retrying"
                );
                *dir_readable = false;
            }
        }
    }
}

impl Source for ManifestSource {
    /// Publishes the first complete scan, then every change. Fails at start
    /// when the directory cannot be read or watched; afterwards it never
    /// returns (abort the task to stop it).
    fn run(self: Box<Self>, tx: StateSender) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin((*self).run_loop(tx))
    }
}

fn lock(state: &Mutex<DirectoryState>) -> std::sync::MutexGuard<'_, DirectoryState> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Reads the directory and feeds the core, off the async threads. Returns the
/// report and, when the objects changed, the new state.
async fn scan(
    dir: PathBuf,
    state: Arc<Mutex<DirectoryState>>,
    saved: Option<Arc<SavedCopies>>,
) -> std::io::Result<(ScanReport, Option<ClusterState>)> {
    tokio::task::spawn_blocking(move || {
        let files = read_manifest_dir(&dir)?;
        let mut state = lock(&state);
        let report = state.update(&files);
        if let Some(saved) = &saved {
            saved.record(&report.events, &files);
        }
        let new_state = report.changed.then(|| state.cluster_state());
        Ok((report, new_state))
    })
    .await
    .map_err(|e| std::io::Error::other(format!("scan task failed: {e}")))?
}

fn log_events(events: &[ScanEvent]) {
    for event in events {
        match event {
            ScanEvent::Loaded { path, objects } => {
                debug!(path = %path.display(), objects, "manifest file loaded");
            }
            ScanEvent::Recovered { path, objects } => {
                info!(path = %path.display(), objects, "manifest file is valid again; applying it");
            }
            ScanEvent::Broken {
                path,
                reason,
                kept_last_good: true,
                saved: false,
            } => {
                warn!(path = %path.display(), %reason, "manifest file is broken; keeping its last good version");
            }
            ScanEvent::Broken {
                path,
                reason,
                kept_last_good: true,
                saved: true,
            } => {
                warn!(
                    path = %path.display(),
                    %reason,
                    "manifest file is broken; applying its last good version, saved by an earlier run"
                );
            }
            ScanEvent::Broken {
                path,
                reason,
                kept_last_good: false,
                ..
            } => {
                warn!(path = %path.display(), %reason, "manifest file is broken; ignoring it");
            }
            ScanEvent::Removed { path } => {
                info!(path = %path.display(), "manifest file removed; dropping its objects");
            }
            ScanEvent::Duplicate(d) => {
                warn!(
                    object = %d.key,
                    kept = %d.kept.display(),
                    ignored = %d.ignored.display(),
                    "object defined more than once; using the first definition"
                );
            }
        }
    }
}

/// Copies of the manifest files' last good versions, one directory per
/// manifest directory, written when a file loads and removed with it.
#[derive(Debug)]
struct SavedCopies {
    dir: PathBuf,
    /// Whether a failure to write a copy was logged (once is enough).
    warned: AtomicBool,
}

impl SavedCopies {
    fn new(dir: PathBuf) -> Self {
        SavedCopies {
            dir,
            warned: AtomicBool::new(false),
        }
    }

    /// `<state_dir>/manifests/<the manifest directory's path, its '/' as
    /// '%2F'>`: readable, and distinct for distinct manifest directories.
    fn dir_for(state_dir: &Path, manifests: &Path) -> PathBuf {
        let absolute = std::path::absolute(manifests).unwrap_or_else(|_| manifests.to_path_buf());
        let name = absolute
            .to_string_lossy()
            .replace('%', "%25")
            .replace('/', "%2F");
        state_dir.join("manifests").join(name)
    }

    /// Removes the copies of manifest directories that are gone (a
    /// temporary directory, one the node no longer uses).
    fn prune_gone_directories(&self) {
        let Some(parent) = self.dir.parent() else {
            return;
        };
        let Ok(entries) = std::fs::read_dir(parent) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let original = PathBuf::from(name.replace("%2F", "/").replace("%25", "%"));
            if original.is_absolute() && !original.exists() && entry.path() != self.dir {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }

    /// Gives `state` the saved copy of every file that is in `manifests`
    /// now; drops the copies of files that are not.
    fn seed(&self, manifests: &Path, state: &mut DirectoryState) {
        self.prune_gone_directories();
        let now = jiff::Timestamp::now();
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return; // nothing saved yet
        };
        for entry in entries.flatten() {
            let copy = entry.path();
            let name = entry.file_name();
            if !is_manifest_file_name(&name) {
                continue;
            }
            let original = manifests.join(&name);
            if !original.exists() {
                let _ = std::fs::remove_file(&copy);
                continue;
            }
            let seeded = std::fs::read(&copy)
                .map_err(|e| e.to_string())
                .and_then(|bytes| state.seed_saved(original.clone(), &bytes, now));
            match seeded {
                Ok(objects) => debug!(
                    path = %original.display(),
                    copy = %copy.display(),
                    objects,
                    "saved last good version of manifest file read"
                ),
                Err(reason) => warn!(
                    copy = %copy.display(),
                    %reason,
                    "saved copy of a manifest file is unusable; ignoring it"
                ),
            }
        }
    }

    /// Saves the files that loaded in `events` and drops the copies of the
    /// removed ones. A failure is logged once: the agent works without.
    fn record(&self, events: &[ScanEvent], files: &BTreeMap<PathBuf, FileRead>) {
        for event in events {
            let result = match event {
                ScanEvent::Loaded { path, .. } | ScanEvent::Recovered { path, .. } => {
                    match (files.get(path), path.file_name()) {
                        (Some(Ok(bytes)), Some(name)) => self.save(name.as_ref(), bytes),
                        _ => Ok(()),
                    }
                }
                ScanEvent::Removed { path } => match path.file_name() {
                    Some(name) => match std::fs::remove_file(self.dir.join(name)) {
                        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                        _ => Ok(()),
                    },
                    None => Ok(()),
                },
                _ => Ok(()),
            };
            if let Err(error) = result
                && !self.warned.swap(true, Ordering::Relaxed)
            {
                warn!(
                    dir = %self.dir.display(),
                    %error,
                    "cannot save the last good versions of the manifest files; \
                     a file broken at the next start will be ignored"
                );
            }
        }
    }

    /// Writes the copy of file `name` whole or not at all; a copy that
    /// holds `bytes` already (every file at start) is left as it is.
    fn save(&self, name: &Path, bytes: &[u8]) -> std::io::Result<()> {
        let copy = self.dir.join(name);
        if std::fs::read(&copy).is_ok_and(|held| held == bytes) {
            return Ok(());
        }
        std::fs::create_dir_all(&self.dir)?;
        let partial = self.dir.join(format!(".{}.partial", name.display()));
        std::fs::write(&partial, bytes)?;
        std::fs::rename(&partial, &copy)
    }
}

/// What the watcher thread tells the loop.
#[derive(Debug)]
enum Signal {
    Changed,
    Error(String),
}

/// Whether an inotify event may mean a changed directory. Opens and reads
/// (including our own) do not.
fn is_relevant(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

/// The inotify watch on the directory, re-established when the directory is
/// replaced (a new inode) or an earlier attempt failed.
struct DirWatch {
    dir: PathBuf,
    tx: mpsc::Sender<Signal>,
    watcher: Option<RecommendedWatcher>,
    /// (device, inode) of the watched directory.
    identity: Option<(u64, u64)>,
    last_error: Option<String>,
}

impl DirWatch {
    fn new(dir: PathBuf, tx: mpsc::Sender<Signal>) -> Self {
        Self {
            dir,
            tx,
            watcher: None,
            identity: None,
            last_error: None,
        }
    }

    fn ensure(&mut self) -> Result<(), SourceError> {
        let meta = std::fs::metadata(&self.dir).map_err(|source| SourceError::Directory {
            path: self.dir.clone(),
            source,
        })?;
        if !meta.is_dir() {
            return Err(SourceError::Directory {
                path: self.dir.clone(),
                source: std::io::Error::other("not a directory"),
            });
        }
        let identity = (meta.dev(), meta.ino());
        if self.watcher.is_some() && self.identity == Some(identity) {
            return Ok(());
        }
        self.watcher = None;
        let tx = self.tx.clone();
        let result = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            let signal = match event {
                Ok(event) if is_relevant(&event.kind) || event.need_rescan() => Signal::Changed,
                Ok(_) => return,
                Err(e) => Signal::Error(e.to_string()),
            };
            // Full means a rescan is already pending: dropping is fine.
            let _ = tx.try_send(signal);
        })
        .and_then(|mut watcher| {
            watcher.watch(&self.dir, RecursiveMode::NonRecursive)?;
            Ok(watcher)
        });
        match result {
            Ok(watcher) => {
                if self.identity.is_some() {
                    info!(dir = %self.dir.display(), "watching manifest directory again");
                }
                self.watcher = Some(watcher);
                self.identity = Some(identity);
                Ok(())
            }
            Err(source) => Err(SourceError::Watch {
                path: self.dir.clone(),
                source,
            }),
        }
    }

    /// [`ensure`](Self::ensure) after the start: a watch failure is warned
    /// about (once per distinct error) and periodic rescans carry on; a
    /// missing directory is the scan's to report.
    fn ensure_or_warn(&mut self) {
        match self.ensure() {
            Ok(()) => self.last_error = None,
            Err(SourceError::Directory { .. }) => {}
            Err(e) => {
                let message = e.to_string();
                if self.last_error.as_ref() != Some(&message) {
                    warn!(error = %message, "cannot watch manifest directory; relying on periodic rescans");
                    self.last_error = Some(message);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{fs, time::Duration};

    use tokio::time::timeout;

    use super::parse::tests::{NODE_1, SERVICE_A, service};
    use super::*;
    use crate::source::StateReceiver;

    const WITHIN: Duration = Duration::from_secs(1);

    /// Starts a source on `dir` (no periodic rescans unless asked) and waits
    /// for its first state.
    async fn start(dir: &Path, rescan: Option<Duration>) -> (StateReceiver, Task) {
        let source = ManifestSource::new(dir.to_path_buf())
            .with_rescan_interval(rescan.unwrap_or(Duration::from_secs(3600)));
        run_until_published(source).await
    }

    /// Runs `source`; returns once it published its first state.
    async fn run_until_published(source: ManifestSource) -> (StateReceiver, Task) {
        let (tx, mut rx) = tokio::sync::watch::channel(None);
        let task = Task(tokio::spawn(Box::new(source).run(tx)));
        timeout(WITHIN, rx.wait_for(Option::is_some))
            .await
            .expect("first state within 1 s")
            .expect("sender alive");
        rx.mark_unchanged();
        (rx, task)
    }

    /// The running source; checks it is still running when done with.
    struct Task(tokio::task::JoinHandle<Result<(), SourceError>>);

    impl Task {
        fn abort(self) {
            assert!(!self.0.is_finished(), "the source stopped");
            self.0.abort();
        }
    }

    /// Waits up to 1 s for a published state satisfying `pred`.
    async fn published(rx: &mut StateReceiver, what: &str, pred: impl Fn(&ClusterState) -> bool) {
        let found = matches!(
            timeout(WITHIN, rx.wait_for(|s| s.as_deref().is_some_and(&pred))).await,
            Ok(Ok(_))
        );
        assert!(found, "no state with {what} within 1 s");
        rx.mark_unchanged();
    }

    fn ips(state: &ClusterState) -> Vec<String> {
        state
            .services
            .iter()
            .filter_map(|s| Some(s.cluster_ips().first()?.to_string()))
            .collect()
    }

    fn current(rx: &StateReceiver) -> Arc<ClusterState> {
        rx.borrow().clone().expect("published")
    }

    async fn assert_quiet(rx: &mut StateReceiver, for_: Duration) {
        let changed = timeout(for_, rx.changed()).await;
        assert!(changed.is_err(), "unexpected publish: {:?}", rx.borrow());
    }

    #[tokio::test]
    async fn a_missing_directory_is_waited_for_and_a_file_fails() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, mut rx) = tokio::sync::watch::channel(None);
        let missing = dir.path().join("later");
        let source =
            ManifestSource::new(missing.clone()).with_rescan_interval(Duration::from_millis(20));
        let task = Task(tokio::spawn(Box::new(source).run(tx)));
        assert_quiet(&mut rx, Duration::from_millis(200)).await;
        assert!(
            rx.borrow().is_none(),
            "nothing published while it is missing"
        );
        fs::create_dir(&missing).unwrap();
        fs::write(missing.join("a.yaml"), service("a", "10.96.0.1")).unwrap();
        published(&mut rx, "the directory's objects", |s| {
            ips(s) == ["10.96.0.1"]
        })
        .await;
        task.abort();

        let file = dir.path().join("file.yaml");
        fs::write(&file, SERVICE_A).unwrap();
        let (tx, _rx) = tokio::sync::watch::channel(None);
        let result = timeout(WITHIN, Box::new(ManifestSource::new(file)).run(tx))
            .await
            .expect("fails fast");
        assert!(
            matches!(result, Err(SourceError::Directory { .. })),
            "{result:?}"
        );
    }

    #[tokio::test]
    async fn publishes_initial_state_even_when_empty() {
        let dir = tempfile::tempdir().unwrap();
        let (rx, task) = start(dir.path(), None).await;
        let state = current(&rx);
        assert!(
            state.services.is_empty() && state.endpoint_slices.is_empty() && state.nodes.is_empty()
        );
        task.abort();

        fs::write(
            dir.path().join("a.yaml"),
            format!("{SERVICE_A}---\n{NODE_1}"),
        )
        .unwrap();
        let (rx, task) = start(dir.path(), None).await;
        let state = current(&rx);
        assert_eq!(state.services.len(), 1);
        assert_eq!(state.nodes.len(), 1);
        task.abort();
    }

    #[tokio::test]
    async fn write_modify_delete_take_effect_within_a_second() {
        let dir = tempfile::tempdir().unwrap();
        let (mut rx, task) = start(dir.path(), None).await;
        let file = dir.path().join("svc.yaml");

        fs::write(&file, service("a", "10.96.0.1")).unwrap();
        published(&mut rx, "the new file", |s| ips(s) == ["10.96.0.1"]).await;

        fs::write(&file, service("a", "10.96.0.2")).unwrap();
        published(&mut rx, "the modified file", |s| ips(s) == ["10.96.0.2"]).await;

        // Broken: warned about, and the last good version stays.
        fs::write(&file, "apiVersion: v1\nkind: Service\nspec: [").unwrap();
        assert_quiet(&mut rx, Duration::from_millis(300)).await;
        assert_eq!(ips(&current(&rx)), ["10.96.0.2"]);

        fs::remove_file(&file).unwrap();
        published(&mut rx, "the file gone", |s| s.services.is_empty()).await;
        task.abort();
    }

    /// Starts a source with a state directory; returns once it published.
    async fn start_saving(dir: &Path, state: &Path) -> (StateReceiver, Task) {
        let source = ManifestSource::new(dir.to_path_buf())
            .with_rescan_interval(Duration::from_secs(3600))
            .with_state_dir(state);
        run_until_published(source).await
    }

    #[tokio::test]
    async fn the_last_good_version_outlives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.yaml"), dir.path().join("b.yaml"));
        fs::write(&a, service("a", "10.96.0.1")).unwrap();
        fs::write(&b, service("b", "10.96.0.2")).unwrap();
        let (mut rx, task) = start_saving(dir.path(), state.path()).await;
        assert_eq!(ips(&current(&rx)), ["10.96.0.1", "10.96.0.2"]);
        fs::write(&a, service("a", "10.96.0.3")).unwrap();
        published(&mut rx, "a's new version", |s| {
            ips(s) == ["10.96.0.3", "10.96.0.2"]
        })
        .await;
        task.abort();

        // Broken while the agent is down: its last good version applies at
        // the next start. A removed file's copy goes; a file that is fine
        // applies as it is.
        fs::write(&a, "apiVersion: v1\nkind: Service\nspec: [").unwrap();
        fs::remove_file(&b).unwrap();
        let (mut rx, task) = start_saving(dir.path(), state.path()).await;
        assert_eq!(ips(&current(&rx)), ["10.96.0.3"]);
        let saved = SavedCopies::dir_for(state.path(), dir.path());
        assert!(saved.join("a.yaml").exists() && !saved.join("b.yaml").exists());

        // Fixed: applies, and is the copy from now on.
        fs::write(&a, service("a", "10.96.0.4")).unwrap();
        published(&mut rx, "a fixed", |s| ips(s) == ["10.96.0.4"]).await;
        task.abort();
        assert_eq!(
            fs::read_to_string(saved.join("a.yaml")).unwrap(),
            service("a", "10.96.0.4")
        );

        // Another manifest directory has copies of its own; those of a
        // directory that is gone go at the next start.
        let other = tempfile::tempdir().unwrap();
        fs::write(other.path().join("a.yaml"), "{{{").unwrap();
        let (rx, task) = start_saving(other.path(), state.path()).await;
        assert!(current(&rx).services.is_empty());
        task.abort();
        drop(dir);
        let (_rx, task) = start_saving(other.path(), state.path()).await;
        task.abort();
        assert!(!saved.exists(), "the copies of a removed directory stay");
    }

    #[tokio::test]
    async fn an_unwritable_state_directory_only_costs_the_copies() {
        let dir = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        // A file where the directory would go.
        let blocked = state.path().join("blocked");
        fs::write(&blocked, "").unwrap();
        fs::write(dir.path().join("a.yaml"), service("a", "10.96.0.1")).unwrap();
        let (rx, task) = start_saving(dir.path(), &blocked).await;
        assert_eq!(ips(&current(&rx)), ["10.96.0.1"]);
        task.abort();
    }

    #[tokio::test]
    async fn atomic_rename_replace() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("svc.yaml");
        fs::write(&file, service("a", "10.96.0.1")).unwrap();
        let (mut rx, task) = start(dir.path(), None).await;
        assert_eq!(ips(&current(&rx)), ["10.96.0.1"]);

        for (i, ip) in ["10.96.0.2", "10.96.0.3"].into_iter().enumerate() {
            let tmp = dir.path().join(format!(".svc.yaml.tmp{i}"));
            fs::write(&tmp, service("a", ip)).unwrap();
            fs::rename(&tmp, &file).unwrap();
            published(&mut rx, ip, |s| ips(s) == [ip]).await;
        }
        task.abort();
    }

    #[tokio::test]
    async fn configmap_style_symlink_swap() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fs::create_dir(d.join("..v1")).unwrap();
        fs::write(d.join("..v1/svc.yaml"), service("a", "10.96.0.1")).unwrap();
        std::os::unix::fs::symlink("..v1", d.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/svc.yaml", d.join("svc.yaml")).unwrap();
        let (mut rx, task) = start(d, None).await;
        assert_eq!(ips(&current(&rx)), ["10.96.0.1"]);

        // What the kubelet does: a new timestamped dir, then swap ..data.
        fs::create_dir(d.join("..v2")).unwrap();
        fs::write(d.join("..v2/svc.yaml"), service("a", "10.96.0.2")).unwrap();
        std::os::unix::fs::symlink("..v2", d.join("..data_tmp")).unwrap();
        fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
        fs::remove_dir_all(d.join("..v1")).unwrap();
        published(&mut rx, "the swapped content", |s| ips(s) == ["10.96.0.2"]).await;
        task.abort();
    }

    #[tokio::test]
    async fn unchanged_rescans_publish_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("svc.yaml");
        fs::write(&file, SERVICE_A).unwrap();
        // Many timer rescans.
        let (mut rx, task) = start(dir.path(), Some(Duration::from_millis(20))).await;
        assert_quiet(&mut rx, Duration::from_millis(300)).await;
        task.abort();

        // Events that change nothing that matters. (No timer rescans here: a
        // rescan could read the file between `write`'s truncate and write.)
        let (mut rx, task) = start(dir.path(), None).await;
        fs::write(&file, SERVICE_A).unwrap();
        fs::write(dir.path().join("notes.txt"), "hello").unwrap();
        fs::write(dir.path().join(".svc.yaml.swp"), "junk").unwrap();
        fs::write(dir.path().join("b.yaml"), "# only a comment\n").unwrap();
        assert_quiet(&mut rx, Duration::from_millis(300)).await;
        // ...while a real change still gets through.
        fs::write(&file, service("a", "10.96.0.9")).unwrap();
        published(&mut rx, "the change", |s| ips(s) == ["10.96.0.9"]).await;
        task.abort();
    }

    #[tokio::test]
    async fn directory_disappearing_keeps_last_state() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("manifests");
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join("svc.yaml"), service("a", "10.96.0.1")).unwrap();
        let (mut rx, task) = start(&dir, Some(Duration::from_millis(50))).await;

        // Gone at once (removing the files first would be a legitimate,
        // publishable, empty directory).
        fs::rename(&dir, parent.path().join("moved-away")).unwrap();
        assert_quiet(&mut rx, Duration::from_millis(300)).await;
        assert_eq!(ips(&current(&rx)), ["10.96.0.1"]);

        // Back (a new inode): picked up by the rescans, and watched again.
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join("svc.yaml"), service("a", "10.96.0.2")).unwrap();
        published(&mut rx, "the recreated directory", |s| {
            ips(s) == ["10.96.0.2"]
        })
        .await;
        fs::write(dir.join("svc.yaml"), service("a", "10.96.0.3")).unwrap();
        published(&mut rx, "a change in it", |s| ips(s) == ["10.96.0.3"]).await;
        task.abort();
    }
}
