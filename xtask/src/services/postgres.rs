//! PostgreSQL: the machine's own server on 127.0.0.1:5432 (started if down), database
//! `leaselock_test`.

use std::process::Command;
use std::time::Duration;

use super::{Ctx, Service};
use crate::util::{output, port_open, run, wait_port, Result};

pub const SERVICE: Service = Service {
    name: "PostgreSQL",
    env_var: "LEASELOCK_POSTGRES_URL",
    up,
    down: None,
};

const PORT: u16 = 5432;
const DATABASE: &str = "leaselock_test";

fn up(_ctx: &Ctx) -> Result<String> {
    if !port_open(PORT) {
        let versions = std::fs::read_dir("/etc/postgresql").map_err(|_| {
            "PostgreSQL is not installed here (no /etc/postgresql); start one on 127.0.0.1:5432 \
             (docker compose up postgres) or set LEASELOCK_POSTGRES_URL"
                .to_owned()
        })?;
        let version = versions
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .max()
            .ok_or("no PostgreSQL cluster under /etc/postgresql")?;
        run(Command::new("pg_ctlcluster").args([
            "--skip-systemctl-redirect",
            &version,
            "main",
            "start",
        ]))?;
        wait_port(PORT, Duration::from_secs(60))?;
    }
    let psql = |sql: &str| {
        output(Command::new("psql").args([
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-tAc",
            sql,
        ]))
    };
    // The server may accept connections a moment before it accepts logins.
    let mut exists = psql(&format!(
        "SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'"
    ));
    for _ in 0..50 {
        if exists.is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
        exists = psql(&format!(
            "SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'"
        ));
    }
    if exists? != "1" {
        // Two runs racing here both try; the loser's error is harmless if the database exists.
        if let Err(error) = psql(&format!("CREATE DATABASE {DATABASE}")) {
            if !error.contains("already exists") {
                return Err(error);
            }
        }
    }
    Ok(format!("postgres://postgres@127.0.0.1:{PORT}/{DATABASE}"))
}
