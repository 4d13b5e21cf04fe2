//! Configuration of the DynamoDB backend.

use std::fmt;
use std::time::{Duration, SystemTime};

use leaselock::{Error, Namespace, Result, MAX_LEASE_DURATION};

/// The default table name.
pub const DEFAULT_TABLE: &str = "leaselock_locks";
/// How long after its last lease ended an item may be deleted by DynamoDB's time to live, by
/// default: 30 days.
pub const DEFAULT_CLEANUP_AFTER: Duration = Duration::from_secs(30 * 24 * 60 * 60);
/// The shortest [`DynamoDbConfig::cleanup_after`]: one hour.
pub const MIN_CLEANUP_AFTER: Duration = Duration::from_secs(60 * 60);
/// The default limit of one request, retries excluded: 10 s.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The default limit on waiting for a new table to become active: 5 minutes.
pub const DEFAULT_TABLE_READY_TIMEOUT: Duration = Duration::from_secs(5 * 60);

/// A shift applied to every wall-clock reading of one backend instance.
///
/// A test hook: it shows that takeover of a dead holder's lease does not depend on any client's
/// wall clock. Leave it at [`ClockOffset::None`] in production.
///
/// ```
/// use std::time::{Duration, UNIX_EPOCH};
/// use leaselock_dynamodb::ClockOffset;
/// let t = UNIX_EPOCH + Duration::from_secs(100);
/// assert_eq!(ClockOffset::Ahead(Duration::from_secs(30)).apply(t), UNIX_EPOCH + Duration::from_secs(130));
/// assert_eq!(ClockOffset::Behind(Duration::from_secs(30)).apply(t), UNIX_EPOCH + Duration::from_secs(70));
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ClockOffset {
    /// The real wall clock.
    #[default]
    None,
    /// The clock reads this much later than it should.
    Ahead(Duration),
    /// The clock reads this much earlier than it should.
    Behind(Duration),
}

impl ClockOffset {
    /// `time` shifted by this offset (saturating at the Unix epoch).
    pub fn apply(self, time: SystemTime) -> SystemTime {
        match self {
            ClockOffset::None => time,
            ClockOffset::Ahead(by) => time.checked_add(by).unwrap_or(time),
            ClockOffset::Behind(by) => time
                .checked_sub(by)
                .unwrap_or(SystemTime::UNIX_EPOCH)
                .max(SystemTime::UNIX_EPOCH),
        }
    }

    fn magnitude(self) -> Duration {
        match self {
            ClockOffset::None => Duration::ZERO,
            ClockOffset::Ahead(by) | ClockOffset::Behind(by) => by,
        }
    }
}

/// Explicit static credentials. Their `Debug` shows neither part.
#[derive(Clone)]
pub(crate) struct StaticCredentials {
    pub(crate) access_key_id: String,
    pub(crate) secret_access_key: String,
}

impl fmt::Debug for StaticCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StaticCredentials(<redacted>)")
    }
}

/// Where and how the DynamoDB backend keeps its locks.
///
/// Everything but the table has a default. Credentials and region come from the standard AWS
/// configuration chain (environment, shared config and credentials files, web identity, ECS and
/// EC2 instance metadata; SSO profiles with the crate feature `sso`) unless set here.
///
/// ```
/// use std::time::Duration;
/// use leaselock_dynamodb::DynamoDbConfig;
/// let config = DynamoDbConfig::new("app_locks")
///     .region("eu-west-1")
///     .max_clock_skew(Duration::from_secs(2));
/// assert_eq!(config.table_name(), "app_locks");
/// // Debug never shows credentials.
/// let local = DynamoDbConfig::new("t").credentials("AKIDEXAMPLE", "very-secret");
/// assert!(!format!("{local:?}").contains("very-secret"));
/// ```
#[derive(Clone)]
pub struct DynamoDbConfig {
    table: String,
    endpoint: Option<String>,
    region: Option<String>,
    credentials: Option<StaticCredentials>,
    max_clock_skew: Option<Duration>,
    cleanup_after: Option<Duration>,
    request_timeout: Duration,
    table_ready_timeout: Duration,
    clock_offset: ClockOffset,
}

impl Default for DynamoDbConfig {
    fn default() -> Self {
        Self::new(DEFAULT_TABLE)
    }
}

impl fmt::Debug for DynamoDbConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DynamoDbConfig")
            .field("table", &self.table)
            .field("endpoint", &self.endpoint.as_deref().map(redact_url))
            .field("region", &self.region)
            .field(
                "credentials",
                &self.credentials.as_ref().map(|_| "<redacted>"),
            )
            .field("max_clock_skew", &self.max_clock_skew)
            .field("cleanup_after", &self.cleanup_after)
            .field("request_timeout", &self.request_timeout)
            .field("table_ready_timeout", &self.table_ready_timeout)
            .field("clock_offset", &self.clock_offset)
            .finish()
    }
}

impl DynamoDbConfig {
    /// Locks in the table `table` (validated when the backend is created: an ASCII letter or `_`,
    /// then letters, digits or `_`, at most 63 bytes; stricter than DynamoDB's own rule).
    pub fn new(table: impl Into<String>) -> Self {
        Self {
            table: table.into(),
            endpoint: None,
            region: None,
            credentials: None,
            max_clock_skew: None,
            cleanup_after: Some(DEFAULT_CLEANUP_AFTER),
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            table_ready_timeout: DEFAULT_TABLE_READY_TIMEOUT,
            clock_offset: ClockOffset::None,
        }
    }

    /// The table name. Default: `leaselock_locks` ([`DEFAULT_TABLE`]).
    pub fn table(mut self, table: impl Into<String>) -> Self {
        self.table = table.into();
        self
    }

    /// The endpoint URL, for DynamoDB Local or another compatible server, such as
    /// `http://127.0.0.1:8000`. Default: none (the AWS endpoint of the region).
    ///
    /// For an endpoint on this machine (a loopback address or `localhost`) without
    /// [`credentials`](Self::credentials) and without `AWS_ACCESS_KEY_ID` in the environment,
    /// the backend signs with fixed dummy credentials, which local servers accept; and without a
    /// region from here or the configuration chain it uses `us-east-1`.
    pub fn endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.endpoint = Some(endpoint.into());
        self
    }

    /// The AWS region. Default: from the configuration chain (`AWS_REGION`, the shared config
    /// file's profile, instance metadata).
    pub fn region(mut self, region: impl Into<String>) -> Self {
        self.region = Some(region.into());
        self
    }

    /// Static credentials instead of the configuration chain. Default: the chain. Never shown by
    /// `Debug`, logs or errors. Prefer the chain (roles, profiles) for real accounts.
    pub fn credentials(
        mut self,
        access_key_id: impl Into<String>,
        secret_access_key: impl Into<String>,
    ) -> Self {
        self.credentials = Some(StaticCredentials {
            access_key_id: access_key_id.into(),
            secret_access_key: secret_access_key.into(),
        });
        self
    }

    /// A bound on the wall-clock difference between any two clients, which allows faster
    /// takeover. Default: `None`, so nothing depends on wall clocks: a waiter takes over a lease
    /// only after it has seen the same record version unchanged for a whole lease duration on its
    /// own monotonic clock.
    ///
    /// With `Some(skew)`, a waiter may also take over at once when the expiry stored by the
    /// holder (read off the holder's wall clock) plus `skew` is before the waiter's wall clock.
    /// That is safe only if the bound really holds: two holders at once are possible when a
    /// client's clock is off by more. At most one year.
    pub fn max_clock_skew(mut self, skew: impl Into<Option<Duration>>) -> Self {
        self.max_clock_skew = skew.into();
        self
    }

    /// How long after its last lease ended (released or expired by the stored wall-clock expiry)
    /// an item may be deleted by DynamoDB's time to live. Default: 30 days
    /// ([`DEFAULT_CLEANUP_AFTER`]); at least one hour ([`MIN_CLEANUP_AFTER`]). `None`: items are
    /// kept forever and `init_storage` leaves the table's time to live alone.
    ///
    /// Every write stores the deadline in the item's `expire_item_at` attribute (seconds since the
    /// Unix epoch), and `init_storage` turns on the table's time to live for that attribute.
    /// A deleted item never makes a fencing token go back: a key's counter starts at the wall
    /// clock in milliseconds when its item is created, and a key is acquired far less than once
    /// per millisecond (see the crate documentation). This must be longer than the worst
    /// wall-clock error of any client.
    pub fn cleanup_after(mut self, retention: impl Into<Option<Duration>>) -> Self {
        self.cleanup_after = retention.into();
        self
    }

    /// The limit on one request, connecting included. Default: 10 s
    /// ([`DEFAULT_REQUEST_TIMEOUT`]). Between 100 ms and 10 minutes. The SDK's own retries are
    /// off: the orchestrator ([`leaselock::Locker`]) retries retryable errors as configured.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// How long `init_storage` waits for a new table to become active. Default: 5 minutes
    /// ([`DEFAULT_TABLE_READY_TIMEOUT`]). At most one hour.
    pub fn table_ready_timeout(mut self, timeout: Duration) -> Self {
        self.table_ready_timeout = timeout;
        self
    }

    /// Shifts every wall-clock reading of the backend (acquired and expiry times it stores, the
    /// fast-takeover check, status). A test hook. Default: [`ClockOffset::None`].
    pub fn clock_offset(mut self, offset: ClockOffset) -> Self {
        self.clock_offset = offset;
        self
    }

    /// The table name as given.
    pub fn table_name(&self) -> &str {
        &self.table
    }

    /// Parses `dynamodb://TABLE[?endpoint=URL&region=NAME&max_clock_skew=2s&cleanup_after=30d]`.
    ///
    /// Credentials do not belong in a URL and are refused there; they come from the standard
    /// AWS configuration chain (or, for a local endpoint, are dummies).
    ///
    /// ```
    /// use leaselock_dynamodb::DynamoDbConfig;
    /// let config = DynamoDbConfig::from_url(
    ///     "dynamodb://locks?endpoint=http://127.0.0.1:8000&region=us-east-1",
    /// )?;
    /// assert_eq!(config.table_name(), "locks");
    /// assert!(DynamoDbConfig::from_url("postgres://db/x").is_err());
    /// assert!(DynamoDbConfig::from_url("dynamodb://bad-name").is_err());
    /// # Ok::<(), leaselock::Error>(())
    /// ```
    pub fn from_url(url: &str) -> Result<Self> {
        let bad = |reason: String| Error::invalid("url", reason);
        if !url.starts_with("dynamodb://") {
            return Err(bad(
                "a DynamoDB URL starts with `dynamodb://` (dynamodb://TABLE?endpoint=…&region=…)"
                    .into(),
            ));
        }
        let parsed = url::Url::parse(url).map_err(|e| bad(format!("not a URL: {e}")))?;
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(bad(
                "credentials do not belong in the URL: use the AWS configuration chain \
                 (environment, profiles, roles)"
                    .into(),
            ));
        }
        if parsed.port().is_some() {
            return Err(bad(
                "the part after `dynamodb://` is the table name, not a server: give a server \
                 as `?endpoint=http://HOST:PORT`"
                    .into(),
            ));
        }
        let table = parsed.host_str().unwrap_or_default();
        if table.is_empty() {
            return Err(bad(
                "no table name: use dynamodb://TABLE?endpoint=…&region=…".into(),
            ));
        }
        if !matches!(parsed.path(), "" | "/") {
            return Err(bad(format!(
                "unexpected path `{}` after the table name",
                parsed.path()
            )));
        }
        if parsed.fragment().is_some() {
            return Err(bad("a DynamoDB URL has no `#fragment`".into()));
        }
        let mut config = Self::new(table);
        let duration = |name: &str, value: &str| {
            humantime::parse_duration(value)
                .map_err(|e| bad(format!("{name} `{value}` is not a duration like `2s`: {e}")))
        };
        for (name, value) in parsed.query_pairs() {
            match &*name {
                "endpoint" => config = config.endpoint(value.into_owned()),
                "region" => config = config.region(value.into_owned()),
                "max_clock_skew" => config = config.max_clock_skew(duration(&name, &value)?),
                "cleanup_after" => {
                    config = config.cleanup_after(if matches!(&*value, "none" | "never") {
                        None
                    } else {
                        Some(duration(&name, &value)?)
                    })
                }
                other => {
                    return Err(bad(format!(
                        "unknown DynamoDB URL parameter `{other}` (known: endpoint, region, \
                         max_clock_skew, cleanup_after)"
                    )))
                }
            }
        }
        config.validated().map_err(|error| match error {
            Error::InvalidInput { field, reason } => bad(format!("{field}: {reason}")),
            other => other,
        })?;
        Ok(config)
    }

    /// Checks every setting, naming the field at fault.
    pub(crate) fn validated(&self) -> Result<Validated> {
        let table = Namespace::for_field("table", self.table.clone())?;
        let endpoint = match &self.endpoint {
            None => None,
            Some(endpoint) => {
                let parsed = url::Url::parse(endpoint).map_err(|e| {
                    Error::invalid(
                        "endpoint",
                        format!("`{}` is not a URL: {e}", redact_url(endpoint)),
                    )
                })?;
                if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
                    return Err(Error::invalid(
                        "endpoint",
                        "must be an http:// or https:// URL with a host",
                    ));
                }
                if !parsed.username().is_empty() || parsed.password().is_some() {
                    return Err(Error::invalid(
                        "endpoint",
                        "must not carry credentials: use credentials() or the AWS chain",
                    ));
                }
                Some(parsed)
            }
        };
        if let Some(region) = &self.region {
            let valid = !region.is_empty()
                && region.len() <= 64
                && region
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-');
            if !valid {
                return Err(Error::invalid(
                    "region",
                    "must be a region name such as `eu-west-1`",
                ));
            }
        }
        if let Some(credentials) = &self.credentials {
            if credentials.access_key_id.is_empty() || credentials.secret_access_key.is_empty() {
                return Err(Error::invalid(
                    "credentials",
                    "the access key id and the secret must not be empty",
                ));
            }
        }
        if let Some(skew) = self.max_clock_skew {
            if skew > MAX_LEASE_DURATION {
                return Err(Error::invalid(
                    "max_clock_skew",
                    format!("{skew:?} is longer than one year"),
                ));
            }
        }
        if let Some(retention) = self.cleanup_after {
            if retention < MIN_CLEANUP_AFTER || retention > Duration::from_secs(100 * 366 * 86400) {
                return Err(Error::invalid(
                    "cleanup_after",
                    format!("{retention:?} must be between one hour and 100 years"),
                ));
            }
        }
        if self.request_timeout < Duration::from_millis(100)
            || self.request_timeout > Duration::from_secs(600)
        {
            return Err(Error::invalid(
                "request_timeout",
                format!(
                    "{:?} must be between 100 ms and 10 minutes",
                    self.request_timeout
                ),
            ));
        }
        if self.table_ready_timeout > Duration::from_secs(3600) {
            return Err(Error::invalid(
                "table_ready_timeout",
                format!("{:?} is longer than one hour", self.table_ready_timeout),
            ));
        }
        if self.clock_offset.magnitude() > Duration::from_secs(366 * 86400) {
            return Err(Error::invalid(
                "clock_offset",
                "is longer than one year".to_owned(),
            ));
        }
        Ok(Validated {
            table,
            endpoint,
            region: self.region.clone(),
            credentials: self.credentials.clone(),
            max_clock_skew: self.max_clock_skew,
            cleanup_after: self.cleanup_after,
            request_timeout: self.request_timeout,
            table_ready_timeout: self.table_ready_timeout,
            clock_offset: self.clock_offset,
        })
    }
}

/// A checked configuration.
#[derive(Clone, Debug)]
pub(crate) struct Validated {
    pub(crate) table: Namespace,
    pub(crate) endpoint: Option<url::Url>,
    pub(crate) region: Option<String>,
    pub(crate) credentials: Option<StaticCredentials>,
    pub(crate) max_clock_skew: Option<Duration>,
    pub(crate) cleanup_after: Option<Duration>,
    pub(crate) request_timeout: Duration,
    pub(crate) table_ready_timeout: Duration,
    pub(crate) clock_offset: ClockOffset,
}

impl Validated {
    /// Whether the endpoint is a server on this machine.
    pub(crate) fn endpoint_is_local(&self) -> bool {
        match self.endpoint.as_ref().and_then(|u| u.host()) {
            Some(url::Host::Domain(domain)) => domain.eq_ignore_ascii_case("localhost"),
            Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
            Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
            None => false,
        }
    }
}

/// A URL with any user information removed, for messages.
pub(crate) fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if !parsed.username().is_empty() || parsed.password().is_some() => {
            let _ = parsed.set_username("");
            let _ = parsed.set_password(None);
            parsed.to_string()
        }
        Ok(_) => url.to_owned(),
        Err(_) => "<unparsable URL>".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let c = DynamoDbConfig::from_url(
            "dynamodb://leaselock_test?endpoint=http://127.0.0.1:8000&region=us-east-1&max_clock_skew=1500ms&cleanup_after=2days",
        )
        .unwrap();
        let v = c.validated().unwrap();
        assert_eq!(v.table.as_str(), "leaselock_test");
        assert_eq!(
            v.endpoint.as_ref().unwrap().as_str(),
            "http://127.0.0.1:8000/"
        );
        assert_eq!(v.region.as_deref(), Some("us-east-1"));
        assert_eq!(v.max_clock_skew, Some(Duration::from_millis(1500)));
        assert_eq!(v.cleanup_after, Some(Duration::from_secs(2 * 86400)));
        assert!(v.endpoint_is_local());

        let plain = DynamoDbConfig::from_url("dynamodb://Locks_2").unwrap();
        let v = plain.validated().unwrap();
        assert_eq!(v.table.as_str(), "Locks_2", "the table name keeps its case");
        assert!(v.endpoint.is_none() && !v.endpoint_is_local());
        assert_eq!(v.cleanup_after, Some(DEFAULT_CLEANUP_AFTER));
        let never = DynamoDbConfig::from_url("dynamodb://t?cleanup_after=never").unwrap();
        assert_eq!(never.validated().unwrap().cleanup_after, None);

        for bad in [
            "",
            "dynamodb:",
            "dynamodb://",
            "dynamodb:///x",
            "postgres://x/y",
            "dynamodb://has-dash",
            "dynamodb://a.b",
            "dynamodb://t/extra",
            "dynamodb://t:8000",
            "dynamodb://user:secret@t",
            "dynamodb://t?endpoint=ftp://x",
            "dynamodb://t?endpoint=http://user:secret@127.0.0.1:8000",
            "dynamodb://t?region=eu%20west",
            "dynamodb://t?max_clock_skew=soon",
            "dynamodb://t?cleanup_after=1s",
            "dynamodb://t?unknown=1",
        ] {
            match DynamoDbConfig::from_url(bad) {
                Err(Error::InvalidInput {
                    field: "url",
                    reason,
                }) => {
                    assert!(!reason.contains("secret"), "{bad}: {reason}")
                }
                other => panic!("{bad:?}: expected InvalidInput(url), got {other:?}"),
            }
        }
    }

    #[test]
    fn validation_names_fields() {
        let field = |c: DynamoDbConfig| match c.validated() {
            Err(Error::InvalidInput { field, .. }) => field,
            other => panic!("expected InvalidInput, got {other:?}"),
        };
        assert_eq!(field(DynamoDbConfig::new("a b")), "table");
        assert_eq!(field(DynamoDbConfig::new("x".repeat(64))), "table");
        assert_eq!(field(DynamoDbConfig::new("t").endpoint("nope")), "endpoint");
        assert_eq!(field(DynamoDbConfig::new("t").region("")), "region");
        assert_eq!(
            field(DynamoDbConfig::new("t").credentials("", "x")),
            "credentials"
        );
        assert_eq!(
            field(DynamoDbConfig::new("t").max_clock_skew(Duration::MAX)),
            "max_clock_skew"
        );
        assert_eq!(
            field(DynamoDbConfig::new("t").cleanup_after(Duration::from_secs(60))),
            "cleanup_after"
        );
        assert_eq!(
            field(DynamoDbConfig::new("t").request_timeout(Duration::ZERO)),
            "request_timeout"
        );
        assert_eq!(
            field(DynamoDbConfig::new("t").table_ready_timeout(Duration::from_secs(7200))),
            "table_ready_timeout"
        );
        assert!(DynamoDbConfig::default().validated().is_ok());
    }

    #[test]
    fn debug_hides_secrets() {
        let c = DynamoDbConfig::new("t")
            .credentials("AKIDSECRETID", "s3cr3t-value")
            .endpoint("http://user:pw-in-url@127.0.0.1:8000");
        let shown = format!("{c:?}");
        assert!(!shown.contains("s3cr3t-value"), "{shown}");
        assert!(!shown.contains("AKIDSECRETID"), "{shown}");
        assert!(!shown.contains("pw-in-url"), "{shown}");
        let err = c.validated().unwrap_err().to_string();
        assert!(!err.contains("pw-in-url"), "{err}");
    }

    #[test]
    fn offsets() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(10);
        assert_eq!(
            ClockOffset::Behind(Duration::from_secs(20)).apply(t),
            SystemTime::UNIX_EPOCH
        );
        assert_eq!(ClockOffset::None.apply(t), t);
    }
}
