//! A test hook: with `BOOTSYNC_TEST_PAUSE_MS` set, bootsync sleeps that long at each named point
//! of a publish, which widens the windows a crash test kills it in. Unset (always, in
//! production), it costs one cached environment lookup.

use std::sync::OnceLock;
use std::time::Duration;

fn pause_length() -> Option<Duration> {
    static PAUSE: OnceLock<Option<Duration>> = OnceLock::new();
    *PAUSE.get_or_init(|| {
        std::env::var("BOOTSYNC_TEST_PAUSE_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map(Duration::from_millis)
    })
}

/// Sleeps at `point` when the hook is on (blocking: called from the unpacking thread too).
pub fn pause(point: &str) {
    if let Some(d) = pause_length() {
        tracing::debug!(point, "test pause");
        std::thread::sleep(d);
    }
}
