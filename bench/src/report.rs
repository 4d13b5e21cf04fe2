//! What a run found: the JSON document's shape, the targets read from it, the stdout table.

use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::machine::Machine;
use crate::stats::Latency;
use crate::target::BackendId;
use crate::Result;

/// The JSON schema's name and version.
pub(crate) const SCHEMA: &str = "leaselock-bench/1";

/// Everything one run measured. Print it with [`Report::table`], save it with
/// [`Report::write_json`] and [`Report::write_docs`].
#[derive(Debug, Serialize)]
pub struct Report {
    pub(crate) schema: &'static str,
    pub(crate) started_at: String,
    pub(crate) finished_at: String,
    pub(crate) command: String,
    pub(crate) machine: Machine,
    pub(crate) settings: Settings,
    pub(crate) backends: Vec<BackendReport>,
}

/// The settings of the run.
#[derive(Debug, Serialize)]
pub(crate) struct Settings {
    pub(crate) measures: Vec<String>,
    pub(crate) cycles: usize,
    pub(crate) round_trip_cycles: usize,
    pub(crate) handoffs: usize,
    pub(crate) poll_interval_ms: f64,
    pub(crate) workers: usize,
    pub(crate) keys: usize,
    pub(crate) contention_duration_s: f64,
    pub(crate) settle_s: f64,
    pub(crate) scale_leases: usize,
    pub(crate) scale_lease_s: f64,
    pub(crate) scale_refresh_interval_s: f64,
    pub(crate) scale_duration_s: f64,
}

/// One backend's results.
#[derive(Debug, Serialize)]
pub(crate) struct BackendReport {
    pub(crate) name: &'static str,
    #[serde(skip)]
    pub(crate) id: BackendId,
    /// `ran`, `skipped` (no server URL) or `failed` (could not even start).
    pub(crate) status: &'static str,
    pub(crate) reason: Option<String>,
    pub(crate) server: Option<String>,
    pub(crate) floor: &'static str,
    pub(crate) uncontended: Outcome<Uncontended>,
    pub(crate) round_trips: Outcome<RoundTrips>,
    pub(crate) handoff: Outcome<Handoff>,
    pub(crate) contention: Outcome<Vec<Contention>>,
    pub(crate) scale: Outcome<Scale>,
    pub(crate) targets: Vec<TargetCheck>,
}

impl BackendReport {
    pub(crate) fn new(id: BackendId) -> Self {
        Self {
            name: id.name(),
            id,
            status: "ran",
            reason: None,
            server: None,
            floor: id.floor_statements(),
            uncontended: Outcome::NotRun,
            round_trips: Outcome::NotRun,
            handoff: Outcome::NotRun,
            contention: Outcome::NotRun,
            scale: Outcome::NotRun,
            targets: Vec::new(),
        }
    }
}

/// How one measure went for one backend.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "kebab-case")]
pub(crate) enum Outcome<T> {
    /// Not selected on the command line.
    NotRun,
    /// Does not apply to this backend, or its server is missing.
    Skipped { reason: String },
    /// Started and failed.
    Failed { error: String },
    /// Measured.
    Ran { result: T },
}

impl<T> Outcome<Outcome<T>> {
    /// An outcome of an outcome (a measure run elsewhere): the inner one, unless the outer
    /// one failed.
    pub(crate) fn flatten(self) -> Outcome<T> {
        match self {
            Outcome::Ran { result } => result,
            Outcome::NotRun => Outcome::NotRun,
            Outcome::Skipped { reason } => Outcome::Skipped { reason },
            Outcome::Failed { error } => Outcome::Failed { error },
        }
    }
}

impl<T> Outcome<T> {
    pub(crate) fn ran(&self) -> Option<&T> {
        match self {
            Outcome::Ran { result } => Some(result),
            _ => None,
        }
    }

    /// A short word for a measure that has no figures.
    pub(crate) fn gap(&self) -> String {
        match self {
            Outcome::NotRun => "not run".into(),
            Outcome::Skipped { .. } => "skipped".into(),
            Outcome::Failed { .. } => "FAILED".into(),
            Outcome::Ran { .. } => String::new(),
        }
    }
}

/// Acquire and release latency of one way of locking.
#[derive(Debug, Serialize)]
pub(crate) struct CycleLatency {
    /// Acquire + release.
    pub(crate) cycle: Latency,
    pub(crate) acquire: Latency,
    pub(crate) release: Latency,
}

/// Measure 1.
#[derive(Debug, Serialize)]
pub(crate) struct Uncontended {
    pub(crate) cycles: usize,
    pub(crate) leaselock: CycleLatency,
    pub(crate) floor: CycleLatency,
    /// leaselock p50 / floor p50 of a whole cycle.
    pub(crate) ratio_p50: f64,
    /// leaselock p99 / floor p99 of a whole cycle.
    pub(crate) ratio_p99: f64,
}

/// Round trips (or statements) of one operation.
#[derive(Debug, Default, Serialize)]
pub(crate) struct OpCount {
    /// Median per operation, counting what the operation caused until the connection was quiet
    /// again (a reset the pool sends after the call returned counts too).
    pub(crate) median: f64,
    pub(crate) mean: f64,
    /// Mean of what was sent while the call ran.
    pub(crate) in_call_mean: f64,
    /// Mean of what was sent after the call returned, before the next operation.
    pub(crate) after_call_mean: f64,
    /// Mean of new connections opened per operation.
    pub(crate) connections_mean: f64,
}

/// Measure 2.
#[derive(Debug, Serialize)]
pub(crate) struct RoundTrips {
    /// `round trips`, `statements` or `none`.
    pub(crate) unit: &'static str,
    pub(crate) method: String,
    pub(crate) samples: usize,
    pub(crate) acquire: OpCount,
    pub(crate) release: OpCount,
    pub(crate) floor_lock: OpCount,
    pub(crate) floor_unlock: OpCount,
}

/// Measure 3.
#[derive(Debug, Serialize)]
pub(crate) struct Handoff {
    pub(crate) poll_interval_ms: f64,
    /// Whether the backend wakes waiters on release (else they poll).
    pub(crate) release_notifications: bool,
    /// From the holder's release call to the waiter holding.
    pub(crate) latency: Latency,
    /// The floor's handoff: after the same kind of pause, the floor's unlock on one connection
    /// and then its lock on another, by hand and back to back (no waiting, no wake-up between
    /// them): what the server takes for the two statements on a machine that was idle.
    pub(crate) floor: Latency,
}

/// The throughput of one side of a contended run.
#[derive(Debug, Default, Serialize)]
pub(crate) struct Throughput {
    /// Acquisition attempts (a cycle: an attempt, plus a release when it won).
    pub(crate) attempts: u64,
    pub(crate) acquired: u64,
    /// Attempts that found the key held (not errors: the fail-fast answer).
    pub(crate) refused: u64,
    /// Errors surfaced to the caller.
    pub(crate) errors: u64,
    pub(crate) error_samples: Vec<String>,
    pub(crate) elapsed_s: f64,
    pub(crate) cycles_per_s: f64,
    pub(crate) acquired_per_s: f64,
    /// Statements issued (the floor only).
    pub(crate) statements: Option<u64>,
}

/// Measure 4, one shape.
#[derive(Debug, Serialize)]
pub(crate) struct Contention {
    pub(crate) workers: usize,
    pub(crate) keys: usize,
    pub(crate) leaselock: Throughput,
    pub(crate) floor: Throughput,
    /// The floor's statements per second divided by the statements its cycles needed (two to
    /// win and release, one when refused): cycles per second the server allows for this shape.
    pub(crate) server_limit_cycles_per_s: f64,
    /// leaselock cycles per second / the server's limit.
    pub(crate) ratio: f64,
}

/// Measure 5.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Scale {
    /// Leases asked for.
    pub(crate) leases: usize,
    /// Leases acquired before the acquisition time limit (all of them, on a backend that keeps
    /// up).
    pub(crate) acquired: usize,
    /// Leases already lost when the window started (during acquisition).
    pub(crate) lost_before_window: usize,
    pub(crate) lease_duration_s: f64,
    pub(crate) refresh_interval_s: f64,
    /// The locker's refresh batch window (`Locker::refresh_batch_window`; zero: none).
    #[serde(default)]
    pub(crate) refresh_batch_window_s: f64,
    pub(crate) acquire_s: f64,
    pub(crate) window_s: f64,
    pub(crate) cpu_s: f64,
    /// CPU time / wall time over the window: 1.0 is one core busy.
    pub(crate) cpu_share_of_one_core: f64,
    pub(crate) rss_before_mib: f64,
    pub(crate) rss_window_start_mib: f64,
    pub(crate) rss_window_max_mib: f64,
    pub(crate) rss_window_end_mib: f64,
    pub(crate) refreshes: u64,
    pub(crate) refresh_errors: u64,
    pub(crate) refreshes_per_s: f64,
    /// Leases whose lost signal had fired by the end of the window (those lost during
    /// acquisition included).
    pub(crate) lost: usize,
}

/// A target of the issue, read from the figures.
#[derive(Debug, Serialize)]
pub(crate) struct TargetCheck {
    pub(crate) measure: &'static str,
    pub(crate) target: String,
    pub(crate) value: String,
    /// `None`: not measured, or the target does not apply.
    pub(crate) met: Option<bool>,
}

impl TargetCheck {
    pub(crate) fn verdict(&self) -> &'static str {
        match self.met {
            Some(true) => "met",
            Some(false) => "NOT MET",
            None => "n/a",
        }
    }
}

/// Reads the targets off one backend's figures.
pub(crate) fn evaluate(b: &BackendReport) -> Vec<TargetCheck> {
    let mut out = Vec::new();
    if let Some(u) = b.uncontended.ran() {
        out.push(TargetCheck {
            measure: "uncontended",
            target: format!("leaselock / floor (p50) ≤ {RATIO_TARGET}"),
            value: ratio(u.ratio_p50),
            met: Some(u.ratio_p50 <= RATIO_TARGET),
        });
    }
    if let Some(rt) = b.round_trips.ran() {
        let applies = rt.unit != "none";
        out.push(TargetCheck {
            measure: "round trips",
            target: format!("1 per acquire and 1 per release (goal; {})", rt.unit),
            value: format!("{} + {}", num(rt.acquire.median), num(rt.release.median)),
            met: applies.then_some(rt.acquire.median <= 1.0 && rt.release.median <= 1.0),
        });
    }
    if let Some(h) = b.handoff.ran() {
        let applies = b.id.handoff_target_applies();
        out.push(TargetCheck {
            measure: "handoff",
            target: if applies {
                "median < 1 ms (PostgreSQL, MySQL)".into()
            } else {
                "median < 1 ms (applies to PostgreSQL, MySQL only)".into()
            },
            value: ms(h.latency.p50_us),
            met: applies.then_some(h.latency.p50_us < 1000.0),
        });
    }
    if let Some(shapes) = b.contention.ran() {
        for c in shapes {
            out.push(TargetCheck {
                measure: "contention",
                target: format!(
                    "{} workers × {} key{}: ≥ {:.0}% of the server's limit, 0 errors",
                    c.workers,
                    c.keys,
                    if c.keys == 1 { "" } else { "s" },
                    SHARE_TARGET * 100.0
                ),
                value: format!(
                    "{} ({:.0} of {:.0} cycles/s), {} errors",
                    share(c.ratio),
                    c.leaselock.cycles_per_s,
                    c.server_limit_cycles_per_s,
                    c.leaselock.errors
                ),
                met: Some(c.ratio >= SHARE_TARGET && c.leaselock.errors == 0),
            });
        }
    }
    if let Some(s) = b.scale.ran() {
        out.push(TargetCheck {
            measure: "scale",
            target: format!(
                "{} leases refreshed with < 5% of one core, none lost",
                s.leases
            ),
            value: format!(
                "{:.1}% of one core, {} of {} acquired, {} lost",
                s.cpu_share_of_one_core * 100.0,
                s.acquired,
                s.leases,
                s.lost
            ),
            met: Some(s.cpu_share_of_one_core < 0.05 && s.lost == 0 && s.acquired == s.leases),
        });
    }
    out
}

/// The uncontended target: leaselock's p50 cycle at most this many times the floor's.
pub(crate) const RATIO_TARGET: f64 = 1.1;
/// The contention target: at least this share of the server's limit.
pub(crate) const SHARE_TARGET: f64 = 0.8;

/// The ratio to the floor, to two decimals, or to as many more as it takes not to round it onto
/// [`RATIO_TARGET`] from either side (1.1025 reads 1.103, not 1.10 beside "not met").
pub(crate) fn ratio(x: f64) -> String {
    beside(x, RATIO_TARGET, 2)
}

/// A share of the server's limit as a percentage, whole, or with as many decimals as it takes
/// not to round it onto [`SHARE_TARGET`] from either side (79.6% reads 79.6%, not 80%).
pub(crate) fn share(x: f64) -> String {
    format!("{}%", beside(x * 100.0, SHARE_TARGET * 100.0, 0))
}

/// `x` to `decimals` decimals, or more (up to three more) while the rounded text compares with
/// `limit` otherwise than `x` does.
fn beside(x: f64, limit: f64, decimals: usize) -> String {
    let most = decimals + 3;
    for d in decimals..most {
        let shown = format!("{x:.d$}");
        let read: f64 = shown.parse().unwrap_or(x);
        if read.partial_cmp(&limit) == x.partial_cmp(&limit) {
            return shown;
        }
    }
    format!("{x:.most$}")
}

/// Microseconds as milliseconds, for tables.
pub(crate) fn ms(us: f64) -> String {
    if us >= 100_000.0 {
        format!("{:.0} ms", us / 1000.0)
    } else if us >= 10_000.0 {
        format!("{:.1} ms", us / 1000.0)
    } else {
        format!("{:.3} ms", us / 1000.0)
    }
}

/// A count that is usually whole.
pub(crate) fn num(x: f64) -> String {
    if (x - x.round()).abs() < 1e-9 {
        format!("{x:.0}")
    } else {
        format!("{x:.2}")
    }
}

impl Report {
    /// The JSON document.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("the report serializes")
    }

    /// Writes the JSON document to `path`, creating its directory.
    pub fn write_json(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, self.to_json() + "\n")?;
        Ok(())
    }

    /// Writes `BENCHMARKS.md` into `root` and one SVG chart per measure into `root/docs/bench`.
    /// A `Notes` section between `<!-- notes:begin -->` and `<!-- notes:end -->` in an existing
    /// `BENCHMARKS.md` is kept.
    pub fn write_docs(&self, root: &Path) -> Result<()> {
        crate::docs::write(self, root)
    }

    /// Whether any backend was skipped (no server URL) or failed.
    pub fn incomplete(&self) -> Vec<String> {
        self.backends
            .iter()
            .filter(|b| b.status != "ran")
            .map(|b| {
                format!(
                    "{} {}: {}",
                    b.name,
                    b.status,
                    b.reason.as_deref().unwrap_or("")
                )
            })
            .collect()
    }

    /// The results as plain-text tables, one per measure, and the targets.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let ran: Vec<&BackendReport> = self.backends.iter().collect();
        let _ = writeln!(out, "leaselock benchmark ({})", self.started_at);
        let _ = writeln!(out, "machine: {}", self.machine.summary());
        for b in self.backends.iter().filter(|b| b.status != "ran") {
            let _ = writeln!(
                out,
                "!!! {} {}: {}",
                b.name,
                b.status.to_uppercase(),
                b.reason.as_deref().unwrap_or("")
            );
        }
        let mut rows = Vec::new();
        for b in &ran {
            let row = match (&b.uncontended, b.uncontended.ran()) {
                (_, Some(u)) => vec![
                    b.name.to_owned(),
                    ms(u.leaselock.cycle.p50_us),
                    ms(u.leaselock.cycle.p99_us),
                    ms(u.floor.cycle.p50_us),
                    ms(u.floor.cycle.p99_us),
                    ratio(u.ratio_p50),
                    format!("{:.2}", u.ratio_p99),
                ],
                (o, None) => gap_row(b.name, &o.gap(), 7),
            };
            rows.push(row);
        }
        section(
            &mut out,
            "1. uncontended acquire + release",
            &[
                "backend",
                "p50",
                "p99",
                "floor p50",
                "floor p99",
                "ratio p50",
                "ratio p99",
            ],
            rows,
        );
        let mut rows = Vec::new();
        for b in &ran {
            rows.push(match b.round_trips.ran() {
                Some(rt) => vec![
                    b.name.to_owned(),
                    rt.unit.to_owned(),
                    num(rt.acquire.median),
                    num(rt.release.median),
                    format!("{:.2}", rt.acquire.mean),
                    format!("{:.2}", rt.release.mean),
                    format!(
                        "{:.2}",
                        rt.acquire.connections_mean + rt.release.connections_mean
                    ),
                    format!(
                        "{} + {}",
                        num(rt.floor_lock.median),
                        num(rt.floor_unlock.median)
                    ),
                ],
                None => gap_row(b.name, &b.round_trips.gap(), 8),
            });
        }
        section(
            &mut out,
            "2. round trips",
            &[
                "backend",
                "unit",
                "acquire",
                "release",
                "acq mean",
                "rel mean",
                "new conns/cycle",
                "floor",
            ],
            rows,
        );
        let mut rows = Vec::new();
        for b in &ran {
            rows.push(match b.handoff.ran() {
                Some(h) => vec![
                    b.name.to_owned(),
                    ms(h.latency.p50_us),
                    ms(h.latency.p99_us),
                    ms(h.floor.p50_us),
                    ms(h.floor.p99_us),
                    if h.release_notifications {
                        "notified".into()
                    } else {
                        format!("polls every {} ms", h.poll_interval_ms)
                    },
                ],
                None => gap_row(b.name, &b.handoff.gap(), 6),
            });
        }
        section(
            &mut out,
            "3. handoff (release call → waiter holding; floor: unlock then lock by hand)",
            &["backend", "p50", "p99", "floor p50", "floor p99", "waiter"],
            rows,
        );
        let mut rows = Vec::new();
        for b in &ran {
            match b.contention.ran() {
                Some(shapes) => {
                    for c in shapes {
                        rows.push(vec![
                            b.name.to_owned(),
                            format!("{}×{}", c.workers, c.keys),
                            format!("{:.0}", c.leaselock.cycles_per_s),
                            format!("{:.0}", c.leaselock.acquired_per_s),
                            c.leaselock.errors.to_string(),
                            format!("{:.0}", c.server_limit_cycles_per_s),
                            format!("{:.0}", c.floor.acquired_per_s),
                            c.floor.errors.to_string(),
                            share(c.ratio),
                        ]);
                    }
                }
                None => rows.push(gap_row(b.name, &b.contention.gap(), 9)),
            }
        }
        section(
            &mut out,
            "4. contended throughput (cycles/s; a cycle = attempt + release if won)",
            &[
                "backend",
                "workers×keys",
                "cycles/s",
                "won/s",
                "errors",
                "server limit",
                "floor won/s",
                "floor errors",
                "of limit",
            ],
            rows,
        );
        let mut rows = Vec::new();
        for b in &ran {
            rows.push(match b.scale.ran() {
                Some(s) => vec![
                    b.name.to_owned(),
                    format!("{} of {}", s.acquired, s.leases),
                    format!("{:.1}%", s.cpu_share_of_one_core * 100.0),
                    format!("{:.0} MiB", s.rss_window_max_mib),
                    format!("{:.0} MiB", s.rss_window_max_mib - s.rss_before_mib),
                    format!("{:.0}", s.refreshes_per_s),
                    s.refresh_errors.to_string(),
                    s.lost.to_string(),
                ],
                None => {
                    let mut row = gap_row(b.name, &b.scale.gap(), 8);
                    if let Outcome::Skipped { reason } = &b.scale {
                        row[1] = format!("skipped: {reason}");
                    }
                    row
                }
            });
        }
        section(
            &mut out,
            &format!(
                "5. scale (leases held with the refresh daemon on, {} s lease, {} s window)",
                self.settings.scale_lease_s, self.settings.scale_duration_s
            ),
            &[
                "backend",
                "leases",
                "CPU (one core)",
                "RSS max",
                "RSS added",
                "refreshes/s",
                "refresh errors",
                "lost",
            ],
            rows,
        );
        let mut rows = Vec::new();
        for b in &ran {
            for t in &b.targets {
                rows.push(vec![
                    b.name.to_owned(),
                    t.measure.to_owned(),
                    t.target.clone(),
                    t.value.clone(),
                    t.verdict().to_owned(),
                ]);
            }
        }
        section(
            &mut out,
            "targets (read from the figures above)",
            &["backend", "measure", "target", "figure", "verdict"],
            rows,
        );
        for b in &ran {
            for (measure, error) in b.failures() {
                let _ = writeln!(out, "!!! {} {measure} FAILED: {error}", b.name);
            }
        }
        out
    }
}

impl BackendReport {
    /// The measures that failed, with their errors.
    pub(crate) fn failures(&self) -> Vec<(&'static str, &str)> {
        [
            ("uncontended", failed(&self.uncontended)),
            ("round trips", failed(&self.round_trips)),
            ("handoff", failed(&self.handoff)),
            ("contention", failed(&self.contention)),
            ("scale", failed(&self.scale)),
        ]
        .into_iter()
        .filter_map(|(name, error)| error.map(|e| (name, e)))
        .collect()
    }
}

fn failed<T>(o: &Outcome<T>) -> Option<&str> {
    match o {
        Outcome::Failed { error } => Some(error),
        _ => None,
    }
}

fn gap_row(name: &str, gap: &str, width: usize) -> Vec<String> {
    let mut row = vec![name.to_owned(), gap.to_owned()];
    row.resize(width, String::new());
    row
}

fn section(out: &mut String, title: &str, header: &[&str], rows: Vec<Vec<String>>) {
    let _ = writeln!(out, "\n{title}");
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() && i + 1 < row.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        let mut s = String::from(" ");
        for (i, cell) in cells.iter().enumerate() {
            let pad = widths.get(i).copied().unwrap_or(0);
            let _ = write!(s, " {cell:<pad$}");
        }
        s.trim_end().to_owned()
    };
    let _ = writeln!(
        out,
        "{}",
        line(header.iter().map(|h| h.to_string()).collect())
    );
    for row in rows {
        let _ = writeln!(out, "{}", line(row));
    }
}

#[cfg(test)]
mod tests {
    use super::{ratio, share};

    #[test]
    fn a_figure_never_rounds_onto_its_target() {
        assert_eq!(ratio(1.0734), "1.07");
        assert_eq!(ratio(1.1025), "1.103");
        assert_eq!(ratio(1.0996), "1.0996");
        assert_eq!(ratio(1.09996), "1.09996");
        assert_eq!(ratio(1.1), "1.10");
        assert_eq!(share(0.8412), "84%");
        assert_eq!(share(0.7962), "79.6%");
        assert_eq!(share(0.8004), "80.04%");
        assert_eq!(share(0.8), "80%");
    }
}
