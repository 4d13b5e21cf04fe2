//! The [`LockBackend`] implementation: one conditional write per acquire, refresh and release.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use aws_config::meta::region::RegionProviderChain;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_dynamodb::config::Credentials;
use aws_sdk_dynamodb::error::ProvideErrorMetadata;
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType, ReturnValue,
    ReturnValuesOnConditionCheckFailure, ScalarAttributeType, TableStatus, TimeToLiveSpecification,
    TimeToLiveStatus, TransactWriteItem, Update,
};
use aws_sdk_dynamodb::Client;
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
use leaselock::{
    validate_lease_duration, AcquireOutcome, AcquireRequest, Capabilities, Error, ExpiryClock,
    FencingToken, Lease, LockBackend, LockInfo, LockKey, LockKind, LockState, OwnerId, Result,
    Wakeup,
};

use crate::config::{DynamoDbConfig, Validated};
use crate::error::{convert, invalid_data, NAME};

/// The partition key: the lock key, a string.
pub(crate) const ATTR_KEY: &str = "key";
/// The last fencing token handed out for the key (a number). Never removed.
const ATTR_TOKEN: &str = "token";
/// The holder's owner id; absent while the key is free.
const ATTR_OWNER: &str = "owner";
/// The record version: a random id rewritten by every acquire and refresh.
const ATTR_VERSION: &str = "version";
/// The holder's lease duration in milliseconds.
const ATTR_LEASE: &str = "lease_ms";
/// When the holder acquired, by its wall clock, in milliseconds since the Unix epoch.
const ATTR_ACQUIRED: &str = "acquired_at_ms";
/// When the lease expires, by the holder's wall clock, in milliseconds since the Unix epoch.
const ATTR_EXPIRES: &str = "expires_at_ms";
/// DynamoDB's time to live: seconds since the Unix epoch after which the item may be deleted.
pub(crate) const ATTR_CLEANUP: &str = "expire_item_at";

/// Placeholders for attribute names in expressions (some are reserved words in DynamoDB).
const NAMES: [(&str, &str); 7] = [
    ("#o", ATTR_OWNER),
    ("#t", ATTR_TOKEN),
    ("#v", ATTR_VERSION),
    ("#l", ATTR_LEASE),
    ("#a", ATTR_ACQUIRED),
    ("#e", ATTR_EXPIRES),
    ("#c", ATTR_CLEANUP),
];

/// The condition of a refresh: the lease's owner still holds the key with the lease's token.
const REFRESH_CONDITION: &str = "#o = :owner AND #t = :token";

/// The most items one `TransactWriteItems` may carry.
const MAX_TRANSACTION_ITEMS: usize = 100;

/// Above this many remembered sightings, stale ones are forgotten (which only delays takeover).
const MAX_SIGHTINGS: usize = 4096;

/// Dummy credentials for a server on this machine (DynamoDB Local accepts any made of letters
/// and digits).
const LOCAL_ACCESS_KEY_ID: &str = "leaselocklocal";
const LOCAL_SECRET: &str = "leaselocklocal";

type Item = HashMap<String, AttributeValue>;

/// Locks in a DynamoDB table, one item per key, changed only by conditional writes.
///
/// - acquire, refresh and release are one `UpdateItem` each, with a condition; a refused write
///   returns the item as it was (`ReturnValuesOnConditionCheckFailure=ALL_OLD`), so a failed
///   acquire names the holder without a second request. A [`leaselock::Locker`] refreshes the
///   leases that fall due together up to 100 at a time in one `TransactWriteItems`;
/// - DynamoDB has no clock in conditions, so expiry is not decided by the database: a waiter
///   takes over a lease only after this instance has seen the same record version unchanged for
///   a whole lease duration on its own monotonic clock (the technique of AWS's DynamoDB lock
///   client), or, with [`DynamoDbConfig::max_clock_skew`], once the stored expiry plus the skew
///   has passed on its wall clock. The holder treats its lease as lost at its own monotonic
///   deadline ([`leaselock::Locker`] does that). A lock without expiry stores no lease duration
///   and no expiry (nor a time to live for the item): no waiter takes it over, cleanup leaves it;
/// - fencing tokens are a counter in the item, incremented by the acquiring write itself;
///   release keeps the item and removes only the holder.
///
/// Clones share the client and the sightings, like one process.
///
/// ```no_run
/// use leaselock::Locker;
/// use leaselock_dynamodb::{DynamoDbBackend, DynamoDbConfig};
/// # #[tokio::main] async fn main() -> leaselock::Result<()> {
/// let backend = DynamoDbBackend::connect(DynamoDbConfig::new("app_locks")).await?;
/// let locker = Locker::builder(backend).build()?;
/// locker.init_storage().await?;
/// locker.run("nightly-report", |lock| async move {
///     println!("fencing token {}", lock.token());
/// }).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct DynamoDbBackend {
    client: Client,
    config: Arc<Validated>,
    sightings: Arc<Mutex<HashMap<LockKey, Sighting>>>,
}

/// A held record this instance has seen, and since when (on its monotonic clock).
#[derive(Debug)]
struct Sighting {
    version: String,
    first_seen: Instant,
    lease: Duration,
}

impl Sighting {
    /// Whether the record may be taken over: unchanged for a whole lease since first seen.
    fn ripe(&self) -> bool {
        self.first_seen.elapsed() >= self.lease
    }
}

impl fmt::Debug for DynamoDbBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        f.debug_struct("DynamoDbBackend")
            .field("table", &c.table)
            .field("endpoint", &c.endpoint.as_ref().map(|u| u.as_str()))
            .field("region", &c.region)
            .field("credentials", &c.credentials.as_ref().map(|_| "<redacted>"))
            .field("max_clock_skew", &c.max_clock_skew)
            .field("cleanup_after", &c.cleanup_after)
            .field("clock_offset", &c.clock_offset)
            .finish_non_exhaustive()
    }
}

/// What a stored item says.
#[derive(Debug, Clone)]
struct Record {
    key: Option<String>,
    token: u64,
    owner: Option<String>,
    version: Option<String>,
    lease: Option<Duration>,
    acquired_at: Option<SystemTime>,
    expires_at: Option<SystemTime>,
}

/// The outcome of one conditional write.
enum Write {
    /// Written; the attributes asked for.
    Done(Option<Item>),
    /// The condition failed; the item as it was, if asked for and present.
    Refused(Option<Item>),
}

impl DynamoDbBackend {
    /// Loads the AWS configuration (the standard chain, overridden by `config`'s endpoint, region
    /// and credentials) and creates a client. Sends no request: call
    /// [`LockBackend::init_storage`] or [`LockBackend::check_storage`] next.
    ///
    /// Fails with [`Error::InvalidInput`] on a bad setting (naming it), or when no region is
    /// configured anywhere.
    pub async fn connect(config: DynamoDbConfig) -> Result<Self> {
        let validated = config.validated()?;
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(CryptoMode::Ring))
            .build_https();
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(validated.request_timeout)
            .operation_attempt_timeout(validated.request_timeout)
            .operation_timeout(validated.request_timeout)
            .build();
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .http_client(http)
            // One request per operation: the orchestrator retries retryable errors itself.
            .retry_config(RetryConfig::disabled())
            .timeout_config(timeouts);
        if let Some(region) = &validated.region {
            loader = loader.region(Region::new(region.clone()));
        } else if validated.endpoint.is_some() {
            loader = loader.region(
                RegionProviderChain::default_provider().or_else(Region::from_static("us-east-1")),
            );
        }
        if let Some(endpoint) = &validated.endpoint {
            loader = loader.endpoint_url(endpoint.as_str().trim_end_matches('/'));
        }
        if let Some(credentials) = &validated.credentials {
            loader = loader.credentials_provider(Credentials::new(
                credentials.access_key_id.clone(),
                credentials.secret_access_key.clone(),
                None,
                None,
                "leaselock-config",
            ));
        } else if validated.endpoint_is_local() && std::env::var_os("AWS_ACCESS_KEY_ID").is_none() {
            loader = loader.credentials_provider(Credentials::new(
                LOCAL_ACCESS_KEY_ID,
                LOCAL_SECRET,
                None,
                None,
                "leaselock-local-endpoint",
            ));
        }
        let sdk = loader.load().await;
        if sdk.region().is_none() {
            return Err(Error::invalid(
                "region",
                "no AWS region configured: set AWS_REGION, a region in the shared config file's \
                 profile, or the backend's region",
            ));
        }
        tracing::debug!(table = %validated.table, region = ?sdk.region(), endpoint = ?validated.endpoint.as_ref().map(|u| u.as_str()), "DynamoDB client configured");
        Ok(Self::with_validated(Client::new(&sdk), validated))
    }

    /// Uses a client configured elsewhere (its endpoint, region, credentials, retries and
    /// timeouts); of `config`, only the table and the lock settings apply.
    ///
    /// ```no_run
    /// use leaselock_dynamodb::{DynamoDbBackend, DynamoDbConfig};
    /// # #[tokio::main] async fn main() -> leaselock::Result<()> {
    /// let sdk = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    /// let client = aws_sdk_dynamodb::Client::new(&sdk);
    /// let backend = DynamoDbBackend::from_client(client, DynamoDbConfig::new("app_locks"))?;
    /// # Ok(()) }
    /// ```
    pub fn from_client(client: Client, config: DynamoDbConfig) -> Result<Self> {
        Ok(Self::with_validated(client, config.validated()?))
    }

    fn with_validated(client: Client, config: Validated) -> Self {
        Self {
            client,
            config: Arc::new(config),
            sightings: Arc::default(),
        }
    }

    /// The table's name.
    pub fn table(&self) -> &str {
        self.config.table.as_str()
    }

    /// The AWS SDK client.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// This instance's wall clock (with the configured test offset).
    fn wall_now(&self) -> SystemTime {
        self.config.clock_offset.apply(SystemTime::now())
    }

    fn sightings(&self) -> MutexGuard<'_, HashMap<LockKey, Sighting>> {
        // Nothing can be left half-written under this lock: recover from a poisoned one.
        self.sightings
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Remembers a held record seen just now (after the response arrived, so after the holder
    /// wrote it and therefore after the holder started its own lease clock). Keeps the first
    /// sighting of an unchanged version.
    fn observe(&self, key: &LockKey, record: &Record) {
        let (Some(version), Some(lease)) = (&record.version, record.lease) else {
            return;
        };
        if record.owner.is_none() {
            return;
        }
        let mut sightings = self.sightings();
        match sightings.get(key) {
            Some(seen) if &seen.version == version => {}
            _ => {
                if sightings.len() >= MAX_SIGHTINGS {
                    sightings.retain(|_, s| {
                        s.first_seen.elapsed() < s.lease.saturating_mul(2) + Duration::from_secs(60)
                    });
                }
                sightings.insert(
                    key.clone(),
                    Sighting {
                        version: version.clone(),
                        first_seen: Instant::now(),
                        lease,
                    },
                );
            }
        }
    }

    /// The record version this instance has seen unchanged for a whole lease, if any.
    fn ripe_version(&self, key: &LockKey) -> Option<String> {
        self.sightings()
            .get(key)
            .filter(|s| s.ripe())
            .map(|s| s.version.clone())
    }

    fn forget(&self, key: &LockKey) {
        self.sightings().remove(key);
    }

    /// The time-to-live attribute's value for an item whose last lease ends at `end`.
    fn cleanup_value(&self, end: SystemTime) -> Option<AttributeValue> {
        self.config
            .cleanup_after
            .map(|retention| number(secs(end).saturating_add(retention.as_secs())))
    }

    /// `SET …` / `REMOVE …` of the time-to-live attribute, and its value.
    fn cleanup_clause(&self, end: SystemTime) -> (&'static str, Option<AttributeValue>) {
        match self.cleanup_value(end) {
            Some(value) => ("#c = :cleanup", Some(value)),
            None => ("", None),
        }
    }

    /// One conditional `UpdateItem` on `key`.
    async fn write(
        &self,
        key: &LockKey,
        update: String,
        condition: &str,
        values: Item,
        returns: ReturnValue,
        old_on_refusal: bool,
    ) -> Result<Write> {
        let names = names_in(&[&update, condition]);
        let mut request = self
            .client
            .update_item()
            .table_name(self.table())
            .key(ATTR_KEY, string(key.as_str()))
            .update_expression(update)
            .condition_expression(condition)
            .set_expression_attribute_names(Some(names))
            .set_expression_attribute_values((!values.is_empty()).then_some(values))
            .return_values(returns);
        if old_on_refusal {
            request = request.return_values_on_condition_check_failure(
                ReturnValuesOnConditionCheckFailure::AllOld,
            );
        }
        match request.send().await {
            Ok(output) => Ok(Write::Done(output.attributes().cloned())),
            Err(error) => match error.as_service_error() {
                Some(UpdateItemError::ConditionalCheckFailedException(refused)) => {
                    Ok(Write::Refused(refused.item().cloned()))
                }
                _ => Err(convert("UpdateItem", self.table(), error)),
            },
        }
    }

    /// A consistent read of `key`'s item.
    async fn read(&self, key: &LockKey) -> Result<Option<Record>> {
        let output = self
            .client
            .get_item()
            .table_name(self.table())
            .key(ATTR_KEY, string(key.as_str()))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| convert("GetItem", self.table(), e))?;
        output.item().map(|item| self.parse(item)).transpose()
    }

    /// Every item that has a holder, by a consistent scan.
    async fn scan_held(&self) -> Result<Vec<(LockKey, Record)>> {
        let mut pages = self
            .client
            .scan()
            .table_name(self.table())
            .consistent_read(true)
            .filter_expression("attribute_exists(#o)")
            .expression_attribute_names("#o", ATTR_OWNER)
            .into_paginator()
            .items()
            .send();
        let mut held = Vec::new();
        while let Some(item) = pages.next().await {
            let item = item.map_err(|e| convert("Scan", self.table(), e))?;
            let record = self.parse(&item)?;
            let Some(key) = &record.key else {
                return Err(invalid_data(self.table(), "an item without a key"));
            };
            let key = LockKey::new(key.clone()).map_err(|e| {
                invalid_data(self.table(), format!("an item with an invalid key: {e}"))
            })?;
            held.push((key, record));
        }
        Ok(held)
    }

    fn parse(&self, item: &Item) -> Result<Record> {
        let table = self.table();
        let text = |name: &str| -> Result<Option<String>> {
            match item.get(name) {
                None | Some(AttributeValue::Null(_)) => Ok(None),
                Some(AttributeValue::S(s)) => Ok(Some(s.clone())),
                Some(other) => Err(invalid_data(
                    table,
                    format!("attribute `{name}` is not a string: {other:?}"),
                )),
            }
        };
        let num = |name: &str| whole_number(table, item, name);
        Ok(Record {
            key: text(ATTR_KEY)?,
            token: num(ATTR_TOKEN)?.unwrap_or(0),
            owner: text(ATTR_OWNER)?,
            version: text(ATTR_VERSION)?,
            lease: num(ATTR_LEASE)?.map(Duration::from_millis),
            acquired_at: num(ATTR_ACQUIRED)?.map(from_millis),
            expires_at: num(ATTR_EXPIRES)?.map(from_millis),
        })
    }

    /// What a record says about its holder, if it has one.
    fn info(&self, key: &LockKey, record: &Record) -> Result<Option<LockInfo>> {
        let Some(owner) = &record.owner else {
            return Ok(None);
        };
        let owner = OwnerId::new(owner.clone()).map_err(|e| {
            invalid_data(self.table(), format!("an item with an invalid owner: {e}"))
        })?;
        let mut info = LockInfo::new(key.clone(), owner, FencingToken::new(record.token));
        info.acquired_at = record.acquired_at;
        info.expires_at = record.expires_at;
        info.remaining = record.expires_at.map(|expires| {
            expires
                .duration_since(self.wall_now())
                .unwrap_or(Duration::ZERO)
        });
        Ok(Some(info))
    }

    /// Whether the stored wall-clock expiry has passed on this instance's wall clock.
    fn past_stored_expiry(&self, record: &Record) -> bool {
        record
            .expires_at
            .is_some_and(|expires| expires <= self.wall_now())
    }

    /// Whether, with a declared clock-skew bound, the record may be taken over at once.
    fn past_expiry_plus_skew(&self, record: &Record) -> bool {
        match (self.config.max_clock_skew, record.expires_at) {
            (Some(skew), Some(expires)) => expires
                .checked_add(skew)
                .is_some_and(|limit| limit < self.wall_now()),
            _ => false,
        }
    }

    /// Waits until the table is active (or fails), as a freshly created table is not at once.
    async fn wait_active(&self) -> Result<()> {
        let started = Instant::now();
        let mut pause = Duration::from_millis(100);
        loop {
            let output = self
                .client
                .describe_table()
                .table_name(self.table())
                .send()
                .await;
            let status = match output {
                Ok(output) => {
                    let table = output.table();
                    if let Some(table) = table {
                        self.check_key_schema(table)
                            .map_err(|what| Error::invalid("table", what))?;
                    }
                    table.and_then(|t| t.table_status()).cloned()
                }
                // Just created by someone else and not visible yet: keep waiting.
                Err(error) if error.code() == Some("ResourceNotFoundException") => None,
                Err(error) => return Err(convert("DescribeTable", self.table(), error)),
            };
            match status {
                Some(TableStatus::Active) | Some(TableStatus::Updating) => return Ok(()),
                Some(TableStatus::Deleting) => {
                    return Err(Error::NotAccessible {
                        backend: NAME,
                        what: format!("table `{}` is being deleted", self.table()),
                        source: None,
                    })
                }
                _ => {}
            }
            if started.elapsed() >= self.config.table_ready_timeout {
                return Err(Error::NotInitialized {
                    backend: NAME,
                    what: format!(
                        "table `{}` did not become active within {:?} (status {status:?})",
                        self.table(),
                        self.config.table_ready_timeout
                    ),
                });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(2));
        }
    }

    /// A table made by someone else must have our key: one string partition key named `key`.
    fn check_key_schema(
        &self,
        table: &aws_sdk_dynamodb::types::TableDescription,
    ) -> std::result::Result<(), String> {
        let schema = table.key_schema();
        let hash_ok = schema.len() == 1
            && schema[0].attribute_name() == ATTR_KEY
            && schema[0].key_type() == &KeyType::Hash;
        let type_ok = table.attribute_definitions().iter().any(|d| {
            d.attribute_name() == ATTR_KEY && d.attribute_type() == &ScalarAttributeType::S
        });
        if hash_ok && type_ok {
            Ok(())
        } else {
            let keys: Vec<String> = schema
                .iter()
                .map(|k| format!("{} ({})", k.attribute_name(), k.key_type().as_str()))
                .collect();
            Err(format!(
                "table `{}` exists but is not a leaselock table: its key is [{}], expected one \
                 string partition key named `{ATTR_KEY}`",
                self.table(),
                keys.join(", ")
            ))
        }
    }

    /// Turns on the table's time to live for [`ATTR_CLEANUP`], unless it is on. Failing to is
    /// logged, not fatal: locks work without it; only the cleanup of long-dead items is lost.
    async fn ensure_cleanup(&self) {
        let described = |this: &Self| {
            let client = this.client.clone();
            let table = this.table().to_owned();
            async move {
                client
                    .describe_time_to_live()
                    .table_name(table)
                    .send()
                    .await
                    .map(|out| {
                        out.time_to_live_description().map(|d| {
                            (
                                d.time_to_live_status().cloned(),
                                d.attribute_name().map(str::to_owned),
                            )
                        })
                    })
            }
        };
        let ours = |state: &Option<(Option<TimeToLiveStatus>, Option<String>)>| {
            matches!(
                state,
                Some((Some(TimeToLiveStatus::Enabled | TimeToLiveStatus::Enabling), Some(attr)))
                    if attr == ATTR_CLEANUP
            )
        };
        let state = match described(self).await {
            Ok(state) => state,
            Err(error) => {
                tracing::warn!(table = self.table(), error = %convert("DescribeTimeToLive", self.table(), error), "cannot read the table's time to live; long-dead items will not be cleaned up");
                return;
            }
        };
        if ours(&state) {
            return;
        }
        if let Some((Some(TimeToLiveStatus::Enabled | TimeToLiveStatus::Enabling), Some(attr))) =
            &state
        {
            tracing::warn!(table = self.table(), attribute = %attr, "the table's time to live is on for another attribute; leaselock's items (attribute `{ATTR_CLEANUP}`) will not be cleaned up");
            return;
        }
        let spec = TimeToLiveSpecification::builder()
            .enabled(true)
            .attribute_name(ATTR_CLEANUP)
            .build()
            .expect("enabled and attribute_name are set");
        let outcome = self
            .client
            .update_time_to_live()
            .table_name(self.table())
            .time_to_live_specification(spec)
            .send()
            .await;
        match outcome {
            Ok(_) => {
                tracing::info!(
                    table = self.table(),
                    attribute = ATTR_CLEANUP,
                    "time to live turned on for long-dead lock items"
                )
            }
            // Another process may have turned it on at the same moment.
            Err(error) => match described(self).await {
                Ok(state) if ours(&state) => {}
                _ => {
                    tracing::warn!(table = self.table(), error = %convert("UpdateTimeToLive", self.table(), error), "cannot turn on the table's time to live; long-dead items will not be cleaned up")
                }
            },
        }
    }

    /// What a refresh of `lease` writes (its update expression and values, under
    /// [`REFRESH_CONDITION`]), and the lease it makes.
    fn refresh_write(&self, lease: &Lease) -> Result<(String, Item, Lease)> {
        let ttl = lease.ttl.ok_or_else(|| {
            Error::invalid("lease", "a lease without a duration cannot be refreshed")
        })?;
        let ttl = validate_lease_duration("ttl", ttl)?;
        let now = self.wall_now();
        let expires = now + ttl;
        let (cleanup, cleanup_value) = self.cleanup_clause(expires);
        let mut update = "SET #v = :version, #l = :lease, #e = :expires".to_owned();
        if cleanup.is_empty() {
            update.push_str(" REMOVE #c");
        } else {
            update.push_str(", ");
            update.push_str(cleanup);
        }
        let mut values: Item = HashMap::from([
            (":owner".to_owned(), string(lease.owner.as_str())),
            (":token".to_owned(), number(lease.token.get())),
            (
                ":version".to_owned(),
                string(&uuid::Uuid::new_v4().simple().to_string()),
            ),
            (":lease".to_owned(), number(duration_ms(ttl))),
            (":expires".to_owned(), number(millis(expires))),
        ]);
        if let Some(value) = cleanup_value {
            values.insert(":cleanup".into(), value);
        }
        let mut fresh = lease.clone();
        fresh.expires_at = Some(expires);
        fresh.ttl = Some(ttl);
        Ok((update, values, fresh))
    }

    /// The error for a lease whose conditional write was refused; `old` is the item as it was,
    /// when the service returned it (`absent` says what its absence means).
    fn lost_error(&self, key: &LockKey, old: Option<&Item>, absent: &str) -> Error {
        let record = match old.map(|item| self.parse(item)).transpose() {
            Ok(record) => record,
            Err(error) => return error,
        };
        let reason = match record {
            None => absent.to_owned(),
            Some(Record { owner: None, .. }) => {
                "the lease was released (or force-released)".to_owned()
            }
            Some(Record {
                owner: Some(owner),
                token,
                ..
            }) => format!("the lock was taken over by `{owner}` (fencing token {token})"),
        };
        Error::lost(key, reason)
    }

    /// Refreshes leases of distinct keys (at most [`MAX_TRANSACTION_ITEMS`]) in one transaction,
    /// trying the ones a cancelled transaction did not refuse once more together, then alone.
    async fn refresh_together(&self, leases: &[&Lease]) -> Vec<Result<Lease>> {
        let mut results: Vec<Option<Result<Lease>>> = leases.iter().map(|_| None).collect();
        let mut todo: Vec<usize> = (0..leases.len()).collect();
        for _ in 0..2 {
            if todo.len() < 2 {
                break;
            }
            let mut items = Vec::with_capacity(todo.len());
            let mut sent = Vec::with_capacity(todo.len());
            for i in std::mem::take(&mut todo) {
                match self.refresh_write(leases[i]) {
                    Ok((update, values, fresh)) => {
                        items.push(self.transact_update(&leases[i].key, update, values));
                        sent.push((i, fresh));
                    }
                    Err(error) => results[i] = Some(Err(error)),
                }
            }
            if sent.is_empty() {
                break;
            }
            let outcome = self
                .client
                .transact_write_items()
                .set_transact_items(Some(items))
                .send()
                .await;
            let error = match outcome {
                Ok(_) => {
                    for (i, fresh) in sent {
                        results[i] = Some(Ok(fresh));
                    }
                    continue;
                }
                Err(error) => error,
            };
            let Some(TransactWriteItemsError::TransactionCanceledException(cancelled)) =
                error.as_service_error()
            else {
                let error = convert("TransactWriteItems", self.table(), error);
                for ((i, _), error) in sent.iter().zip(error.for_batch(sent.len())) {
                    results[*i] = Some(Err(error));
                }
                break;
            };
            // Reasons come in the order of the items: a refused condition is a lost lease;
            // every other item was not written (its transaction was cancelled), so try again.
            let reasons = cancelled.cancellation_reasons();
            for (position, (i, _)) in sent.iter().enumerate() {
                match reasons.get(position) {
                    Some(reason) if reason.code() == Some("ConditionalCheckFailed") => {
                        results[*i] = Some(Err(self.lost_error(
                            &leases[*i].key,
                            reason.item(),
                            "the lease was released, expired or was taken over",
                        )));
                    }
                    _ => todo.push(*i),
                }
            }
        }
        for i in todo {
            results[i] = Some(self.refresh(leases[i]).await);
        }
        results
            .into_iter()
            .map(|result| result.expect("every lease is answered"))
            .collect()
    }

    /// One conditional update of a refresh, as an item of a transaction.
    fn transact_update(&self, key: &LockKey, update: String, values: Item) -> TransactWriteItem {
        let names = names_in(&[&update, REFRESH_CONDITION]);
        let update = Update::builder()
            .table_name(self.table())
            .key(ATTR_KEY, string(key.as_str()))
            .update_expression(update)
            .condition_expression(REFRESH_CONDITION)
            .set_expression_attribute_names(Some(names))
            .set_expression_attribute_values(Some(values))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .build()
            .expect("table, key and update expression are set");
        TransactWriteItem::builder().update(update).build()
    }

    /// Removes the holder of `key` if `condition` holds, keeping the counter.
    async fn clear_holder(
        &self,
        key: &LockKey,
        condition: &str,
        mut values: Item,
        return_old: bool,
    ) -> Result<Write> {
        let (cleanup, cleanup_value) = self.cleanup_clause(self.wall_now());
        let update = if cleanup.is_empty() {
            "REMOVE #o, #v, #l, #a, #e, #c".to_owned()
        } else {
            format!("REMOVE #o, #v, #l, #a, #e SET {cleanup}")
        };
        if let Some(value) = cleanup_value {
            values.insert(":cleanup".into(), value);
        }
        let returns = if return_old {
            ReturnValue::AllOld
        } else {
            ReturnValue::None
        };
        self.write(key, update, condition, values, returns, false)
            .await
    }
}

#[async_trait]
impl LockBackend for DynamoDbBackend {
    fn capabilities(&self) -> Capabilities {
        let mut caps = Capabilities::new(NAME, LockKind::Lease, ExpiryClock::WaiterMonotonic);
        caps.max_refresh_batch = MAX_TRANSACTION_ITEMS;
        caps
    }

    async fn init_storage(&self) -> Result<()> {
        let key_definition = AttributeDefinition::builder()
            .attribute_name(ATTR_KEY)
            .attribute_type(ScalarAttributeType::S)
            .build()
            .expect("name and type are set");
        let key_schema = KeySchemaElement::builder()
            .attribute_name(ATTR_KEY)
            .key_type(KeyType::Hash)
            .build()
            .expect("name and type are set");
        let created = self
            .client
            .create_table()
            .table_name(self.table())
            .attribute_definitions(key_definition)
            .key_schema(key_schema)
            .billing_mode(BillingMode::PayPerRequest)
            .send()
            .await;
        match created {
            Ok(_) => tracing::info!(table = self.table(), "DynamoDB lock table created"),
            // It exists, or someone else is creating it right now: wait until it is active.
            Err(error) if error.code() == Some("ResourceInUseException") => {}
            Err(error) => return Err(convert("CreateTable", self.table(), error)),
        }
        self.wait_active().await?;
        if self.config.cleanup_after.is_some() {
            self.ensure_cleanup().await;
        }
        Ok(())
    }

    async fn check_storage(&self) -> Result<()> {
        let output = self
            .client
            .describe_table()
            .table_name(self.table())
            .send()
            .await
            .map_err(|e| convert("DescribeTable", self.table(), e))?;
        let Some(table) = output.table() else {
            return Err(Error::NotInitialized {
                backend: NAME,
                what: format!("table `{}` is not described", self.table()),
            });
        };
        match table.table_status() {
            Some(TableStatus::Active) | Some(TableStatus::Updating) => {}
            Some(TableStatus::Creating) => {
                return Err(Error::NotInitialized {
                    backend: NAME,
                    what: format!(
                        "table `{}` is still being created: wait for init_storage",
                        self.table()
                    ),
                })
            }
            other => {
                return Err(Error::NotAccessible {
                    backend: NAME,
                    what: format!(
                        "table `{}` is not usable (status {})",
                        self.table(),
                        other.map(|s| s.as_str()).unwrap_or("unknown")
                    ),
                    source: None,
                })
            }
        }
        // A table shaped differently does not change by waiting.
        self.check_key_schema(table)
            .map_err(|what| Error::permanent(NAME, what))?;
        // Describing needs another permission than reading items: read one too.
        let probe = LockKey::new("leaselock/check_storage").expect("a valid key");
        self.read(&probe).await?;
        Ok(())
    }

    async fn try_acquire(&self, request: &AcquireRequest) -> Result<AcquireOutcome> {
        let key = request.key();
        // `None`: a lock without expiry, which stores no lease duration and no expiry, so no
        // waiter ever sees it ripe and cleanup never releases it.
        let ttl = request.ttl();
        let now = self.wall_now();
        let now_ms = millis(now);
        let expires = ttl.map(|ttl| now + ttl);
        let version = uuid::Uuid::new_v4().simple().to_string();

        let mut condition = "attribute_not_exists(#o)".to_owned();
        let mut values: Item = HashMap::new();
        let ripe = self.ripe_version(key);
        if let Some(seen) = &ripe {
            // Unchanged for a whole lease on our monotonic clock: the holder is gone.
            condition.push_str(" OR #v = :seen");
            values.insert(":seen".into(), string(seen));
        }
        if let Some(skew) = self.config.max_clock_skew {
            condition.push_str(" OR #e < :cutoff");
            values.insert(
                ":cutoff".into(),
                number(now_ms.saturating_sub(duration_ms(skew))),
            );
        }
        let (cleanup, cleanup_value) = match expires {
            Some(expires) => self.cleanup_clause(expires),
            None => ("", None),
        };
        // A new item's counter starts at the wall clock in milliseconds (`:now`), so an item
        // deleted by the time to live and created again continues above every token it handed
        // out.
        let mut update = "SET #o = :owner, #v = :version, #a = :now, \
                          #t = if_not_exists(#t, :now) + :one"
            .to_owned();
        if expires.is_some() {
            update.push_str(", #l = :lease, #e = :expires");
        }
        if !cleanup.is_empty() {
            update.push_str(", ");
            update.push_str(cleanup);
        }
        match (cleanup.is_empty(), expires.is_none()) {
            (true, true) => update.push_str(" REMOVE #c, #l, #e"),
            (true, false) => update.push_str(" REMOVE #c"),
            (false, _) => {}
        }
        values.insert(":owner".into(), string(request.owner().as_str()));
        values.insert(":version".into(), string(&version));
        if let (Some(ttl), Some(expires)) = (ttl, expires) {
            values.insert(":lease".into(), number(duration_ms(ttl)));
            values.insert(":expires".into(), number(millis(expires)));
        }
        values.insert(":now".into(), number(now_ms));
        values.insert(":one".into(), number(1));
        if let Some(value) = cleanup_value {
            values.insert(":cleanup".into(), value);
        }

        let lease_with = |token: u64| {
            let lease = Lease::new(
                key.clone(),
                request.owner().clone(),
                FencingToken::new(token),
                now,
            );
            match (expires, ttl) {
                (Some(expires), Some(ttl)) => lease.with_expiry(expires, ttl),
                _ => lease,
            }
        };
        match self
            .write(
                key,
                update,
                &condition,
                values,
                // The old values of the attributes the write changed, rather than the new
                // ones: after a release that is the token alone, a smaller answer to parse.
                ReturnValue::UpdatedOld,
                true,
            )
            .await?
        {
            Write::Done(old) => {
                self.forget(key);
                let token = acquired_token(self.table(), old.as_ref(), now_ms)?;
                if ripe.is_some() {
                    tracing::debug!(%key, token, "took over a lease whose record was unchanged for a whole lease duration");
                }
                Ok(AcquireOutcome::Acquired(lease_with(token)))
            }
            Write::Refused(old) => {
                let Some(record) = old.as_ref().map(|item| self.parse(item)).transpose()? else {
                    return Ok(AcquireOutcome::Held(None));
                };
                // A retried request whose first attempt was applied sees its own version.
                if record.version.as_deref() == Some(version.as_str())
                    && record.owner.as_deref() == Some(request.owner().as_str())
                {
                    self.forget(key);
                    return Ok(AcquireOutcome::Acquired(lease_with(record.token)));
                }
                self.observe(key, &record);
                Ok(AcquireOutcome::Held(self.info(key, &record)?))
            }
        }
    }

    async fn refresh(&self, lease: &Lease) -> Result<Lease> {
        let (update, values, fresh) = self.refresh_write(lease)?;
        match self
            .write(
                &lease.key,
                update,
                REFRESH_CONDITION,
                values,
                ReturnValue::None,
                true,
            )
            .await?
        {
            Write::Done(_) => Ok(fresh),
            Write::Refused(old) => {
                Err(self.lost_error(&lease.key, old.as_ref(), "the lock's record is gone"))
            }
        }
    }

    /// `TransactWriteItems` of up to 100 leases with distinct keys each (one signed request
    /// instead of a hundred). A lease that fails its condition cancels its transaction: the
    /// others are sent again without it, and one at a time if that fails too.
    async fn refresh_many(&self, leases: &[Lease]) -> Vec<Result<Lease>> {
        let mut results: Vec<Option<Result<Lease>>> = leases.iter().map(|_| None).collect();
        let mut pending: Vec<usize> = (0..leases.len()).collect();
        while !pending.is_empty() {
            // A transaction may touch an item once: a stale lease waits beside its successor.
            let mut keys = HashSet::new();
            let (chunk, rest): (Vec<usize>, Vec<usize>) = pending
                .into_iter()
                .partition(|&i| keys.len() < MAX_TRANSACTION_ITEMS && keys.insert(&leases[i].key));
            let chunk_leases: Vec<&Lease> = chunk.iter().map(|&i| &leases[i]).collect();
            for (i, result) in chunk
                .into_iter()
                .zip(self.refresh_together(&chunk_leases).await)
            {
                results[i] = Some(result);
            }
            pending = rest;
        }
        results
            .into_iter()
            .map(|result| result.expect("every lease is answered"))
            .collect()
    }

    async fn verify(&self, lease: &Lease) -> Result<bool> {
        Ok(self.read(&lease.key).await?.is_some_and(|record| {
            record.owner.as_deref() == Some(lease.owner.as_str())
                && record.token == lease.token.get()
                && !self.past_stored_expiry(&record)
        }))
    }

    async fn release(&self, lease: &Lease) -> Result<bool> {
        let values: Item = HashMap::from([
            (":owner".to_owned(), string(lease.owner.as_str())),
            (":token".to_owned(), number(lease.token.get())),
        ]);
        let released = matches!(
            self.clear_holder(&lease.key, "#o = :owner AND #t = :token", values, false)
                .await?,
            Write::Done(_)
        );
        Ok(released)
    }

    async fn status(&self, key: &LockKey) -> Result<LockState> {
        let Some(record) = self.read(key).await? else {
            return Ok(LockState::Free);
        };
        Ok(match self.info(key, &record)? {
            None => LockState::Free,
            Some(info) if self.past_stored_expiry(&record) => LockState::Expired(info),
            Some(info) => LockState::Held(info),
        })
    }

    async fn list(&self) -> Result<Vec<LockInfo>> {
        let mut held = Vec::new();
        for (key, record) in self.scan_held().await? {
            if self.past_stored_expiry(&record) {
                continue;
            }
            if let Some(info) = self.info(&key, &record)? {
                held.push(info);
            }
        }
        held.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(held)
    }

    /// The same scan as [`LockBackend::list`]; a lease past its stored expiry (by this host's
    /// clock, as [`LockBackend::status`] judges it) is [`LockState::Expired`].
    async fn list_with_expired(&self) -> Result<Vec<LockState>> {
        let mut all = Vec::new();
        for (key, record) in self.scan_held().await? {
            if let Some(info) = self.info(&key, &record)? {
                all.push(if self.past_stored_expiry(&record) {
                    LockState::Expired(info)
                } else {
                    LockState::Held(info)
                });
            }
        }
        all.sort_by(|a, b| state_key(a).cmp(&state_key(b)));
        Ok(all)
    }

    async fn force_release(&self, key: &LockKey) -> Result<Option<LockInfo>> {
        self.forget(key);
        match self
            .clear_holder(key, "attribute_exists(#o)", HashMap::new(), true)
            .await?
        {
            Write::Done(old) => match old {
                Some(item) => {
                    let record = self.parse(&item)?;
                    self.info(key, &record)
                }
                None => Ok(None),
            },
            Write::Refused(_) => Ok(None),
        }
    }

    async fn release_expired(&self) -> Result<u64> {
        let mut released = 0;
        for (key, record) in self.scan_held().await? {
            self.observe(&key, &record);
            let Some(version) = &record.version else {
                continue;
            };
            let ripe = self.ripe_version(&key).as_deref() == Some(version.as_str());
            if !ripe && !self.past_expiry_plus_skew(&record) {
                continue;
            }
            let values: Item = HashMap::from([(":seen".to_owned(), string(version))]);
            if let Write::Done(_) = self.clear_holder(&key, "#v = :seen", values, false).await? {
                self.forget(&key);
                tracing::info!(%key, owner = ?record.owner, token = record.token, "released an expired lease");
                released += 1;
            }
        }
        Ok(released)
    }

    async fn watch_release(&self, _key: &LockKey) -> Result<Option<Wakeup>> {
        Ok(None)
    }

    fn watch_lost(&self, _lease: &Lease) -> Option<Wakeup> {
        None
    }
}

/// The attribute-name placeholders an expression uses (DynamoDB refuses unused ones).
fn names_in(expressions: &[&str]) -> HashMap<String, String> {
    NAMES
        .iter()
        .filter(|(placeholder, _)| expressions.iter().any(|e| e.contains(placeholder)))
        .map(|(placeholder, name)| ((*placeholder).to_owned(), (*name).to_owned()))
        .collect()
}

/// The whole-number attribute `name` of `item` (tokens, milliseconds); `None` when it is absent
/// or null.
fn whole_number(table: &str, item: &Item, name: &str) -> Result<Option<u64>> {
    match item.get(name) {
        None | Some(AttributeValue::Null(_)) => Ok(None),
        Some(AttributeValue::N(n)) => n.parse::<u64>().map(Some).map_err(|_| {
            invalid_data(
                table,
                format!("attribute `{name}` is not a whole number: {n}"),
            )
        }),
        Some(other) => Err(invalid_data(
            table,
            format!("attribute `{name}` is not a number: {other:?}"),
        )),
    }
}

/// The token an acquiring write set, from the attributes' values before it: the counter moves
/// by exactly one (`if_not_exists(#t, :now) + :one`), and starts at `now_ms` on a new item.
/// An error when the old token is not a whole number below `u64::MAX`.
fn acquired_token(table: &str, old: Option<&Item>, now_ms: u64) -> Result<u64> {
    let previous = match old {
        Some(item) => whole_number(table, item, ATTR_TOKEN)?,
        None => None,
    };
    previous.unwrap_or(now_ms).checked_add(1).ok_or_else(|| {
        invalid_data(
            table,
            format!("attribute `{ATTR_TOKEN}` is at the largest token"),
        )
    })
}

fn string(value: &str) -> AttributeValue {
    AttributeValue::S(value.to_owned())
}

fn number(value: u64) -> AttributeValue {
    AttributeValue::N(value.to_string())
}

fn millis(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map(duration_ms)
        .unwrap_or(0)
}

fn secs(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn duration_ms(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

fn from_millis(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// The key of a listed state (never [`LockState::Free`]), for sorting.
fn state_key(state: &LockState) -> Option<&LockKey> {
    match state {
        LockState::Held(info) | LockState::Expired(info) => Some(&info.key),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_only_those_used() {
        let names = names_in(&["SET #o = :owner", "attribute_not_exists(#o) OR #v = :seen"]);
        assert_eq!(names.len(), 2);
        assert_eq!(names["#o"], ATTR_OWNER);
        assert_eq!(names["#v"], ATTR_VERSION);
        // No placeholder is a prefix of another.
        for (a, _) in NAMES {
            for (b, _) in NAMES {
                assert!(a == b || !b.starts_with(a), "{a} {b}");
            }
        }
    }

    #[test]
    fn the_acquired_token_is_one_above_the_old_one_or_the_clock() {
        let old = |token: AttributeValue| HashMap::from([(ATTR_TOKEN.to_owned(), token)]);
        let token = |old: Option<&Item>, now_ms| acquired_token("locks", old, now_ms).ok();
        assert_eq!(token(Some(&old(number(41))), 7), Some(42));
        // A new item, or one that had no token: the counter started at the clock.
        assert_eq!(token(None, 1_700_000_000_000), Some(1_700_000_000_001));
        assert_eq!(token(Some(&HashMap::new()), 7), Some(8));
        assert_eq!(token(Some(&old(string("41"))), 7), None);
        assert_eq!(token(Some(&old(number(u64::MAX))), 7), None);
    }

    #[test]
    fn sightings_ripen_after_a_lease() {
        let fresh = Sighting {
            version: "v".into(),
            first_seen: Instant::now(),
            lease: Duration::from_secs(60),
        };
        assert!(!fresh.ripe());
        let old = Sighting {
            version: "v".into(),
            first_seen: Instant::now() - Duration::from_millis(20),
            lease: Duration::from_millis(10),
        };
        assert!(old.ripe());
    }
}
