//! The MongoDB lease backend.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use leaselock::{
    async_trait, AcquireOutcome, AcquireRequest, Capabilities, Error, ExpiryClock, FencingToken,
    Lease, LockBackend, LockInfo, LockKey, LockKind, LockState, Namespace, OwnerId, Result, Wakeup,
};
use mongodb::bson::{doc, Bson, DateTime, Document};
use mongodb::options::{
    ClientOptions, CollectionOptions, IndexOptions, ReadConcern, ReadPreference, ReturnDocument,
    SelectionCriteria, WriteConcern,
};
use mongodb::{Client, Collection, Database, IndexModel};

use crate::config::{
    scrub, MongoConfig, ReadConsistency, Validated, DEFAULT_SERVER_SELECTION_TIMEOUT,
    DEFAULT_WRITE_TIMEOUT,
};
use crate::error::{
    code, convert, corrupt, not_initialized, DUPLICATE_KEY, NAME, NAMESPACE_EXISTS,
};

/// The index `init_storage` creates, on `expires_at`, for `list` and `release_expired`. Its
/// presence is what `check_storage` looks for.
pub const EXPIRY_INDEX: &str = "leaselock_expires_at";

// The fields of a lock document. `_id` is the key itself, so the collection's built-in unique
// `_id` index makes two documents for one key impossible, whatever state the storage is in.
const OWNER: &str = "owner";
const TOKEN: &str = "token";
const ACQUIRED_AT: &str = "acquired_at";
const EXPIRES_AT: &str = "expires_at";
const TTL_MS: &str = "ttl_ms";
/// The `expires_at` of a lock without expiry, 9999-12-31T23:59:59.999Z: later than any `$$NOW`
/// (a missing or null date would compare as earlier), reported as no expiry.
const NEVER_MS: i64 = 253_402_300_799_999;
/// A random id written by the acquisition that took the lock, so that an acquisition whose
/// reply carries no document can tell from the stored one whether it won (see `try_acquire`).
const ATTEMPT: &str = "attempt";
/// The server's clock at the moment of a read, added by the `$project` stage of reads (never
/// stored).
const NOW: &str = "now";

/// The holder's fields, cleared by release, force release and cleanup. `token` stays: it is the
/// key's fencing counter.
fn cleared() -> Document {
    doc! { "$unset": { OWNER: "", ACQUIRED_AT: "", EXPIRES_AT: "", TTL_MS: "", ATTEMPT: "" } }
}

/// The lock fields plus the server's clock, for the `$project` stage of reads that report a holder.
fn with_now() -> Document {
    doc! { OWNER: 1, TOKEN: 1, ACQUIRED_AT: 1, EXPIRES_AT: 1, ATTEMPT: 1, NOW: "$$NOW" }
}

/// Matches a document whose holder's lease has not expired by the server's clock.
fn live() -> Document {
    doc! { "$gt": [format!("${EXPIRES_AT}"), "$$NOW"] }
}

/// The server's clock plus `ms` milliseconds. (`$dateAdd` rather than `$add` of a date and a
/// number: both are MongoDB, and this one is understood by more MongoDB-compatible servers.)
fn now_plus(ms: i64) -> Document {
    doc! { "$dateAdd": { "startDate": "$$NOW", "unit": "millisecond", "amount": ms } }
}

/// Leases in a MongoDB collection, one document per key.
///
/// - **Documents**: `{_id: KEY, owner, token, acquired_at, expires_at, ttl_ms, attempt}`. The
///   `_id` is the key, so the collection's unique `_id` index guarantees one document per key.
///   Release, force release and cleanup remove the holder's fields and keep the document with
///   its `token`, the key's fencing counter; documents are never deleted, so tokens never go
///   back. There is deliberately no TTL index: deleting a key's document would restart its
///   counter at 1. The cost is one small document per key ever locked.
/// - **Acquire** is one `findAndModify` with `upsert`: its filter matches the key's document only
///   when it has no holder or the holder's `expires_at` has passed by the server's `$$NOW`, and
///   its pipeline update sets the new holder, the times (from `$$NOW`) and `token + 1`. A key
///   without a document is inserted with token 1. When the key is held, the filter matches
///   nothing, the upsert tries to insert a second document with the same `_id`, and the server
///   refuses it with a duplicate-key error (11000): the attempt is refused. The same owner
///   asking again is refused too: locks are not reentrant. Only on this refused path is there a
///   second round trip, a read that reports the holder with its remaining time by the server's
///   clock (the refusal itself carries no document). Each acquisition also stores a random
///   `attempt` id, so that a reply without a document (which MongoDB does not send, but a
///   compatible server may after a race) is settled by the same read.
/// - **Expiry** is decided by the server's clock (`$$NOW`), never the client's. A lock without
///   expiry stores `expires_at` 9999-12-31T23:59:59.999Z and a null `ttl_ms`, and is reported
///   without expiry.
/// - **Batched refreshes**: a [`leaselock::Locker`] refreshes the leases that fall due together
///   up to 100 at a time in one `updateMany` (its filter an `$or` of each lease's key, owner and
///   token); when it matches fewer documents than it names, those leases are refreshed one by
///   one to tell the lost ones ([`LockBackend::refresh_many`]).
/// - **Consistency**: writes use `w: majority` (with [`MongoConfig::write_timeout`]); reads go to
///   the primary with `readConcern: majority` or `linearizable`
///   ([`MongoConfig::read_consistency`]), so `verify` and `status` never report ownership that a
///   majority has not seen or that was already replaced.
/// - **Storage**: [`LockBackend::init_storage`] creates the collection and an index on
///   `expires_at`; MongoDB would otherwise create the collection implicitly on the first write,
///   so each instance checks once, before its first operation, that the index exists, and fails
///   with [`Error::NotInitialized`] until `init_storage` has run.
/// - **Server**: MongoDB 5.0 or later (pipeline updates, `$$NOW`, `$dateAdd`), a replica set in
///   production (a standalone server works, without the replication guarantees), or a
///   compatible server.
///
/// ```no_run
/// use leaselock::Locker;
/// use leaselock_mongodb::{MongoBackend, MongoConfig};
/// # #[tokio::main] async fn main() -> leaselock::Result<()> {
/// let backend = MongoBackend::connect(MongoConfig::new("mongodb://127.0.0.1:27017/app")).await?;
/// let locker = Locker::builder(backend).build()?;
/// locker.init_storage().await?;
/// locker.run("nightly-job", |lock| async move { println!("token {}", lock.token()) }).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct MongoBackend {
    inner: Arc<Inner>,
}

struct Inner {
    database: Database,
    locks: Collection<Document>,
    database_name: Namespace,
    collection_name: Namespace,
    read_consistency: ReadConsistency,
    /// Set once this instance has seen initialized storage (see [`MongoBackend::ready`]).
    ready: AtomicBool,
    /// The client [`MongoBackend::connect`] made, which [`LockBackend::shutdown`] shuts down;
    /// `None` for a client the application passed in, which is the application's to shut down.
    own_client: Option<Client>,
}

/// How long [`LockBackend::shutdown`] waits for the driver to end its server sessions and close
/// its connections.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

impl fmt::Debug for MongoBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MongoBackend")
            .field("database", &self.inner.database_name)
            .field("collection", &self.inner.collection_name)
            .field("read_consistency", &self.inner.read_consistency)
            .finish()
    }
}

impl MongoBackend {
    /// A backend with its own client (connection pool) for `config`. Validates the configuration
    /// and parses the URL, but does not contact the server (the driver connects on first use):
    /// call [`LockBackend::check_storage`] for a pre-flight check, and
    /// [`LockBackend::init_storage`] to create the collection.
    ///
    /// Errors with [`Error::InvalidInput`] naming `url`, `database`, `collection` or a timeout;
    /// the message never contains the URL's password.
    pub async fn connect(config: MongoConfig) -> Result<Self> {
        let validated = config.validated()?;
        let mut options =
            ClientOptions::parse(&validated.url)
                .await
                .map_err(|e| match &*e.kind {
                    mongodb::error::ErrorKind::InvalidArgument { .. } => {
                        Error::invalid("url", scrub(e.to_string(), &validated.url))
                    }
                    _ => convert(e),
                })?;
        if let Some(timeout) = validated.server_selection_timeout {
            options.server_selection_timeout = Some(timeout);
        } else if options.server_selection_timeout.is_none() {
            options.server_selection_timeout = Some(DEFAULT_SERVER_SELECTION_TIMEOUT);
        }
        if options.app_name.is_none() {
            options.app_name = Some("leaselock".to_owned());
        }
        let client = Client::with_options(options)
            .map_err(|e| Error::invalid("url", scrub(e.to_string(), &validated.url)))?;
        Ok(Self::build(&client, validated, Some(client.clone())))
    }

    /// A backend over a client the application already has, locking in `database`.`collection`
    /// (both validated like identifiers) with the defaults: majority reads on the primary,
    /// majority writes with a 10 s write timeout.
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() -> leaselock::Result<()> {
    /// let client = mongodb::Client::with_uri_str("mongodb://127.0.0.1:27017").await.unwrap();
    /// let backend = leaselock_mongodb::MongoBackend::with_client(&client, "app", "locks")?;
    /// # Ok(()) }
    /// ```
    pub fn with_client(client: &Client, database: &str, collection: &str) -> Result<Self> {
        let validated = Validated {
            url: String::new(),
            database: Namespace::for_field("database", database)?,
            collection: Namespace::for_field("collection", collection)?,
            read_consistency: ReadConsistency::default(),
            write_timeout: DEFAULT_WRITE_TIMEOUT,
            server_selection_timeout: None,
        };
        Ok(Self::build(client, validated, None))
    }

    fn build(client: &Client, config: Validated, own_client: Option<Client>) -> Self {
        let write_concern = WriteConcern::builder()
            .w(mongodb::options::Acknowledgment::Majority)
            .w_timeout(config.write_timeout)
            .build();
        let read_concern = match config.read_consistency {
            ReadConsistency::Majority => ReadConcern::majority(),
            ReadConsistency::Linearizable => ReadConcern::linearizable(),
        };
        let options = CollectionOptions::builder()
            .selection_criteria(SelectionCriteria::ReadPreference(ReadPreference::Primary))
            .read_concern(read_concern)
            .write_concern(write_concern)
            .build();
        let database = client.database(config.database.as_str());
        let locks = database.collection_with_options(config.collection.as_str(), options);
        Self {
            inner: Arc::new(Inner {
                database,
                locks,
                database_name: config.database,
                collection_name: config.collection,
                read_consistency: config.read_consistency,
                ready: AtomicBool::new(false),
                own_client,
            }),
        }
    }

    /// The database holding the lock collection.
    pub fn database(&self) -> &str {
        self.inner.database_name.as_str()
    }

    /// The lock collection.
    pub fn collection(&self) -> &str {
        self.inner.collection_name.as_str()
    }

    fn locks(&self) -> &Collection<Document> {
        &self.inner.locks
    }

    fn namespace(&self) -> String {
        format!(
            "{}.{}",
            self.inner.database_name, self.inner.collection_name
        )
    }

    /// Whether the collection and its index exist (one `listIndexes`).
    async fn check_index(&self) -> Result<()> {
        match self.locks().list_index_names().await {
            Ok(names) if names.iter().any(|n| n == EXPIRY_INDEX) => Ok(()),
            Ok(_) => Err(not_initialized(&format!(
                "the collection `{}` has no index `{EXPIRY_INDEX}`",
                self.namespace()
            ))),
            Err(e) if code(&e) == Some(crate::error::NAMESPACE_NOT_FOUND) => Err(not_initialized(
                &format!("no collection `{}`", self.namespace()),
            )),
            Err(e) => Err(convert(e)),
        }
    }

    /// Makes sure, once per instance, that storage was initialized: MongoDB creates a missing
    /// collection on the first upsert, which would hide a forgotten `init_storage`. One extra
    /// round trip, before this instance's first operation only.
    async fn ready(&self) -> Result<()> {
        if self.inner.ready.load(Ordering::Acquire) {
            return Ok(());
        }
        self.check_index().await?;
        self.inner.ready.store(true, Ordering::Release);
        Ok(())
    }

    /// Creates the collection (tolerating a concurrent creation) and the expiry index
    /// (idempotent for an identical index).
    async fn create(&self) -> Result<()> {
        let created = self
            .inner
            .database
            .create_collection(self.inner.collection_name.as_str())
            .write_concern(WriteConcern::majority())
            .await;
        match created {
            Ok(()) => {}
            Err(e) if code(&e) == Some(NAMESPACE_EXISTS) => {}
            Err(e) => return Err(convert(e)),
        }
        let index = IndexModel::builder()
            .keys(doc! { EXPIRES_AT: 1 })
            .options(
                IndexOptions::builder()
                    .name(EXPIRY_INDEX.to_owned())
                    .build(),
            )
            .build();
        self.locks().create_index(index).await.map_err(convert)?;
        Ok(())
    }

    /// Runs `aggregate` and collects the documents.
    async fn aggregate(&self, pipeline: Vec<Document>) -> Result<Vec<Document>> {
        let mut cursor = self.locks().aggregate(pipeline).await.map_err(convert)?;
        let mut out = Vec::new();
        while cursor.advance().await.map_err(convert)? {
            out.push(cursor.deserialize_current().map_err(convert)?);
        }
        Ok(out)
    }

    /// The key's holder, if any, and whether its lease has expired, by the server's clock (one
    /// `aggregate` that projects `$$NOW`).
    async fn read(&self, key: &LockKey) -> Result<Option<(LockInfo, bool)>> {
        match self.read_doc(key).await? {
            Some(doc) => holder(key, &doc),
            None => Ok(None),
        }
    }

    /// The key's document with the server's clock in `now`.
    async fn read_doc(&self, key: &LockKey) -> Result<Option<Document>> {
        let docs = self
            .aggregate(vec![
                doc! { "$match": { "_id": key.as_str() } },
                doc! { "$project": with_now() },
            ])
            .await?;
        Ok(docs.into_iter().next())
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn integer(doc: &Document, field: &str) -> Result<i64> {
    match doc.get(field) {
        Some(Bson::Int64(v)) => Ok(*v),
        Some(Bson::Int32(v)) => Ok(i64::from(*v)),
        Some(Bson::Double(v)) if v.fract() == 0.0 => Ok(*v as i64),
        other => Err(corrupt(format!("`{field}` is {other:?}"))),
    }
}

fn date(doc: &Document, field: &str) -> Result<DateTime> {
    doc.get_datetime(field)
        .copied()
        .map_err(|_| corrupt(format!("`{field}` is {:?}", doc.get(field))))
}

fn token(doc: &Document) -> Result<FencingToken> {
    let raw = integer(doc, TOKEN)?;
    u64::try_from(raw)
        .map(FencingToken::new)
        .map_err(|_| corrupt(format!("negative `{TOKEN}` {raw}")))
}

fn system_time(at: DateTime) -> SystemTime {
    at.to_system_time()
}

/// The holder described by a lock document, without the remaining time; `None` when the key has
/// no holder.
fn removed_holder(key: &LockKey, doc: &Document) -> Result<Option<LockInfo>> {
    let owner = match doc.get(OWNER) {
        None | Some(Bson::Null) => return Ok(None),
        Some(Bson::String(owner)) => {
            OwnerId::new(owner.clone()).map_err(|e| corrupt(format!("owner of `{key}`: {e}")))?
        }
        Some(other) => return Err(corrupt(format!("`{OWNER}` is {other:?}"))),
    };
    let mut info = LockInfo::new(key.clone(), owner, token(doc)?);
    info.acquired_at = Some(system_time(date(doc, ACQUIRED_AT)?));
    info.expires_at = expiry(doc)?.map(system_time);
    Ok(Some(info))
}

/// A holder's `expires_at`; `None` for a lock without expiry.
fn expiry(doc: &Document) -> Result<Option<DateTime>> {
    let expires = date(doc, EXPIRES_AT)?;
    Ok((expires.timestamp_millis() != NEVER_MS).then_some(expires))
}

/// The holder described by a lock document read with [`with_now`], with its remaining time and
/// whether its lease has expired, by the server's clock; `None` when the key has no holder.
fn holder(key: &LockKey, doc: &Document) -> Result<Option<(LockInfo, bool)>> {
    let Some(mut info) = removed_holder(key, doc)? else {
        return Ok(None);
    };
    let Some(expires) = expiry(doc)? else {
        return Ok(Some((info, false)));
    };
    let now = date(doc, NOW)?;
    let left = expires
        .timestamp_millis()
        .saturating_sub(now.timestamp_millis());
    info.remaining = Some(Duration::from_millis(left.max(0) as u64));
    Ok(Some((info, left <= 0)))
}

fn doc_key(doc: &Document) -> Result<LockKey> {
    match doc.get("_id") {
        Some(Bson::String(key)) => {
            LockKey::new(key.clone()).map_err(|e| corrupt(format!("key {key:?}: {e}")))
        }
        other => Err(corrupt(format!("`_id` is {other:?}"))),
    }
}

/// How many leases one batched refresh (`updateMany`) names at most.
const REFRESH_CHUNK: usize = 100;

/// The owner and token of `lease`'s key, as a filter (without the expiry check).
fn owned_by(lease: &Lease) -> Result<Document> {
    let token = i64::try_from(lease.token.get())
        .map_err(|_| Error::invalid("lease", "fencing token out of range"))?;
    Ok(doc! { "_id": lease.key.as_str(), OWNER: lease.owner.as_str(), TOKEN: token })
}

/// The filter matching `lease`'s holder while its lease lives.
fn held_by(lease: &Lease) -> Result<Document> {
    let mut filter = owned_by(lease)?;
    filter.insert("$expr", live());
    Ok(filter)
}

impl MongoBackend {
    /// One `updateMany` over `chunk` (leases of duration `ttl`): whether it refreshed every one.
    async fn refresh_chunk(&self, ttl: Duration, chunk: &[&Lease]) -> Result<bool> {
        self.ready().await?;
        let named = chunk
            .iter()
            .map(|lease| owned_by(lease))
            .collect::<Result<Vec<Document>>>()?;
        let distinct: std::collections::HashSet<(&str, &str, u64)> = chunk
            .iter()
            .map(|l| (l.key.as_str(), l.owner.as_str(), l.token.get()))
            .collect();
        let keys: Vec<&str> = chunk.iter().map(|lease| lease.key.as_str()).collect();
        let ttl_ms = millis(ttl);
        let result = self
            .locks()
            .update_many(
                // The `_id` list lets the server look the keys up in its primary index before
                // it checks each against the `$or` of owners and tokens.
                doc! { "_id": { "$in": keys }, "$or": named, "$expr": live() },
                vec![doc! { "$set": { EXPIRES_AT: now_plus(ttl_ms), TTL_MS: ttl_ms } }],
            )
            .await
            .map_err(convert)?;
        Ok(result.matched_count == distinct.len() as u64)
    }
}

#[async_trait]
impl LockBackend for MongoBackend {
    fn capabilities(&self) -> Capabilities {
        let mut caps = Capabilities::new(NAME, LockKind::Lease, ExpiryClock::Database);
        caps.max_refresh_batch = 10 * REFRESH_CHUNK;
        caps
    }

    async fn init_storage(&self) -> Result<()> {
        // Concurrent initializers race to create the same collection and index; the server
        // settles each race, and a loser that sees the finished storage is done too. An index
        // build still in progress elsewhere is waited out.
        let mut attempt = 0;
        loop {
            let created = self.create().await;
            let outcome = match created {
                Ok(()) => Ok(()),
                Err(error) => match self.check_index().await {
                    Ok(()) => Ok(()),
                    Err(_) => Err(error),
                },
            };
            match outcome {
                Ok(()) => {
                    self.inner.ready.store(true, Ordering::Release);
                    tracing::debug!(collection = %self.namespace(), "MongoDB lock collection ready");
                    return Ok(());
                }
                // Only the server's own refusals can come from a race (an index build in
                // progress, a write conflict); an unreachable server or refused credentials fail
                // at once.
                Err(error @ Error::Backend { .. }) if attempt < 10 => {
                    attempt += 1;
                    tracing::debug!(%error, attempt, "MongoDB storage init raced, retrying");
                    tokio::time::sleep(Duration::from_millis(50 * attempt)).await;
                }
                Err(error) => return Err(error),
            }
        }
    }

    async fn check_storage(&self) -> Result<()> {
        self.check_index().await?;
        // A write that matches nothing (no key contains NUL) proves the write path: the primary
        // is reachable, the user may update, a majority acknowledges.
        self.locks()
            .update_one(
                doc! { "_id": "\u{0}leaselock-check" },
                doc! { "$set": { TOKEN: 0_i64 } },
            )
            .await
            .map_err(convert)?;
        self.inner.ready.store(true, Ordering::Release);
        Ok(())
    }

    async fn try_acquire(&self, request: &AcquireRequest) -> Result<AcquireOutcome> {
        self.ready().await?;
        let key = request.key();
        let ttl_ms = request.ttl().map(millis);
        let expires_at = match ttl_ms {
            Some(ms) => Bson::Document(now_plus(ms)),
            None => Bson::DateTime(DateTime::from_millis(NEVER_MS)),
        };
        let attempt = uuid::Uuid::new_v4().simple().to_string();
        let free_or_expired = doc! {
            "_id": key.as_str(),
            "$or": [
                { OWNER: null },
                { "$expr": { "$lte": [format!("${EXPIRES_AT}"), "$$NOW"] } },
            ],
        };
        let take = vec![doc! { "$set": {
            OWNER: request.owner().as_str(),
            TOKEN: { "$add": [{ "$ifNull": [format!("${TOKEN}"), 0_i64] }, 1_i64] },
            ACQUIRED_AT: "$$NOW",
            EXPIRES_AT: expires_at,
            TTL_MS: ttl_ms,
            ATTEMPT: &attempt,
        } }];
        let result = self
            .locks()
            .find_one_and_update(free_or_expired, take)
            .upsert(true)
            .return_document(ReturnDocument::After)
            .await;
        let doc = match result {
            Ok(Some(doc)) => doc,
            Err(e) if code(&e) != Some(DUPLICATE_KEY) => return Err(convert(e)),
            // Held: the key's document exists and the filter did not match it. Or a reply
            // without the document, which MongoDB never sends for an upsert that returns the new
            // document, but a compatible server may when the upsert raced with another write,
            // having taken the lock or not. Either way, read the key: the stored `attempt` says
            // whether this attempt won; otherwise report the live holder (nobody, if the holder
            // went meanwhile).
            outcome => {
                if outcome.is_ok() {
                    tracing::debug!(%key, "MongoDB upsert replied without a document; reading it");
                }
                let Some(doc) = self.read_doc(key).await? else {
                    return Ok(AcquireOutcome::Held(None));
                };
                if !matches!(doc.get(ATTEMPT), Some(Bson::String(a)) if *a == attempt) {
                    let info = match holder(key, &doc)? {
                        Some((info, false)) => Some(info),
                        _ => None,
                    };
                    tracing::debug!(%key, holder = ?info.as_ref().map(|i| i.owner.as_str()), "MongoDB lock held");
                    return Ok(AcquireOutcome::Held(info));
                }
                doc
            }
        };
        let lease = Lease::new(
            key.clone(),
            request.owner().clone(),
            token(&doc)?,
            system_time(date(&doc, ACQUIRED_AT)?),
        );
        let lease = match (expiry(&doc)?, request.ttl()) {
            (Some(expires), Some(ttl)) => lease.with_expiry(system_time(expires), ttl),
            _ => lease,
        };
        tracing::debug!(%key, token = %lease.token, "MongoDB lock acquired");
        Ok(AcquireOutcome::Acquired(lease))
    }

    async fn refresh(&self, lease: &Lease) -> Result<Lease> {
        let ttl = lease.ttl.ok_or_else(|| {
            Error::invalid("lease", "a lease without a duration cannot be refreshed")
        })?;
        self.ready().await?;
        let ttl_ms = millis(ttl);
        let doc = self
            .locks()
            .find_one_and_update(
                held_by(lease)?,
                vec![doc! { "$set": { EXPIRES_AT: now_plus(ttl_ms), TTL_MS: ttl_ms } }],
            )
            .return_document(ReturnDocument::After)
            .await
            .map_err(convert)?;
        match doc {
            Some(doc) => {
                let mut fresh = lease
                    .clone()
                    .with_expiry(system_time(date(&doc, EXPIRES_AT)?), ttl);
                fresh.acquired_at = system_time(date(&doc, ACQUIRED_AT)?);
                Ok(fresh)
            }
            None => Err(Error::lost(
                &lease.key,
                "the lease expired, was released or was taken over",
            )),
        }
    }

    /// Leases of one duration, 100 to an `updateMany` whose filter names each of
    /// them (`$or` of key, owner and token, and the server's clock). When it matches as many
    /// documents as it names leases, all were refreshed; otherwise (a lease was lost) each lease
    /// of that call is refreshed on its own, which tells the lost ones apart.
    async fn refresh_many(&self, leases: &[Lease]) -> Vec<Result<Lease>> {
        leaselock::refresh_in_chunks(self, leases, REFRESH_CHUNK, |ttl, chunk| async move {
            self.refresh_chunk(ttl, &chunk).await
        })
        .await
    }

    async fn verify(&self, lease: &Lease) -> Result<bool> {
        self.ready().await?;
        let found = self
            .locks()
            .find_one(held_by(lease)?)
            .await
            .map_err(convert)?;
        Ok(found.is_some())
    }

    async fn release(&self, lease: &Lease) -> Result<bool> {
        self.ready().await?;
        let result = self
            .locks()
            .update_one(held_by(lease)?, cleared())
            .await
            .map_err(convert)?;
        Ok(result.matched_count == 1)
    }

    async fn status(&self, key: &LockKey) -> Result<LockState> {
        self.ready().await?;
        Ok(match self.read(key).await? {
            None => LockState::Free,
            Some((info, true)) => LockState::Expired(info),
            Some((info, false)) => LockState::Held(info),
        })
    }

    async fn list(&self) -> Result<Vec<LockInfo>> {
        self.ready().await?;
        let docs = self
            .aggregate(vec![
                doc! { "$match": { OWNER: { "$type": "string" }, "$expr": live() } },
                doc! { "$sort": { "_id": 1 } },
                doc! { "$project": with_now() },
            ])
            .await?;
        let mut out = Vec::with_capacity(docs.len());
        for doc in &docs {
            if let Some((info, false)) = holder(&doc_key(doc)?, doc)? {
                out.push(info);
            }
        }
        Ok(out)
    }

    async fn list_with_expired(&self) -> Result<Vec<LockState>> {
        self.ready().await?;
        let docs = self
            .aggregate(vec![
                doc! { "$match": { OWNER: { "$type": "string" } } },
                doc! { "$sort": { "_id": 1 } },
                doc! { "$project": with_now() },
            ])
            .await?;
        let mut out = Vec::with_capacity(docs.len());
        for doc in &docs {
            match holder(&doc_key(doc)?, doc)? {
                Some((info, true)) => out.push(LockState::Expired(info)),
                Some((info, false)) => out.push(LockState::Held(info)),
                None => {}
            }
        }
        Ok(out)
    }

    async fn force_release(&self, key: &LockKey) -> Result<Option<LockInfo>> {
        self.ready().await?;
        let before = self
            .locks()
            .find_one_and_update(
                doc! { "_id": key.as_str(), OWNER: { "$type": "string" } },
                cleared(),
            )
            .return_document(ReturnDocument::Before)
            .await
            .map_err(convert)?;
        // The removed holder is reported without `remaining`: this write does not read the
        // server's clock, and the client's must not stand in for it.
        let removed = match before {
            Some(doc) => removed_holder(key, &doc)?,
            None => None,
        };
        if let Some(info) = &removed {
            tracing::info!(%key, owner = %info.owner, token = %info.token, "MongoDB lock force-released");
        }
        Ok(removed)
    }

    async fn release_expired(&self) -> Result<u64> {
        self.ready().await?;
        let result = self
            .locks()
            .update_many(
                doc! {
                    OWNER: { "$type": "string" },
                    "$expr": { "$lte": [format!("${EXPIRES_AT}"), "$$NOW"] },
                },
                cleared(),
            )
            .await
            .map_err(convert)?;
        Ok(result.modified_count)
    }

    async fn watch_release(&self, _key: &LockKey) -> Result<Option<Wakeup>> {
        // Change streams need a replica set and a cursor per waiter; waiters poll instead.
        Ok(None)
    }

    fn watch_lost(&self, _lease: &Lease) -> Option<Wakeup> {
        None
    }

    /// Shuts down the client [`MongoBackend::connect`] made (ending its server sessions and
    /// closing its connections, without waiting for cursors still open), within 5 s. Left to
    /// itself, the driver does that from the drop of the last handle, in a task that can panic
    /// when the runtime is shutting down. A client passed to [`MongoBackend::with_client`] is
    /// left alone.
    async fn shutdown(&self) {
        let Some(client) = &self.inner.own_client else {
            return;
        };
        let shutdown = client.clone().shutdown().immediate(true);
        if tokio::time::timeout(SHUTDOWN_TIMEOUT, shutdown)
            .await
            .is_err()
        {
            tracing::debug!("MongoDB client shutdown did not finish within {SHUTDOWN_TIMEOUT:?}");
        }
    }
}
