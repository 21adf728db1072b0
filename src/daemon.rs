//! The sync loop: every target on its own schedule, with jitter, and backoff after failures.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{watch, Semaphore};

use crate::config::Target;
use crate::status::Board;
use crate::sync::{self, Context, Outcome};

/// Targets syncing at the same time (downloads share one link and two cores).
const MAX_CONCURRENT_SYNCS: usize = 2;
const BACKOFF_START: Duration = Duration::from_secs(10);
const BACKOFF_CAP: Duration = Duration::from_secs(15 * 60);

/// `d` +-10%, so many bastions polling one registry do not arrive in step.
pub fn jitter(d: Duration) -> Duration {
    d.mul_f64(0.9 + fastrand::f64() * 0.2)
}

/// Delay after the `failures`-th consecutive failure: 10 s doubling, capped at 15 min and never
/// longer than the poll interval.
pub fn backoff(failures: u32, interval: Duration) -> Duration {
    let exp = BACKOFF_START.saturating_mul(1u32 << failures.saturating_sub(1).min(16));
    jitter(exp.min(BACKOFF_CAP).min(interval.max(BACKOFF_START)))
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

/// Runs one sync of `target` and records it on the board. Returns the error text on failure.
pub async fn sync_and_record(
    cx: &Context,
    target: &Target,
    board: &Board,
) -> Result<Outcome, String> {
    board.syncing(&target.name);
    match sync::sync_target(cx, target).await {
        Ok(outcome) => {
            board.succeeded(&target.name, outcome.manifest(), None);
            Ok(outcome)
        }
        Err(e) => {
            let text = format!(
                "target {} ({}, {}): {}",
                target.name,
                target.reference,
                target.platform,
                error_chain(&e)
            );
            let failures = board.failed(&target.name, &text, None);
            tracing::error!(target = %target.name, failures, "sync failed: {text}");
            Err(text)
        }
    }
}

/// Polls every target until `shutdown` turns true.
pub async fn run_loops(cx: Context, board: Board, shutdown: watch::Receiver<bool>) {
    let permits = Arc::new(Semaphore::new(MAX_CONCURRENT_SYNCS));
    let mut tasks = tokio::task::JoinSet::new();
    for target in cx.settings.targets.clone() {
        let cx = cx.clone();
        let board = board.clone();
        let permits = permits.clone();
        let mut shutdown = shutdown.clone();
        tasks.spawn(async move {
            loop {
                let sync = async {
                    let _permit = permits.acquire().await;
                    sync_and_record(&cx, &target, &board).await
                };
                let result = tokio::select! {
                    r = sync => r,
                    _ = shutdown.wait_for(|stop| *stop) => return,
                };
                let delay = match result {
                    Ok(_) => jitter(cx.settings.interval),
                    Err(_) => backoff(
                        board.consecutive_failures(&target.name),
                        cx.settings.interval,
                    ),
                };
                board.set_next(&target.name, SystemTime::now() + delay);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.wait_for(|stop| *stop) => return,
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
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
        let hour = Duration::from_secs(3600);
        let within = |d: Duration, base: u64| {
            let b = Duration::from_secs(base);
            d >= b.mul_f64(0.9) && d <= b.mul_f64(1.1)
        };
        assert!(within(backoff(1, hour), 10));
        assert!(within(backoff(2, hour), 20));
        assert!(within(backoff(4, hour), 80));
        assert!(within(backoff(30, hour), 900));
        // never longer than the poll interval
        assert!(within(backoff(30, Duration::from_secs(60)), 60));
    }

    #[test]
    fn error_chain_skips_repeated_causes() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer: {0}")]
        struct Outer(#[source] std::io::Error);
        let e = Outer(std::io::Error::other("inner"));
        assert_eq!(error_chain(&e), "outer: inner");
    }
}
