//! The floor: what a lock costs when its statements are issued by hand through the raw driver
//! on one connection, with nothing around them.
//!
//! Each floor issues exactly one statement to take a key and one to let it go: the statements
//! the issue names for session locks (`pg_try_advisory_lock` + `pg_advisory_unlock`,
//! `GET_LOCK(…, 0)` + `RELEASE_LOCK`), and for the table and document stores the single
//! conditional write that takes a free key and the write that clears its holder, on the same
//! table or collection the backend uses.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use aws_sdk_dynamodb::types::{AttributeValue, ReturnValue};
use leaselock::async_trait;
use mongodb::bson::{doc, Document};
use mysql_async::prelude::Queryable;

use crate::target::{BackendId, Target};
use crate::Result;

/// One raw connection issuing the floor statements.
#[async_trait]
pub(crate) trait Floor: Send {
    /// One statement that takes `key` if it is free; whether it did.
    async fn lock(&mut self, key: &str) -> Result<bool>;
    /// One statement that lets `key` go (taken by this floor's last `lock`).
    async fn unlock(&mut self, key: &str) -> Result<()>;
}

/// A new floor connection for `target`, through `via` if given. Floors of the in-memory backend
/// share one map (it is one process).
pub(crate) async fn connect(target: &Target, via: Option<SocketAddr>) -> Result<Box<dyn Floor>> {
    let owner = format!("floor-{}", uuid::Uuid::new_v4().simple());
    Ok(match target.id {
        BackendId::Memory => Box::new(MemoryFloor {
            map: Arc::clone(&target.memory_floor),
        }),
        BackendId::Sqlite => {
            let conn = rusqlite::Connection::open(target.sqlite_path()?)?;
            // As the backend configures its connection (the file is already in WAL mode).
            conn.busy_timeout(std::time::Duration::from_secs(5))?;
            conn.execute_batch("PRAGMA synchronous = NORMAL")?;
            Box::new(SqliteFloor::new(conn, &target.table, owner))
        }
        BackendId::PostgresAdvisory | BackendId::PostgresTable => {
            let config = leaselock_postgres::PgConfig::from_url(&target.backend_url(via)?)?;
            let (client, connection) = config.connection().connect(tokio_postgres::NoTls).await?;
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!(error = %e, "floor connection ended");
                }
            });
            if target.id == BackendId::PostgresAdvisory {
                let lock = client.prepare("SELECT pg_try_advisory_lock($1)").await?;
                let unlock = client.prepare("SELECT pg_advisory_unlock($1)").await?;
                Box::new(PgAdvisoryFloor {
                    client,
                    lock,
                    unlock,
                    prefix: format!("{}_floor", target.prefix),
                })
            } else {
                let t = target.pg_table()?;
                let lock = client
                    .prepare(&format!(
                        "INSERT INTO {t} AS l (key, owner, token, acquired_at, expires_at) \
                         VALUES ($1, $2, 1, now(), now() + interval '60 seconds') \
                         ON CONFLICT (key) DO UPDATE \
                           SET owner = EXCLUDED.owner, token = l.token + 1, \
                               acquired_at = EXCLUDED.acquired_at, expires_at = EXCLUDED.expires_at \
                           WHERE l.owner IS NULL OR l.expires_at <= now() \
                         RETURNING l.token"
                    ))
                    .await?;
                let unlock = client
                    .prepare(&format!(
                        "UPDATE {t} SET owner = NULL, acquired_at = NULL, expires_at = NULL \
                         WHERE key = $1 AND owner = $2 AND token = $3"
                    ))
                    .await?;
                Box::new(PgTableFloor {
                    client,
                    lock,
                    unlock,
                    owner,
                    tokens: HashMap::new(),
                })
            }
        }
        BackendId::MysqlGetLock | BackendId::MysqlTable => {
            let opts = mysql_async::Opts::from_url(&target.driver_url(via)?)?;
            let conn = mysql_async::Conn::new(opts).await?;
            if target.id == BackendId::MysqlGetLock {
                Box::new(MysqlGetLockFloor {
                    conn,
                    prefix: format!("{}_floor", target.prefix),
                })
            } else {
                Box::new(MysqlTableFloor {
                    conn,
                    owner,
                    tokens: HashMap::new(),
                    lock_sql: mysql_table_acquire(&target.table),
                    unlock_sql: format!(
                        "UPDATE `{}` SET owner = NULL, acquired_at = NULL, expires_at = NULL \
                         WHERE lock_key = ? AND owner = ? AND token = ?",
                        target.table
                    ),
                })
            }
        }
        BackendId::Mongodb => {
            let url = target.driver_url(via)?;
            let database = leaselock_mongodb::MongoConfig::from_url(&url)?
                .database_name()
                .to_owned();
            let mut options = mongodb::options::ClientOptions::parse(&url).await?;
            // One connection, like the other floors.
            options.max_pool_size = Some(1);
            let client = mongodb::Client::with_options(options)?;
            let write_concern = mongodb::options::WriteConcern::builder()
                .w(mongodb::options::Acknowledgment::Majority)
                .w_timeout(std::time::Duration::from_secs(10))
                .build();
            let options = mongodb::options::CollectionOptions::builder()
                .write_concern(write_concern)
                .build();
            let collection = client
                .database(&database)
                .collection_with_options::<Document>(&target.table, options);
            Box::new(MongoFloor {
                collection,
                owner,
                tokens: HashMap::new(),
            })
        }
        BackendId::Dynamodb => {
            let config = leaselock_dynamodb::DynamoDbConfig::from_url(&target.backend_url(via)?)?;
            let backend = leaselock_dynamodb::DynamoDbBackend::connect(config).await?;
            Box::new(DynamoFloor {
                client: backend.client().clone(),
                table: target.table.clone(),
                owner,
                tokens: HashMap::new(),
            })
        }
    })
}

/// The in-memory floor's "server": a map shared by its connections.
pub(crate) type MemoryMap = Arc<Mutex<HashMap<String, (bool, u64)>>>;

struct MemoryFloor {
    map: MemoryMap,
}

#[async_trait]
impl Floor for MemoryFloor {
    async fn lock(&mut self, key: &str) -> Result<bool> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let entry = map.entry(key.to_owned()).or_insert((false, 0));
        if entry.0 {
            return Ok(false);
        }
        *entry = (true, entry.1 + 1);
        Ok(true)
    }

    async fn unlock(&mut self, key: &str) -> Result<()> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = map.get_mut(key) {
            entry.0 = false;
        }
        Ok(())
    }
}

struct SqliteFloor {
    conn: rusqlite::Connection,
    /// The statements, built once (rusqlite's cache then finds them by their text).
    lock_sql: String,
    unlock_sql: String,
    owner: String,
    tokens: HashMap<String, i64>,
}

const SQLITE_NOW_MS: &str = "CAST(unixepoch('subsec') * 1000 AS INTEGER)";

impl SqliteFloor {
    fn new(conn: rusqlite::Connection, table: &str, owner: String) -> Self {
        let t = format!("\"{table}\"");
        Self {
            conn,
            lock_sql: format!(
                "INSERT INTO {t} (lock_key, owner, token, acquired_at_ms, expires_at_ms, ttl_ms)
                 VALUES (?1, ?2, 1, {SQLITE_NOW_MS}, {SQLITE_NOW_MS} + 60000, 60000)
                 ON CONFLICT (lock_key) DO UPDATE SET
                    owner = excluded.owner, token = {t}.token + 1,
                    acquired_at_ms = excluded.acquired_at_ms, expires_at_ms = excluded.expires_at_ms,
                    ttl_ms = excluded.ttl_ms
                 WHERE {t}.owner IS NULL OR {t}.expires_at_ms <= excluded.acquired_at_ms
                 RETURNING token"
            ),
            unlock_sql: format!(
                "UPDATE {t} SET owner = NULL, acquired_at_ms = NULL, expires_at_ms = NULL, \
                 ttl_ms = NULL WHERE lock_key = ?1 AND owner = ?2 AND token = ?3"
            ),
            owner,
            tokens: HashMap::new(),
        }
    }
}

#[async_trait]
impl Floor for SqliteFloor {
    async fn lock(&mut self, key: &str) -> Result<bool> {
        use rusqlite::OptionalExtension;
        let token: Option<i64> = self
            .conn
            .prepare_cached(&self.lock_sql)?
            .query_row(rusqlite::params![key, self.owner], |r| r.get(0))
            .optional()?;
        Ok(match token {
            Some(token) => {
                self.tokens.insert(key.to_owned(), token);
                true
            }
            None => false,
        })
    }

    async fn unlock(&mut self, key: &str) -> Result<()> {
        let token = self.tokens.remove(key).ok_or("unlock without lock")?;
        self.conn
            .prepare_cached(&self.unlock_sql)?
            .execute(rusqlite::params![key, self.owner, token])?;
        Ok(())
    }
}

struct PgAdvisoryFloor {
    client: tokio_postgres::Client,
    lock: tokio_postgres::Statement,
    unlock: tokio_postgres::Statement,
    prefix: String,
}

impl PgAdvisoryFloor {
    fn id(&self, key: &str) -> i64 {
        leaselock_postgres::advisory_key(&self.prefix, key)
    }
}

#[async_trait]
impl Floor for PgAdvisoryFloor {
    async fn lock(&mut self, key: &str) -> Result<bool> {
        let row = self.client.query_one(&self.lock, &[&self.id(key)]).await?;
        Ok(row.get(0))
    }

    async fn unlock(&mut self, key: &str) -> Result<()> {
        let row = self
            .client
            .query_one(&self.unlock, &[&self.id(key)])
            .await?;
        if !row.get::<_, bool>(0) {
            return Err("pg_advisory_unlock found no lock".into());
        }
        Ok(())
    }
}

struct PgTableFloor {
    client: tokio_postgres::Client,
    lock: tokio_postgres::Statement,
    unlock: tokio_postgres::Statement,
    owner: String,
    tokens: HashMap<String, i64>,
}

#[async_trait]
impl Floor for PgTableFloor {
    async fn lock(&mut self, key: &str) -> Result<bool> {
        let row = self
            .client
            .query_opt(&self.lock, &[&key, &self.owner])
            .await?;
        Ok(match row {
            Some(row) => {
                self.tokens.insert(key.to_owned(), row.get(0));
                true
            }
            None => false,
        })
    }

    async fn unlock(&mut self, key: &str) -> Result<()> {
        let token = self.tokens.remove(key).ok_or("unlock without lock")?;
        self.client
            .execute(&self.unlock, &[&key, &self.owner, &token])
            .await?;
        Ok(())
    }
}

struct MysqlGetLockFloor {
    conn: mysql_async::Conn,
    prefix: String,
}

impl MysqlGetLockFloor {
    fn name(&self, key: &str) -> String {
        let name = format!("{}:{key}", self.prefix);
        // GET_LOCK names are at most 64 characters on MySQL.
        name.chars()
            .rev()
            .take(64)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect()
    }
}

#[async_trait]
impl Floor for MysqlGetLockFloor {
    async fn lock(&mut self, key: &str) -> Result<bool> {
        let got: Option<Option<i64>> = self
            .conn
            .exec_first("SELECT GET_LOCK(?, 0)", (self.name(key),))
            .await?;
        Ok(got.flatten() == Some(1))
    }

    async fn unlock(&mut self, key: &str) -> Result<()> {
        let released: Option<Option<i64>> = self
            .conn
            .exec_first("SELECT RELEASE_LOCK(?)", (self.name(key),))
            .await?;
        if released.flatten() != Some(1) {
            return Err("RELEASE_LOCK did not release".into());
        }
        Ok(())
    }
}

/// The MySQL table backend's own acquiring statement, with a 60 s lease.
fn mysql_table_acquire(table: &str) -> String {
    let now = "UTC_TIMESTAMP(6)";
    let free = format!("(expires_at IS NULL OR expires_at <= {now})");
    format!(
        "INSERT INTO `{table}` (lock_key, token, owner, acquired_at, expires_at) \
         VALUES (?, 1, ?, {now}, {now} + INTERVAL 60000000 MICROSECOND) \
         ON DUPLICATE KEY UPDATE \
         token = IF({free}, LAST_INSERT_ID(token + 1), token), \
         owner = IF({free}, ?, owner), \
         acquired_at = IF({free}, {now}, acquired_at), \
         expires_at = IF({free}, {now} + INTERVAL 60000000 MICROSECOND, expires_at)"
    )
}

struct MysqlTableFloor {
    conn: mysql_async::Conn,
    owner: String,
    tokens: HashMap<String, u64>,
    lock_sql: String,
    unlock_sql: String,
}

#[async_trait]
impl Floor for MysqlTableFloor {
    async fn lock(&mut self, key: &str) -> Result<bool> {
        self.conn
            .exec_drop(&self.lock_sql, (key, &self.owner, &self.owner))
            .await?;
        let token = match (self.conn.affected_rows(), self.conn.last_insert_id()) {
            (1, None) => 1,
            (2, Some(token)) => token,
            _ => return Ok(false),
        };
        self.tokens.insert(key.to_owned(), token);
        Ok(true)
    }

    async fn unlock(&mut self, key: &str) -> Result<()> {
        let token = self.tokens.remove(key).ok_or("unlock without lock")?;
        self.conn
            .exec_drop(&self.unlock_sql, (key, &self.owner, token))
            .await?;
        Ok(())
    }
}

struct MongoFloor {
    collection: mongodb::Collection<Document>,
    owner: String,
    tokens: HashMap<String, i64>,
}

const MONGO_DUPLICATE_KEY: i32 = 11000;

fn mongo_code(error: &mongodb::error::Error) -> Option<i32> {
    use mongodb::error::{ErrorKind, WriteFailure};
    match &*error.kind {
        ErrorKind::Command(e) => Some(e.code),
        ErrorKind::Write(WriteFailure::WriteError(e)) => Some(e.code),
        _ => None,
    }
}

#[async_trait]
impl Floor for MongoFloor {
    async fn lock(&mut self, key: &str) -> Result<bool> {
        let filter = doc! {
            "_id": key,
            "$or": [ { "owner": null }, { "$expr": { "$lte": ["$expires_at", "$$NOW"] } } ],
        };
        let update = vec![doc! { "$set": {
            "owner": &self.owner,
            "token": { "$add": [{ "$ifNull": ["$token", 0_i64] }, 1_i64] },
            "acquired_at": "$$NOW",
            "expires_at": { "$dateAdd": { "startDate": "$$NOW", "unit": "millisecond", "amount": 60_000_i64 } },
            "ttl_ms": 60_000_i64,
        } }];
        let result = self
            .collection
            .find_one_and_update(filter, update)
            .upsert(true)
            .return_document(mongodb::options::ReturnDocument::After)
            .await;
        match result {
            Ok(Some(doc)) => {
                let token = match doc.get("token") {
                    Some(mongodb::bson::Bson::Int64(t)) => *t,
                    Some(mongodb::bson::Bson::Int32(t)) => i64::from(*t),
                    other => return Err(format!("token is {other:?}").into()),
                };
                self.tokens.insert(key.to_owned(), token);
                Ok(true)
            }
            Ok(None) => Err("findAndModify upsert returned no document".into()),
            Err(e) if mongo_code(&e) == Some(MONGO_DUPLICATE_KEY) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    async fn unlock(&mut self, key: &str) -> Result<()> {
        let token = self.tokens.remove(key).ok_or("unlock without lock")?;
        self.collection
            .update_one(
                doc! { "_id": key, "owner": &self.owner, "token": token },
                doc! { "$unset": { "owner": "", "acquired_at": "", "expires_at": "", "ttl_ms": "" } },
            )
            .await?;
        Ok(())
    }
}

struct DynamoFloor {
    client: aws_sdk_dynamodb::Client,
    table: String,
    owner: String,
    tokens: HashMap<String, String>,
}

#[async_trait]
impl Floor for DynamoFloor {
    async fn lock(&mut self, key: &str) -> Result<bool> {
        let outcome = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("key", AttributeValue::S(key.to_owned()))
            .update_expression("SET #o = :owner, #t = if_not_exists(#t, :zero) + :one")
            .condition_expression("attribute_not_exists(#o)")
            .expression_attribute_names("#o", "owner")
            .expression_attribute_names("#t", "token")
            .expression_attribute_values(":owner", AttributeValue::S(self.owner.clone()))
            .expression_attribute_values(":zero", AttributeValue::N("0".into()))
            .expression_attribute_values(":one", AttributeValue::N("1".into()))
            .return_values(ReturnValue::UpdatedNew)
            .send()
            .await;
        match outcome {
            Ok(output) => {
                let token = output
                    .attributes()
                    .and_then(|a| a.get("token"))
                    .and_then(|v| v.as_n().ok())
                    .ok_or("UpdateItem returned no token")?
                    .clone();
                self.tokens.insert(key.to_owned(), token);
                Ok(true)
            }
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_conditional_check_failed_exception()) =>
            {
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn unlock(&mut self, key: &str) -> Result<()> {
        let token = self.tokens.remove(key).ok_or("unlock without lock")?;
        self.client
            .update_item()
            .table_name(&self.table)
            .key("key", AttributeValue::S(key.to_owned()))
            .update_expression("REMOVE #o")
            .condition_expression("#o = :owner AND #t = :token")
            .expression_attribute_names("#o", "owner")
            .expression_attribute_names("#t", "token")
            .expression_attribute_values(":owner", AttributeValue::S(self.owner.clone()))
            .expression_attribute_values(":token", AttributeValue::N(token))
            .send()
            .await?;
        Ok(())
    }
}
