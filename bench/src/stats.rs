//! Percentiles of latency samples.

use std::time::Duration;

use serde::Serialize;

/// The distribution of a set of latency samples, in microseconds.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct Latency {
    /// How many samples.
    pub(crate) samples: usize,
    /// Median.
    pub(crate) p50_us: f64,
    /// 99th percentile (nearest rank).
    pub(crate) p99_us: f64,
    /// Mean.
    pub(crate) mean_us: f64,
    /// Smallest.
    pub(crate) min_us: f64,
    /// Largest.
    pub(crate) max_us: f64,
}

impl Latency {
    /// Summarizes `samples` (empty: all zero).
    pub(crate) fn of(samples: &[Duration]) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        let mut us: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e6).collect();
        us.sort_by(f64::total_cmp);
        let rank = |p: f64| {
            // Nearest rank: the smallest sample with at least p of the samples at or below it.
            let r = (p * us.len() as f64).ceil() as usize;
            us[r.clamp(1, us.len()) - 1]
        };
        Self {
            samples: us.len(),
            p50_us: rank(0.50),
            p99_us: rank(0.99),
            mean_us: us.iter().sum::<f64>() / us.len() as f64,
            min_us: us[0],
            max_us: us[us.len() - 1],
        }
    }
}

/// The median of counts (the lower middle for an even number), and their mean.
pub(crate) fn median_and_mean(counts: &[u64]) -> (f64, f64) {
    if counts.is_empty() {
        return (0.0, 0.0);
    }
    let mut sorted = counts.to_vec();
    sorted.sort_unstable();
    let median = sorted[(sorted.len() - 1) / 2] as f64;
    let mean = counts.iter().sum::<u64>() as f64 / counts.len() as f64;
    (median, mean)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let samples: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
        let l = Latency::of(&samples);
        assert_eq!(
            (l.p50_us, l.p99_us, l.min_us, l.max_us),
            (50.0, 99.0, 1.0, 100.0)
        );
        assert_eq!(l.mean_us, 50.5);
        let one = Latency::of(&[Duration::from_micros(7)]);
        assert_eq!((one.p50_us, one.p99_us), (7.0, 7.0));
        assert_eq!(median_and_mean(&[1, 1, 3, 1]), (1.0, 1.5));
    }
}
