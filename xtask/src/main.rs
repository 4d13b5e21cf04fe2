//! `cargo xtask`: the project's own tasks.
//!
//! - `cargo xtask test [ARGS…]`: starts (and if needed installs) every database server the
//!   suite needs, exports their URLs, and runs `cargo test --workspace [ARGS…]`.
//! - `cargo xtask lint`: `cargo fmt --check`, clippy with warnings denied, docs with warnings
//!   denied.
//! - `cargo xtask ci`: lint, then test.
//! - `cargo xtask services up|env|down`: manage the servers without running tests.
//! - `cargo xtask chaos [CARGO TEST ARGS…]`: starts the servers like `test`, then runs every
//!   backend's fault suite (`tests/faults.rs`) with the full soak (10,000 critical sections per
//!   backend; `LEASELOCK_SOAK_SECTIONS` changes it) and collects the figures in
//!   `target/chaos-report.txt` (see RELIABILITY.md).
//! - `cargo xtask bench [BACKEND…] [OPTIONS]`: starts the servers like `test`, then runs the
//!   benchmark harness (`bench/`) in release mode (`--write-docs` rewrites BENCHMARKS.md).
//!
//! Servers are native processes (no container engine needed); their scratch files live in
//! `.services/` at the workspace root. A URL variable already set in the environment is used as
//! is and its server is not touched.

use std::path::PathBuf;
use std::process::ExitCode;

mod services;
mod util;

use util::{cargo, Result};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let outcome = match args.first().map(String::as_str) {
        Some("test") => test(&args[1..]),
        Some("lint") => lint(),
        Some("ci") => lint().and_then(|()| test(&args[1..])),
        Some("services") => services_cmd(args.get(1).map(String::as_str)),
        Some("bench") => bench(&args[1..]),
        Some("chaos") => chaos(&args[1..]),
        _ => {
            eprintln!(
                "usage: cargo xtask <test [CARGO TEST ARGS…] | lint | ci | services up|env|down | bench [ARGS…] | chaos [ARGS…]>"
            );
            return ExitCode::from(2);
        }
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("xtask: {message}");
            ExitCode::FAILURE
        }
    }
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Starts every service and returns the variables to export.
fn services_up() -> Result<Vec<(String, String)>> {
    let ctx = services::Ctx::new(root())?;
    let mut env = Vec::new();
    let mut failures = Vec::new();
    for service in services::all() {
        if let Ok(url) = std::env::var(service.env_var) {
            if !url.is_empty() {
                eprintln!(
                    "xtask: {} from {} (already set)",
                    service.name, service.env_var
                );
                env.push((service.env_var.to_owned(), url));
                continue;
            }
        }
        eprintln!("xtask: starting {}…", service.name);
        match (service.up)(&ctx) {
            Ok(url) => {
                eprintln!("xtask: {} ready", service.name);
                env.push((service.env_var.to_owned(), url));
            }
            Err(error) => {
                eprintln!("xtask: {} could not be started: {error}", service.name);
                failures.push(format!("{}: {error}", service.name));
            }
        }
    }
    if !failures.is_empty() && util::is_ci() {
        return Err(format!(
            "under CI every server is required; failed: {}",
            failures.join("; ")
        ));
    }
    Ok(env)
}

fn test(extra: &[String]) -> Result<()> {
    fault_tools()?;
    let env = services_up()?;
    let mut cmd = cargo();
    cmd.current_dir(root())
        .args(["test", "--workspace"])
        .args(extra);
    for (key, value) in &env {
        cmd.env(key, value);
    }
    util::run(&mut cmd)
}

/// The clock-skew fault cases preload libfaketime into holder processes: install it if missing
/// (Debian package `faketime`). Without it those cases skip locally and fail under CI.
fn fault_tools() -> Result<()> {
    if util::have("faketime") {
        return Ok(());
    }
    eprintln!("xtask: installing faketime (libfaketime) for the clock-skew fault cases");
    match util::apt_install(&["faketime"]) {
        Err(error) if !util::is_ci() => {
            eprintln!("xtask: {error}; the clock-skew fault cases will be skipped");
            Ok(())
        }
        outcome => outcome,
    }
}

/// Every backend's fault suite with the full soak; figures to `target/chaos-report.txt`.
fn chaos(extra: &[String]) -> Result<()> {
    fault_tools()?;
    let env = services_up()?;
    let report = root().join("target").join("chaos-report.txt");
    let _ = std::fs::remove_file(&report);
    let mut cmd = cargo();
    cmd.current_dir(root()).arg("test");
    for krate in [
        "leaselock-sqlite",
        "leaselock-postgres",
        "leaselock-mysql",
        "leaselock-mongodb",
        "leaselock-dynamodb",
    ] {
        cmd.args(["-p", krate]);
    }
    cmd.args(["--test", "faults"]).args(extra);
    for (key, value) in &env {
        cmd.env(key, value);
    }
    if std::env::var_os("LEASELOCK_SOAK_SECTIONS").is_none() {
        cmd.env("LEASELOCK_SOAK_SECTIONS", "10000");
    }
    cmd.env("LEASELOCK_FAULT_REPORT", &report);
    let outcome = util::run(&mut cmd);
    eprintln!("xtask: fault figures in {}", report.display());
    outcome
}

fn bench(args: &[String]) -> Result<()> {
    let env = services_up()?;
    let mut cmd = cargo();
    cmd.current_dir(root())
        .args(["run", "--release", "-p", "leaselock-bench", "--"])
        .args(args)
        .env(
            "LEASELOCK_BENCH_COMMAND",
            format!("cargo xtask bench {}", args.join(" ")).trim_end(),
        );
    for (key, value) in &env {
        cmd.env(key, value);
    }
    util::run(&mut cmd)
}

fn lint() -> Result<()> {
    let root = root();
    util::run(
        cargo()
            .current_dir(&root)
            .args(["fmt", "--all", "--", "--check"]),
    )?;
    util::run(cargo().current_dir(&root).args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    util::run(
        cargo()
            .current_dir(&root)
            .env("RUSTDOCFLAGS", "-D warnings")
            .args(["doc", "--workspace", "--no-deps"]),
    )
}

fn services_cmd(sub: Option<&str>) -> Result<()> {
    match sub {
        Some("up") | Some("env") => {
            for (key, value) in services_up()? {
                println!("export {key}='{value}'");
            }
            Ok(())
        }
        Some("down") => {
            let ctx = services::Ctx::new(root())?;
            for service in services::all() {
                if let Some(down) = service.down {
                    down(&ctx)?;
                }
            }
            Ok(())
        }
        _ => Err("usage: cargo xtask services up|env|down".into()),
    }
}
