//! The words of the contract: keys, owners, namespaces, leases, fencing tokens, lock states and
//! capabilities.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The longest key, in bytes.
pub const MAX_KEY_BYTES: usize = 255;
/// The longest owner id, in bytes.
pub const MAX_OWNER_BYTES: usize = 255;
/// The shortest lease duration a backend accepts.
pub const MIN_LEASE_DURATION: Duration = Duration::from_millis(10);
/// The longest lease duration a backend accepts (one year). Anything longer is almost certainly a
/// unit mistake; a lock that should never expire is a different kind of lock.
pub const MAX_LEASE_DURATION: Duration = Duration::from_secs(366 * 24 * 60 * 60);

/// The name of a lock: a non-empty UTF-8 string of at most [`MAX_KEY_BYTES`] bytes.
///
/// Any such string is valid; backends whose native lock names are limited map keys
/// deterministically.
///
/// Clones share the text, so a key travels through requests, leases and guards without copies.
///
/// ```
/// use leaselock::LockKey;
/// let key = LockKey::new("migrations/app")?;
/// assert_eq!(key.as_str(), "migrations/app");
/// assert!(LockKey::new("").is_err());
/// # Ok::<(), leaselock::Error>(())
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct LockKey(Arc<str>);

impl LockKey {
    /// Validates and wraps a key. Errors with [`Error::InvalidInput`] naming the field `key`.
    pub fn new(key: impl Into<String>) -> Result<Self> {
        let key = key.into();
        validate_text("key", &key, MAX_KEY_BYTES)?;
        Ok(Self(key.into()))
    }

    /// The key as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for LockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for LockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for LockKey {
    type Error = Error;
    fn try_from(key: String) -> Result<Self> {
        Self::new(key)
    }
}

impl From<LockKey> for String {
    fn from(key: LockKey) -> String {
        key.0.to_string()
    }
}

impl AsRef<str> for LockKey {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// Who holds a lock. The default, [`OwnerId::generate`], is `host-pid-uuid`.
///
/// ```
/// use leaselock::OwnerId;
/// let generated = OwnerId::generate();
/// assert!(generated.as_str().contains(&std::process::id().to_string()));
/// let mine = OwnerId::new("deploy-job-42")?;
/// assert_eq!(mine.to_string(), "deploy-job-42");
/// # Ok::<(), leaselock::Error>(())
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct OwnerId(Arc<str>);

impl OwnerId {
    /// Validates and wraps an owner id: non-empty, at most [`MAX_OWNER_BYTES`] bytes, no control
    /// characters.
    pub fn new(owner: impl Into<String>) -> Result<Self> {
        let owner = owner.into();
        validate_text("owner", &owner, MAX_OWNER_BYTES)?;
        Ok(Self(owner.into()))
    }

    /// A fresh owner id `host-pid-uuid`, unique to this call.
    pub fn generate() -> Self {
        let host = gethostname::gethostname().to_string_lossy().into_owned();
        let host: String = host.chars().filter(|c| !c.is_control()).take(128).collect();
        let host = if host.is_empty() {
            "unknown-host".to_owned()
        } else {
            host
        };
        Self(
            format!(
                "{host}-{}-{}",
                std::process::id(),
                uuid::Uuid::new_v4().simple()
            )
            .into(),
        )
    }

    /// The owner id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for OwnerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for OwnerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for OwnerId {
    type Error = Error;
    fn try_from(owner: String) -> Result<Self> {
        Self::new(owner)
    }
}

impl From<OwnerId> for String {
    fn from(owner: OwnerId) -> String {
        owner.0.to_string()
    }
}

fn validate_text(field: &'static str, value: &str, max: usize) -> Result<()> {
    if value.is_empty() {
        return Err(Error::invalid(field, "must not be empty"));
    }
    if value.len() > max {
        return Err(Error::invalid(
            field,
            format!("is {} bytes long, the limit is {max}", value.len()),
        ));
    }
    if value.chars().any(|c| c == '\0') {
        return Err(Error::invalid(field, "must not contain NUL characters"));
    }
    Ok(())
}

/// A validated storage identifier: the name of a table, schema, collection or prefix where locks
/// live.
///
/// Valid: an ASCII letter or `_`, then up to 62 ASCII letters, digits or `_`. Backends still quote
/// it; nothing a user passes is spliced into a statement unchecked.
///
/// ```
/// use leaselock::Namespace;
/// assert!(Namespace::new("leaselock_locks").is_ok());
/// assert!(Namespace::new("locks; DROP TABLE x").is_err());
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Namespace(String);

impl Namespace {
    /// The longest identifier, in bytes (PostgreSQL's limit, the smallest of our databases).
    pub const MAX_LEN: usize = 63;

    /// Validates an identifier. Errors with [`Error::InvalidInput`] naming the field `namespace`.
    pub fn new(name: impl Into<String>) -> Result<Self> {
        Self::for_field("namespace", name)
    }

    /// Validates an identifier, naming `field` (such as `table` or `schema`) in the error.
    pub fn for_field(field: &'static str, name: impl Into<String>) -> Result<Self> {
        let name = name.into();
        let mut chars = name.chars();
        let Some(first) = chars.next() else {
            return Err(Error::invalid(field, "must not be empty"));
        };
        if name.len() > Self::MAX_LEN {
            return Err(Error::invalid(
                field,
                format!(
                    "is {} bytes long, the limit is {}",
                    name.len(),
                    Self::MAX_LEN
                ),
            ));
        }
        if !(first.is_ascii_alphabetic() || first == '_') {
            return Err(Error::invalid(
                field,
                "must start with an ASCII letter or `_`",
            ));
        }
        if !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(Error::invalid(
                field,
                "may contain only ASCII letters, digits and `_`",
            ));
        }
        Ok(Self(name))
    }

    /// The identifier, unquoted.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name of a companion object: this identifier with `suffix` appended (such as a
    /// backend's second table named after its first). Errors with [`Error::InvalidInput`] naming
    /// `field` when the result is not a valid identifier, saying how long this one may be.
    ///
    /// ```
    /// use leaselock::Namespace;
    /// let table = Namespace::for_field("table", "locks")?;
    /// assert_eq!(table.with_suffix("table", "_holders")?.as_str(), "locks_holders");
    /// let long = Namespace::for_field("table", "t".repeat(60))?;
    /// assert!(long.with_suffix("table", "_holders").is_err());
    /// # Ok::<(), leaselock::Error>(())
    /// ```
    pub fn with_suffix(&self, field: &'static str, suffix: &str) -> Result<Self> {
        Self::for_field(field, format!("{}{suffix}", self.0)).map_err(|_| {
            Error::invalid(
                field,
                format!(
                    "is {} bytes long; with the `{suffix}` of its companion the limit is {}",
                    self.0.len(),
                    Self::MAX_LEN.saturating_sub(suffix.len())
                ),
            )
        })
    }

    /// The identifier quoted for SQL with double quotes (PostgreSQL, SQLite, ANSI).
    pub fn quoted(&self) -> String {
        // Validation already rules out quotes; doubling keeps this safe on its own.
        format!("\"{}\"", self.0.replace('"', "\"\""))
    }

    /// The identifier quoted for MySQL/MariaDB with backticks.
    pub fn backquoted(&self) -> String {
        format!("`{}`", self.0.replace('`', "``"))
    }
}

impl fmt::Debug for Namespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for Namespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Checks a lease duration: at least [`MIN_LEASE_DURATION`], at most [`MAX_LEASE_DURATION`].
///
/// ```
/// use std::time::Duration;
/// use leaselock::validate_lease_duration;
/// assert!(validate_lease_duration("lease_duration", Duration::from_secs(30)).is_ok());
/// assert!(validate_lease_duration("lease_duration", Duration::ZERO).is_err());
/// ```
pub fn validate_lease_duration(field: &'static str, duration: Duration) -> Result<Duration> {
    if duration < MIN_LEASE_DURATION {
        return Err(Error::invalid(
            field,
            format!("{duration:?} is shorter than the minimum {MIN_LEASE_DURATION:?}"),
        ));
    }
    if duration > MAX_LEASE_DURATION {
        return Err(Error::invalid(
            field,
            format!("{duration:?} is longer than the maximum {MAX_LEASE_DURATION:?}"),
        ));
    }
    Ok(duration)
}

/// A fencing token: strictly increases every time any owner acquires the same key, and never goes
/// back (also after release, expiry, cleanup or a restart).
///
/// Pass it along with every write the protected work makes, so the storage can reject a write
/// carrying an older token than one it has already seen.
///
/// ```
/// use leaselock::FencingToken;
/// assert!(FencingToken::new(2) > FencingToken::new(1));
/// assert_eq!(FencingToken::new(7).get(), 7);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct FencingToken(u64);

impl FencingToken {
    /// Wraps a raw token value.
    pub const fn new(value: u64) -> Self {
        Self(value)
    }

    /// The raw value.
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for FencingToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// One attempt to acquire a key, as a backend receives it. Built only from valid parts.
///
/// A lease ([`AcquireRequest::new`]) expires unless refreshed; a lock without expiry
/// ([`AcquireRequest::without_expiry`]) is held until its owner releases it or someone forces it
/// free. Every backend must tell them apart: [`AcquireRequest::ttl`] is `None` for the second.
///
/// ```
/// use std::time::Duration;
/// use leaselock::{AcquireRequest, LockKey, OwnerId};
/// let req = AcquireRequest::new(
///     LockKey::new("job")?,
///     OwnerId::new("me")?,
///     Duration::from_secs(30),
/// )?;
/// assert_eq!(req.ttl(), Some(Duration::from_secs(30)));
/// let forever = AcquireRequest::without_expiry(LockKey::new("job")?, OwnerId::new("me")?);
/// assert_eq!(forever.ttl(), None);
/// # Ok::<(), leaselock::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct AcquireRequest {
    key: LockKey,
    owner: OwnerId,
    ttl: Option<Duration>,
}

impl AcquireRequest {
    /// A request for `key` by `owner`, leased for `ttl` (validated with
    /// [`validate_lease_duration`], field `ttl`).
    pub fn new(key: LockKey, owner: OwnerId, ttl: Duration) -> Result<Self> {
        validate_lease_duration("ttl", ttl)?;
        Ok(Self {
            key,
            owner,
            ttl: Some(ttl),
        })
    }

    /// A request for a lock on `key` by `owner` that never expires: the backend records no
    /// expiry, so the lock stays held until its owner releases it or it is force-released, also
    /// if the owner crashes (session backends still free it when the session ends).
    pub fn without_expiry(key: LockKey, owner: OwnerId) -> Self {
        Self {
            key,
            owner,
            ttl: None,
        }
    }

    /// The key to acquire.
    pub fn key(&self) -> &LockKey {
        &self.key
    }

    /// Who asks.
    pub fn owner(&self) -> &OwnerId {
        &self.owner
    }

    /// How long the lease lasts unless refreshed; `None` for a lock without expiry, which must
    /// never expire, be released as expired or be taken over. Session backends hold the lock as
    /// long as the session either way.
    pub fn ttl(&self) -> Option<Duration> {
        self.ttl
    }
}

/// Proof of holding a lock, as returned by a backend's acquire or refresh.
///
/// Times are read off the clock that decides expiry (the database server's where it has one).
/// A lease serializes with serde, so another process can take it over with
/// [`crate::Locker::adopt`] (the backend still checks owner and fencing token).
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use leaselock::{FencingToken, Lease, LockKey, OwnerId};
/// let now = SystemTime::now();
/// let lease = Lease::new(LockKey::new("job")?, OwnerId::new("me")?, FencingToken::new(1), now)
///     .with_expiry(now + Duration::from_secs(30), Duration::from_secs(30));
/// assert_eq!(lease.ttl, Some(Duration::from_secs(30)));
/// # Ok::<(), leaselock::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Lease {
    /// The key held.
    pub key: LockKey,
    /// Who holds it.
    pub owner: OwnerId,
    /// The fencing token of this acquisition.
    pub token: FencingToken,
    /// When this acquisition happened.
    pub acquired_at: SystemTime,
    /// When the lease expires unless refreshed; `None` for session locks, which live as long as
    /// their connection, and for locks without expiry.
    pub expires_at: Option<SystemTime>,
    /// The lease duration used for refreshes; `None` for session locks and locks without expiry.
    pub ttl: Option<Duration>,
}

impl Lease {
    /// A lease without expiry (a session lock, or a lock without expiry).
    pub fn new(key: LockKey, owner: OwnerId, token: FencingToken, acquired_at: SystemTime) -> Self {
        Self {
            key,
            owner,
            token,
            acquired_at,
            expires_at: None,
            ttl: None,
        }
    }

    /// The same lease, expiring at `expires_at` and refreshed by `ttl`.
    pub fn with_expiry(mut self, expires_at: SystemTime, ttl: Duration) -> Self {
        self.expires_at = Some(expires_at);
        self.ttl = Some(ttl);
        self
    }
}

/// What a backend knows about a held or expired lock.
///
/// ```
/// use std::time::SystemTime;
/// use leaselock::{FencingToken, LockInfo, LockKey, OwnerId};
/// let info = LockInfo::new(LockKey::new("job")?, OwnerId::new("other")?, FencingToken::new(3));
/// assert!(info.to_string().contains("other"));
/// # Ok::<(), leaselock::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct LockInfo {
    /// The key.
    pub key: LockKey,
    /// The holder (or last holder, for an expired lock).
    pub owner: OwnerId,
    /// The fencing token of the holder's acquisition.
    pub token: FencingToken,
    /// When it was acquired, if the backend records it.
    pub acquired_at: Option<SystemTime>,
    /// When it expires (or expired); `None` for session locks and locks without expiry.
    pub expires_at: Option<SystemTime>,
    /// Time left before expiry by the clock that decides expiry, at the moment of reading; zero
    /// once expired; `None` for session locks and locks without expiry.
    pub remaining: Option<Duration>,
}

impl LockInfo {
    /// Information with only the mandatory parts; set the optional fields directly.
    pub fn new(key: LockKey, owner: OwnerId, token: FencingToken) -> Self {
        Self {
            key,
            owner,
            token,
            acquired_at: None,
            expires_at: None,
            remaining: None,
        }
    }
}

impl fmt::Display for LockInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}` (fencing token {}", self.owner, self.token)?;
        if let Some(remaining) = self.remaining {
            write!(f, ", {:.1}s left", remaining.as_secs_f64())?;
        }
        f.write_str(")")
    }
}

/// The state of a key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LockState {
    /// Nobody holds it.
    Free,
    /// Held, by the owner in the info.
    Held(LockInfo),
    /// The last holder's lease expired and nobody has taken it over yet; anyone may acquire it.
    Expired(LockInfo),
}

impl LockState {
    /// The holder, if held.
    pub fn holder(&self) -> Option<&LockInfo> {
        match self {
            LockState::Held(info) => Some(info),
            _ => None,
        }
    }

    /// Whether someone holds it now.
    pub fn is_held(&self) -> bool {
        matches!(self, LockState::Held(_))
    }
}

/// The result of one acquisition attempt.
#[derive(Clone, Debug)]
pub enum AcquireOutcome {
    /// The lock is ours.
    Acquired(Lease),
    /// Someone else holds it; who, when the backend could tell in the same round trip.
    Held(Option<LockInfo>),
}

/// How a backend holds a lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockKind {
    /// The lock lives as long as a database session (advisory locks, `GET_LOCK`): it is freed at
    /// once when the session ends.
    Session,
    /// A record with an expiry time that the holder refreshes.
    Lease,
}

/// Whose clock decides that a lease has expired.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpiryClock {
    /// The database server's clock (`now()`, `NOW(6)`, `$$NOW`; SQLite's host clock).
    Database,
    /// The clock of the process that hosts the storage (the in-memory backend).
    Process,
    /// No clock in the database: a waiter watches the record unchanged for a whole lease on its
    /// own monotonic clock before taking over (DynamoDB).
    WaiterMonotonic,
    /// Nothing expires: the lock ends with its session.
    None,
}

/// What a backend can do; the conformance suite and the orchestrator branch on it.
///
/// ```
/// use leaselock::{Capabilities, ExpiryClock, LockKind};
/// let caps = Capabilities::new("example", LockKind::Lease, ExpiryClock::Database);
/// assert!(caps.fencing);
/// assert!(!caps.release_notifications);
/// assert_eq!(caps.max_refresh_batch, 1);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// The backend's name, as used in errors and logs (`sqlite`, `postgres-advisory`, ...).
    pub backend: &'static str,
    /// Session-bound or lease-based.
    pub kind: LockKind,
    /// Whose clock decides expiry.
    pub expiry_clock: ExpiryClock,
    /// Whether acquisitions carry fencing tokens (every leaselock backend: `true`).
    pub fencing: bool,
    /// Whether waiters can be woken on release (see [`crate::LockBackend::watch_release`]).
    pub release_notifications: bool,
    /// Whether the backend tells a holder that its lease is gone without being asked (see
    /// [`crate::LockBackend::watch_lost`]).
    pub lost_notifications: bool,
    /// How many leases one [`crate::LockBackend::refresh_many`] call should carry at most. Above
    /// 1, the orchestrator gathers the leases of one [`crate::Locker`] that fall due together
    /// into batches of up to this many (see [`crate::LockerBuilder::refresh_batch_window`]); 1
    /// (the default) refreshes each lease with its own [`crate::LockBackend::refresh`].
    pub max_refresh_batch: usize,
}

impl Capabilities {
    /// Capabilities with fencing on, no notifications, and one lease per refresh.
    pub fn new(backend: &'static str, kind: LockKind, expiry_clock: ExpiryClock) -> Self {
        Self {
            backend,
            kind,
            expiry_clock,
            fencing: true,
            release_notifications: false,
            lost_notifications: false,
            max_refresh_batch: 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        assert!(LockKey::new("a").is_ok());
        assert!(LockKey::new("é".repeat(127)).is_ok()); // 254 bytes
        assert!(LockKey::new("x".repeat(255)).is_ok());
        let err = LockKey::new("x".repeat(256)).unwrap_err();
        assert!(
            matches!(err, Error::InvalidInput { field: "key", .. }),
            "{err}"
        );
        assert!(matches!(
            LockKey::new("").unwrap_err(),
            Error::InvalidInput { field: "key", .. }
        ));
        assert!(LockKey::new("a\0b").is_err());
    }

    #[test]
    fn namespaces() {
        for ok in ["locks", "_x", "Leaselock_2", &"a".repeat(63)] {
            assert!(Namespace::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "1abc",
            "locks; DROP TABLE x",
            "a\"b",
            "a`b",
            "a-b",
            "sch.tbl",
            &"a".repeat(64),
            "é",
        ] {
            let err = Namespace::new(bad).unwrap_err();
            assert!(
                matches!(
                    err,
                    Error::InvalidInput {
                        field: "namespace",
                        ..
                    }
                ),
                "{bad}: {err}"
            );
        }
        assert_eq!(Namespace::new("t").unwrap().quoted(), "\"t\"");
        assert_eq!(Namespace::new("t").unwrap().backquoted(), "`t`");
    }

    #[test]
    fn owners() {
        let a = OwnerId::generate();
        let b = OwnerId::generate();
        assert_ne!(a, b);
        assert!(a.as_str().len() <= MAX_OWNER_BYTES);
        assert!(OwnerId::new("").is_err());
    }

    #[test]
    fn leases_round_trip_through_serde_and_validate() {
        let now = SystemTime::now();
        let lease = Lease::new(
            LockKey::new("k").unwrap(),
            OwnerId::new("o").unwrap(),
            FencingToken::new(9),
            now,
        )
        .with_expiry(now + Duration::from_secs(5), Duration::from_secs(5));
        let json = serde_json::to_string(&lease).unwrap();
        assert!(
            json.contains("\"key\":\"k\"") && json.contains("\"token\":9"),
            "{json}"
        );
        let back: Lease = serde_json::from_str(&json).unwrap();
        assert_eq!(back, lease);
        let forged = json.replace("\"key\":\"k\"", "\"key\":\"\"");
        assert!(
            serde_json::from_str::<Lease>(&forged).is_err(),
            "empty key rejected"
        );
    }

    #[test]
    fn durations() {
        assert!(validate_lease_duration("d", Duration::ZERO).is_err());
        assert!(validate_lease_duration("d", Duration::from_millis(9)).is_err());
        assert!(validate_lease_duration("d", Duration::from_millis(10)).is_ok());
        assert!(validate_lease_duration("d", Duration::from_secs(u64::MAX)).is_err());
        assert!(validate_lease_duration("d", MAX_LEASE_DURATION).is_ok());
    }
}
