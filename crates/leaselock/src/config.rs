//! Configuration of the orchestrator: waiting and failure policies.

use std::time::{Duration, Instant};

use crate::error::{Error, Result};

const MAX_WAIT: Duration = Duration::from_secs(366 * 24 * 60 * 60);
const MAX_DELAY: Duration = Duration::from_secs(24 * 60 * 60);
const MIN_DELAY: Duration = Duration::from_millis(1);

/// How long to keep trying when a lock is held by someone else.
///
/// The default is [`WaitPolicy::fail_fast`]: immediate feedback is better than waiting, unless the
/// caller is an automated system that can afford to wait. While waiting, a backend with release
/// notifications wakes the waiter as soon as the holder releases.
///
/// ```
/// use std::time::Duration;
/// use leaselock::WaitPolicy;
/// let patient = WaitPolicy::until(Duration::from_secs(300), Duration::from_secs(1))
///     .with_jitter(Duration::from_millis(200));
/// let a_few = WaitPolicy::attempts(5, Duration::from_millis(500));
/// assert_ne!(patient, a_few);
/// assert_eq!(WaitPolicy::default(), WaitPolicy::fail_fast());
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct WaitPolicy {
    mode: WaitMode,
    jitter: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
enum WaitMode {
    #[default]
    FailFast,
    Attempts {
        attempts: u32,
        delay: Duration,
    },
    Until {
        timeout: Duration,
        interval: Duration,
    },
}

impl WaitPolicy {
    /// One attempt, no waiting (the default).
    pub fn fail_fast() -> Self {
        Self::default()
    }

    /// Up to `attempts` attempts in all (at least 1), `delay` apart.
    pub fn attempts(attempts: u32, delay: Duration) -> Self {
        Self {
            mode: WaitMode::Attempts { attempts, delay },
            jitter: Duration::ZERO,
        }
    }

    /// Keep trying every `interval` until `timeout` has passed since the first attempt.
    pub fn until(timeout: Duration, interval: Duration) -> Self {
        Self {
            mode: WaitMode::Until { timeout, interval },
            jitter: Duration::ZERO,
        }
    }

    /// Adds a random delay between zero and `jitter` to every wait, so many waiters do not retry
    /// in lockstep. Default: none.
    pub fn with_jitter(mut self, jitter: Duration) -> Self {
        self.jitter = jitter;
        self
    }

    /// The total time this policy may wait, if bounded by time.
    pub fn timeout(&self) -> Option<Duration> {
        match self.mode {
            WaitMode::Until { timeout, .. } => Some(timeout),
            _ => None,
        }
    }

    pub(crate) fn validate(&self) -> Result<()> {
        match self.mode {
            WaitMode::FailFast => {}
            WaitMode::Attempts { attempts, delay } => {
                if attempts == 0 {
                    return Err(Error::invalid("wait.attempts", "must be at least 1"));
                }
                check_delay("wait.delay", delay)?;
            }
            WaitMode::Until { timeout, interval } => {
                if timeout.is_zero() || timeout > MAX_WAIT {
                    return Err(Error::invalid(
                        "wait.timeout",
                        format!("{timeout:?} must be above zero and at most {MAX_WAIT:?}"),
                    ));
                }
                check_delay("wait.interval", interval)?;
            }
        }
        if self.jitter > MAX_DELAY {
            return Err(Error::invalid(
                "wait.jitter",
                format!("{:?} is longer than {MAX_DELAY:?}", self.jitter),
            ));
        }
        Ok(())
    }

    /// The delay before attempt `attempt + 1`, or `None` to give up. `attempt` counts from 1.
    pub(crate) fn next_delay(&self, attempt: u32, started: Instant) -> Option<Duration> {
        let jitter = if self.jitter.is_zero() {
            Duration::ZERO
        } else {
            self.jitter.mul_f64(fastrand::f64())
        };
        match self.mode {
            WaitMode::FailFast => None,
            WaitMode::Attempts { attempts, delay } => (attempt < attempts).then(|| delay + jitter),
            WaitMode::Until { timeout, interval } => {
                let left = timeout.checked_sub(started.elapsed())?;
                (!left.is_zero()).then(|| (interval + jitter).min(left))
            }
        }
    }
}

fn check_delay(field: &'static str, delay: Duration) -> Result<()> {
    if delay < MIN_DELAY || delay > MAX_DELAY {
        return Err(Error::invalid(
            field,
            format!("{delay:?} must be between {MIN_DELAY:?} and {MAX_DELAY:?}"),
        ));
    }
    Ok(())
}

/// What [`crate::Locker::acquire`] and [`crate::Locker::run`] do when the lock stays held after
/// waiting as configured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum OnUnavailable {
    /// Fail with [`Error::Held`], naming the holder (the default).
    #[default]
    Error,
    /// Return `Ok(None)`: the work did not run.
    ReturnNone,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays() {
        let start = Instant::now();
        assert_eq!(WaitPolicy::fail_fast().next_delay(1, start), None);
        let p = WaitPolicy::attempts(3, Duration::from_millis(5));
        assert_eq!(p.next_delay(1, start), Some(Duration::from_millis(5)));
        assert_eq!(p.next_delay(2, start), Some(Duration::from_millis(5)));
        assert_eq!(p.next_delay(3, start), None);
        let p = WaitPolicy::until(Duration::from_secs(3600), Duration::from_secs(1))
            .with_jitter(Duration::from_millis(100));
        let d = p.next_delay(1, start).unwrap();
        assert!(d >= Duration::from_secs(1) && d <= Duration::from_millis(1100));
        let past = Instant::now() - Duration::from_secs(2);
        let p = WaitPolicy::until(Duration::from_secs(1), Duration::from_millis(10));
        assert_eq!(p.next_delay(1, past), None);
    }

    #[test]
    fn validation() {
        assert!(WaitPolicy::attempts(0, Duration::from_secs(1))
            .validate()
            .is_err());
        assert!(WaitPolicy::attempts(1, Duration::ZERO).validate().is_err());
        assert!(WaitPolicy::until(Duration::ZERO, Duration::from_secs(1))
            .validate()
            .is_err());
        assert!(
            WaitPolicy::until(Duration::from_secs(u64::MAX), Duration::from_secs(1))
                .validate()
                .is_err()
        );
        assert!(WaitPolicy::fail_fast()
            .with_jitter(Duration::from_secs(1_000_000))
            .validate()
            .is_err());
        assert!(
            WaitPolicy::until(Duration::from_secs(60), Duration::from_millis(100))
                .validate()
                .is_ok()
        );
    }
}
