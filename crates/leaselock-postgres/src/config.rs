//! Configuration shared by both PostgreSQL backends, and URL parsing.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use leaselock::{Error, Namespace, Result};
use tokio_postgres::config::Host;

/// The lease table's name when none is configured ([`PgTableBackend`](crate::PgTableBackend)).
pub const DEFAULT_TABLE: &str = "leaselock_locks";
/// The fencing-counter table's name when none is configured
/// ([`PgAdvisoryBackend`](crate::PgAdvisoryBackend)).
pub const DEFAULT_COUNTER_TABLE: &str = "leaselock_advisory";
/// The advisory key prefix when none is configured (see [`advisory_key`](crate::advisory_key)).
pub const DEFAULT_PREFIX: &str = "leaselock";
/// How many statement connections a backend opens at most, by default: 4 (see
/// [`PgConfig::connections`]).
pub const DEFAULT_CONNECTIONS: usize = 4;

/// Which backend a URL asks for (`strategy=` in [`PgConfig::from_url`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Strategy {
    /// Session advisory locks, [`PgAdvisoryBackend`](crate::PgAdvisoryBackend) (`strategy=advisory`,
    /// the default).
    #[default]
    Advisory,
    /// A lease table, [`PgTableBackend`](crate::PgTableBackend) (`strategy=table`).
    Table,
}

/// How to reach PostgreSQL and where the locks live. Shared by both backends.
///
/// Build it from a URL with [`PgConfig::from_url`] or from a `tokio_postgres::Config` with
/// [`PgConfig::new`], then adjust with the builder methods. Every identifier is validated with
/// [`leaselock::Namespace`] and quoted in statements. `Debug` never shows the password.
///
/// ```
/// use std::time::Duration;
/// use leaselock_postgres::PgConfig;
/// let config = PgConfig::from_url("postgres://app:s3cret@db.internal:5432/app?table=locks")?
///     .schema("ops")?
///     .operation_timeout(Duration::from_secs(10))?;
/// assert_eq!(config.table_name(), Some("locks"));
/// assert!(!format!("{config:?}").contains("s3cret"));
/// # Ok::<(), leaselock::Error>(())
/// ```
#[derive(Clone)]
pub struct PgConfig {
    pub(crate) connection: tokio_postgres::Config,
    pub(crate) strategy: Strategy,
    pub(crate) schema: Option<Namespace>,
    pub(crate) table: Option<Namespace>,
    pub(crate) prefix: Namespace,
    pub(crate) prefix_set: bool,
    pub(crate) connect_timeout: Duration,
    pub(crate) operation_timeout: Duration,
    pub(crate) max_idle_sessions: usize,
    pub(crate) probe_pooler: bool,
    pub(crate) statement_cache: bool,
    pub(crate) connections: usize,
    #[cfg(feature = "tls")]
    pub(crate) tls_roots: Vec<rustls::pki_types::CertificateDer<'static>>,
}

impl PgConfig {
    /// A configuration over an already-built driver configuration, with every other setting at its
    /// default. Sets `application_name` to `leaselock` unless the driver configuration has one.
    pub fn new(mut connection: tokio_postgres::Config) -> Self {
        if connection.get_application_name().is_none() {
            connection.application_name("leaselock");
        }
        Self {
            connection,
            strategy: Strategy::default(),
            schema: None,
            table: None,
            prefix: Namespace::for_field("prefix", DEFAULT_PREFIX).expect("a valid default"),
            prefix_set: false,
            connect_timeout: Duration::from_secs(10),
            operation_timeout: Duration::from_secs(30),
            max_idle_sessions: 4,
            probe_pooler: true,
            statement_cache: true,
            connections: DEFAULT_CONNECTIONS,
            #[cfg(feature = "tls")]
            tls_roots: Vec::new(),
        }
    }

    /// Parses a `postgres://` or `postgresql://` URL.
    ///
    /// Besides everything `tokio_postgres` understands (`sslmode=`, `connect_timeout=`,
    /// `application_name=`, several hosts, ...), these query parameters are leaselock's own and
    /// are removed before the rest goes to the driver:
    ///
    /// - `strategy=advisory|table`: which backend [`crate::from_url`] builds (default `advisory`);
    /// - `table=NAME`: the lease table, or for advisory locks the fencing-counter table (whose
    ///   holder table is `NAME_holders`);
    /// - `schema=NAME`: the schema of that table (default: the connection's `search_path`);
    /// - `prefix=NAME`: the advisory key prefix (advisory only, default `leaselock`);
    /// - `sslrootcert=PATH`: a PEM file of CA certificates to trust (with the `tls` feature);
    /// - `statement_cache=true|false`: see [`PgConfig::statement_cache`] (default `true`);
    /// - `connections=N`: see [`PgConfig::connections`] (default 4);
    /// - `max_idle_sessions=N`: see [`PgConfig::max_idle_sessions`] (default 4).
    ///
    /// Errors are [`Error::InvalidInput`] with field `url`, and never contain the password.
    ///
    /// ```
    /// use leaselock_postgres::{PgConfig, Strategy};
    /// let config = PgConfig::from_url("postgresql://u:pw@localhost/app?strategy=table&schema=ops")?;
    /// assert_eq!(config.get_strategy(), Strategy::Table);
    /// assert_eq!(config.schema_name(), Some("ops"));
    ///
    /// let err = PgConfig::from_url("postgres://u:hunter2@localhost:notaport/app").unwrap_err();
    /// assert!(matches!(err, leaselock::Error::InvalidInput { field: "url", .. }));
    /// assert!(!err.to_string().contains("hunter2"));
    /// # Ok::<(), leaselock::Error>(())
    /// ```
    pub fn from_url(url: &str) -> Result<Self> {
        Self::parse_url(url).map_err(|error| match error {
            Error::InvalidInput { field, reason } => Error::InvalidInput {
                field,
                reason: redact(&reason, url),
            },
            other => other,
        })
    }

    fn parse_url(url: &str) -> Result<Self> {
        let parts = split_url(url)?;
        let connection = tokio_postgres::Config::from_str(&parts.driver_url).map_err(|e| {
            Error::invalid(
                "url",
                format!("the connection URL is not valid: {}", error_chain(&e)),
            )
        })?;
        let mut config = Self::new(connection);
        for (name, value) in parts.ours {
            config = match name.as_str() {
                "strategy" => match value.as_str() {
                    "advisory" => config.strategy(Strategy::Advisory),
                    "table" => config.strategy(Strategy::Table),
                    other => {
                        return Err(Error::invalid(
                            "url",
                            format!("strategy must be `advisory` or `table`, not `{other}`"),
                        ))
                    }
                },
                "table" => config.table(&value).map_err(as_url_error)?,
                "schema" => config.schema(&value).map_err(as_url_error)?,
                "prefix" => config.prefix(&value).map_err(as_url_error)?,
                "sslrootcert" => config.sslrootcert(&value)?,
                "connections" => config
                    .connections(url_number(&name, &value)?)
                    .map_err(as_url_error)?,
                "max_idle_sessions" => config.max_idle_sessions(url_number(&name, &value)?),
                "statement_cache" => match value.as_str() {
                    "true" => config.statement_cache(true),
                    "false" => config.statement_cache(false),
                    other => {
                        return Err(Error::invalid(
                            "url",
                            format!("statement_cache must be `true` or `false`, not `{other}`"),
                        ))
                    }
                },
                _ => unreachable!("split_url returns only our parameters"),
            };
        }
        if config.strategy == Strategy::Table && config.prefix_set {
            return Err(Error::invalid(
                "url",
                "prefix= applies only to strategy=advisory",
            ));
        }
        Ok(config)
    }

    /// Which backend [`crate::from_url`] builds. Default [`Strategy::Advisory`].
    pub fn strategy(mut self, strategy: Strategy) -> Self {
        self.strategy = strategy;
        self
    }

    /// The schema of the table. Default: none, so the connection's `search_path` decides.
    /// Validated (field `schema`) and quoted.
    pub fn schema(mut self, schema: &str) -> Result<Self> {
        self.schema = Some(Namespace::for_field("schema", schema)?);
        Ok(self)
    }

    /// The table: the lease table for [`PgTableBackend`](crate::PgTableBackend) (default
    /// [`DEFAULT_TABLE`]), the fencing-counter table for
    /// [`PgAdvisoryBackend`](crate::PgAdvisoryBackend) (default [`DEFAULT_COUNTER_TABLE`]; its
    /// holder table is named the same with `_holders` appended, so keep this name within 55
    /// bytes for that backend). Validated (field `table`) and quoted.
    pub fn table(mut self, table: &str) -> Result<Self> {
        self.table = Some(Namespace::for_field("table", table)?);
        Ok(self)
    }

    /// The prefix hashed together with each key into the 64-bit advisory lock id (see
    /// [`advisory_key`](crate::advisory_key)), so applications sharing a database do not collide.
    /// Default [`DEFAULT_PREFIX`]. Validated (field `prefix`). Advisory backend only.
    pub fn prefix(mut self, prefix: &str) -> Result<Self> {
        self.prefix = Namespace::for_field("prefix", prefix)?;
        self.prefix_set = true;
        Ok(self)
    }

    /// How long opening a connection may take. Default 10 s (a `connect_timeout` in the URL also
    /// applies, per host).
    pub fn connect_timeout(mut self, timeout: Duration) -> Result<Self> {
        self.connect_timeout = positive("connect_timeout", timeout)?;
        Ok(self)
    }

    /// How long one statement may take before the operation fails with a retryable error. For an
    /// advisory lock's refresh or verify, a session that does not answer in time is treated as
    /// lost (closing it frees the lock on the server). Default 30 s.
    pub fn operation_timeout(mut self, timeout: Duration) -> Result<Self> {
        self.operation_timeout = positive("operation_timeout", timeout)?;
        Ok(self)
    }

    /// How many idle advisory sessions (connections that hold no lock) are kept for reuse instead
    /// of opening a new connection per acquisition. `0` opens a fresh connection every time.
    /// Default 4. Advisory backend only.
    pub fn max_idle_sessions(mut self, max: usize) -> Self {
        self.max_idle_sessions = max;
        self
    }

    /// Whether each new advisory session is checked when it opens, with one extra round trip on
    /// the control connection, to be a different server session from the control connection
    /// (behind a transaction-pooling proxy such as PgBouncer they often are the same, and the
    /// acquisition is refused before anything is locked). A session reused from the idle ones
    /// costs nothing more: the pid checks on acquire, refresh, verify and release happen
    /// regardless. Default `true`. Advisory backend only.
    pub fn probe_pooler(mut self, probe: bool) -> Self {
        self.probe_pooler = probe;
        self
    }

    /// Over how many connections the backend spreads its statements: every lease-table
    /// operation, and the advisory backend's status, list, pooler probe and cleanup (advisory
    /// locks themselves each hold a session of their own). Each is opened on first use and
    /// pipelines concurrent statements; several let the server commit concurrent writes
    /// together instead of one after another. Default [`DEFAULT_CONNECTIONS`]; 1 to 64.
    ///
    /// ```
    /// use leaselock_postgres::PgConfig;
    /// let config = PgConfig::from_url("postgres://app@db/app?strategy=table&connections=8")?;
    /// assert!(format!("{config:?}").contains("connections: 8"));
    /// assert!(PgConfig::from_url("postgres://app@db/app")?.connections(0).is_err());
    /// # Ok::<(), leaselock::Error>(())
    /// ```
    pub fn connections(mut self, connections: usize) -> Result<Self> {
        if !(1..=64).contains(&connections) {
            return Err(Error::invalid(
                "connections",
                format!("must be between 1 and 64, not {connections}"),
            ));
        }
        self.connections = connections;
        Ok(self)
    }

    /// Whether each connection prepares its statements once and reuses them (skipping the
    /// server's parsing and planning on every later run), as sqlx and most drivers do. Turn it
    /// off behind a transaction-pooling proxy (PgBouncer with `pool_mode = transaction` before
    /// 1.21, or without `max_prepared_statements`), where a prepared statement does not follow
    /// the client from one server connection to the next. Default `true`; URL parameter
    /// `statement_cache=false`.
    ///
    /// ```
    /// use leaselock_postgres::PgConfig;
    /// let config = PgConfig::from_url("postgres://app@pooler:6432/app?strategy=table")?
    ///     .statement_cache(false);
    /// assert!(format!("{config:?}").contains("statement_cache: false"));
    /// # Ok::<(), leaselock::Error>(())
    /// ```
    pub fn statement_cache(mut self, cache: bool) -> Self {
        self.statement_cache = cache;
        self
    }

    /// Trusts the CA certificates in `pem` (one or more PEM blocks), for managed databases whose
    /// certificates are signed by their own CA. The platform's root certificates are trusted
    /// too. With the `tls` feature.
    #[cfg(feature = "tls")]
    pub fn tls_root_certificates_pem(mut self, pem: &[u8]) -> Result<Self> {
        use rustls::pki_types::pem::PemObject;
        let before = self.tls_roots.len();
        for cert in rustls::pki_types::CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| {
                Error::invalid("tls_root_certificates", format!("not valid PEM: {e}"))
            })?;
            self.tls_roots.push(cert);
        }
        if self.tls_roots.len() == before {
            return Err(Error::invalid(
                "tls_root_certificates",
                "no certificate found in the PEM data",
            ));
        }
        Ok(self)
    }

    #[cfg(feature = "tls")]
    fn sslrootcert(self, path: &str) -> Result<Self> {
        let pem = std::fs::read(path).map_err(|e| {
            Error::invalid("url", format!("sslrootcert: cannot read `{path}`: {e}"))
        })?;
        self.tls_root_certificates_pem(&pem)
            .map_err(|e| Error::invalid("url", format!("sslrootcert `{path}`: {e}")))
    }

    #[cfg(not(feature = "tls"))]
    fn sslrootcert(self, _path: &str) -> Result<Self> {
        Err(Error::invalid(
            "url",
            "sslrootcert= needs leaselock-postgres built with the `tls` feature",
        ))
    }

    /// The configured strategy.
    pub fn get_strategy(&self) -> Strategy {
        self.strategy
    }

    /// The configured schema, if any.
    pub fn schema_name(&self) -> Option<&str> {
        self.schema.as_ref().map(Namespace::as_str)
    }

    /// The configured table, if any (`None`: the backend's default).
    pub fn table_name(&self) -> Option<&str> {
        self.table.as_ref().map(Namespace::as_str)
    }

    /// The advisory key prefix.
    pub fn prefix_name(&self) -> &str {
        self.prefix.as_str()
    }

    /// The driver configuration (its `Debug` hides the password).
    pub fn connection(&self) -> &tokio_postgres::Config {
        &self.connection
    }

    /// Where this connects, for messages: `user@host:port/dbname`, never the password.
    ///
    /// ```
    /// let config = leaselock_postgres::PgConfig::from_url("postgres://me:pw@db:5433/app")?;
    /// assert_eq!(config.target(), "me@db:5433/app");
    /// # Ok::<(), leaselock::Error>(())
    /// ```
    pub fn target(&self) -> String {
        let c = &self.connection;
        let hosts: Vec<String> = c
            .get_hosts()
            .iter()
            .enumerate()
            .map(|(i, host)| {
                let port = c
                    .get_ports()
                    .get(i)
                    .or_else(|| c.get_ports().first())
                    .copied()
                    .unwrap_or(5432);
                match host {
                    Host::Tcp(name) => format!("{name}:{port}"),
                    Host::Unix(path) => format!("{}:{port}", path.display()),
                }
            })
            .collect();
        let hosts = if hosts.is_empty() {
            "localhost:5432".to_owned()
        } else {
            hosts.join(",")
        };
        let user = c.get_user().map(|u| format!("{u}@")).unwrap_or_default();
        let db = c.get_dbname().unwrap_or_default();
        format!("{user}{hosts}/{db}")
    }

    /// The schema-qualified, quoted name of the table named like the configured one (or
    /// `default_table`) with `suffix` appended, in the same schema: a companion table. Errors
    /// (field `table`) when the name grows past the identifier limit.
    pub(crate) fn qualified_companion(&self, default_table: &str, suffix: &str) -> Result<String> {
        let table = self.table_or(default_table).with_suffix("table", suffix)?;
        Ok(self.in_schema(&table))
    }

    /// The schema-qualified, quoted table name for statements.
    pub(crate) fn qualified(&self, default_table: &str) -> String {
        self.in_schema(&self.table_or(default_table))
    }

    /// The configured table, or `default_table`.
    fn table_or(&self, default_table: &str) -> Namespace {
        match &self.table {
            Some(table) => table.clone(),
            None => Namespace::for_field("table", default_table).expect("a valid default"),
        }
    }

    /// `table`, quoted, in the configured schema if there is one.
    fn in_schema(&self, table: &Namespace) -> String {
        match &self.schema {
            Some(schema) => format!("{}.{}", schema.quoted(), table.quoted()),
            None => table.quoted(),
        }
    }
}

impl fmt::Debug for PgConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgConfig")
            .field("target", &self.target())
            .field("strategy", &self.strategy)
            .field("schema", &self.schema)
            .field("table", &self.table)
            .field("prefix", &self.prefix)
            .field("connect_timeout", &self.connect_timeout)
            .field("operation_timeout", &self.operation_timeout)
            .field("max_idle_sessions", &self.max_idle_sessions)
            .field("probe_pooler", &self.probe_pooler)
            .field("statement_cache", &self.statement_cache)
            .field("connections", &self.connections)
            .finish_non_exhaustive()
    }
}

fn positive(field: &'static str, value: Duration) -> Result<Duration> {
    if value.is_zero() {
        return Err(Error::invalid(field, "must be longer than zero"));
    }
    if value > Duration::from_secs(24 * 60 * 60) {
        return Err(Error::invalid(field, "must be at most one day"));
    }
    Ok(value)
}

fn as_url_error(error: Error) -> Error {
    match error {
        Error::InvalidInput { field, reason } => {
            Error::invalid("url", format!("{field}= {reason}"))
        }
        other => other,
    }
}

/// A count given in the URL as `name=value`.
fn url_number(name: &str, value: &str) -> Result<usize> {
    value
        .parse()
        .map_err(|_| Error::invalid("url", format!("{name} must be a number, not `{value}`")))
}

/// A URL split into what the driver gets and our own parameters.
struct UrlParts {
    driver_url: String,
    ours: Vec<(String, String)>,
}

const OUR_PARAMS: [&str; 8] = [
    "connections",
    "max_idle_sessions",
    "strategy",
    "table",
    "schema",
    "prefix",
    "sslrootcert",
    "statement_cache",
];

fn split_url(url: &str) -> Result<UrlParts> {
    let lower = url.get(..13).unwrap_or(url).to_ascii_lowercase();
    if !(lower.starts_with("postgres://") || lower.starts_with("postgresql://")) {
        return Err(Error::invalid(
            "url",
            "must start with postgres:// or postgresql://",
        ));
    }
    if url.contains('#') {
        return Err(Error::invalid(
            "url",
            "must not contain a fragment (`#`); percent-encode `#` in passwords as %23",
        ));
    }
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, query),
        None => (url, ""),
    };
    let mut kept = Vec::new();
    let mut ours = Vec::new();
    for piece in query.split('&').filter(|p| !p.is_empty()) {
        let name = piece.split_once('=').map_or(piece, |(name, _)| name);
        if OUR_PARAMS.contains(&name) {
            let (name, value) = url::form_urlencoded::parse(piece.as_bytes())
                .next()
                .map(|(n, v)| (n.into_owned(), v.into_owned()))
                .unwrap_or_default();
            if ours.iter().any(|(n, _)| *n == name) {
                return Err(Error::invalid("url", format!("{name}= is given twice")));
            }
            ours.push((name, value));
        } else {
            kept.push(piece);
        }
    }
    let driver_url = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok(UrlParts { driver_url, ours })
}

/// Removes the URL's password (raw and percent-decoded) from `message`.
pub(crate) fn redact(message: &str, url: &str) -> String {
    let mut out = message.to_owned();
    for secret in password_forms(url) {
        if !secret.is_empty() {
            out = out.replace(&secret, "***");
        }
    }
    out
}

fn password_forms(url: &str) -> Vec<String> {
    let Some((_, rest)) = url.split_once("://") else {
        return Vec::new();
    };
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    let Some((userinfo, _)) = authority.rsplit_once('@') else {
        return Vec::new();
    };
    let Some((_, password)) = userinfo.split_once(':') else {
        return Vec::new();
    };
    let decoded: String = url::form_urlencoded::parse(format!("p={password}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default();
    let mut forms = vec![password.to_owned(), decoded];
    // Longest first, so a form that contains another is replaced whole.
    forms.sort_by_key(|f| std::cmp::Reverse(f.len()));
    forms
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_our_parameters_off() {
        let parts = split_url(
            "postgres://u:p@h/db?sslmode=disable&strategy=table&table=t%5Fx&application_name=a",
        )
        .unwrap();
        assert_eq!(
            parts.driver_url,
            "postgres://u:p@h/db?sslmode=disable&application_name=a"
        );
        assert_eq!(
            parts.ours,
            vec![
                ("strategy".to_owned(), "table".to_owned()),
                ("table".to_owned(), "t_x".to_owned())
            ]
        );
        assert!(split_url("postgres://h/db?table=a&table=b").is_err());
        assert!(split_url("mysql://h/db").is_err());
        assert!(split_url("POSTGRESQL://h/db").is_ok());
    }

    #[test]
    fn parses_urls() {
        let c = PgConfig::from_url("postgresql://me@localhost:5433/app?table=locks&prefix=app_1")
            .unwrap();
        assert_eq!(c.get_strategy(), Strategy::Advisory);
        assert_eq!(c.table_name(), Some("locks"));
        assert_eq!(c.prefix_name(), "app_1");
        assert_eq!(c.target(), "me@localhost:5433/app");
        assert_eq!(c.connection().get_application_name(), Some("leaselock"));
        assert_eq!(c.qualified(DEFAULT_TABLE), "\"locks\"");
        let c = c.schema("ops").unwrap();
        assert_eq!(c.qualified(DEFAULT_TABLE), "\"ops\".\"locks\"");
        assert_eq!(
            c.qualified_companion(DEFAULT_TABLE, "_holders").unwrap(),
            "\"ops\".\"locks_holders\""
        );
        let long = PgConfig::from_url("postgres://h/db")
            .unwrap()
            .table(&"t".repeat(60))
            .unwrap();
        let e = long
            .qualified_companion(DEFAULT_TABLE, "_holders")
            .unwrap_err();
        assert!(
            matches!(e, Error::InvalidInput { field: "table", .. }),
            "{e}"
        );
        assert!(e.to_string().contains("limit is 55"), "{e}");

        for (bad, field_hint) in [
            ("postgres://h/db?strategy=mutex", "strategy"),
            ("postgres://h/db?table=bad-name", "table"),
            ("postgres://h/db?schema=1x", "schema"),
            ("postgres://h/db?strategy=table&prefix=p", "prefix"),
            ("postgres://h/db?nosuchoption=1", "not valid"),
            ("http://h/db", "postgres://"),
        ] {
            match PgConfig::from_url(bad) {
                Err(Error::InvalidInput {
                    field: "url",
                    reason,
                }) => {
                    assert!(reason.contains(field_hint), "{bad}: {reason}")
                }
                other => panic!("{bad}: {other:?}"),
            }
        }
    }

    #[test]
    fn never_shows_the_password() {
        for url in [
            "postgres://user:Sup3rS3cret@localhost:bad/db",
            "postgres://user:Sup3rS3cret@localhost/db?connect_timeout=Sup3rS3cret",
            "postgres://user:Sup3rS3cret@localhost/db?sslmode=Sup3rS3cret",
            "postgres://user:Sup3r%53ecret@localhost/db?keepalives=x",
            "postgres://user:Sup3rS3cret@localhost/db?table=Sup3rS3cret-",
        ] {
            let err = PgConfig::from_url(url).unwrap_err();
            let shown = format!("{err} {err:?}");
            assert!(!shown.contains("Sup3r"), "{url}: {shown}");
        }
        let ok = PgConfig::from_url("postgres://user:Sup3rS3cret@localhost/db").unwrap();
        let shown = format!("{ok:?} {:?} {}", ok.connection(), ok.target());
        assert!(!shown.contains("Sup3rS3cret"), "{shown}");
        assert_eq!(
            redact(
                "x Sup3rSecret y Sup3r%53ecret",
                "postgres://u:Sup3r%53ecret@h/d"
            ),
            "x *** y ***"
        );
    }

    #[cfg(feature = "tls")]
    #[test]
    fn tls_roots() {
        let c = PgConfig::from_url("postgres://h/db").unwrap();
        assert!(matches!(
            c.clone().tls_root_certificates_pem(b"not a certificate"),
            Err(Error::InvalidInput {
                field: "tls_root_certificates",
                ..
            })
        ));
        let err =
            PgConfig::from_url("postgres://u:pw@h/db?sslrootcert=/nonexistent/ca.pem").unwrap_err();
        assert!(
            matches!(err, Error::InvalidInput { field: "url", .. }),
            "{err}"
        );
        assert!(crate::backend::Connector::new(&c).is_ok());
    }

    #[cfg(not(feature = "tls"))]
    #[test]
    fn sslrootcert_needs_the_tls_feature() {
        let err = PgConfig::from_url("postgres://h/db?sslrootcert=/ca.pem").unwrap_err();
        assert!(err.to_string().contains("`tls` feature"), "{err}");
    }

    #[test]
    fn statement_cache_from_the_url() {
        assert!(
            PgConfig::from_url("postgres://h/db")
                .unwrap()
                .statement_cache
        );
        let off = PgConfig::from_url("postgres://h/db?statement_cache=false").unwrap();
        assert!(!off.statement_cache);
        let err = PgConfig::from_url("postgres://h/db?statement_cache=maybe").unwrap_err();
        assert!(
            matches!(err, Error::InvalidInput { field: "url", .. }),
            "{err}"
        );
    }

    #[test]
    fn max_idle_sessions_from_the_url() {
        assert_eq!(
            PgConfig::from_url("postgres://h/db")
                .unwrap()
                .max_idle_sessions,
            4
        );
        let c = PgConfig::from_url("postgres://h/db?max_idle_sessions=64").unwrap();
        assert_eq!(c.max_idle_sessions, 64);
        assert!(!format!("{:?}", c.connection()).contains("max_idle"));
        let err = PgConfig::from_url("postgres://h/db?max_idle_sessions=-1").unwrap_err();
        assert!(
            matches!(err, Error::InvalidInput { field: "url", ref reason } if reason.contains("max_idle_sessions")),
            "{err}"
        );
    }

    #[test]
    fn rejects_bad_durations() {
        let c = PgConfig::from_url("postgres://h/db").unwrap();
        assert!(c.clone().connect_timeout(Duration::ZERO).is_err());
        assert!(c
            .clone()
            .operation_timeout(Duration::from_secs(100_000))
            .is_err());
        assert!(c.operation_timeout(Duration::from_secs(5)).is_ok());
    }
}
