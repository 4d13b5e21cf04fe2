//! `BENCHMARKS.md` and its charts, generated from a report.

use std::fmt::Write as _;
use std::path::Path;

use crate::chart::{Chart, Group, Series};
use crate::report::{
    ms, num, ratio, share, BackendReport, Outcome, Report, RATIO_TARGET, SHARE_TARGET,
};
use crate::Result;

const NOTES_BEGIN: &str = "<!-- notes:begin -->";
const NOTES_END: &str = "<!-- notes:end -->";
const CHART_DIR: &str = "docs/bench";

const BLUE: &str = "#1f77b4";
const ORANGE: &str = "#ff7f0e";
const GREEN: &str = "#2ca02c";
const GREY: &str = "#7f7f7f";

pub(crate) fn write(report: &Report, root: &Path) -> Result<()> {
    let dir = root.join(CHART_DIR);
    std::fs::create_dir_all(&dir)?;
    for (name, chart) in charts(report) {
        std::fs::write(dir.join(format!("{name}.svg")), chart.render())?;
    }
    let path = root.join("BENCHMARKS.md");
    let notes = std::fs::read_to_string(&path)
        .ok()
        .and_then(|old| {
            let start = old.find(NOTES_BEGIN)? + NOTES_BEGIN.len();
            let end = old[start..].find(NOTES_END)? + start;
            Some(old[start..end].trim().to_owned())
        })
        .unwrap_or_else(|| {
            "(Nothing yet: analysis written here is kept when the figures are regenerated.)".into()
        });
    std::fs::write(path, markdown(report, &notes))?;
    Ok(())
}

fn ran(report: &Report) -> impl Iterator<Item = &BackendReport> {
    report.backends.iter().filter(|b| b.status == "ran")
}

fn gap_label<T>(outcome: &Outcome<T>) -> String {
    match outcome {
        Outcome::Skipped { reason } => format!("skipped: {reason}"),
        other => other.gap(),
    }
}

fn charts(report: &Report) -> Vec<(&'static str, Chart)> {
    let mut out = Vec::new();

    let groups = ran(report)
        .map(|b| match b.uncontended.ran() {
            Some(u) => Group {
                label: b.name.to_owned(),
                values: vec![
                    Some(u.leaselock.cycle.p50_us / 1e3),
                    Some(u.floor.cycle.p50_us / 1e3),
                ],
                labels: vec![
                    format!(
                        "{} (p99 {}), {}× the floor",
                        ms(u.leaselock.cycle.p50_us),
                        ms(u.leaselock.cycle.p99_us),
                        ratio(u.ratio_p50)
                    ),
                    format!(
                        "{} (p99 {})",
                        ms(u.floor.cycle.p50_us),
                        ms(u.floor.cycle.p99_us)
                    ),
                ],
            },
            None => gap_group(b.name, 2, &gap_label(&b.uncontended)),
        })
        .collect();
    out.push((
        "uncontended",
        Chart {
            title: format!(
                "1. Uncontended acquire + release, median (target: ≤ {RATIO_TARGET}× the floor)"
            ),
            unit: "milliseconds per cycle".into(),
            series: vec![
                Series {
                    name: "leaselock",
                    color: BLUE,
                },
                Series {
                    name: "raw-driver floor",
                    color: GREY,
                },
            ],
            groups,
            target: None,
            log: true,
        },
    ));

    let groups = ran(report)
        .map(|b| match b.round_trips.ran() {
            Some(rt) if rt.unit != "none" => Group {
                label: b.name.to_owned(),
                values: vec![Some(rt.acquire.median), Some(rt.release.median)],
                labels: vec![
                    format!(
                        "{} (mean {:.2}) {}",
                        num(rt.acquire.median),
                        rt.acquire.mean,
                        rt.unit
                    ),
                    format!(
                        "{} (mean {:.2}) {}",
                        num(rt.release.median),
                        rt.release.mean,
                        rt.unit
                    ),
                ],
            },
            Some(_) => gap_group(b.name, 2, "no I/O"),
            None => gap_group(b.name, 2, &gap_label(&b.round_trips)),
        })
        .collect();
    out.push((
        "round-trips",
        Chart {
            title: "2. Round trips per operation, median (goal: 1 each)".into(),
            unit: "round trips (SQLite: statements)".into(),
            series: vec![
                Series {
                    name: "acquire",
                    color: BLUE,
                },
                Series {
                    name: "release",
                    color: ORANGE,
                },
            ],
            groups,
            target: Some((1.0, "goal: 1".into())),
            log: false,
        },
    ));

    let groups = ran(report)
        .map(|b| match b.handoff.ran() {
            Some(h) => Group {
                label: b.name.to_owned(),
                values: vec![
                    Some(h.latency.p50_us / 1e3),
                    Some(h.latency.p99_us / 1e3),
                    Some(h.floor.p50_us / 1e3),
                ],
                labels: vec![
                    format!(
                        "{}{}",
                        ms(h.latency.p50_us),
                        if h.release_notifications {
                            " (woken)"
                        } else {
                            " (polling)"
                        }
                    ),
                    ms(h.latency.p99_us),
                    ms(h.floor.p50_us),
                ],
            },
            None => gap_group(b.name, 3, &gap_label(&b.handoff)),
        })
        .collect();
    out.push((
        "handoff",
        Chart {
            title: format!(
                "3. Handoff: release call → waiter holding (waiters poll every {} ms)",
                report.settings.poll_interval_ms
            ),
            unit: "milliseconds".into(),
            series: vec![
                Series {
                    name: "p50",
                    color: BLUE,
                },
                Series {
                    name: "p99",
                    color: ORANGE,
                },
                Series {
                    name: "floor p50 (unlock + lock by hand)",
                    color: GREY,
                },
            ],
            groups,
            target: Some((1.0, "target: 1 ms (PostgreSQL, MySQL)".into())),
            log: true,
        },
    ));

    let mut groups = Vec::new();
    for b in ran(report) {
        match b.contention.ran() {
            Some(shapes) => {
                for c in shapes {
                    groups.push(Group {
                        label: format!("{} {}×{}", b.name, c.workers, c.keys),
                        values: vec![
                            Some(c.leaselock.cycles_per_s),
                            Some(c.server_limit_cycles_per_s),
                        ],
                        labels: vec![
                            format!(
                                "{:.0}/s = {} of the limit, {} errors",
                                c.leaselock.cycles_per_s,
                                share(c.ratio),
                                c.leaselock.errors
                            ),
                            format!("{:.0}/s", c.server_limit_cycles_per_s),
                        ],
                    });
                }
            }
            None => groups.push(gap_group(b.name, 2, &gap_label(&b.contention))),
        }
    }
    out.push((
        "contention",
        Chart {
            title: format!(
                "4. Contended cycles per second, {} workers (target: ≥ {:.0}% of the server's limit, 0 errors)",
                report.settings.workers,
                SHARE_TARGET * 100.0
            ),
            unit: "cycles per second (attempt + release when won)".into(),
            series: vec![
                Series {
                    name: "leaselock",
                    color: BLUE,
                },
                Series {
                    name: "server's limit (raw floor, same shape)",
                    color: GREY,
                },
            ],
            groups,
            target: None,
            log: true,
        },
    ));

    let groups = ran(report)
        .map(|b| match b.scale.ran() {
            Some(s) => Group {
                label: b.name.to_owned(),
                values: vec![Some(s.cpu_share_of_one_core * 100.0)],
                labels: vec![format!(
                    "{:.2}% of one core, {} of {} held, RSS {:.0} MiB, {:.0} refreshes/s, {} lost",
                    s.cpu_share_of_one_core * 100.0,
                    s.acquired,
                    s.leases,
                    s.rss_window_max_mib,
                    s.refreshes_per_s,
                    s.lost
                )],
            },
            None => gap_group(b.name, 1, &gap_label(&b.scale)),
        })
        .collect();
    out.push((
        "scale",
        Chart {
            title: format!(
                "5. CPU of one process holding {} leases ({} s lease, refreshed every {:.0} s)",
                report.settings.scale_leases,
                report.settings.scale_lease_s,
                report.settings.scale_refresh_interval_s
            ),
            unit: "% of one core".into(),
            series: vec![Series {
                name: "CPU",
                color: GREEN,
            }],
            groups,
            target: Some((5.0, "target: 5%".into())),
            log: false,
        },
    ));
    out
}

fn gap_group(name: &str, series: usize, why: &str) -> Group {
    Group {
        label: name.to_owned(),
        values: vec![None; series],
        labels: vec![why.to_owned(); series],
    }
}

fn markdown(report: &Report, notes: &str) -> String {
    let mut s = String::new();
    let m = &report.machine;
    let st = &report.settings;
    let _ = writeln!(s, "# Benchmarks\n");
    let _ = writeln!(
        s,
        "Generated by the benchmark harness (`bench/`, package `leaselock-bench`) on {}. The \
         figures, tables and charts are rewritten by every run with `--write-docs`; only the \
         [Notes](#notes) section is kept. Targets come from the benchmark issue and are read \
         from the figures here, never asserted by a timed test.\n",
        report.started_at
    );
    let _ = writeln!(s, "## How they were taken\n");
    let _ = writeln!(s, "- Command: `{}`", report.command);
    let _ = writeln!(
        s,
        "- Machine: {} cores ({}), {:.1} GiB memory, {}.",
        m.cores, m.cpu, m.memory_gib, m.kernel
    );
    if let Some(fsync) = m.fsync_p50_ms {
        let _ = writeln!(
            s,
            "- Disk: a 4 KiB write + `fdatasync` takes {fsync:.2} ms (median of 50, in the \
             harness's scratch directory). A server that flushes its log at every commit \
             (settings below) pays about this much per durable write; `pg_try_advisory_lock` \
             and `GET_LOCK` write nothing."
        );
    }
    let _ = writeln!(
        s,
        "- Load average (1 min) {:.2} at the start and {:.2} at the end: the machine is shared, \
         the database servers run on it too, and anything above zero means other work competed \
         with the benchmark, which makes every figure noisier (the floor and leaselock are \
         measured in alternating blocks, so ratios suffer less than absolute times). Before \
         each measure the harness waits, up to {} s, for a half second in which the machine's \
         CPUs were busy less than a tenth of one CPU in all, so that what a measure leaves the \
         servers to do (InnoDB's purge, a checkpoint, a JVM's collector) does not fall into the \
         next.",
        m.load_start[0], m.load_end[0], report.settings.settle_s
    );
    let _ = writeln!(s, "- Servers:");
    for b in &report.backends {
        match (&b.server, b.status) {
            (Some(server), _) => {
                let _ = writeln!(s, "  - {}: {server}", b.name);
            }
            (None, status) => {
                let _ = writeln!(
                    s,
                    "  - {}: **{}** ({})",
                    b.name,
                    status.to_uppercase(),
                    b.reason.as_deref().unwrap_or("")
                );
            }
        }
    }
    let _ = writeln!(
        s,
        "- Settings: {} uncontended cycles; {} counted cycles for round trips; {} handoffs with \
         waiters polling every {} ms; {} workers over {} keys and over 1 key, {} s each; {} \
         leases of {} s (refreshed every {:.0} s) watched for {} s.",
        st.cycles,
        st.round_trip_cycles,
        st.handoffs,
        st.poll_interval_ms,
        st.workers,
        st.keys,
        st.contention_duration_s,
        st.scale_leases,
        st.scale_lease_s,
        st.scale_refresh_interval_s,
        st.scale_duration_s
    );
    let _ = writeln!(
        s,
        "- Run: {} to {}; the JSON document of the run has every figure, including the ones \
         not shown here.\n",
        report.started_at, report.finished_at
    );

    let _ = writeln!(s, "## Targets\n");
    let _ = writeln!(s, "| backend | measure | target | figure | verdict |");
    let _ = writeln!(s, "|---|---|---|---|---|");
    for b in ran(report) {
        for t in &b.targets {
            let verdict = match t.met {
                Some(true) => "met",
                Some(false) => "**not met**",
                None => "n/a",
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {verdict} |",
                b.name, t.measure, t.target, t.value
            );
        }
        for (measure, error) in b.failures() {
            let _ = writeln!(
                s,
                "| {} | {measure} | — | **failed**: {} | — |",
                b.name,
                error.replace('|', "/")
            );
        }
    }
    let _ = writeln!(s);

    let _ = writeln!(s, "## 1. Uncontended acquire + release\n");
    let _ = writeln!(s, "![Uncontended latency]({CHART_DIR}/uncontended.svg)\n");
    let _ = writeln!(
        s,
        "One key acquired and released {} times through a `Locker` with default settings \
         (fail-fast, refresh daemon on), and the same number of cycles by hand through the raw \
         driver on one connection (the floor), in alternating blocks of 50.\n",
        st.cycles
    );
    let _ = writeln!(
        s,
        "| backend | p50 | p99 | acquire p50 | release p50 | floor p50 | floor p99 | ratio p50 | ratio p99 | floor statements |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|");
    for b in ran(report) {
        match b.uncontended.ran() {
            Some(u) => {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} | {} | {} | {} | {:.2} | {} |",
                    b.name,
                    ms(u.leaselock.cycle.p50_us),
                    ms(u.leaselock.cycle.p99_us),
                    ms(u.leaselock.acquire.p50_us),
                    ms(u.leaselock.release.p50_us),
                    ms(u.floor.cycle.p50_us),
                    ms(u.floor.cycle.p99_us),
                    ratio(u.ratio_p50),
                    u.ratio_p99,
                    b.floor
                );
            }
            None => {
                let _ = writeln!(
                    s,
                    "| {} | {} | | | | | | | | |",
                    b.name,
                    gap_label(&b.uncontended)
                );
            }
        }
    }
    let _ = writeln!(s);

    let _ = writeln!(s, "## 2. Round trips per acquire and per release\n");
    let _ = writeln!(s, "![Round trips]({CHART_DIR}/round-trips.svg)\n");
    let _ = writeln!(
        s,
        "Counted, not guessed: networked backends talk to their server through a TCP proxy in \
         the harness that counts every burst of client→server bytes that follows a server reply \
         (one request and its answer, however many packets). Each operation runs between 25 ms \
         quiet periods and owns what was sent from its start until the next quiet period, so \
         work a driver leaves running after the call returns (a pool's connection reset) counts \
         with it. SQLite is counted in statements, read off the backend's code (no network); \
         the in-memory backend does no I/O. The floor, counted the same way, reads 1 + 1, which \
         checks the counter.\n"
    );
    let _ = writeln!(
        s,
        "| backend | unit | acquire (median) | release (median) | acquire mean: in call + after | release mean: in call + after | new connections per cycle | floor |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
    for b in ran(report) {
        match b.round_trips.ran() {
            Some(rt) => {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {:.2} + {:.2} | {:.2} + {:.2} | {:.2} | {} + {} |",
                    b.name,
                    rt.unit,
                    num(rt.acquire.median),
                    num(rt.release.median),
                    rt.acquire.in_call_mean,
                    rt.acquire.after_call_mean,
                    rt.release.in_call_mean,
                    rt.release.after_call_mean,
                    rt.acquire.connections_mean + rt.release.connections_mean,
                    num(rt.floor_lock.median),
                    num(rt.floor_unlock.median)
                );
            }
            None => {
                let _ = writeln!(
                    s,
                    "| {} | {} | | | | | | |",
                    b.name,
                    gap_label(&b.round_trips)
                );
            }
        }
    }
    let _ = writeln!(s);

    let _ = writeln!(s, "## 3. Handoff\n");
    let _ = writeln!(s, "![Handoff]({CHART_DIR}/handoff.svg)\n");
    let _ = writeln!(
        s,
        "A holder (one backend instance) releases while a waiter (a second instance, as another \
         process would be) waits through the orchestrator with `WaitPolicy::until(30 s, {} ms)`. \
         The release comes at a random moment of the waiter's poll interval, after the waiter's \
         first attempt failed; the time runs from the release call to the waiter's `acquire` \
         returning. {} handoffs. A backend with release notifications wakes the waiter; the \
         others leave it to its next poll, so their median is about half the poll interval. \
         The floor, in the same run: after the same kind of pause, the floor's unlock on one \
         connection and at once its lock on another, by hand (no waiter, no wake-up between \
         the two): what the server alone takes to hand a lock over on a machine that was idle \
         for the pause, as it is between a real release and the work before it.\n",
        st.poll_interval_ms, st.handoffs
    );
    let _ = writeln!(
        s,
        "| backend | p50 | p99 | floor p50 | floor p99 | waiter |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|");
    for b in ran(report) {
        match b.handoff.ran() {
            Some(h) => {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} | {} |",
                    b.name,
                    ms(h.latency.p50_us),
                    ms(h.latency.p99_us),
                    ms(h.floor.p50_us),
                    ms(h.floor.p99_us),
                    if h.release_notifications {
                        "woken by a release notification".to_owned()
                    } else {
                        format!("polls every {} ms", h.poll_interval_ms)
                    }
                );
            }
            None => {
                let _ = writeln!(s, "| {} | {} | | | | |", b.name, gap_label(&b.handoff));
            }
        }
    }
    let _ = writeln!(s);

    let _ = writeln!(s, "## 4. Contended throughput\n");
    let _ = writeln!(s, "![Contention]({CHART_DIR}/contention.svg)\n");
    let _ = writeln!(
        s,
        "{} tasks acquire a random key (of {} keys, then of 1 key) and release it at once, for \
         {} s, through one fail-fast `Locker` over one backend instance (one process; \
         `OnUnavailable::ReturnNone`, so a held key is an answer, not an error). A cycle is an \
         attempt plus the release when it won. In the same run, {} raw connections issue the \
         floor statements the same way (take; release when taken); the server's limit is their \
         statements per second divided by the statements their cycles needed (two when won, one \
         when refused). Every key is acquired once before the clock starts. Errors are anything \
         returned as `Err` to the caller. The two sides run in {} alternating blocks each, so a \
         machine whose speed drifts weighs on both alike, and with as many server connections \
         each: the floor's {} connections, and for leaselock the backend's pool sized to the \
         workers (PostgreSQL `connections={}` for the lease table and `max_idle_sessions={}` \
         for advisory sessions; MySQL's pool grows to 100 by default; the DynamoDB and MongoDB \
         clients and the in-process backends need no setting).\n",
        st.workers,
        st.keys,
        st.contention_duration_s,
        st.workers,
        crate::measure::CONTENTION_BLOCKS,
        st.workers,
        st.workers.min(64),
        st.workers
    );
    let _ = writeln!(
        s,
        "| backend | workers × keys | cycles/s | won/s | errors | server limit (cycles/s) | floor won/s | floor errors | of the limit |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|");
    for b in ran(report) {
        match b.contention.ran() {
            Some(shapes) => {
                for c in shapes {
                    let _ = writeln!(
                        s,
                        "| {} | {} × {} | {:.0} | {:.0} | {} | {:.0} | {:.0} | {} | {} |",
                        b.name,
                        c.workers,
                        c.keys,
                        c.leaselock.cycles_per_s,
                        c.leaselock.acquired_per_s,
                        c.leaselock.errors,
                        c.server_limit_cycles_per_s,
                        c.floor.acquired_per_s,
                        c.floor.errors,
                        share(c.ratio)
                    );
                }
            }
            None => {
                let _ = writeln!(
                    s,
                    "| {} | {} | | | | | | | |",
                    b.name,
                    gap_label(&b.contention)
                );
            }
        }
    }
    let samples: Vec<String> = ran(report)
        .filter_map(|b| b.contention.ran().map(|c| (b.name, c)))
        .flat_map(|(name, shapes)| {
            shapes.iter().flat_map(move |c| {
                c.leaselock.error_samples.iter().map(move |e| {
                    format!(
                        "- {name} {}×{}: `{}`",
                        c.workers,
                        c.keys,
                        e.replace('`', "'")
                    )
                })
            })
        })
        .collect();
    if !samples.is_empty() {
        let _ = writeln!(s, "\nErrors leaselock surfaced (first few of each kind):\n");
        for line in samples {
            let _ = writeln!(s, "{line}");
        }
    }
    let _ = writeln!(s);

    let _ = writeln!(s, "## 5. Scale\n");
    let _ = writeln!(s, "![Scale]({CHART_DIR}/scale.svg)\n");
    let _ = writeln!(
        s,
        "One process acquires {} keys through one `Locker` with a {} s lease (shorter than the \
         60 s default, so refreshes come every {:.0} s, three times as often) and the refresh \
         daemon on, then holds them for {} s while its CPU time (`/proc/self/stat` utime + \
         stime) and resident memory (`VmRSS`, every second) are read. Nothing else runs in the \
         process meanwhile. Session-lock backends hold one server connection per lease and are \
         not run at this size.\n",
        st.scale_leases, st.scale_lease_s, st.scale_refresh_interval_s, st.scale_duration_s
    );
    let _ = writeln!(
        s,
        "| backend | leases acquired | CPU (share of one core) | RSS before | RSS max while held | refreshes/s | refresh errors | lost | acquiring took | batch window |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|");
    for b in ran(report) {
        match b.scale.ran() {
            Some(sc) => {
                let _ = writeln!(
                    s,
                    "| {} | {} of {} | {:.2}% | {:.0} MiB | {:.0} MiB | {:.0} | {} | {} | {:.1} s | {} |",
                    b.name,
                    sc.acquired,
                    sc.leases,
                    sc.cpu_share_of_one_core * 100.0,
                    sc.rss_before_mib,
                    sc.rss_window_max_mib,
                    sc.refreshes_per_s,
                    sc.refresh_errors,
                    sc.lost,
                    sc.acquire_s,
                    if sc.refresh_batch_window_s > 0.0 {
                        format!("{:.2} s", sc.refresh_batch_window_s)
                    } else {
                        "none".to_owned()
                    }
                );
            }
            None => {
                let _ = writeln!(
                    s,
                    "| {} | {} | | | | | | | | |",
                    b.name,
                    gap_label(&b.scale)
                );
            }
        }
    }
    let _ = writeln!(s);
    let _ = writeln!(s, "## Notes\n");
    let _ = writeln!(s, "{NOTES_BEGIN}\n{notes}\n{NOTES_END}");
    s
}
