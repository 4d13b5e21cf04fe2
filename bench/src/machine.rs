//! The machine the figures come from, and this process's CPU time and memory (from `/proc`).

use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// Where a run happened.
#[derive(Debug, Serialize)]
pub(crate) struct Machine {
    pub(crate) cores: usize,
    pub(crate) cpu: String,
    pub(crate) memory_gib: f64,
    pub(crate) kernel: String,
    /// `/proc/loadavg` (1, 5, 15 minutes) when the run started and ended: other work on the
    /// machine shows here.
    pub(crate) load_start: [f64; 3],
    pub(crate) load_end: [f64; 3],
    /// Median time of a 4 KiB write + `fdatasync` in the scratch directory, in milliseconds:
    /// what a durable commit costs at least on this machine's disk.
    pub(crate) fsync_p50_ms: Option<f64>,
}

/// Times 50 4 KiB writes, each followed by `fdatasync`, in a file inside `dir`; the median in
/// milliseconds.
pub(crate) fn fsync_probe(dir: &std::path::Path) -> Option<f64> {
    use std::io::{Seek, Write};
    let path = dir.join("fsync-probe");
    let mut file = std::fs::File::create(&path).ok()?;
    let block = [7u8; 4096];
    let mut samples = Vec::with_capacity(50);
    for _ in 0..50 {
        let start = std::time::Instant::now();
        file.seek(std::io::SeekFrom::Start(0)).ok()?;
        file.write_all(&block).ok()?;
        file.sync_data().ok()?;
        samples.push(start.elapsed());
    }
    let _ = std::fs::remove_file(&path);
    Some(crate::stats::Latency::of(&samples).p50_us / 1000.0)
}

impl Machine {
    pub(crate) fn now(load_start: [f64; 3], fsync_p50_ms: Option<f64>) -> Self {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|info| {
                info.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".into());
        let memory_kib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|info| kib_field(&info, "MemTotal:"))
            .unwrap_or(0);
        Self {
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu,
            memory_gib: memory_kib as f64 / (1024.0 * 1024.0),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| format!("Linux {}", s.trim()))
                .unwrap_or_else(|_| std::env::consts::OS.to_owned()),
            load_start,
            load_end: loadavg(),
            fsync_p50_ms,
        }
    }

    pub(crate) fn summary(&self) -> String {
        format!(
            "{} cores ({}), {:.1} GiB, {}; load average {:.2} at start, {:.2} at end",
            self.cores,
            self.cpu,
            self.memory_gib,
            self.kernel,
            self.load_start[0],
            self.load_end[0]
        )
    }
}

/// The load averages, or zeros where `/proc/loadavg` is missing.
pub(crate) fn loadavg() -> [f64; 3] {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut it = text
        .split_whitespace()
        .map(|v| v.parse::<f64>().unwrap_or(0.0));
    [
        it.next().unwrap_or(0.0),
        it.next().unwrap_or(0.0),
        it.next().unwrap_or(0.0),
    ]
}

fn kib_field(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// This process's resident memory (`VmRSS`), in MiB.
pub(crate) fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| kib_field(&s, "VmRSS:"))
        .map_or(0.0, |kib| kib as f64 / 1024.0)
}

/// Clock ticks per second of `/proc/self/stat` (`USER_HZ`, 100 on every Linux this runs on).
const USER_HZ: f64 = 100.0;

/// This process's CPU time so far, user + system, in seconds (`/proc/self/stat` utime + stime).
pub(crate) fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The command name may contain spaces; the fields after it start with the state (field 3).
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let field = |n: usize| -> f64 {
        fields
            .get(n - 3)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    (field(14) + field(15)) / USER_HZ
}

/// `SystemTime` as `YYYY-MM-DD HH:MM:SS UTC`.
pub(crate) fn utc(time: SystemTime) -> String {
    let secs = time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Busy and total jiffies of all CPUs so far (`/proc/stat`, first line); `None` where missing.
fn cpu_jiffies() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let idle = fields.get(3)? + fields.get(4).copied().unwrap_or(0);
    let total: u64 = fields.iter().take(8).sum();
    Some((total - idle, total))
}

/// Waits until the machine is quiet: a 500 ms window in which all CPUs together were busy less
/// than a tenth of one CPU, so that work a previous measure left behind on the servers (InnoDB's
/// purge, a checkpoint, a JVM's collector) does not fall into the next one. Gives up after
/// `limit`. Returns how long it waited and the busy share of the last window (in CPUs).
pub(crate) async fn settle(limit: std::time::Duration) -> (std::time::Duration, f64) {
    let started = std::time::Instant::now();
    let window = std::time::Duration::from_millis(500);
    loop {
        let Some((busy0, total0)) = cpu_jiffies() else {
            return (started.elapsed(), 0.0);
        };
        tokio::time::sleep(window).await;
        let Some((busy1, total1)) = cpu_jiffies() else {
            return (started.elapsed(), 0.0);
        };
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let share = (busy1 - busy0) as f64 / (total1 - total0).max(1) as f64 * cpus;
        if share < 0.1 || started.elapsed() >= limit {
            return (started.elapsed(), share);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn dates() {
        assert_eq!(utc(UNIX_EPOCH), "1970-01-01 00:00:00 UTC");
        let t = UNIX_EPOCH + Duration::from_secs(1_709_210_096); // 2024-02-29 12:34:56
        assert_eq!(utc(t), "2024-02-29 12:34:56 UTC");
    }

    #[test]
    fn proc_readings() {
        assert!(rss_mib() > 0.0);
        assert!(cpu_seconds() >= 0.0);
    }
}
