//! The daemon: a supervisor that keeps one loop per target (`target::TargetLoop`, which owns
//! that target's state) in step with the reloadable config, routes changes under each `dest` to
//! its loop, and hands the API's requests to the loops as commands.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};

use super::metrics::Metrics;
use super::status::Board;
use super::ServiceReporter;
use crate::agent::{Command, Context, TargetLoop};
use crate::config::Settings;
use crate::store::VersionManifest;

/// Config file events are coalesced over this period before a reload.
const RELOAD_DEBOUNCE: Duration = Duration::from_secs(1);
/// How soon a dest that could not be watched is tried again.
const REWATCH: Duration = Duration::from_millis(500);
/// How long the API waits for a loop to answer a rollback or unpin.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Triggered {
    Started,
    /// An operation of that target is running.
    Busy,
    Unknown,
}

pub struct Daemon {
    cx: watch::Sender<Context>,
    board: Board,
    metrics: Arc<Metrics>,
    config_path: PathBuf,
    loops: Mutex<HashMap<String, mpsc::Sender<Command>>>,
    permits: Arc<Semaphore>,
}

impl Daemon {
    pub fn new(settings: Settings, config_path: &Path) -> Arc<Daemon> {
        let board = Board::new(&settings.targets);
        let metrics = Metrics::new();
        for t in &settings.targets {
            metrics.register_target(&t.name);
        }
        let reporter = Arc::new(ServiceReporter {
            board: board.clone(),
            metrics: metrics.clone(),
        });
        let permits = Arc::new(Semaphore::new(settings.max_concurrent_syncs));
        Arc::new(Daemon {
            cx: watch::Sender::new(Context::new(settings, reporter)),
            board,
            metrics,
            config_path: config_path.to_path_buf(),
            loops: Mutex::default(),
            permits,
        })
    }

    pub fn context(&self) -> Context {
        self.cx.borrow().clone()
    }

    pub fn board(&self) -> &Board {
        &self.board
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    fn sender(&self, name: &str) -> Option<mpsc::Sender<Command>> {
        self.loops
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// Asks the loop of `name` to check its reference now.
    pub fn trigger(&self, name: &str) -> Triggered {
        let Some(sender) = self.sender(name) else {
            return Triggered::Unknown;
        };
        if self.board.is_busy(name) {
            return Triggered::Busy;
        }
        // A full queue means requests are already pending: as good.
        let _ = sender.try_send(Command::Sync);
        Triggered::Started
    }

    /// Sends `make(reply)` to the loop of `name` and waits for its answer.
    async fn ask<T>(
        &self,
        name: &str,
        make: impl FnOnce(oneshot::Sender<Result<T, String>>) -> Command,
    ) -> Result<T, String> {
        let sender = self
            .sender(name)
            .ok_or_else(|| format!("no target {name:?}"))?;
        let (tx, rx) = oneshot::channel();
        sender
            .send(make(tx))
            .await
            .map_err(|_| format!("the loop of {name} has stopped"))?;
        tokio::time::timeout(COMMAND_TIMEOUT, rx)
            .await
            .map_err(|_| format!("{name} did not answer within {COMMAND_TIMEOUT:?}"))?
            .map_err(|_| format!("the loop of {name} has stopped"))?
    }

    /// Rolls `name` back (through its loop: the same epilogue as any change).
    pub async fn rollback(
        &self,
        name: &str,
        to: Option<String>,
    ) -> Result<VersionManifest, String> {
        self.ask(name, |reply| Command::Rollback { to, reply })
            .await
    }

    /// Lifts the pin of `name`; its loop syncs next.
    pub async fn unpin(&self, name: &str) -> Result<bool, String> {
        self.ask(name, |reply| Command::Unpin { reply }).await
    }

    pub fn target_names(&self) -> Vec<String> {
        self.cx
            .borrow()
            .settings
            .targets
            .iter()
            .map(|t| t.name.clone())
            .collect()
    }

    /// Re-reads the config. An invalid one is reported and the running one kept.
    pub fn reload(&self) {
        super::systemd::reloading();
        match Settings::load(&self.config_path) {
            Ok(settings) => {
                let old = self.context();
                if settings.listen != old.settings.listen {
                    tracing::warn!(old = %old.settings.listen, new = %settings.listen, "a new listen address takes effect at the next restart");
                }
                tracing::info!(files = ?settings.sources, targets = settings.targets.len(), "config reloaded");
                for t in &settings.targets {
                    self.metrics.register_target(&t.name);
                }
                self.board.reconcile(&settings.targets);
                self.board.set_config_error(None);
                self.cx.send_replace(old.with_settings(settings));
            }
            Err(e) => {
                tracing::error!("config reload rejected, keeping the running config: {e}");
                self.board.set_config_error(Some(e.to_string()));
            }
        }
        super::systemd::reloaded();
    }

    /// Resolves once every target's startup recovery is done.
    pub async fn recovered(&self) {
        let mut changes = self.board.subscribe();
        while !self.board.recovered() {
            if changes.changed().await.is_err() {
                return;
            }
        }
    }

    /// Keeps one loop per configured target until `shutdown`.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut changes = self.cx.subscribe();
        let mut tasks = tokio::task::JoinSet::new();
        let (dest_events, mut dest_rx) = mpsc::channel::<PathBuf>(64);
        let mut dest_watcher = make_watcher(dest_events);
        let mut watched: Vec<PathBuf> = Vec::new();
        loop {
            let cx = changes.borrow_and_update().clone();
            // Loops of targets that are gone stop themselves at the reload; forget them.
            self.loops
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|name, _| cx.settings.target(name).is_some());
            for target in &cx.settings.targets {
                if self.sender(&target.name).is_some() {
                    continue;
                }
                // Room for a sync request behind a burst of change events.
                let (tx, rx) = mpsc::channel(8);
                self.loops
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(target.name.clone(), tx);
                let (name, config, stop, permits) = (
                    target.name.clone(),
                    self.cx.subscribe(),
                    shutdown.clone(),
                    self.permits.clone(),
                );
                tasks.spawn(async move {
                    if let Some(l) = TargetLoop::new(&name, rx, config, stop, permits).await {
                        l.run().await;
                    }
                });
            }
            let wanted: Vec<PathBuf> = cx.settings.targets.iter().map(|t| t.dest.clone()).collect();
            if let Some(w) = dest_watcher.as_mut() {
                rewatch(w, &mut watched, wanted.clone());
            }
            // A dest that does not exist yet (its loop's recovery creates it) is watched later.
            let unwatched = dest_watcher.is_some() && wanted.iter().any(|d| !watched.contains(d));
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { break },
                _ = tokio::time::sleep(REWATCH), if unwatched => {}
                Some(path) = dest_rx.recv() => {
                    // Collect the burst, then route each path to its target's loop.
                    let mut paths = vec![path];
                    while let Ok(p) = dest_rx.try_recv() {
                        paths.push(p);
                    }
                    for t in &cx.settings.targets {
                        if paths.iter().any(|p| p.starts_with(&t.dest) && !is_our_temp(p)) {
                            if let Some(s) = self.sender(&t.name) {
                                let _ = s.try_send(Command::Changed);
                            }
                        }
                    }
                }
                _ = shutdown.wait_for(|s| *s) => break,
            }
        }
        while tasks.join_next().await.is_some() {}
    }
}

/// Temp names of our own making are not outside changes.
fn is_our_temp(path: &Path) -> bool {
    path.components().any(|c| {
        let c = c.as_os_str().to_string_lossy();
        c.starts_with(".staging-") || c.starts_with(".tmp-")
    })
}

fn make_watcher(events: mpsc::Sender<PathBuf>) -> Option<notify::RecommendedWatcher> {
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event {
            if event.kind.is_access() {
                return;
            }
            for path in event.paths {
                // Full channel: a burst is already queued, which is enough.
                let _ = events.try_send(path);
            }
        }
    });
    match watcher {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(%e, "cannot watch the asset directories; self-repair runs on the verify timer only");
            None
        }
    }
}

fn rewatch(
    watcher: &mut notify::RecommendedWatcher,
    watched: &mut Vec<PathBuf>,
    wanted: Vec<PathBuf>,
) {
    for old in watched.iter().filter(|p| !wanted.contains(p)) {
        let _ = watcher.unwatch(old);
    }
    watched.retain(|p| wanted.contains(p));
    for dest in wanted {
        if watched.contains(&dest) {
            continue;
        }
        match watcher.watch(&dest, RecursiveMode::Recursive) {
            Ok(()) => watched.push(dest),
            Err(e) => {
                if dest.exists() {
                    tracing::warn!(dest = %dest.display(), %e, "cannot watch for outside changes")
                } else {
                    tracing::debug!(dest = %dest.display(), "not there yet: watched once it is")
                }
            }
        }
    }
}

/// Watches the config file and its drop-in directory; sends one message per settled burst.
pub fn watch_config(
    path: &Path,
    also: &[PathBuf],
) -> Option<(notify::RecommendedWatcher, mpsc::Receiver<()>)> {
    let (tx, rx) = mpsc::channel(1);
    let file = path.to_path_buf();
    let dropins = crate::config::drop_in_dir(path);
    let relevant = {
        let (file, dropins, also) = (file.clone(), dropins.clone(), also.to_vec());
        move |p: &Path| p == file || p.starts_with(&dropins) || also.iter().any(|a| a == p)
    };
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event {
            if !event.kind.is_access() && event.paths.iter().any(|p| relevant(p)) {
                let _ = tx.try_send(());
            }
        }
    })
    .map_err(|e| tracing::warn!(%e, "cannot watch the config file; reload with SIGHUP"))
    .ok()?;
    // Watch the directory, recursively: editors replace files by renaming, which a file watch
    // would lose, and config.d may be created after we start.
    let Some(dir) = file.parent() else {
        return Some((watcher, rx));
    };
    if let Err(e) = watcher.watch(dir, RecursiveMode::Recursive) {
        tracing::warn!(%e, "cannot watch the config directory; reload with SIGHUP");
        return None;
    }
    // Files the config names elsewhere (signature keys, a trusted root): their directories.
    for other in also.iter().filter_map(|a| a.parent()) {
        if !other.starts_with(dir) {
            if let Err(e) = watcher.watch(other, RecursiveMode::NonRecursive) {
                tracing::warn!(%e, dir = %other.display(), "cannot watch; reload with SIGHUP after changing files there");
            }
        }
    }
    Some((watcher, rx))
}

/// Debounces config events into reloads until `shutdown`.
pub async fn reload_on_change(
    daemon: Arc<Daemon>,
    mut events: mpsc::Receiver<()>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            e = events.recv() => if e.is_none() { return },
            _ = shutdown.wait_for(|s| *s) => return,
        }
        tokio::time::sleep(RELOAD_DEBOUNCE).await;
        while events.try_recv().is_ok() {}
        tracing::info!("config changed on disk");
        daemon.reload();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_temp_paths_are_recognised() {
        assert!(is_our_temp(Path::new("/a/dest/.staging-ab-1-2/k")));
        assert!(is_our_temp(Path::new("/a/dest/.tmp-current-1-2")));
        assert!(!is_our_temp(Path::new("/a/dest/versions/ab/k")));
    }
}
