//! MongoDB for the tests: SecantusDB 0.5.3-beta.196 (`secantusd-rs`), a MongoDB-wire-compatible
//! single-node server with WiredTiger storage, on 127.0.0.1:27018, database `leaselock_test`.
//! No real `mongod` can be installed here. SecantusDB is GPL-licensed, so it only ever runs as a
//! separate process and is never a dependency of the workspace.
//!
//! The binary is reused from /opt/leaselock-services/secantus/bin, else installed there with
//! `cargo install` (cmake from Debian's packages first; about 8 minutes on two cores) using its
//! own target directory, away from the workspace's build. Its data, log and our pid file live in
//! `.services/mongodb`.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::{Ctx, Service};
use crate::util::{apt_install, cargo, have, port_open, run, wait_port, Result};

pub const SERVICE: Service = Service {
    name: "MongoDB (SecantusDB)",
    env_var: "LEASELOCK_MONGODB_URL",
    up,
    down: Some(down),
};

const PORT: u16 = 27018;
const DATABASE: &str = "leaselock_test";
const PACKAGE: &str = "secantus-mdb";
const VERSION: &str = "0.5.3-beta.196";
const INSTALL_ROOT: &str = "/opt/leaselock-services/secantus";
const BINARY: &str = "secantusd-rs";

fn dir(ctx: &Ctx) -> PathBuf {
    ctx.scratch.join("mongodb")
}

/// The installed server, installing it first when missing.
fn install() -> Result<PathBuf> {
    let binary = Path::new(INSTALL_ROOT).join("bin").join(BINARY);
    if binary.is_file() {
        return Ok(binary);
    }
    if !have("cmake") {
        apt_install(&["cmake"])?;
    }
    eprintln!(
        "xtask: installing {PACKAGE} {VERSION} into {INSTALL_ROOT} with cargo (about 8 minutes)"
    );
    let target = std::env::temp_dir().join("leaselock-secantus-target");
    run(cargo()
        .args([
            "install",
            PACKAGE,
            "--version",
            VERSION,
            "--ignore-rust-version",
        ])
        .arg("--root")
        .arg(INSTALL_ROOT)
        .env("CARGO_TARGET_DIR", &target)
        // Outside the workspace, so its configuration does not apply.
        .current_dir(std::env::temp_dir()))?;
    if binary.is_file() {
        Ok(binary)
    } else {
        Err(format!(
            "{PACKAGE} {VERSION} installed, but there is no {}",
            binary.display()
        ))
    }
}

fn up(ctx: &Ctx) -> Result<String> {
    let url = format!("mongodb://127.0.0.1:{PORT}/{DATABASE}");
    if port_open(PORT) {
        return Ok(url); // already running (ours from an earlier run, or the developer's)
    }
    let binary = install()?;
    let dir = dir(ctx);
    let data = dir.join("data");
    std::fs::create_dir_all(&data).map_err(|e| format!("cannot create {}: {e}", data.display()))?;
    let log_path = dir.join("secantusd.log");
    let log = File::create(&log_path)
        .map_err(|e| format!("cannot create {}: {e}", log_path.display()))?;
    let log_err = log
        .try_clone()
        .map_err(|e| format!("cannot open {}: {e}", log_path.display()))?;
    let child = Command::new(&binary)
        .args(["--host", "127.0.0.1", "--port", &PORT.to_string()])
        .arg("--storage-path")
        .arg(&data)
        .args(["--cache-size", "256M", "--log-file-max", "16MB"])
        .current_dir(&dir)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        // Its own process group: it outlives this command, like the other servers.
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
    let pidfile = dir.join("secantusd.pid");
    std::fs::write(&pidfile, child.id().to_string())
        .map_err(|e| format!("cannot write {}: {e}", pidfile.display()))?;
    wait_port(PORT, Duration::from_secs(60))
        .map_err(|e| format!("SecantusDB did not start: {e}; see {}", log_path.display()))?;
    Ok(url)
}

fn down(ctx: &Ctx) -> Result<()> {
    let pidfile = dir(ctx).join("secantusd.pid");
    let Ok(pid) = std::fs::read_to_string(&pidfile) else {
        return Ok(()); // not started by us
    };
    let _ = std::fs::remove_file(&pidfile);
    // Already gone is fine.
    let _ = run(Command::new("kill").arg(pid.trim()));
    Ok(())
}
