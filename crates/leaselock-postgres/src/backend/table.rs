//! The lease table backend.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use leaselock::{
    AcquireOutcome, AcquireRequest, Capabilities, Error, ExpiryClock, Lease, LockBackend, LockInfo,
    LockKey, LockKind, LockState, Result, Wakeup,
};
use tokio_postgres::types::Type;
use tokio_postgres::Row;

use super::{channel_name, key, owner, token, Shared};
use crate::config::{PgConfig, DEFAULT_TABLE};

const NAME: &str = "postgres-table";
const COLUMNS: &str = "key, owner, token, acquired_at, expires_at, wanted";
/// How many leases one batched refresh (one `UPDATE … FROM unnest(…)`) extends at most.
const MAX_REFRESH_BATCH: usize = 1000;

/// Leases in a table, expiring by the database server's clock (`now()`).
///
/// One row per key, never deleted: `key text PRIMARY KEY, owner text, token bigint,
/// acquired_at timestamptz, expires_at timestamptz, wanted boolean`. Acquiring is one statement,
/// `INSERT … ON CONFLICT (key) DO UPDATE … WHERE the row is free or expired … RETURNING`, which
/// bumps the fencing token; when the key is held, the same statement returns the holder. Release,
/// force release and cleanup clear the holder and keep the token, so tokens strictly increase per
/// key forever. Locks are not reentrant: the same owner asking again is refused.
///
/// Every statement is a single unnamed statement without a prepare round trip, so this backend
/// also works through a transaction-pooling proxy such as PgBouncer (release notifications then
/// fall back to polling, as LISTEN needs a session).
///
/// Waiters are woken through `LISTEN`/`NOTIFY`: force release and cleanup send `pg_notify` in
/// the same statement, and so does a release when a waiter is listening. An acquisition refused
/// while its caller waits (a live [`LockBackend::watch_release`] in the same backend) marks the
/// row `wanted`, and the next acquisition clears it. A release nobody waits for sends nothing,
/// because PostgreSQL serializes the commits of all notifying transactions in a database: with
/// 64 workers over 1,000 keys that alone took a quarter of the throughput. `init_storage` adds
/// the `wanted` column to a table made by an earlier version.
///
/// A [`leaselock::Locker`] (by default: see its refresh batch window) refreshes the leases that fall due together in one statement
/// (`UPDATE … FROM unnest(…)`, up to 1,000 leases; [`LockBackend::refresh_many`]).
///
/// ```no_run
/// use leaselock::Locker;
/// use leaselock_postgres::{PgConfig, PgTableBackend};
/// # #[tokio::main] async fn main() -> leaselock::Result<()> {
/// let config = PgConfig::from_url("postgres://app@localhost/app")?.table("deploy_locks")?;
/// let locker = Locker::builder(PgTableBackend::new(config)?).build()?;
/// locker.init_storage().await?;
/// locker.run("migrations", |lock| async move { lock.token() }).await?;
/// # Ok(()) }
/// ```
pub struct PgTableBackend {
    shared: Arc<Shared>,
}

impl fmt::Debug for PgTableBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgTableBackend")
            .field("target", &self.shared.connector_target())
            .field("table", &self.shared.qualified)
            .finish_non_exhaustive()
    }
}

impl PgTableBackend {
    /// Every key with a holder, held or (with `with_expired`) expired, by the server's clock:
    /// what `list` and `list_with_expired` read.
    async fn holders(&self, with_expired: bool) -> Result<Vec<LockState>> {
        let live = if with_expired {
            ""
        } else {
            " AND (expires_at IS NULL OR expires_at > now())"
        };
        let sql = format!(
            "SELECT key, owner, token, acquired_at, expires_at, now() AS now FROM {t} \
              WHERE owner IS NOT NULL{live} ORDER BY key COLLATE \"C\"",
            t = self.t()
        );
        let rows = self.shared.query("list", &sql, &[]).await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let now: SystemTime = row.try_get("now").map_err(conv)?;
            let k = key(NAME, row.try_get(0).map_err(conv)?)?;
            if let Some(info) = info_at(&k, row, 1, now)? {
                out.push(match info.expires_at {
                    Some(expires_at) if expires_at <= now => LockState::Expired(info),
                    _ => LockState::Held(info),
                });
            }
        }
        Ok(out)
    }

    /// A backend over `config`'s table (default [`DEFAULT_TABLE`]). Connects lazily, on first
    /// use; call [`LockBackend::init_storage`] once to create the table.
    pub fn new(config: PgConfig) -> Result<Self> {
        let qualified = config.qualified(DEFAULT_TABLE);
        let channel = channel_name("table", &qualified, "");
        Ok(Self {
            shared: Arc::new(Shared::new(NAME, &config, qualified, channel)?),
        })
    }

    /// The schema-qualified, quoted table name.
    pub fn table(&self) -> &str {
        &self.shared.qualified
    }

    fn t(&self) -> &str {
        &self.shared.qualified
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn remaining(expires_at: SystemTime, now: SystemTime) -> Duration {
    expires_at.duration_since(now).unwrap_or(Duration::ZERO)
}

/// A holder row: (owner, token, acquired_at, expires_at) at the given column offset, plus `now`.
fn info_at(k: &LockKey, row: &Row, at: usize, now: SystemTime) -> Result<Option<LockInfo>> {
    let Some(raw_owner) = row.try_get::<_, Option<String>>(at).map_err(conv)? else {
        return Ok(None);
    };
    let mut info = LockInfo::new(
        k.clone(),
        owner(NAME, raw_owner)?,
        token(NAME, row.try_get(at + 1).map_err(conv)?)?,
    );
    info.acquired_at = row.try_get(at + 2).map_err(conv)?;
    let expires_at: Option<SystemTime> = row.try_get(at + 3).map_err(conv)?;
    info.expires_at = expires_at;
    info.remaining = expires_at.map(|e| remaining(e, now));
    Ok(Some(info))
}

fn conv(e: tokio_postgres::Error) -> Error {
    Error::permanent(NAME, format!("unexpected column type: {e}"))
}

impl PgTableBackend {
    /// The statement of [`LockBackend::refresh_many`] for `(position, lease, ttl_ms)` triples:
    /// an answer for each position it found a row for (a missing row is a lost lease).
    async fn refresh_rows(
        &self,
        sent: &[(usize, &Lease, i64)],
    ) -> Result<Vec<(usize, Result<Lease>)>> {
        let sql = format!(
            "WITH input AS ( \
               SELECT * FROM unnest($1::int8[], $2::text[], $3::text[], $4::int8[], $5::int8[]) \
                 AS u(n, key, owner, token, ttl_ms) \
             ), upd AS ( \
               UPDATE {t} AS l \
                  SET expires_at = now() + (u.ttl_ms::float8 * interval '1 millisecond') \
                 FROM input u \
                WHERE l.key = u.key AND l.owner = u.owner AND l.token = u.token \
                  AND l.expires_at > now() \
               RETURNING u.n, l.acquired_at, l.expires_at \
             ) \
             SELECT u.n, upd.n IS NOT NULL AS refreshed, \
                    coalesce(upd.acquired_at, cur.acquired_at) AS acquired_at, \
                    coalesce(upd.expires_at, cur.expires_at) AS expires_at, \
                    CASE WHEN upd.n IS NULL THEN cur.owner END AS owner, \
                    CASE WHEN upd.n IS NULL THEN cur.token END AS token \
               FROM input u \
               LEFT JOIN upd ON upd.n = u.n \
               JOIN {t} cur ON cur.key = u.key",
            t = self.t()
        );
        let positions: Vec<i64> = sent.iter().map(|(n, _, _)| *n as i64).collect();
        let keys: Vec<&str> = sent.iter().map(|(_, l, _)| l.key.as_str()).collect();
        let owners: Vec<&str> = sent.iter().map(|(_, l, _)| l.owner.as_str()).collect();
        let tokens: Vec<i64> = sent.iter().map(|(_, l, _)| l.token.get() as i64).collect();
        let ttls: Vec<i64> = sent.iter().map(|(_, _, ttl)| *ttl).collect();
        let rows = self
            .shared
            .query(
                "refresh_many",
                &sql,
                &[
                    (&positions, Type::INT8_ARRAY),
                    (&keys, Type::TEXT_ARRAY),
                    (&owners, Type::TEXT_ARRAY),
                    (&tokens, Type::INT8_ARRAY),
                    (&ttls, Type::INT8_ARRAY),
                ],
            )
            .await?;
        let leases: std::collections::HashMap<usize, &Lease> =
            sent.iter().map(|(n, lease, _)| (*n, *lease)).collect();
        let mut answers = Vec::with_capacity(rows.len());
        for row in &rows {
            let n = row.try_get::<_, i64>("n").map_err(conv)? as usize;
            let Some(lease) = leases.get(&n) else {
                return Err(Error::permanent(
                    NAME,
                    "refresh_many returned an unknown lease",
                ));
            };
            answers.push((n, fresh_or_lost(lease, row)?));
        }
        Ok(answers)
    }
}

/// A refresh's row: the refreshed lease, or why it is lost.
fn fresh_or_lost(lease: &Lease, row: &Row) -> Result<Result<Lease>> {
    if !row.try_get::<_, bool>("refreshed").map_err(conv)? {
        return Ok(Err(lost(lease, row)?));
    }
    let ttl = lease
        .ttl
        .expect("only leases with a duration are refreshed");
    let expires_at: SystemTime = row.try_get("expires_at").map_err(conv)?;
    let mut fresh = lease.clone().with_expiry(expires_at, ttl);
    if let Some(acquired_at) = row
        .try_get::<_, Option<SystemTime>>("acquired_at")
        .map_err(conv)?
    {
        fresh.acquired_at = acquired_at;
    }
    Ok(Ok(fresh))
}

/// Why `lease` is lost, from the row's current `owner` and `token`.
fn lost(lease: &Lease, row: &Row) -> Result<Error> {
    let current_owner: Option<String> = row.try_get("owner").map_err(conv)?;
    let current_token: Option<i64> = row.try_get("token").map_err(conv)?;
    let reason = match (current_owner, current_token) {
        (Some(o), Some(t)) if o == lease.owner.as_str() && t == lease.token.get() as i64 => {
            "the lease expired".to_owned()
        }
        (Some(o), Some(t)) => format!("taken over by `{o}` (fencing token {t})"),
        _ => "the lease was released (or force-released, or cleaned up after expiry)".to_owned(),
    };
    Ok(Error::lost(&lease.key, reason))
}

#[async_trait]
impl LockBackend for PgTableBackend {
    fn capabilities(&self) -> Capabilities {
        let mut caps = Capabilities::new(NAME, LockKind::Lease, ExpiryClock::Database);
        caps.release_notifications = true;
        caps.lost_notifications = false;
        caps.max_refresh_batch = MAX_REFRESH_BATCH;
        caps
    }

    async fn init_storage(&self) -> Result<()> {
        let ddl = format!(
            "CREATE TABLE IF NOT EXISTS {t} ( \
                key text PRIMARY KEY, \
                owner text, \
                token bigint NOT NULL CHECK (token > 0), \
                acquired_at timestamptz, \
                expires_at timestamptz, \
                wanted boolean NOT NULL DEFAULT false \
             ); {upgrade}",
            t = self.t(),
            upgrade = super::add_column(self.t(), COLUMNS, "wanted", super::WANTED)
        );
        self.shared.init(&ddl, self.shared.schema()).await?;
        self.check_storage().await
    }

    async fn check_storage(&self) -> Result<()> {
        self.shared.check(COLUMNS).await
    }

    async fn try_acquire(&self, request: &AcquireRequest) -> Result<AcquireOutcome> {
        // When somebody in this process waits for the key (a live release watch), a refused
        // attempt marks the row `wanted`, so that its release notifies. The conflict locked the
        // row, so the mark sees the same holder, and the holder's release, which waits for that
        // lock, sees the mark. Nobody waiting: no mark, and the release sends no `pg_notify`,
        // whose commit is serialized across the whole database. One case marks nothing: a key
        // whose first row was inserted after this statement's snapshot, which the mark reads;
        // the statement then returns no row, and runs once more with a fresh snapshot.
        let marking = self.shared.watching(request.key());
        let (mark, holder) = if marking {
            (
                format!(
                    ", marked AS ( \
                       UPDATE {t} SET wanted = true \
                        WHERE key = $1 AND NOT EXISTS (SELECT 1 FROM attempt) \
                       RETURNING key, owner, token, acquired_at, expires_at \
                     )",
                    t = self.t()
                ),
                "marked",
            )
        } else {
            (String::new(), self.t())
        };
        let sql = format!(
            "WITH attempt AS ( \
               INSERT INTO {t} AS l (key, owner, token, acquired_at, expires_at) \
               VALUES ($1, $2, 1, now(), now() + ($3::float8 * interval '1 millisecond')) \
               ON CONFLICT (key) DO UPDATE \
                 SET owner = EXCLUDED.owner, token = l.token + 1, \
                     acquired_at = EXCLUDED.acquired_at, expires_at = EXCLUDED.expires_at, \
                     wanted = false \
                 WHERE l.owner IS NULL OR l.expires_at <= now() \
               RETURNING true AS acquired, l.owner, l.token, l.acquired_at, l.expires_at \
             ){mark} \
             SELECT acquired, owner, token, acquired_at, expires_at, now() AS now FROM attempt \
             UNION ALL \
             SELECT false, owner, token, acquired_at, expires_at, now() FROM {holder} \
              WHERE key = $1 AND NOT EXISTS (SELECT 1 FROM attempt)",
            t = self.t()
        );
        // A lock without expiry binds a NULL duration: `now() + NULL` is a NULL expiry, which
        // no `expires_at <= now()` ever matches.
        let ttl = request.ttl().map(millis);
        let (key, owner) = (request.key().as_str(), request.owner().as_str());
        let params: [super::Param<'_>; 3] =
            [(&key, Type::TEXT), (&owner, Type::TEXT), (&ttl, Type::INT8)];
        let mut rows = self.shared.query("try_acquire", &sql, &params).await?;
        if rows.is_empty() && marking {
            rows = self.shared.query("try_acquire", &sql, &params).await?;
        }
        let Some(row) = rows.first() else {
            // The holder changed between the conflict and our read: held, holder unknown.
            self.shared.shed();
            return Ok(AcquireOutcome::Held(None));
        };
        let now: SystemTime = row.try_get("now").map_err(conv)?;
        let acquired: bool = row.try_get(0).map_err(conv)?;
        let info = info_at(request.key(), row, 1, now)?;
        if acquired {
            let info = info.ok_or_else(|| Error::permanent(NAME, "acquired without an owner"))?;
            let acquired_at = info.acquired_at.unwrap_or(now);
            let lease = Lease::new(
                request.key().clone(),
                request.owner().clone(),
                info.token,
                acquired_at,
            );
            let lease = match request.ttl() {
                Some(ttl) => lease.with_expiry(info.expires_at.unwrap_or(now + ttl), ttl),
                None => lease,
            };
            return Ok(AcquireOutcome::Acquired(lease));
        }
        // Waiting on a crowded server: keep no connection until the next attempt.
        self.shared.shed();
        // Held: report the holder unless the row we read was already free or expired (a race).
        Ok(AcquireOutcome::Held(
            info.filter(|i| i.remaining.is_none_or(|r| !r.is_zero())),
        ))
    }

    async fn refresh(&self, lease: &Lease) -> Result<Lease> {
        let ttl = lease.ttl.ok_or_else(|| {
            Error::invalid("lease", "a lease without a duration cannot be refreshed")
        })?;
        let sql = format!(
            "WITH upd AS ( \
               UPDATE {t} SET expires_at = now() + ($4::float8 * interval '1 millisecond') \
                WHERE key = $1 AND owner = $2 AND token = $3 AND expires_at > now() \
               RETURNING acquired_at, expires_at \
             ) \
             SELECT true AS refreshed, acquired_at, expires_at, NULL::text AS owner, NULL::int8 AS token FROM upd \
             UNION ALL \
             SELECT false, acquired_at, expires_at, owner, token FROM {t} \
              WHERE key = $1 AND NOT EXISTS (SELECT 1 FROM upd)",
            t = self.t()
        );
        let raw_token = lease.token.get() as i64;
        let ttl_ms = millis(ttl);
        let rows = self
            .shared
            .query(
                "refresh",
                &sql,
                &[
                    (&lease.key.as_str(), Type::TEXT),
                    (&lease.owner.as_str(), Type::TEXT),
                    (&raw_token, Type::INT8),
                    (&ttl_ms, Type::INT8),
                ],
            )
            .await?;
        let Some(row) = rows.first() else {
            return Err(Error::lost(&lease.key, "the lock's row is gone"));
        };
        fresh_or_lost(lease, row)?
    }

    /// Every lease in one statement: the leases go in as arrays, `UPDATE … FROM unnest(…)`
    /// extends the ones still held, and each lease comes back in its row, refreshed or with the
    /// row's current holder.
    async fn refresh_many(&self, leases: &[Lease]) -> Vec<Result<Lease>> {
        let mut results: Vec<Option<Result<Lease>>> = leases.iter().map(|_| None).collect();
        let mut sent = Vec::with_capacity(leases.len());
        for (n, lease) in leases.iter().enumerate() {
            match lease.ttl {
                Some(ttl) => sent.push((n, lease, millis(ttl))),
                None => {
                    results[n] = Some(Err(Error::invalid(
                        "lease",
                        "a lease without a duration cannot be refreshed",
                    )))
                }
            }
        }
        if !sent.is_empty() {
            match self.refresh_rows(&sent).await {
                Ok(answers) => {
                    for (n, answer) in answers {
                        results[n] = Some(answer);
                    }
                }
                Err(error) => {
                    for ((n, _, _), error) in sent.iter().zip(error.for_batch(sent.len())) {
                        results[*n] = Some(Err(error));
                    }
                }
            }
        }
        results
            .into_iter()
            .enumerate()
            .map(|(n, result)| {
                result.unwrap_or_else(|| Err(Error::lost(&leases[n].key, "the lock's row is gone")))
            })
            .collect()
    }

    async fn verify(&self, lease: &Lease) -> Result<bool> {
        let sql = format!(
            "SELECT EXISTS (SELECT 1 FROM {t} \
               WHERE key = $1 AND owner = $2 AND token = $3 \
                 AND (expires_at IS NULL OR expires_at > now()))",
            t = self.t()
        );
        let raw_token = lease.token.get() as i64;
        let row = self
            .shared
            .query_one(
                "verify",
                &sql,
                &[
                    (&lease.key.as_str(), Type::TEXT),
                    (&lease.owner.as_str(), Type::TEXT),
                    (&raw_token, Type::INT8),
                ],
            )
            .await?;
        row.try_get(0).map_err(conv)
    }

    async fn release(&self, lease: &Lease) -> Result<bool> {
        // An expiring lease's release commits without waiting for the log flush
        // (`synchronous_commit` off for this transaction alone): a release the server loses in a
        // crash leaves the lease held until it expires, as a crashed holder would, and the token
        // is safe because only acquisitions raise it, and they stay durable (an acquisition's
        // flush also writes every release before it). A lock without expiry is released durably:
        // a lost release would hold it forever.
        let commit = if lease.ttl.is_some() {
            super::NO_FLUSH_WAIT_CALL
        } else {
            "NULL"
        };
        // A plain UPDATE whose RETURNING list notifies (once, for the one row it changed, and
        // only when a waiter marked it `wanted`: see `try_acquire`): without CTEs or subqueries
        // the server has the fewest plan nodes to set up, which under contention is a good part
        // of a release's cost.
        let sql = format!(
            "UPDATE {t} SET owner = NULL, acquired_at = NULL, expires_at = NULL \
              WHERE key = $1 AND owner = $2 AND token = $3 \
                AND (expires_at IS NULL OR expires_at > now()) \
             RETURNING CASE WHEN wanted THEN pg_notify($4, key) END AS notified, \
                       {commit} AS relaxed",
            t = self.t()
        );
        let raw_token = lease.token.get() as i64;
        let rows = self
            .shared
            .query(
                "release",
                &sql,
                &[
                    (&lease.key.as_str(), Type::TEXT),
                    (&lease.owner.as_str(), Type::TEXT),
                    (&raw_token, Type::INT8),
                    (&self.shared.channel, Type::TEXT),
                ],
            )
            .await?;
        Ok(!rows.is_empty())
    }

    async fn status(&self, k: &LockKey) -> Result<LockState> {
        let sql = format!(
            "SELECT owner, token, acquired_at, expires_at, now() AS now FROM {t} WHERE key = $1",
            t = self.t()
        );
        let rows = self
            .shared
            .query("status", &sql, &[(&k.as_str(), Type::TEXT)])
            .await?;
        let Some(row) = rows.first() else {
            return Ok(LockState::Free);
        };
        let now: SystemTime = row.try_get("now").map_err(conv)?;
        Ok(match info_at(k, row, 0, now)? {
            None => LockState::Free,
            Some(info) if info.remaining.is_some_and(|r| r.is_zero()) => LockState::Expired(info),
            Some(info) => LockState::Held(info),
        })
    }

    async fn list(&self) -> Result<Vec<LockInfo>> {
        Ok(self
            .holders(false)
            .await?
            .into_iter()
            .filter_map(|state| match state {
                LockState::Held(info) => Some(info),
                _ => None,
            })
            .collect())
    }

    async fn list_with_expired(&self) -> Result<Vec<LockState>> {
        self.holders(true).await
    }

    async fn force_release(&self, k: &LockKey) -> Result<Option<LockInfo>> {
        let sql = format!(
            "WITH r AS ( \
               UPDATE {t} AS l SET owner = NULL, acquired_at = NULL, expires_at = NULL \
                 FROM (SELECT key, owner, token, acquired_at, expires_at FROM {t} \
                        WHERE key = $1 AND owner IS NOT NULL FOR UPDATE) AS old \
                WHERE l.key = old.key \
               RETURNING old.owner, old.token, old.acquired_at, old.expires_at \
             ), n AS MATERIALIZED (SELECT pg_notify($2, $1) FROM r) \
             SELECT owner, token, acquired_at, expires_at, now() AS now, \
                    (SELECT count(*) FROM n) AS notified \
               FROM r",
            t = self.t()
        );
        let rows = self
            .shared
            .query(
                "force_release",
                &sql,
                &[
                    (&k.as_str(), Type::TEXT),
                    (&self.shared.channel, Type::TEXT),
                ],
            )
            .await?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        let now: SystemTime = row.try_get("now").map_err(conv)?;
        info_at(k, row, 0, now)
    }

    async fn release_expired(&self) -> Result<u64> {
        let sql = format!(
            "WITH r AS ( \
               UPDATE {t} SET owner = NULL, acquired_at = NULL, expires_at = NULL \
                WHERE owner IS NOT NULL AND expires_at <= now() \
               RETURNING key \
             ), n AS MATERIALIZED (SELECT pg_notify($1, r.key) FROM r) \
             SELECT (SELECT count(*) FROM r) AS released, (SELECT count(*) FROM n) AS notified",
            t = self.t()
        );
        let row = self
            .shared
            .query_one(
                "release_expired",
                &sql,
                &[(&self.shared.channel, Type::TEXT)],
            )
            .await?;
        let released: i64 = row.try_get("released").map_err(conv)?;
        Ok(released.max(0) as u64)
    }

    async fn watch_release(&self, k: &LockKey) -> Result<Option<Wakeup>> {
        self.shared.watch_release(k).await
    }

    fn watch_lost(&self, _lease: &Lease) -> Option<Wakeup> {
        // A lease ends by expiry, which the holder's own deadline covers, or by an operator's
        // force release, which the refresh daemon finds at its next refresh.
        None
    }
}
