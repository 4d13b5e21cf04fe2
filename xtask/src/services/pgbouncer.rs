//! PgBouncer in `pool_mode = transaction` on 127.0.0.1:6432, in front of the PostgreSQL service
//! (which starts first), for the PostgreSQL backend's pooler-detection test. Installed from
//! Debian's packages when missing; its config, log and pid file live in `.services/pgbouncer`.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use super::{Ctx, Service};
use crate::util::{apt_install, have, output, port_open, run, wait_port, Result};

pub const SERVICE: Service = Service {
    name: "PgBouncer",
    env_var: "LEASELOCK_PGBOUNCER_URL",
    up,
    down: Some(down),
};

const PORT: u16 = 6432;
const DATABASE: &str = "leaselock_test";

fn dir(ctx: &Ctx) -> PathBuf {
    ctx.scratch.join("pgbouncer")
}

fn up(ctx: &Ctx) -> Result<String> {
    let url = format!("postgres://postgres@127.0.0.1:{PORT}/{DATABASE}");
    if port_open(PORT) {
        return Ok(url);
    }
    if !have("pgbouncer") && !std::path::Path::new("/usr/sbin/pgbouncer").exists() {
        apt_install(&["pgbouncer"])?;
    }
    let dir = dir(ctx);
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    // Every client connects as the server's `postgres` user (trust auth on 127.0.0.1), so
    // `auth_type = any` needs no user list. Transaction pooling is the point: the backend must
    // notice that its session's server process changes between transactions.
    let config = format!(
        "[databases]\n\
         * = host=127.0.0.1 port=5432 user=postgres\n\
         \n\
         [pgbouncer]\n\
         listen_addr = 127.0.0.1\n\
         listen_port = {PORT}\n\
         unix_socket_dir =\n\
         auth_type = any\n\
         pool_mode = transaction\n\
         default_pool_size = 8\n\
         max_client_conn = 500\n\
         logfile = {log}\n\
         pidfile = {pid}\n",
        log = dir.join("pgbouncer.log").display(),
        pid = dir.join("pgbouncer.pid").display(),
    );
    let ini = dir.join("pgbouncer.ini");
    std::fs::write(&ini, config).map_err(|e| format!("cannot write {}: {e}", ini.display()))?;
    let program = if have("pgbouncer") {
        "pgbouncer"
    } else {
        "/usr/sbin/pgbouncer"
    };
    let mut start = Command::new(program);
    start.arg("-d");
    // PgBouncer refuses to run as root: drop to the `postgres` user, which must own its files.
    if output(Command::new("id").arg("-u"))? == "0" {
        run(Command::new("chown").args(["-R", "postgres"]).arg(&dir))?;
        start.args(["-u", "postgres"]);
    }
    run(start.arg(&ini))?;
    wait_port(PORT, Duration::from_secs(30))?;
    Ok(url)
}

fn down(ctx: &Ctx) -> Result<()> {
    let pidfile = dir(ctx).join("pgbouncer.pid");
    let Ok(pid) = std::fs::read_to_string(&pidfile) else {
        return Ok(()); // not started by us
    };
    run(Command::new("kill").arg(pid.trim()))
}
