//! MariaDB/MySQL: the machine's own server on 127.0.0.1:3306 (started if down), database
//! `leaselock_test`.

use std::process::Command;
use std::time::Duration;

use super::{Ctx, Service};
use crate::util::{have, output, port_open, run, wait_port, Result};

pub const SERVICE: Service = Service {
    name: "MariaDB",
    env_var: "LEASELOCK_MYSQL_URL",
    up,
    down: None,
};

const PORT: u16 = 3306;
const DATABASE: &str = "leaselock_test";

fn up(_ctx: &Ctx) -> Result<String> {
    if !port_open(PORT) {
        if !std::path::Path::new("/usr/sbin/mariadbd").exists() {
            return Err(
                "MariaDB is not installed here (no /usr/sbin/mariadbd); start one on \
                        127.0.0.1:3306 (docker compose up mysql) or set LEASELOCK_MYSQL_URL"
                    .into(),
            );
        }
        run(Command::new("start-stop-daemon").args([
            "--start",
            "--oknodo",
            "--background",
            "--exec",
            "/usr/sbin/mariadbd",
        ]))?;
        wait_port(PORT, Duration::from_secs(60))?;
    }
    let client = if have("mariadb") { "mariadb" } else { "mysql" };
    let sql = format!("CREATE DATABASE IF NOT EXISTS {DATABASE}");
    let mut outcome = output(Command::new(client).args(["-h", "127.0.0.1", "-uroot", "-e", &sql]));
    for _ in 0..50 {
        if outcome.is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
        outcome = output(Command::new(client).args(["-h", "127.0.0.1", "-uroot", "-e", &sql]));
    }
    outcome?;
    Ok(format!("mysql://root@127.0.0.1:{PORT}/{DATABASE}"))
}
