//! A few cycles of every measure on every backend whose server is reachable (memory and SQLite
//! always; the others when their URL is set, and under CI they must be): the harness runs,
//! produces numbers for every measure, a valid JSON document, the Markdown page and its charts.
//! No timing is asserted.

use leaselock_bench::{BackendId, Config};
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_harness_measures_every_reachable_backend() {
    let mut backends = Vec::new();
    for id in BackendId::ALL {
        match id.url_var() {
            None => backends.push(id),
            // Panics under CI=true when the variable is missing; skips loudly otherwise.
            Some(var) => {
                if leaselock_conformance::server_url(var).is_some() {
                    backends.push(id);
                }
            }
        }
    }
    let scratch = tempfile::tempdir().unwrap();
    let config = Config {
        backends: backends.clone(),
        scratch: Some(scratch.path().to_path_buf()),
        ..Config::smoke()
    };
    let report = leaselock_bench::run(&config, "smoke test").await;
    let table = report.table();
    println!("{table}");

    let json_path = scratch.path().join("results.json");
    report.write_json(&json_path).unwrap();
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap())
        .expect("the JSON document parses");
    assert_eq!(doc["schema"], "leaselock-bench/1");
    assert!(doc["machine"]["cores"].as_u64().unwrap() >= 1);
    let reported = doc["backends"].as_array().unwrap();
    assert_eq!(reported.len(), backends.len());
    for (b, id) in reported.iter().zip(&backends) {
        let name = id.name();
        assert_eq!(b["name"], name);
        assert_eq!(b["status"], "ran", "{name}: {}", b["reason"]);
        for measure in ["uncontended", "round_trips", "handoff", "contention"] {
            assert_eq!(
                b[measure]["status"], "ran",
                "{name} {measure}: {}",
                b[measure]
            );
        }
        let u = &b["uncontended"]["result"];
        for side in ["leaselock", "floor"] {
            assert_eq!(u[side]["cycle"]["samples"], 10, "{name}");
            assert!(u[side]["cycle"]["p50_us"].as_f64().unwrap() > 0.0, "{name}");
            assert!(u[side]["cycle"]["p99_us"].as_f64().unwrap() > 0.0, "{name}");
        }
        assert!(u["ratio_p50"].as_f64().unwrap().is_finite(), "{name}");

        let rt = &b["round_trips"]["result"];
        if id.url_var().is_some() {
            assert_eq!(rt["unit"], "round trips", "{name}");
            // The floor issues exactly one statement each way: the counter must see that.
            assert_eq!(rt["floor_lock"]["median"], 1.0, "{name}: {rt}");
            assert_eq!(rt["floor_unlock"]["median"], 1.0, "{name}: {rt}");
            assert!(
                rt["acquire"]["median"].as_f64().unwrap() >= 1.0,
                "{name}: {rt}"
            );
            assert!(
                rt["release"]["median"].as_f64().unwrap() >= 1.0,
                "{name}: {rt}"
            );
        }

        let h = &b["handoff"]["result"];
        assert_eq!(h["latency"]["samples"], 3, "{name}");
        assert!(h["latency"]["p50_us"].as_f64().unwrap() > 0.0, "{name}");

        let shapes = b["contention"]["result"].as_array().unwrap();
        assert_eq!(shapes.len(), 2, "{name}");
        for c in shapes {
            assert!(
                c["leaselock"]["acquired"].as_u64().unwrap() > 0,
                "{name}: {c}"
            );
            assert!(c["floor"]["acquired"].as_u64().unwrap() > 0, "{name}: {c}");
            assert!(
                c["server_limit_cycles_per_s"].as_f64().unwrap() > 0.0,
                "{name}"
            );
        }

        let scale = &b["scale"];
        if matches!(id, BackendId::PostgresAdvisory | BackendId::MysqlGetLock) {
            assert_eq!(scale["status"], "skipped", "{name}");
        } else {
            assert_eq!(scale["status"], "ran", "{name}: {scale}");
            let s = &scale["result"];
            assert_eq!(s["leases"], 20, "{name}");
            assert_eq!(s["acquired"], 20, "{name}");
            assert!(s["rss_window_max_mib"].as_f64().unwrap() > 0.0, "{name}");
            assert!(
                s["cpu_share_of_one_core"].as_f64().unwrap() >= 0.0,
                "{name}"
            );
        }
        assert!(!b["targets"].as_array().unwrap().is_empty(), "{name}");
    }

    let root = scratch.path().join("docs-root");
    report.write_docs(&root).unwrap();
    let page = std::fs::read_to_string(root.join("BENCHMARKS.md")).unwrap();
    for name in [
        "uncontended",
        "round-trips",
        "handoff",
        "contention",
        "scale",
    ] {
        let svg = std::fs::read_to_string(root.join(format!("docs/bench/{name}.svg"))).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
            "{name}"
        );
        assert!(page.contains(&format!("docs/bench/{name}.svg")), "{name}");
    }
    assert!(page.contains("smoke test"));
    // Notes written by hand survive a regeneration.
    let edited = page.replace(
        "(Nothing yet: analysis written here is kept when the figures are regenerated.)",
        "Hand-written analysis.",
    );
    std::fs::write(root.join("BENCHMARKS.md"), edited).unwrap();
    report.write_docs(&root).unwrap();
    let page = std::fs::read_to_string(root.join("BENCHMARKS.md")).unwrap();
    assert!(page.contains("Hand-written analysis."));
}
