//! The `--url` / `LEASELOCK_URL`: which backend, where, and how to show it without credentials.
//!
//! A URL is checked completely (scheme, syntax, the backend's own parameters) before anything is
//! opened or connected, so bad input touches nothing.

use std::sync::Arc;

use leaselock::{LockBackend, LockKey, Namespace};
use serde::Serialize;
use url::Url;

use crate::exit::{describe, Failure};

/// The default URL: an SQLite file in the current directory, so the command works with no setup.
pub const DEFAULT_URL: &str = "sqlite://leaselock.db";

/// What replaces a password (or another secret) wherever a URL is shown.
pub const MASK: &str = "***";

/// Query parameters whose values are secrets (matched as substrings of the lower-cased name).
const SECRET_PARAMS: &[&str] = &[
    "password",
    // MongoDB's `authMechanismProperties` can carry an AWS session token.
    "authmechanismproperties",
    "passwd",
    "pwd",
    "secret",
    "token",
    "credential",
    "access_key",
];

/// The schemes this build accepts, for messages.
const AVAILABLE: &str = "sqlite, postgres, mysql, mongodb, dynamodb";

/// The URL of the lock storage, and where it came from.
#[derive(Clone)]
pub struct StorageUrl {
    /// The URL, secrets included: never print it (print [`Target::display`]).
    pub url: String,
    /// The file it was read from (`--url-file`), if it was.
    pub file: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for StorageUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StorageUrl")
            .field("url", &redact(&self.url))
            .field("file", &self.file)
            .finish()
    }
}

impl StorageUrl {
    /// The URL from `--url`/`LEASELOCK_URL` or `--url-file`/`LEASELOCK_URL_FILE` (not both),
    /// else [`DEFAULT_URL`]. The file's first line is the URL; its secrets are registered for
    /// scrubbing before anything can print them.
    pub fn resolve(url: Option<&str>, file: Option<&std::path::Path>) -> Result<Self, Failure> {
        match (url, file) {
            (Some(_), Some(_)) => Err(Failure::usage(
                "give the URL once: either --url (or LEASELOCK_URL) or --url-file (or \
                 LEASELOCK_URL_FILE)",
            )),
            (Some(url), None) => Ok(Self {
                url: url.to_owned(),
                file: None,
            }),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    Failure::usage(format!("cannot read --url-file {}: {e}", path.display()))
                })?;
                let url = text.lines().next().unwrap_or("").trim().to_owned();
                register_secrets(&url);
                if url.is_empty() {
                    return Err(Failure::usage(format!(
                        "--url-file {}: the first line is empty; it must hold the URL",
                        path.display()
                    )));
                }
                Ok(Self {
                    url,
                    file: Some(path.to_path_buf()),
                })
            }
            (None, None) => Ok(Self {
                url: DEFAULT_URL.to_owned(),
                file: None,
            }),
        }
    }

    /// The variables to set (and remove) in a command's environment so that a `leaselock` it
    /// runs finds the same storage, without the password: the `--url-file` path when the URL
    /// came from one, otherwise the URL with its password masked.
    pub fn child_env(
        &self,
        display: &str,
    ) -> (Vec<(&'static str, String)>, &'static [&'static str]) {
        match &self.file {
            Some(path) => (
                vec![("LEASELOCK_URL_FILE", path.display().to_string())],
                &["LEASELOCK_URL"],
            ),
            None => (
                vec![("LEASELOCK_URL", display.to_owned())],
                &["LEASELOCK_URL_FILE"],
            ),
        }
    }
}

/// The backends this build can open, by URL scheme.
///
/// Backend crates slot in here: add the scheme to [`Scheme::from_name`], a pre-connection check
/// to [`Target::parse`], the crate's `from_url` to [`Target::open_with`] and its native lock name to
/// [`Target::native_name`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    /// `sqlite://FILE` (relative to the current directory) or `sqlite:///ABSOLUTE/FILE`, with
    /// optional `?table=NAME&busy_timeout=5s`.
    Sqlite,
    /// `postgres://` or `postgresql://`, with `?strategy=advisory|table` (default `advisory`),
    /// `table=`, `schema=`, `prefix=`; other parameters go to the driver.
    Postgres,
    /// `mysql://` or `mariadb://`, with `?strategy=get_lock|table` (default `get_lock`),
    /// `table=`, `prefix=`; other parameters go to the driver.
    Mysql,
    /// `mongodb://` or `mongodb+srv://`, the database in the path (default `leaselock`), with
    /// `collection=`; other options go to the driver.
    Mongodb,
    /// `dynamodb://TABLE`, with `endpoint=`, `region=`, `max_clock_skew=`, `cleanup_after=`;
    /// credentials from the standard AWS configuration chain.
    Dynamodb,
}

impl Scheme {
    /// The backend for a URL scheme (lower-cased), or a one-line usage error.
    fn from_name(scheme: &str) -> Result<Self, Failure> {
        // ---- Backend selection: the one place where a new scheme is wired in. ----
        match scheme {
            "sqlite" => Ok(Scheme::Sqlite),
            "postgres" | "postgresql" => Ok(Scheme::Postgres),
            "mysql" | "mariadb" => Ok(Scheme::Mysql),
            "mongodb" | "mongodb+srv" => Ok(Scheme::Mongodb),
            "dynamodb" => Ok(Scheme::Dynamodb),
            other => Err(Failure::usage(format!(
                "unknown URL scheme `{other}` (available: {AVAILABLE}; for example {DEFAULT_URL})"
            ))),
        }
    }
}

/// A checked lock-storage URL.
#[derive(Clone)]
pub struct Target {
    url: String,
    display: String,
    scheme: Scheme,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("url", &self.display)
            .field("scheme", &self.scheme)
            .finish()
    }
}

impl Target {
    /// Checks `url` without opening anything: its scheme is known to this build and the
    /// backend's own parser accepts it. Every secret in it is registered for scrubbing.
    pub fn parse(url: &str) -> Result<Self, Failure> {
        register_secrets(url);
        let display = redact(url);
        if has_masked_password(url) {
            return Err(Failure::usage(format!(
                "the password in `{display}` is `{MASK}`, the mask leaselock shows instead of a \
                 password (a command run by `leaselock run` gets the URL masked): give the real \
                 URL, or keep the password out of sight with --url-file"
            )));
        }
        let scheme_name = match url.split_once(':') {
            Some((scheme, _)) if is_scheme(scheme) => scheme.to_ascii_lowercase(),
            _ => {
                return Err(Failure::usage(format!(
                    "malformed URL `{display}`: expected SCHEME://..., for example {DEFAULT_URL}"
                )))
            }
        };
        let scheme = Scheme::from_name(&scheme_name)?;
        let invalid = |error: leaselock::Error| {
            Failure::usage(format!("invalid URL `{display}`: {}", describe(&error)))
        };
        match scheme {
            Scheme::Sqlite => {
                leaselock_sqlite::SqliteConfig::from_url(url).map_err(invalid)?;
            }
            Scheme::Postgres => {
                leaselock_postgres::PgConfig::from_url(url).map_err(invalid)?;
            }
            Scheme::Mysql => {
                leaselock_mysql::MysqlConfig::from_url(url).map_err(invalid)?;
            }
            Scheme::Mongodb => {
                leaselock_mongodb::MongoConfig::from_url(url).map_err(invalid)?;
            }
            Scheme::Dynamodb => {
                leaselock_dynamodb::DynamoDbConfig::from_url(url).map_err(invalid)?;
            }
        }
        Ok(Self {
            url: url.to_owned(),
            display,
            scheme,
        })
    }

    /// The URL with its password (and any secret parameter) replaced by `***`.
    pub fn display(&self) -> &str {
        &self.display
    }

    /// For a file-based backend whose file does not exist yet: that file (so `check` can say so
    /// without creating it).
    pub fn missing_file(&self) -> Option<std::path::PathBuf> {
        match self.scheme {
            Scheme::Sqlite => {
                let config = leaselock_sqlite::SqliteConfig::from_url(&self.url).ok()?;
                let path = config.path();
                (!path.exists()).then(|| path.to_path_buf())
            }
            Scheme::Postgres | Scheme::Mysql | Scheme::Mongodb | Scheme::Dynamodb => None,
        }
    }

    /// Opens (or connects to) the backend for `access`. Only a file-based backend (SQLite)
    /// tells the three apart at opening (with [`Access::Create`] it creates the database file
    /// if missing, but never the table); a server backend never creates anything by
    /// connecting.
    pub async fn open_with(&self, access: Access) -> leaselock::Result<Arc<dyn LockBackend>> {
        match self.scheme {
            Scheme::Sqlite => {
                let config = leaselock_sqlite::SqliteConfig::from_url(&self.url)?;
                let config = match access {
                    Access::Create => config,
                    Access::Existing => config.create_if_missing(false),
                    Access::ReadOnly => config.read_only(true),
                };
                Ok(Arc::new(
                    leaselock_sqlite::SqliteBackend::connect(config).await?,
                ))
            }
            Scheme::Postgres => leaselock_postgres::from_url(&self.url).await,
            Scheme::Mysql => leaselock_mysql::from_url(&self.url).await,
            Scheme::Mongodb => leaselock_mongodb::from_url(&self.url).await,
            Scheme::Dynamodb => leaselock_dynamodb::from_url(&self.url).await,
        }
    }
}

/// How a command uses the lock storage when it opens it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// May create it (`run`, `init`): an SQLite file is created when missing.
    Create,
    /// Writes to storage that must already exist (`release --force`): nothing is created.
    Existing,
    /// Only reads (`status`, `list`, `check`, `release --dry-run`): an SQLite file is opened
    /// read-only, nothing is created or changed.
    ReadOnly,
}

/// Where, and under which name, a backend keeps the lock on one key: what `leaselock key`
/// shows, so that users can find the lock with their database's own tools. Computed from the URL
/// alone: nothing is opened, created or contacted.
#[derive(Debug, Serialize)]
pub struct NativeName {
    /// The backend's name, as `status --json` shows it.
    pub backend: &'static str,
    /// What the database locks: `advisory_lock` (a PostgreSQL session advisory lock),
    /// `get_lock` (a MySQL/MariaDB named lock), `row`, `document` or `item`.
    pub kind: &'static str,
    /// PostgreSQL advisory locks: the 64-bit lock id passed to `pg_try_advisory_lock(bigint)`,
    /// the first 8 bytes of SHA-256(prefix, NUL, key) as a big-endian signed integer.
    pub advisory_key: Option<i64>,
    /// PostgreSQL advisory locks: how the `pg_locks` view shows the lock.
    pub pg_locks: Option<PgLocks>,
    /// MySQL `GET_LOCK`: the lock name (`prefix:key`, or a readable part plus a hash when that
    /// is longer than 64 characters or not plain lower-case ASCII).
    pub lock_name: Option<String>,
    /// The prefix the advisory key or `GET_LOCK` name is derived from, with the key.
    pub prefix: Option<String>,
    /// SQLite: the database file, as given in the URL.
    pub file: Option<String>,
    /// MongoDB: the database.
    pub database: Option<String>,
    /// PostgreSQL: the schema, when the URL sets one (otherwise the `search_path` decides).
    pub schema: Option<String>,
    /// The table holding the key's row or item; for `advisory_lock` and `get_lock`, the counter
    /// table of durable fencing token reservations, next to the lock itself (the holders are in
    /// this name with `_holders` appended).
    pub table: Option<String>,
    /// MongoDB: the collection.
    pub collection: Option<String>,
    /// The column, document field or item attribute that holds the key, unchanged.
    pub key_field: &'static str,
    /// A query that shows the lock: SQL for the SQL databases (MySQL's assumes the default
    /// backslash escapes), a `mongosh` expression for MongoDB, PartiQL for DynamoDB.
    pub inspect: String,
}

/// The `pg_locks` columns that identify a leaselock advisory lock.
#[derive(Debug, Serialize)]
pub struct PgLocks {
    /// The high 32 bits of the advisory key, unsigned.
    pub classid: u32,
    /// The low 32 bits of the advisory key, unsigned.
    pub objid: u32,
    /// Always 1: a lock taken with one `bigint` argument.
    pub objsubid: u8,
}

impl Target {
    /// Where the backend keeps the lock on `key`, and its native name there. Connects to
    /// nothing, opens no file.
    pub fn native_name(&self, key: &LockKey) -> Result<NativeName, Failure> {
        let invalid = |error: leaselock::Error| {
            Failure::usage(format!(
                "invalid URL `{}`: {}",
                self.display,
                describe(&error)
            ))
        };
        let k = key.as_str();
        let quoted = |table: &str| {
            Namespace::for_field("table", table)
                .map(|t| t.quoted())
                .map_err(invalid)
        };
        let empty = NativeName {
            backend: "",
            kind: "row",
            advisory_key: None,
            pg_locks: None,
            lock_name: None,
            prefix: None,
            file: None,
            database: None,
            schema: None,
            table: None,
            collection: None,
            key_field: "",
            inspect: String::new(),
        };
        Ok(match self.scheme {
            Scheme::Sqlite => {
                let config =
                    leaselock_sqlite::SqliteConfig::from_url(&self.url).map_err(invalid)?;
                let table = raw_param(&self.url, "table")
                    .unwrap_or(leaselock_sqlite::DEFAULT_TABLE)
                    .to_owned();
                NativeName {
                    backend: "sqlite",
                    file: Some(config.path().display().to_string()),
                    inspect: format!(
                        "SELECT * FROM {} WHERE lock_key = {};",
                        quoted(&table)?,
                        sql_string(k, false)
                    ),
                    table: Some(table),
                    key_field: "lock_key",
                    ..empty
                }
            }
            Scheme::Postgres => {
                use leaselock_postgres::{PgAdvisoryBackend, PgConfig, PgTableBackend, Strategy};
                let config = PgConfig::from_url(&self.url).map_err(invalid)?;
                let schema = config.schema_name().map(str::to_owned);
                let qualify = |table: &str| -> Result<String, Failure> {
                    Ok(match &schema {
                        Some(schema) => format!(
                            "{}.{}",
                            Namespace::for_field("schema", schema.as_str())
                                .map_err(invalid)?
                                .quoted(),
                            quoted(table)?
                        ),
                        None => quoted(table)?,
                    })
                };
                match config.get_strategy() {
                    Strategy::Advisory => {
                        let table = config
                            .table_name()
                            .unwrap_or(leaselock_postgres::DEFAULT_COUNTER_TABLE)
                            .to_owned();
                        // Lazy: the constructor validates, the first operation connects.
                        let backend = PgAdvisoryBackend::new(config).map_err(invalid)?;
                        let id = backend.lock_id(key);
                        let (classid, objid) = leaselock_postgres::advisory_lock_parts(id);
                        NativeName {
                            backend: backend.capabilities().backend,
                            kind: "advisory_lock",
                            advisory_key: Some(id),
                            pg_locks: Some(PgLocks {
                                classid,
                                objid,
                                objsubid: 1,
                            }),
                            prefix: Some(backend.prefix().to_owned()),
                            inspect: format!(
                                "SELECT * FROM pg_locks WHERE locktype = 'advisory' AND database = \
                                 (SELECT oid FROM pg_database WHERE datname = current_database()) \
                                 AND classid = {classid} AND objid = {objid} AND objsubid = 1;"
                            ),
                            schema: schema.clone(),
                            table: Some(table),
                            key_field: "key",
                            ..empty
                        }
                    }
                    Strategy::Table => {
                        let table = config
                            .table_name()
                            .unwrap_or(leaselock_postgres::DEFAULT_TABLE)
                            .to_owned();
                        let backend = PgTableBackend::new(config).map_err(invalid)?;
                        NativeName {
                            backend: backend.capabilities().backend,
                            inspect: format!(
                                "SELECT * FROM {} WHERE key = {};",
                                qualify(&table)?,
                                sql_string(k, false)
                            ),
                            schema: schema.clone(),
                            table: Some(table),
                            key_field: "key",
                            ..empty
                        }
                    }
                    other => {
                        return Err(Failure::usage(format!(
                            "`leaselock key` does not know the PostgreSQL strategy {other:?}"
                        )))
                    }
                }
            }
            Scheme::Mysql => {
                use leaselock_mysql::{MysqlConfig, MysqlGetLockBackend, Strategy};
                let config = MysqlConfig::from_url(&self.url).map_err(invalid)?;
                // The parameters as `MysqlConfig::from_url` read them (it checked them).
                let strategy = match url_param(&self.url, "strategy") {
                    Some(strategy) => strategy.parse().map_err(invalid)?,
                    None => Strategy::default(),
                };
                let table = url_param(&self.url, "table").unwrap_or_else(|| {
                    match strategy {
                        Strategy::GetLock => leaselock_mysql::DEFAULT_GET_LOCK_TABLE,
                        Strategy::Table => leaselock_mysql::DEFAULT_TABLE,
                    }
                    .to_owned()
                });
                let backquoted = Namespace::for_field("table", table.as_str())
                    .map_err(invalid)?
                    .backquoted();
                match strategy {
                    Strategy::GetLock => {
                        // Lazy: the constructor validates, the first operation connects.
                        let backend = MysqlGetLockBackend::new(config).map_err(invalid)?;
                        let name = backend.lock_name(key);
                        NativeName {
                            backend: backend.capabilities().backend,
                            kind: "get_lock",
                            inspect: format!("SELECT IS_USED_LOCK({});", sql_string(&name, true)),
                            lock_name: Some(name),
                            prefix: Some(
                                url_param(&self.url, "prefix")
                                    .unwrap_or_else(|| leaselock_mysql::DEFAULT_PREFIX.to_owned()),
                            ),
                            table: Some(table),
                            key_field: "lock_key",
                            ..empty
                        }
                    }
                    Strategy::Table => {
                        let backend = config.build().map_err(invalid)?;
                        NativeName {
                            backend: backend.capabilities().backend,
                            inspect: format!(
                                "SELECT * FROM {backquoted} WHERE lock_key = {};",
                                sql_string(k, true)
                            ),
                            table: Some(table),
                            key_field: "lock_key",
                            ..empty
                        }
                    }
                }
            }
            Scheme::Mongodb => {
                let config =
                    leaselock_mongodb::MongoConfig::from_url(&self.url).map_err(invalid)?;
                let js = |text: &str| serde_json::to_string(text).unwrap_or_default();
                NativeName {
                    backend: "mongodb",
                    kind: "document",
                    inspect: format!(
                        "db.getSiblingDB({}).getCollection({}).findOne({{ _id: {} }})",
                        js(config.database_name()),
                        js(config.collection_name()),
                        js(k)
                    ),
                    database: Some(config.database_name().to_owned()),
                    collection: Some(config.collection_name().to_owned()),
                    key_field: "_id",
                    ..empty
                }
            }
            Scheme::Dynamodb => {
                let config =
                    leaselock_dynamodb::DynamoDbConfig::from_url(&self.url).map_err(invalid)?;
                let table = config.table_name().to_owned();
                NativeName {
                    backend: "dynamodb",
                    kind: "item",
                    inspect: format!(
                        "SELECT * FROM {} WHERE \"key\" = {}",
                        quoted(&table)?,
                        sql_string(k, false)
                    ),
                    table: Some(table),
                    key_field: "key",
                    ..empty
                }
            }
        })
    }
}

/// `text` as an SQL string literal: quotes doubled, and with `backslashes` (MySQL's default
/// mode) backslashes doubled too.
fn sql_string(text: &str, backslashes: bool) -> String {
    let mut literal = String::with_capacity(text.len() + 2);
    literal.push('\'');
    for c in text.chars() {
        match c {
            '\'' => literal.push_str("''"),
            '\\' if backslashes => literal.push_str("\\\\"),
            c => literal.push(c),
        }
    }
    literal.push('\'');
    literal
}

/// The value of the query parameter `name`, read as the SQLite URL parser reads it: no
/// percent-decoding (it refuses every value that would need it), the last one wins.
fn raw_param<'a>(url: &'a str, name: &str) -> Option<&'a str> {
    let (_, query) = url.split_once('?')?;
    query
        .rsplit('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, value)| value)
}

/// The value of the query parameter `name`, decoded, for URLs that [`Url`] parses.
fn url_param(url: &str, name: &str) -> Option<String> {
    Url::parse(url)
        .ok()?
        .query_pairs()
        .find(|(n, _)| n == name)
        .map(|(_, value)| value.into_owned())
}

/// Whether the URL's password is literally the mask (`***`, or `%2A%2A%2A`).
fn has_masked_password(url: &str) -> bool {
    match Url::parse(url) {
        Ok(parsed) => parsed
            .password()
            .is_some_and(|p| p == MASK || p.eq_ignore_ascii_case("%2A%2A%2A")),
        Err(_) => url.contains(&format!(":{MASK}@")) || url.contains(&format!("://{MASK}@")),
    }
}

fn is_scheme(scheme: &str) -> bool {
    let mut chars = scheme.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

fn is_secret_param(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    SECRET_PARAMS.iter().any(|s| name.contains(s))
}

/// `url` with its password and secret query parameters replaced by `***`. A URL that does not
/// parse loses everything between `://` and its last `@`.
pub fn redact(url: &str) -> String {
    match Url::parse(url) {
        Ok(parsed) => {
            let mut redacted = parsed.clone();
            let mut changed = false;
            if parsed.password().is_some() {
                changed |= redacted.set_password(Some(MASK)).is_ok();
            }
            if parsed.query_pairs().any(|(name, _)| is_secret_param(&name)) {
                let pairs: Vec<(String, String)> = parsed
                    .query_pairs()
                    .map(|(name, value)| {
                        let value = if is_secret_param(&name) {
                            MASK.to_owned()
                        } else {
                            value.into_owned()
                        };
                        (name.into_owned(), value)
                    })
                    .collect();
                redacted.query_pairs_mut().clear().extend_pairs(pairs);
                changed = true;
            }
            if changed {
                redacted.to_string()
            } else {
                url.to_owned()
            }
        }
        Err(_) => match url.split_once("://") {
            Some((scheme, rest)) => match rest.rfind('@') {
                Some(at) => format!("{scheme}://{MASK}{}", &rest[at..]),
                None => url.to_owned(),
            },
            None => url.to_owned(),
        },
    }
}

/// Registers every secret in `url` (its password, secret query values; as written and decoded)
/// for scrubbing from all output.
pub fn register_secrets(url: &str) {
    match Url::parse(url) {
        Ok(parsed) => {
            if let Some(password) = parsed.password() {
                crate::logging::add_secret(password);
                if let Ok(decoded) = percent_decode(password) {
                    crate::logging::add_secret(&decoded);
                }
            }
            for (name, value) in parsed.query_pairs() {
                if is_secret_param(&name) {
                    crate::logging::add_secret(&value);
                }
            }
        }
        Err(_) => {
            if let Some((_, rest)) = url.split_once("://") {
                if let Some(at) = rest.rfind('@') {
                    let userinfo = &rest[..at];
                    if let Some((_, password)) = userinfo.split_once(':') {
                        crate::logging::add_secret(password);
                    }
                }
            }
        }
    }
}

fn percent_decode(text: &str) -> Result<String, ()> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).map_err(|_| ())?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| ())?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords_and_secret_params() {
        assert_eq!(
            redact("postgres://app:hunter22@db:5432/x?strategy=table"),
            "postgres://app:***@db:5432/x?strategy=table"
        );
        assert_eq!(
            redact("dynamodb://locks?region=eu&secret_key=abc123"),
            "dynamodb://locks?region=eu&secret_key=***"
        );
        assert_eq!(redact(DEFAULT_URL), DEFAULT_URL);
        assert_eq!(
            redact("sqlite:///tmp/x.db?table=t"),
            "sqlite:///tmp/x.db?table=t"
        );
        // Unparseable (a `/` in the password): everything up to the last `@` goes.
        assert_eq!(
            redact("postgres://u:pa/ss@host:bad/db"),
            "postgres://***@host:bad/db"
        );
        assert_eq!(redact("mysql://root@h/db"), "mysql://root@h/db");
    }

    #[test]
    fn decodes_percent_escapes() {
        assert_eq!(percent_decode("p%40ss%2Fw").unwrap(), "p@ss/w");
        assert_eq!(percent_decode("plain").unwrap(), "plain");
        assert!(percent_decode("bad%zz").is_err());
    }

    #[test]
    fn parses_schemes() {
        assert_eq!(Target::parse(DEFAULT_URL).unwrap().scheme, Scheme::Sqlite);
        assert_eq!(
            Target::parse("sqlite:///tmp/x.db?table=jobs")
                .unwrap()
                .scheme,
            Scheme::Sqlite
        );
        let pg = Target::parse("postgresql://app:pw@db/app?strategy=table").unwrap();
        assert_eq!(pg.scheme, Scheme::Postgres);
        assert_eq!(pg.display(), "postgresql://app:***@db/app?strategy=table");
        let my = Target::parse("mariadb://root:pw@db/app?strategy=get_lock").unwrap();
        assert_eq!(my.scheme, Scheme::Mysql);
        assert_eq!(my.display(), "mariadb://root:***@db/app?strategy=get_lock");
        let mongo =
            Target::parse("mongodb://app:pw@h1:27017,h2:27017/app?collection=jobs").unwrap();
        assert_eq!(mongo.scheme, Scheme::Mongodb);
        assert_eq!(
            mongo.display(),
            "mongodb://***@h1:27017,h2:27017/app?collection=jobs"
        );
        assert_eq!(
            Target::parse("mongodb://h/db").unwrap().scheme,
            Scheme::Mongodb
        );
        assert_eq!(
            Target::parse("mongodb+srv://app:pw@cluster.example.com/app")
                .unwrap()
                .scheme,
            Scheme::Mongodb
        );
        let dynamo =
            Target::parse("dynamodb://locks?endpoint=http://127.0.0.1:8000&region=us-east-1")
                .unwrap();
        assert_eq!(dynamo.scheme, Scheme::Dynamodb);
        assert_eq!(
            Target::parse("dynamodb://locks").unwrap().scheme,
            Scheme::Dynamodb
        );
        for bad in [
            "",
            "leaselock.db",
            "://x",
            "1sqlite://x",
            "ftp://x",
            "sqlite://",
            "sqlite://x.db?table=bad-name",
            "sqlite://x.db?nope=1",
            "postgres://app:pw@db/app?strategy=nope",
            "postgres://db/app?strategy=table&prefix=p",
            "mysql://root:pw@db/app?strategy=advisory",
            "mongodb://h/db?collection=bad-name",
            "mongodb://h/1db",
            "mongodb+srv://app:pw@cluster.example.com/app?collection=a.b",
            "dynamodb://",
            "dynamodb://bad-name",
            "dynamodb://locks?nope=1",
            "dynamodb://locks?max_clock_skew=soon",
            "dynamodb://AKID:secret@locks",
            "dynamodb://locks:8000",
        ] {
            let failure = Target::parse(bad).unwrap_err();
            assert_eq!(failure.code, crate::exit::USAGE, "{bad}: {failure}");
            assert!(!failure.message.contains('\n'));
        }
    }

    #[test]
    fn sql_literals() {
        assert_eq!(sql_string("plain", true), "'plain'");
        assert_eq!(sql_string(r"it's a\b", false), r"'it''s a\b'");
        assert_eq!(sql_string(r"it's a\b", true), r"'it''s a\\b'");
        assert_eq!(
            raw_param("sqlite://x.db?table=a&busy_timeout=5s&table=b", "table"),
            Some("b")
        );
        assert_eq!(raw_param("sqlite://x.db", "table"), None);
        assert_eq!(
            url_param("mysql://h/db?table=%61bc", "table").as_deref(),
            Some("abc")
        );
    }

    fn native(url: &str, key: &str) -> NativeName {
        Target::parse(url)
            .unwrap()
            .native_name(&LockKey::new(key).unwrap())
            .unwrap()
    }

    #[test]
    fn native_names_of_file_document_and_item_backends() {
        let sqlite = native(
            "sqlite:///tmp/no-such-dir-for-leaselock/x.db?table=jobs",
            "it's",
        );
        assert_eq!((sqlite.backend, sqlite.kind), ("sqlite", "row"));
        assert_eq!(
            sqlite.file.as_deref(),
            Some("/tmp/no-such-dir-for-leaselock/x.db")
        );
        assert_eq!(sqlite.table.as_deref(), Some("jobs"));
        assert_eq!(
            sqlite.inspect,
            r#"SELECT * FROM "jobs" WHERE lock_key = 'it''s';"#
        );
        assert!(!std::path::Path::new("/tmp/no-such-dir-for-leaselock").exists());
        assert_eq!(
            native(DEFAULT_URL, "k").table.as_deref(),
            Some(leaselock_sqlite::DEFAULT_TABLE)
        );

        let mongo = native("mongodb://u:pw@127.0.0.1:1/ops?collection=jobs", "a\"b");
        assert_eq!((mongo.backend, mongo.kind), ("mongodb", "document"));
        assert_eq!(mongo.database.as_deref(), Some("ops"));
        assert_eq!(mongo.collection.as_deref(), Some("jobs"));
        assert_eq!(mongo.key_field, "_id");
        assert_eq!(
            mongo.inspect,
            r#"db.getSiblingDB("ops").getCollection("jobs").findOne({ _id: "a\"b" })"#
        );
        let default = native("mongodb://127.0.0.1:1", "k");
        assert_eq!(default.database.as_deref(), Some("leaselock"));
        assert_eq!(default.collection.as_deref(), Some("leaselock_locks"));

        let dynamo = native("dynamodb://app_locks?endpoint=http://127.0.0.1:1", "o'k");
        assert_eq!((dynamo.backend, dynamo.kind), ("dynamodb", "item"));
        assert_eq!(dynamo.table.as_deref(), Some("app_locks"));
        assert_eq!(
            dynamo.inspect,
            r#"SELECT * FROM "app_locks" WHERE "key" = 'o''k'"#
        );
    }

    #[tokio::test]
    async fn native_names_of_postgres_and_mysql() {
        // The values of the documented examples of `advisory_key` and `lock_name`.
        let pg = native("postgres://app:pw@127.0.0.1:1/app", "migrations");
        assert_eq!(
            (pg.backend, pg.kind),
            ("postgres-advisory", "advisory_lock")
        );
        assert_eq!(pg.advisory_key, Some(-7_738_434_545_972_184_409));
        let parts = pg.pg_locks.unwrap();
        assert_eq!(
            (u64::from(parts.classid) << 32) | u64::from(parts.objid),
            (-7_738_434_545_972_184_409_i64) as u64
        );
        assert_eq!(pg.prefix.as_deref(), Some("leaselock"));
        assert_eq!(pg.table.as_deref(), Some("leaselock_advisory"));
        let other = native("postgres://127.0.0.1:1/app?prefix=other_app", "migrations");
        assert_eq!(
            other.advisory_key,
            Some(leaselock_postgres::advisory_key("other_app", "migrations"))
        );
        assert_ne!(other.advisory_key, pg.advisory_key);
        let table = native(
            "postgresql://127.0.0.1:1/app?strategy=table&schema=ops&table=jobs",
            "it's",
        );
        assert_eq!((table.backend, table.kind), ("postgres-table", "row"));
        assert_eq!(table.advisory_key, None);
        assert_eq!(table.schema.as_deref(), Some("ops"));
        assert_eq!(
            table.inspect,
            r#"SELECT * FROM "ops"."jobs" WHERE key = 'it''s';"#
        );

        let my = native("mysql://root:pw@127.0.0.1:1/app", "migrations");
        assert_eq!((my.backend, my.kind), ("mysql-get-lock", "get_lock"));
        assert_eq!(my.lock_name.as_deref(), Some("leaselock:migrations"));
        assert_eq!(my.inspect, "SELECT IS_USED_LOCK('leaselock:migrations');");
        assert_eq!(my.table.as_deref(), Some("leaselock_get_locks"));
        let upper = native("mysql://127.0.0.1:1/app", "Migrations");
        assert_eq!(
            upper.lock_name.as_deref(),
            Some("leaselock:migrations#87abf4a5a8f7b086")
        );
        let long = native("mysql://127.0.0.1:1/app", &"reports/".repeat(10));
        assert_eq!(
            long.lock_name.as_deref(),
            Some("leaselock:reports/reports/reports/reports/repor#5d500b36af778329")
        );
        let prefixed = native("mariadb://127.0.0.1:1/app?prefix=myapp", "migrations");
        assert_eq!(prefixed.lock_name.as_deref(), Some("myapp:migrations"));
        assert_eq!(prefixed.prefix.as_deref(), Some("myapp"));
        let table = native("mysql://127.0.0.1:1/app?strategy=table", r"a\'b");
        assert_eq!((table.backend, table.kind), ("mysql-table", "row"));
        assert_eq!(table.lock_name, None);
        assert_eq!(table.table.as_deref(), Some("leaselock_locks"));
        assert_eq!(
            table.inspect,
            r"SELECT * FROM `leaselock_locks` WHERE lock_key = 'a\\''b';"
        );
    }
}
