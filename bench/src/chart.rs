//! Horizontal grouped bar charts as hand-written SVG: one group per backend, one bar per series,
//! the value written beside each bar, and an optional dashed target line.

use std::fmt::Write as _;

/// One series (a colour in the legend).
pub(crate) struct Series {
    pub(crate) name: &'static str,
    pub(crate) color: &'static str,
}

/// One backend's bars, one value per series (`None`: not measured, with the reason shown).
pub(crate) struct Group {
    pub(crate) label: String,
    pub(crate) values: Vec<Option<f64>>,
    /// Text shown beside each bar (defaults to the value).
    pub(crate) labels: Vec<String>,
}

/// A chart.
pub(crate) struct Chart {
    pub(crate) title: String,
    pub(crate) unit: String,
    pub(crate) series: Vec<Series>,
    pub(crate) groups: Vec<Group>,
    /// A vertical dashed line at this value, with its caption.
    pub(crate) target: Option<(f64, String)>,
    /// Draw the axis logarithmically (for values spanning orders of magnitude).
    pub(crate) log: bool,
}

const WIDTH: f64 = 860.0;
const LEFT: f64 = 150.0;
const RIGHT: f64 = 150.0;
const BAR: f64 = 14.0;
const GAP: f64 = 12.0;
const TOP: f64 = 58.0;

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A "nice" round number at or above `x` (1, 2 or 5 times a power of ten).
fn nice_ceiling(x: f64) -> f64 {
    if x <= 0.0 || !x.is_finite() {
        return 1.0;
    }
    let power = 10f64.powf(x.log10().floor());
    for step in [1.0, 2.0, 5.0, 10.0] {
        if step * power >= x {
            return step * power;
        }
    }
    10.0 * power
}

/// A number for an axis tick.
fn tick_label(x: f64) -> String {
    if x == 0.0 {
        "0".into()
    } else if x >= 1000.0 {
        format!("{:.0}", x)
    } else if x >= 1.0 {
        let s = format!("{x:.2}");
        s.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        let s = format!("{x:.4}");
        s.trim_end_matches('0').trim_end_matches('.').to_owned()
    }
}

impl Chart {
    /// The SVG document.
    pub(crate) fn render(&self) -> String {
        let plot = WIDTH - LEFT - RIGHT;
        let per_group = self.series.len() as f64 * BAR + GAP;
        let height = TOP + self.groups.len() as f64 * per_group + 40.0;
        let values = self
            .groups
            .iter()
            .flat_map(|g| g.values.iter().flatten().copied())
            .chain(self.target.iter().map(|(t, _)| *t))
            .filter(|v| v.is_finite());
        let (mut lo, mut hi) = (f64::INFINITY, 0.0f64);
        for v in values {
            hi = hi.max(v);
            if v > 0.0 {
                lo = lo.min(v);
            }
        }
        let log = self.log && lo.is_finite() && hi > lo;
        let (axis_lo, axis_hi) = if log {
            (
                10f64.powf(lo.log10().floor()),
                10f64.powf(hi.log10().ceil().max(lo.log10().floor() + 1.0)),
            )
        } else {
            (0.0, nice_ceiling(hi * 1.05))
        };
        let x = |v: f64| -> f64 {
            if log {
                let v = v.max(axis_lo);
                LEFT + plot * (v.log10() - axis_lo.log10()) / (axis_hi.log10() - axis_lo.log10())
            } else {
                LEFT + plot * v / axis_hi
            }
        };
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(
            s,
            r#"<rect width="{WIDTH}" height="{height}" fill="white"/>"#
        );
        let _ = writeln!(
            s,
            r#"<text x="{LEFT}" y="20" font-size="15" font-weight="bold">{}</text>"#,
            escape(&self.title)
        );
        // Legend.
        let mut lx = LEFT;
        for series in &self.series {
            let _ = writeln!(
                s,
                r#"<rect x="{lx}" y="30" width="12" height="12" fill="{}"/><text x="{}" y="40">{}</text>"#,
                series.color,
                lx + 16.0,
                escape(series.name)
            );
            lx += 24.0 + 7.0 * series.name.chars().count() as f64;
        }
        // Axis and grid.
        let bottom = height - 40.0;
        let ticks: Vec<f64> = if log {
            let mut t = Vec::new();
            let mut v = axis_lo;
            while v <= axis_hi * 1.0001 {
                t.push(v);
                v *= 10.0;
            }
            t
        } else {
            (0..=5).map(|i| axis_hi * i as f64 / 5.0).collect()
        };
        for t in ticks {
            let tx = x(t);
            let _ = writeln!(
                s,
                r##"<line x1="{tx:.1}" y1="{TOP}" x2="{tx:.1}" y2="{bottom}" stroke="#e0e0e0"/><text x="{tx:.1}" y="{}" text-anchor="middle" fill="#555">{}</text>"##,
                bottom + 15.0,
                tick_label(t)
            );
        }
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{}" text-anchor="middle" fill="#555">{}{}</text>"##,
            LEFT + plot / 2.0,
            bottom + 32.0,
            escape(&self.unit),
            if log { " (log scale)" } else { "" }
        );
        // Bars.
        let mut y = TOP;
        for group in &self.groups {
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{:.1}" text-anchor="end">{}</text>"#,
                LEFT - 8.0,
                y + per_group / 2.0 - GAP / 2.0 + 4.0,
                escape(&group.label)
            );
            for (i, series) in self.series.iter().enumerate() {
                let by = y + i as f64 * BAR;
                let label = group.labels.get(i).cloned().unwrap_or_default();
                match group.values.get(i).copied().flatten() {
                    Some(v) if v.is_finite() => {
                        let w = (x(v) - LEFT).max(1.0);
                        let _ = writeln!(
                            s,
                            r#"<rect x="{LEFT}" y="{by:.1}" width="{w:.1}" height="{}" fill="{}"><title>{}: {}</title></rect><text x="{:.1}" y="{:.1}" font-size="11">{}</text>"#,
                            BAR - 2.0,
                            series.color,
                            escape(series.name),
                            escape(&label),
                            LEFT + w + 4.0,
                            by + BAR - 4.0,
                            escape(&label)
                        );
                    }
                    _ => {
                        let _ = writeln!(
                            s,
                            r##"<text x="{:.1}" y="{:.1}" font-size="11" fill="#999">{}: {}</text>"##,
                            LEFT + 4.0,
                            by + BAR - 4.0,
                            escape(series.name),
                            escape(if label.is_empty() { "n/a" } else { &label })
                        );
                    }
                }
            }
            y += per_group;
        }
        if let Some((target, caption)) = &self.target {
            let tx = x(*target);
            let _ = writeln!(
                s,
                r##"<line x1="{tx:.1}" y1="{}" x2="{tx:.1}" y2="{bottom}" stroke="#d62728" stroke-width="1.5" stroke-dasharray="5,3"/><text x="{tx:.1}" y="{}" fill="#d62728" font-size="11" text-anchor="middle">{}</text>"##,
                TOP - 6.0,
                TOP - 8.0,
                escape(caption)
            );
        }
        s.push_str("</svg>\n");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_bars_gaps_and_target() {
        let chart = Chart {
            title: "a < b".into(),
            unit: "ms".into(),
            series: vec![
                Series {
                    name: "x",
                    color: "#1f77b4",
                },
                Series {
                    name: "y",
                    color: "#ff7f0e",
                },
            ],
            groups: vec![
                Group {
                    label: "one".into(),
                    values: vec![Some(1.5), None],
                    labels: vec!["1.5".into(), "skipped".into()],
                },
                Group {
                    label: "two".into(),
                    values: vec![Some(300.0), Some(0.02)],
                    labels: vec!["300".into(), "0.02".into()],
                },
            ],
            target: Some((1.0, "target".into())),
            log: true,
        };
        let svg = chart.render();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("a &lt; b"));
        assert_eq!(svg.matches("<title>").count(), 3, "{svg}");
        assert!(svg.contains("y: skipped"));
        assert!(svg.contains("stroke-dasharray"));
        assert_eq!(nice_ceiling(0.37), 0.5);
        assert_eq!(nice_ceiling(101.0), 200.0);
    }
}
