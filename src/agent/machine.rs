//! The loop that owns one target's state: startup recovery, then one operation at a time, from
//! its schedule (the poll `interval` with jitter, backoff after failures, `Retry-After`
//! honoured, the slow `verify_interval`) and from its commands (the API, the file watcher, a
//! reload). Every operation is a `Runner` method and ends in its epilogue.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, watch, Semaphore};
use tokio::time::Instant;

use super::runner::{Context, Failure, Runner};
use super::state::Command;
use crate::backoff::{backoff, jitter};
use crate::config::Settings;

/// Outside changes to a dest are ignored this long after our own operation (our own writes).
const QUIET_AFTER: Duration = Duration::from_secs(2);
/// Repairs wait this long for a burst of file events to settle.
const REPAIR_SETTLE: Duration = Duration::from_millis(500);

/// When a target's loop acts next: its sync timer, its slow verify timer.
pub struct Schedule {
    next_sync: Instant,
    next_verify: Instant,
}

/// What woke the loop.
#[derive(Debug)]
pub enum Wake {
    Sync,
    Verify,
    Command(Command),
    Reload,
    Stop,
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

    /// Waits for the next thing to do.
    pub async fn next(
        &mut self,
        commands: &mut mpsc::Receiver<Command>,
        config: &mut watch::Receiver<Context>,
        stop: &mut watch::Receiver<bool>,
        verify_interval: Duration,
    ) -> Wake {
        tokio::select! {
            _ = tokio::time::sleep_until(self.next_sync) => Wake::Sync,
            _ = tokio::time::sleep_until(self.next_verify) => {
                self.next_verify = Instant::now() + verify_interval;
                Wake::Verify
            }
            c = commands.recv() => match c {
                Some(c) => Wake::Command(c),
                None => Wake::Stop,
            },
            changed = config.changed() => if changed.is_ok() { Wake::Reload } else { Wake::Stop },
            _ = stop.wait_for(|s| *s) => Wake::Stop,
        }
    }
}

/// One target's loop.
pub struct TargetLoop {
    name: String,
    runner: Runner,
    commands: mpsc::Receiver<Command>,
    config: watch::Receiver<Context>,
    stop: watch::Receiver<bool>,
    permits: Arc<Semaphore>,
    /// File events before this are our own writes.
    quiet_until: Instant,
}

impl TargetLoop {
    /// The loop of target `name` (which `config` must define).
    pub async fn new(
        name: &str,
        commands: mpsc::Receiver<Command>,
        mut config: watch::Receiver<Context>,
        stop: watch::Receiver<bool>,
        permits: Arc<Semaphore>,
    ) -> Option<TargetLoop> {
        let cx = config.borrow_and_update().clone();
        let target = cx.settings.target(name)?.clone();
        Some(TargetLoop {
            name: name.to_string(),
            runner: Runner::new(cx, target).await,
            commands,
            config,
            stop,
            permits,
            quiet_until: Instant::now(),
        })
    }

    fn hush(&mut self) {
        self.quiet_until = Instant::now() + QUIET_AFTER;
    }

    async fn sync(&mut self, schedule: &mut Schedule) {
        let result = {
            let _permit = self.permits.acquire().await;
            self.runner.sync(false).await
        };
        self.hush();
        self.plan_next(schedule, &result);
    }

    fn plan_next(&mut self, schedule: &mut Schedule, result: &Result<super::Done, Failure>) {
        let settings = self.config.borrow().settings.clone();
        let delay = schedule.synced(
            result.is_ok(),
            self.runner.state().consecutive_failures,
            result.as_ref().err().and_then(|f| f.retry_after),
            &settings,
        );
        self.runner.set_next_check(SystemTime::now() + delay);
    }

    /// Runs until the target leaves the config or the daemon stops.
    pub async fn run(mut self) {
        {
            let _permit = self.permits.acquire().await;
            self.runner.recover().await;
        }
        self.hush();
        let verify_interval = self.config.borrow().settings.verify_interval;
        let mut schedule = Schedule::new(verify_interval);
        let mut pending: VecDeque<Command> = VecDeque::new();
        loop {
            let wake = match pending.pop_front() {
                Some(c) => Wake::Command(c),
                None => {
                    let interval = self.config.borrow().settings.verify_interval;
                    schedule
                        .next(
                            &mut self.commands,
                            &mut self.config,
                            &mut self.stop,
                            interval,
                        )
                        .await
                }
            };
            match wake {
                Wake::Stop => return,
                Wake::Reload => {
                    let cx = self.config.borrow_and_update().clone();
                    let Some(target) = cx.settings.target(&self.name).cloned() else {
                        tracing::info!(target = %self.name, "target removed from the config");
                        return;
                    };
                    let changed = &target != self.runner.target();
                    self.runner.reconfigure(cx, target);
                    if changed {
                        self.sync(&mut schedule).await;
                    }
                }
                Wake::Sync | Wake::Command(Command::Sync) => {
                    self.sync(&mut schedule).await;
                }
                Wake::Verify => {
                    let _permit = self.permits.acquire().await;
                    let _ = self.runner.repair().await;
                    drop(_permit);
                    self.hush();
                }
                Wake::Command(Command::Changed) => {
                    if Instant::now() < self.quiet_until {
                        continue;
                    }
                    tokio::time::sleep(REPAIR_SETTLE).await;
                    // Collapse the burst; keep every other command for after the repair.
                    while let Ok(c) = self.commands.try_recv() {
                        if !matches!(c, Command::Changed) {
                            pending.push_back(c);
                        }
                    }
                    tracing::debug!(target = %self.name, "outside change under dest");
                    {
                        let _permit = self.permits.acquire().await;
                        let _ = self.runner.repair().await;
                    }
                    self.hush();
                }
                Wake::Command(Command::Rollback { to, reply }) => {
                    let result = {
                        let _permit = self.permits.acquire().await;
                        self.runner.rollback(to).await
                    };
                    self.hush();
                    let _ = reply.send(result);
                }
                Wake::Command(Command::Unpin { reply }) => {
                    let lifted = self.runner.lift_pin().await;
                    let ok = lifted.is_ok();
                    let _ = reply.send(lifted);
                    if ok {
                        self.sync(&mut schedule).await;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn settings() -> Settings {
        let text = "interval = \"5m\"\n[[target]]\nname = \"t\"\nreference = \"r.example/a:b\"\ndest = \"/srv/t\"\npreset = \"demo\"\n";
        Settings::parse(Path::new("test.toml"), text).unwrap()
    }

    type Channels = (
        mpsc::Sender<Command>,
        mpsc::Receiver<Command>,
        watch::Sender<Context>,
        watch::Receiver<Context>,
        watch::Sender<bool>,
        watch::Receiver<bool>,
    );

    fn channels() -> Channels {
        let (tx, rx) = mpsc::channel(1);
        let cx = Context::new(settings(), Arc::new(super::super::Quiet));
        let (ctx, crx) = watch::channel(cx);
        let (stx, srx) = watch::channel(false);
        (tx, rx, ctx, crx, stx, srx)
    }

    /// Drives the real waiting code with tokio's clock paused: backoff doubles after each
    /// failure, a Retry-After longer than the backoff wins, success waits the interval, and a
    /// command cuts a wait short.
    #[tokio::test(start_paused = true)]
    async fn schedule_backs_off_honours_retry_after_and_commands() {
        let settings = settings();
        let (tx, mut rx, _ctx, mut crx, _stx, mut srx) = channels();
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
            let w = s
                .next(&mut rx, &mut crx, &mut srx, settings.verify_interval)
                .await;
            assert!(matches!(w, Wake::Sync), "{w:?}");
            waited(lo, hi, t);
        }
        let t = Instant::now();
        s.synced(true, 0, None, &settings);
        let w = s
            .next(&mut rx, &mut crx, &mut srx, settings.verify_interval)
            .await;
        assert!(matches!(w, Wake::Sync), "{w:?}");
        waited(270, 330, t);

        // A command arrives 3 s into a 5 min wait.
        s.synced(true, 0, None, &settings);
        let t = Instant::now();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(3)).await;
            tx.send(Command::Sync).await.unwrap();
        });
        let w = s
            .next(&mut rx, &mut crx, &mut srx, settings.verify_interval)
            .await;
        assert!(matches!(w, Wake::Command(Command::Sync)), "{w:?}");
        waited(3, 3, t);
    }

    #[tokio::test(start_paused = true)]
    async fn the_verify_timer_fires_on_its_own() {
        let mut settings = settings();
        settings.interval = Duration::from_secs(24 * 3600);
        settings.verify_interval = Duration::from_secs(3600);
        let (_tx, mut rx, _ctx, mut crx, _stx, mut srx) = channels();
        let mut s = Schedule::new(settings.verify_interval);
        s.synced(true, 0, None, &settings);
        let t = Instant::now();
        let w = s
            .next(&mut rx, &mut crx, &mut srx, settings.verify_interval)
            .await;
        assert!(matches!(w, Wake::Verify), "{w:?}");
        assert_eq!(t.elapsed(), Duration::from_secs(3600));
    }
}
