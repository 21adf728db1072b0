//! The daemon: a supervisor that keeps one loop per target in step with the (reloadable)
//! config; each loop syncs on its schedule (interval with jitter, backoff after failures,
//! `Retry-After` honoured), on demand (`POST /sync`), and repairs what is served when something
//! else changes it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use notify::{RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch, Semaphore};

use crate::config::{Settings, Target};
use crate::status::Board;
use crate::store::Recovery;
use crate::sync::{self, Context, Outcome, Repair};

/// `d` +-10%, so many bastions polling one registry do not arrive in step.
pub fn jitter(d: Duration) -> Duration {
    d.mul_f64(0.9 + fastrand::f64() * 0.2)
}

/// Delay after the `failures`-th consecutive failure: `start` doubling up to `max`, never
/// longer than the poll interval, with jitter.
pub fn backoff(failures: u32, start: Duration, max: Duration, interval: Duration) -> Duration {
    let exp = start.saturating_mul(1u32 << failures.saturating_sub(1).min(16));
    jitter(exp.min(max).min(interval.max(start)))
}

/// Formats an error with its causes, leaving out causes the message already includes.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}

/// `text` with control characters escaped (`\n`, `\u{1b}`, ...), fit for one log or terminal line.
pub fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// The result of one sync as the scheduler sees it.
pub struct Synced {
    pub result: Result<Outcome, String>,
    pub retry_after: Option<Duration>,
}

/// Runs one sync of `target`, records it on the board and in the metrics, and runs the hook
/// when what is served changed.
pub async fn sync_and_record(cx: &Context, target: &Target, board: &Board, verify: bool) -> Synced {
    let started = Instant::now();
    let previous = board.published_digest(&target.name);
    board.syncing(&target.name);
    // Run the sync as its own task: a panic (a bug) becomes a failed sync the loop retries,
    // not a dead loop stuck in "syncing".
    let task = {
        let (cx, target) = (cx.clone(), target.clone());
        tokio::spawn(async move { sync::sync_target(&cx, &target, verify).await })
    };
    let result = match task.await {
        Ok(r) => r.map_err(|e| (error_chain(&e), e.retry_after())),
        Err(e) => Err((
            format!("internal error (a bug, please report it): {e}"),
            None,
        )),
    };
    match result {
        Ok(outcome) => {
            let m = outcome.manifest();
            board.succeeded(&target.name, m, None);
            board.set_pinned(
                &target.name,
                matches!(outcome, Outcome::Pinned(_)).then(|| m.digest.clone()),
            );
            cx.metrics
                .sync_finished(&target.name, outcome.label(), started.elapsed(), 0);
            cx.metrics
                .published(&target.name, &m.digest, previous.as_deref());
            if outcome.changed() {
                if let Some(hook) = &target.hook {
                    let result = crate::hook::run(hook, target, m)
                        .await
                        .map_err(|e| printable(&e));
                    if let Err(e) = &result {
                        tracing::error!(target = %target.name, "{e}");
                        cx.metrics.hook_failed(&target.name);
                    }
                    board.hook_result(&target.name, &result);
                }
            }
            Synced {
                result: Ok(outcome),
                retry_after: None,
            }
        }
        Err((cause, retry_after)) => {
            // Causes quote names and bodies from the registry and the image: escape control
            // characters so they cannot forge lines or move the cursor.
            let text = printable(&format!(
                "target {} ({}, {}): {cause}",
                target.name, target.reference, target.platform
            ));
            let failures = board.failed(&target.name, &text, None);
            cx.metrics
                .sync_finished(&target.name, "failed", started.elapsed(), failures);
            tracing::error!(target = %target.name, failures, "sync failed: {text}");
            Synced {
                retry_after,
                result: Err(text),
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// Check the registry now.
    Sync,
    /// Something changed what is served: check it against the store.
    Repair,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Triggered {
    Started,
    /// A sync of that target is running.
    Busy,
    Unknown,
}

/// Outside changes to a dest are ignored this long after our own sync (our own writes).
const QUIET_AFTER_SYNC: Duration = Duration::from_secs(2);
/// Repairs wait this long for a burst of file events to settle.
const REPAIR_SETTLE: Duration = Duration::from_millis(500);
/// Config file events are coalesced over this period before a reload.
const RELOAD_DEBOUNCE: Duration = Duration::from_secs(1);

pub struct Daemon {
    cx: watch::Sender<Context>,
    board: Board,
    config_path: PathBuf,
    triggers: Mutex<HashMap<String, mpsc::Sender<Trigger>>>,
    quiet_until: Mutex<HashMap<String, Instant>>,
    permits: Arc<Semaphore>,
}

impl Daemon {
    pub fn new(cx: Context, board: Board, config_path: &Path) -> Arc<Daemon> {
        let permits = Arc::new(Semaphore::new(cx.settings.max_concurrent_syncs));
        Arc::new(Daemon {
            cx: watch::Sender::new(cx),
            board,
            config_path: config_path.to_path_buf(),
            triggers: Mutex::default(),
            quiet_until: Mutex::default(),
            permits,
        })
    }

    pub fn context(&self) -> Context {
        self.cx.borrow().clone()
    }

    pub fn board(&self) -> &Board {
        &self.board
    }

    /// Asks the loop of `name` to act now.
    pub fn trigger(&self, name: &str, what: Trigger) -> Triggered {
        let sender = self
            .triggers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned();
        let Some(sender) = sender else {
            return Triggered::Unknown;
        };
        if what == Trigger::Sync && self.board.is_syncing(name) {
            return Triggered::Busy;
        }
        // A full queue means the same request is already pending: that is as good.
        let _ = sender.try_send(what);
        Triggered::Started
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

    /// Startup recovery of every target, before we report ready.
    pub async fn recover_all(&self) {
        let cx = self.context();
        for target in cx.settings.targets.clone() {
            cx.metrics.register_target(&target.name);
            let settings = cx.settings.clone();
            let t = target.clone();
            let result =
                tokio::task::spawn_blocking(move || sync::recover_target(&settings, &t)).await;
            let note = match result {
                Ok(Ok(Recovery::Intact(_))) | Ok(Ok(Recovery::Empty)) => None,
                Ok(Ok(Recovery::FellBack { from, reason, to })) => Some(format!(
                    "current version {} was damaged ({reason}); fell back to {}",
                    from.as_deref().unwrap_or("(none)"),
                    to.digest
                )),
                Ok(Ok(Recovery::NothingIntact { reason })) => Some(format!(
                    "no intact version on disk ({reason}); the next sync downloads one"
                )),
                Ok(Err(e)) => Some(format!("recovery failed: {}", error_chain(&e))),
                Err(e) => Some(format!("recovery failed: {e}")),
            };
            if let Some(note) = note {
                tracing::warn!(target = %target.name, "{note}");
                self.board.recovered(&target.name, note);
            }
            if let Some(m) = sync::published(&target) {
                self.board.set_published(&target.name, &m);
            }
        }
    }

    /// Re-reads the config. An invalid one is reported and the running one kept.
    pub fn reload(&self) {
        crate::systemd::reloading();
        match Settings::load(&self.config_path) {
            Ok(settings) => {
                let old = self.context();
                if settings.listen != old.settings.listen {
                    tracing::warn!(old = %old.settings.listen, new = %settings.listen, "a new listen address takes effect at the next restart");
                }
                tracing::info!(files = ?settings.sources, targets = settings.targets.len(), "config reloaded");
                self.board.reconcile(&settings.targets);
                self.board.set_config_error(None);
                self.cx.send_replace(old.with_settings(settings));
            }
            Err(e) => {
                tracing::error!("config reload rejected, keeping the running config: {e}");
                self.board.set_config_error(Some(e.to_string()));
            }
        }
        crate::systemd::reloaded();
    }

    fn quiet(&self, name: &str) -> bool {
        self.quiet_until
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .is_some_and(|until| Instant::now() < *until)
            || self.board.is_syncing(name)
    }

    fn hush(&self, name: &str) {
        self.quiet_until
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), Instant::now() + QUIET_AFTER_SYNC);
    }

    /// Keeps one loop per configured target until `shutdown`.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut changes = self.cx.subscribe();
        let mut loops: HashMap<String, (Target, watch::Sender<bool>)> = HashMap::new();
        let mut tasks = tokio::task::JoinSet::new();
        let (dest_events, mut dest_rx) = mpsc::channel::<PathBuf>(64);
        let mut dest_watcher = make_watcher(dest_events);
        let mut watched: Vec<PathBuf> = Vec::new();
        loop {
            let cx = changes.borrow_and_update().clone();
            // Stop loops of targets that are gone.
            loops.retain(|name, (_, stop)| {
                let keep = cx.settings.target(name).is_some();
                if !keep {
                    tracing::info!(target = %name, "target removed from the config");
                    let _ = stop.send(true);
                    self.triggers
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(name);
                }
                keep
            });
            for target in &cx.settings.targets {
                match loops.get_mut(&target.name) {
                    Some((known, _)) if known == target => {}
                    Some((known, _)) => {
                        *known = target.clone();
                        self.trigger(&target.name, Trigger::Sync);
                    }
                    None => {
                        // Room for a sync request behind a burst of repair requests.
                        let (tx, rx) = mpsc::channel(4);
                        let (stop_tx, stop_rx) = watch::channel(false);
                        self.triggers
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(target.name.clone(), tx);
                        loops.insert(target.name.clone(), (target.clone(), stop_tx));
                        tasks.spawn(self.clone().target_loop(
                            target.name.clone(),
                            rx,
                            stop_rx,
                            shutdown.clone(),
                        ));
                    }
                }
            }
            if let Some(w) = dest_watcher.as_mut() {
                rewatch(
                    w,
                    &mut watched,
                    cx.settings.targets.iter().map(|t| t.dest.clone()).collect(),
                );
            }
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { break },
                Some(path) = dest_rx.recv() => {
                    // Collect the burst, then route each path to its target.
                    let mut paths = vec![path];
                    while let Ok(p) = dest_rx.try_recv() {
                        paths.push(p);
                    }
                    for t in &cx.settings.targets {
                        if paths.iter().any(|p| p.starts_with(&t.dest) && !is_our_temp(p)) && !self.quiet(&t.name) {
                            tracing::debug!(target = %t.name, "outside change under dest");
                            self.trigger(&t.name, Trigger::Repair);
                        }
                    }
                }
                _ = shutdown.wait_for(|s| *s) => break,
            }
        }
        for (_, (_, stop)) in loops {
            let _ = stop.send(true);
        }
        while tasks.join_next().await.is_some() {}
    }

    async fn target_loop(
        self: Arc<Self>,
        name: String,
        mut triggers: mpsc::Receiver<Trigger>,
        stop: watch::Receiver<bool>,
        shutdown: watch::Receiver<bool>,
    ) {
        let mut schedule = Schedule::new(self.context().settings.verify_interval);
        let mut action = Some(Trigger::Sync);
        loop {
            let cx = self.context();
            let Some(target) = cx.settings.target(&name).cloned() else {
                return;
            };
            match action {
                Some(Trigger::Sync) => {
                    let synced = {
                        let _permit = self.permits.acquire().await;
                        let s = sync_and_record(&cx, &target, &self.board, false).await;
                        self.hush(&name);
                        s
                    };
                    let failures = self.board.consecutive_failures(&name);
                    let delay = schedule.synced(
                        synced.result.is_ok(),
                        failures,
                        synced.retry_after,
                        &cx.settings,
                    );
                    self.board.set_next(&name, SystemTime::now() + delay);
                }
                Some(Trigger::Repair) => {
                    tokio::time::sleep(REPAIR_SETTLE).await;
                    // Collapse the burst of repair requests; keep a sync request found in it.
                    let mut sync_asked = false;
                    while let Ok(t) = triggers.try_recv() {
                        sync_asked |= t == Trigger::Sync;
                    }
                    self.repair(&cx, &target).await;
                    if sync_asked {
                        action = Some(Trigger::Sync);
                        continue;
                    }
                }
                None => {}
            }
            crate::systemd::status(&self.board.summary());
            action = match schedule
                .next(&mut triggers, &stop, &shutdown, cx.settings.verify_interval)
                .await
            {
                Some(a) => Some(a),
                None => return,
            };
        }
    }

    /// Checks what is served against the store; re-downloads damaged files.
    async fn repair(&self, cx: &Context, target: &Target) {
        let settings = cx.settings.clone();
        let t = target.clone();
        let checked = tokio::task::spawn_blocking(move || sync::repair_target(&settings, &t)).await;
        match checked {
            Ok(Ok(Repair::Healthy)) => {}
            Ok(Ok(Repair::Relinked)) => {
                tracing::warn!(target = %target.name, "restored links changed from outside");
                self.board.self_repaired(&target.name);
                cx.metrics.self_repaired(&target.name);
            }
            Ok(Ok(Repair::NeedsRefetch(reason))) => {
                tracing::warn!(target = %target.name, "served files are damaged ({reason}); downloading them again");
                let _permit = self.permits.acquire().await;
                let synced = sync_and_record(cx, target, &self.board, true).await;
                self.hush(&target.name);
                if synced.result.is_ok() {
                    self.board.self_repaired(&target.name);
                    cx.metrics.self_repaired(&target.name);
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(target = %target.name, "repair check failed: {}", error_chain(&e))
            }
            Err(e) => tracing::warn!(target = %target.name, "repair check failed: {e}"),
        }
        self.hush(&target.name);
    }
}

/// When a target loop acts next: its sync timer, its slow verify timer, or a trigger.
pub struct Schedule {
    next_sync: Instant,
    next_verify: Instant,
}

impl Schedule {
    pub fn new(verify_interval: Duration) -> Schedule {
        let now = Instant::now();
        Schedule {
            next_sync: now,
            next_verify: now + verify_interval,
        }
    }

    /// Plans the next sync after one finished: the interval (jittered) after a success; after a
    /// failure the backoff, or longer when the registry said when to come back (Retry-After).
    pub fn synced(
        &mut self,
        ok: bool,
        failures: u32,
        retry_after: Option<Duration>,
        settings: &Settings,
    ) -> Duration {
        let delay = if ok {
            jitter(settings.interval)
        } else {
            backoff(
                failures,
                settings.backoff.start,
                settings.backoff.max,
                settings.interval,
            )
            .max(retry_after.unwrap_or_default())
        };
        self.next_sync = Instant::now() + delay;
        delay
    }

    /// Waits for the next thing to do; `None` when the loop should end.
    pub async fn next(
        &mut self,
        triggers: &mut mpsc::Receiver<Trigger>,
        stop: &watch::Receiver<bool>,
        shutdown: &watch::Receiver<bool>,
        verify_interval: Duration,
    ) -> Option<Trigger> {
        let (mut stop, mut shutdown) = (stop.clone(), shutdown.clone());
        tokio::select! {
            _ = tokio::time::sleep_until(self.next_sync) => Some(Trigger::Sync),
            _ = tokio::time::sleep_until(self.next_verify) => {
                self.next_verify = Instant::now() + verify_interval;
                Some(Trigger::Repair)
            }
            t = triggers.recv() => t,
            _ = stop.wait_for(|s| *s) => None,
            _ = shutdown.wait_for(|s| *s) => None,
        }
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
                tracing::warn!(dest = %dest.display(), %e, "cannot watch for outside changes")
            }
        }
    }
}

/// Watches the config file and its drop-in directory; sends one message per settled burst.
pub fn watch_config(path: &Path) -> Option<(notify::RecommendedWatcher, mpsc::Receiver<()>)> {
    let (tx, rx) = mpsc::channel(1);
    let file = path.to_path_buf();
    let dropins = crate::config::drop_in_dir(path);
    let relevant = {
        let file = file.clone();
        let dropins = dropins.clone();
        move |p: &Path| p == file || p.starts_with(&dropins)
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
    if let Some(dir) = file.parent() {
        if let Err(e) = watcher.watch(dir, RecursiveMode::Recursive) {
            tracing::warn!(%e, "cannot watch the config directory; reload with SIGHUP");
            return None;
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
    fn jitter_stays_within_ten_percent() {
        for _ in 0..1000 {
            let j = jitter(Duration::from_secs(300));
            assert!(
                j >= Duration::from_secs(270) && j <= Duration::from_secs(330),
                "{j:?}"
            );
        }
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let s = Duration::from_secs(10);
        let cap = Duration::from_secs(900);
        let hour = Duration::from_secs(3600);
        let within = |d: Duration, base: u64| {
            let b = Duration::from_secs(base);
            d >= b.mul_f64(0.9) && d <= b.mul_f64(1.1)
        };
        assert!(within(backoff(1, s, cap, hour), 10));
        assert!(within(backoff(2, s, cap, hour), 20));
        assert!(within(backoff(4, s, cap, hour), 80));
        assert!(within(backoff(30, s, cap, hour), 900));
        // never longer than the poll interval
        assert!(within(backoff(30, s, cap, Duration::from_secs(60)), 60));
    }

    #[test]
    fn error_chain_skips_repeated_causes() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer: {0}")]
        struct Outer(#[source] std::io::Error);
        let e = Outer(std::io::Error::other("inner"));
        assert_eq!(error_chain(&e), "outer: inner");
    }

    fn settings() -> Settings {
        let text = "interval = \"5m\"\n[[target]]\nname = \"t\"\nreference = \"r.example/a:b\"\ndest = \"/srv/t\"\npreset = \"demo\"\n";
        Settings::parse(Path::new("test.toml"), text).unwrap()
    }

    /// Drives the real waiting code with tokio's clock paused: backoff doubles after each
    /// failure, a Retry-After longer than the backoff wins, success waits the interval, and a
    /// trigger cuts a wait short.
    #[tokio::test(start_paused = true)]
    async fn schedule_backs_off_honours_retry_after_and_triggers() {
        let settings = settings();
        let (tx, mut rx) = mpsc::channel(1);
        let (_stop_tx, stop) = watch::channel(false);
        let (_down_tx, down) = watch::channel(false);
        let mut s = Schedule::new(settings.verify_interval);
        let waited = |lo: u64, hi: u64, started: Instant| {
            let e = started.elapsed();
            assert!(
                e >= Duration::from_secs(lo) && e <= Duration::from_secs(hi),
                "waited {e:?}, expected {lo}..{hi} s"
            );
        };
        for (failures, retry_after, lo, hi) in [
            (1, None, 9, 11),
            (2, None, 18, 22),
            (3, Some(120), 120, 120),
            (4, Some(5), 72, 88),
        ] {
            let t = Instant::now();
            s.synced(
                false,
                failures,
                retry_after.map(Duration::from_secs),
                &settings,
            );
            assert_eq!(
                s.next(&mut rx, &stop, &down, settings.verify_interval)
                    .await,
                Some(Trigger::Sync)
            );
            waited(lo, hi, t);
        }
        let t = Instant::now();
        s.synced(true, 0, None, &settings);
        assert_eq!(
            s.next(&mut rx, &stop, &down, settings.verify_interval)
                .await,
            Some(Trigger::Sync)
        );
        waited(270, 330, t);

        // A trigger arrives 3 s into a 5 min wait.
        s.synced(true, 0, None, &settings);
        let t = Instant::now();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(3)).await;
            tx.send(Trigger::Sync).await.unwrap();
        });
        assert_eq!(
            s.next(&mut rx, &stop, &down, settings.verify_interval)
                .await,
            Some(Trigger::Sync)
        );
        waited(3, 3, t);
    }

    #[tokio::test(start_paused = true)]
    async fn the_verify_timer_fires_on_its_own() {
        let mut settings = settings();
        settings.interval = Duration::from_secs(24 * 3600);
        settings.verify_interval = Duration::from_secs(3600);
        let (_tx, mut rx) = mpsc::channel(1);
        let (_stop_tx, stop) = watch::channel(false);
        let (_down_tx, down) = watch::channel(false);
        let mut s = Schedule::new(settings.verify_interval);
        s.synced(true, 0, None, &settings);
        let t = Instant::now();
        assert_eq!(
            s.next(&mut rx, &stop, &down, settings.verify_interval)
                .await,
            Some(Trigger::Repair)
        );
        assert_eq!(t.elapsed(), Duration::from_secs(3600));
    }

    #[test]
    fn control_characters_are_escaped() {
        let forged = "x\ntalos: published sha256:0 (2 files)\u{1b}[1A\r";
        let p = printable(forged);
        assert!(!p.chars().any(char::is_control), "{p:?}");
        assert!(p.contains("\\n") && p.contains("\\u{1b}"), "{p}");
        assert_eq!(printable("plain ünïcode"), "plain ünïcode");
    }

    #[test]
    fn our_temp_paths_are_recognised() {
        assert!(is_our_temp(Path::new("/a/dest/.staging-ab-1-2/k")));
        assert!(is_our_temp(Path::new("/a/dest/.tmp-current-1-2")));
        assert!(!is_our_temp(Path::new("/a/dest/versions/ab/k")));
    }
}
