//! Waits between retries: jittered, so many bastions polling one registry do not arrive in step.

use std::time::Duration;

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
}
