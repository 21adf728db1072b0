//! The progress display of `sync --once` on a terminal: one line per layer with bytes, rate
//! and ETA, redrawn at most ten times a second.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::registry::Observer;

/// A progress line on stderr for `target`'s blob downloads.
pub fn observer(target: &str) -> Arc<dyn Observer> {
    Arc::new(Bar {
        target: target.to_string(),
        state: Mutex::new(None),
    })
}

struct Layer {
    digest: String,
    size: u64,
    done: u64,
    started: Instant,
    drawn: Instant,
}

struct Bar {
    target: String,
    state: Mutex<Option<Layer>>,
}

fn mb(n: u64) -> f64 {
    n as f64 / 1e6
}

impl Bar {
    fn draw(&self, l: &Layer, last: bool) {
        let secs = l.started.elapsed().as_secs_f64().max(0.001);
        let rate = l.done as f64 / secs;
        let eta = if rate > 0.0 {
            Duration::from_secs_f64(l.size.saturating_sub(l.done) as f64 / rate)
        } else {
            Duration::ZERO
        };
        let short = l.digest.strip_prefix("sha256:").unwrap_or(&l.digest);
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r{} layer {}  {:>7.1}/{:.1} MB  {:>6.1} MB/s  ETA {:>3}s ",
            self.target,
            &short[..short.len().min(12)],
            mb(l.done),
            mb(l.size),
            mb(rate as u64),
            eta.as_secs()
        );
        if last {
            let _ = writeln!(err);
        }
        let _ = err.flush();
    }
}

impl Observer for Bar {
    fn blob_started(&self, digest: &str, size: u64) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(prev) = state.take() {
            self.draw(&prev, true);
        }
        let now = Instant::now();
        *state = Some(Layer {
            digest: digest.to_string(),
            size,
            done: 0,
            started: now,
            drawn: now,
        });
    }

    fn bytes(&self, _host: &str, n: u64) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(l) = state.as_mut() {
            l.done += n;
            let finished = l.done >= l.size;
            if finished || l.drawn.elapsed() >= Duration::from_millis(100) {
                l.drawn = Instant::now();
                self.draw(l, finished);
                if finished {
                    *state = None;
                }
            }
        }
    }
}
