//! MongoDB-specific tests against a real server named by `LEASELOCK_MONGODB_URL`: races on one
//! key, concurrent storage initialization, what the documents keep, and credentials in errors.

use std::sync::Arc;
use std::time::Duration;

use leaselock::{
    AcquireOutcome, AcquireRequest, Error, Lease, LockBackend, LockKey, LockState, OwnerId,
};
use leaselock_mongodb::{MongoBackend, MongoConfig, EXPIRY_INDEX};
use mongodb::bson::{doc, Document};
use tokio::sync::Barrier;

fn url() -> Option<String> {
    leaselock_conformance::server_url("LEASELOCK_MONGODB_URL")
}

fn fresh(prefix: &str) -> String {
    format!(
        "{prefix}_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..16]
    )
}

fn owner(name: &str) -> OwnerId {
    OwnerId::new(format!("{name}-{}", uuid::Uuid::new_v4().simple())).unwrap()
}

async fn backend(config: MongoConfig) -> MongoBackend {
    MongoBackend::connect(config).await.expect("connect")
}

/// The raw collection, to look at what the backend stored.
async fn raw(url: &str, database: &str, collection: &str) -> mongodb::Collection<Document> {
    let client = mongodb::Client::with_uri_str(url).await.unwrap();
    client.database(database).collection(collection)
}

async fn drop_database(url: &str, database: &str) {
    let client = mongodb::Client::with_uri_str(url).await.unwrap();
    client.database(database).drop().await.unwrap();
}

/// 32 instances (separate clients, like separate processes) race for one key, round after
/// round: exactly one wins each round, every loser is told who won, and tokens strictly increase.
/// The first round races on a key with no document yet (concurrent upserts); some rounds give
/// all 32 the same owner (locks are not reentrant); some let the winner's lease expire instead of
/// releasing it (takeover by the server's clock).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn race_of_32_has_one_winner_per_round() {
    let Some(url) = url() else { return };
    let collection = fresh("ll_race");
    let config = MongoConfig::from_url(&url).unwrap().collection(&collection);
    backend(config.clone()).await.init_storage().await.unwrap();
    let mut instances = Vec::new();
    for _ in 0..32 {
        instances.push(Arc::new(backend(config.clone()).await));
    }
    let key = LockKey::new(format!("race/{}", uuid::Uuid::new_v4())).unwrap();
    let mut last_token = 0;
    for round in 0..8 {
        let shared_owner = owner("same");
        let ttl = if round % 3 == 2 {
            Duration::from_millis(300)
        } else {
            Duration::from_secs(60)
        };
        let barrier = Arc::new(Barrier::new(instances.len()));
        let tasks: Vec<_> = instances
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let (b, barrier) = (Arc::clone(b), Arc::clone(&barrier));
                let who = if round % 2 == 1 {
                    shared_owner.clone()
                } else {
                    owner(&format!("task{i}"))
                };
                let request = AcquireRequest::new(key.clone(), who, ttl).unwrap();
                tokio::spawn(async move {
                    barrier.wait().await;
                    b.try_acquire(&request).await
                })
            })
            .collect();
        let mut winners: Vec<(usize, Lease)> = Vec::new();
        let mut holders = Vec::new();
        for (i, task) in tasks.into_iter().enumerate() {
            match task.await.unwrap().expect("try_acquire") {
                AcquireOutcome::Acquired(lease) => winners.push((i, lease)),
                AcquireOutcome::Held(holder) => holders.push(holder),
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: winners {winners:?}");
        let (index, lease) = winners.pop().unwrap();
        assert!(lease.token.get() > last_token, "round {round}: {lease:?}");
        last_token = lease.token.get();
        assert_eq!(holders.len(), 31);
        for holder in holders {
            let info = holder.expect("a refused attempt learns the holder");
            assert_eq!(info.owner, lease.owner, "round {round}");
            assert_eq!(info.token, lease.token, "round {round}");
        }
        let winner = &instances[index];
        assert!(winner.verify(&lease).await.unwrap());
        if round % 3 == 2 {
            // Left to expire: the next round takes it over.
            tokio::time::sleep(ttl + Duration::from_millis(200)).await;
            assert!(!winner.verify(&lease).await.unwrap());
        } else {
            assert!(winner.release(&lease).await.unwrap());
        }
    }
    drop_collection(&url, &config, &collection).await;
}

async fn drop_collection(url: &str, config: &MongoConfig, collection: &str) {
    raw(url, config.database_name(), collection)
        .await
        .drop()
        .await
        .unwrap();
}

/// 16 instances initialize the same fresh database and collection at once: all succeed, and the
/// storage then works from every instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_init_from_16_tasks() {
    let Some(url) = url() else { return };
    let database = fresh("ll_init");
    let config = MongoConfig::from_url(&url)
        .unwrap()
        .database(&database)
        .collection("locks");
    let mut instances = Vec::new();
    for _ in 0..16 {
        instances.push(Arc::new(backend(config.clone()).await));
    }
    let barrier = Arc::new(Barrier::new(16));
    let tasks: Vec<_> = instances
        .iter()
        .map(|b| {
            let (b, barrier) = (Arc::clone(b), Arc::clone(&barrier));
            tokio::spawn(async move {
                barrier.wait().await;
                b.init_storage().await
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap().expect("every concurrent init succeeds");
    }
    for b in &instances {
        b.check_storage().await.expect("initialized");
    }
    let names = raw(&url, &database, "locks")
        .await
        .list_index_names()
        .await
        .unwrap();
    assert_eq!(
        names.iter().filter(|n| *n == EXPIRY_INDEX).count(),
        1,
        "{names:?}"
    );
    let key = LockKey::new("init/after").unwrap();
    let request = AcquireRequest::new(key.clone(), owner("a"), Duration::from_secs(30)).unwrap();
    let AcquireOutcome::Acquired(lease) = instances[3].try_acquire(&request).await.unwrap() else {
        panic!("a fresh key is free");
    };
    let other = AcquireRequest::new(key, owner("b"), Duration::from_secs(30)).unwrap();
    assert!(matches!(
        instances[12].try_acquire(&other).await.unwrap(),
        AcquireOutcome::Held(Some(_))
    ));
    assert!(instances[7].release(&lease).await.unwrap());
    drop_database(&url, &database).await;
}

/// Before `init_storage`, operations fail with `NotInitialized` and do not create the collection
/// behind the user's back (MongoDB would, on an upsert).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uninitialized_storage_is_not_created_implicitly() {
    let Some(url) = url() else { return };
    let collection = fresh("ll_uninit");
    let config = MongoConfig::from_url(&url).unwrap().collection(&collection);
    let b = backend(config.clone()).await;
    let key = LockKey::new("uninit").unwrap();
    let request = AcquireRequest::new(key.clone(), owner("a"), Duration::from_secs(5)).unwrap();
    for outcome in [
        b.try_acquire(&request).await.map(|_| ()),
        b.status(&key).await.map(|_| ()),
        b.check_storage().await,
    ] {
        match outcome {
            Err(Error::NotInitialized { what, .. }) => {
                assert!(what.contains(&collection), "{what}")
            }
            other => panic!("expected NotInitialized, got {other:?}"),
        }
    }
    let client = mongodb::Client::with_uri_str(&url).await.unwrap();
    let names = client
        .database(config.database_name())
        .list_collection_names()
        .await
        .unwrap();
    assert!(
        !names.contains(&collection),
        "created implicitly: {names:?}"
    );
    b.init_storage().await.unwrap();
    assert!(matches!(
        b.try_acquire(&request).await.unwrap(),
        AcquireOutcome::Acquired(_)
    ));
    drop_collection(&url, &config, &collection).await;
}

/// Release, force release and cleanup clear the holder but keep the key's document and its
/// token counter, so the next acquisition continues the sequence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documents_keep_their_token_counter() {
    let Some(url) = url() else { return };
    let collection = fresh("ll_doc");
    let config = MongoConfig::from_url(&url).unwrap().collection(&collection);
    let b = backend(config.clone()).await;
    b.init_storage().await.unwrap();
    let locks = raw(&url, config.database_name(), &collection).await;
    let key = LockKey::new("kept").unwrap();
    let acquire = |ttl| {
        let request = AcquireRequest::new(key.clone(), owner("a"), ttl).unwrap();
        let b = b.clone();
        async move {
            match b.try_acquire(&request).await.unwrap() {
                AcquireOutcome::Acquired(lease) => lease,
                other => panic!("{other:?}"),
            }
        }
    };
    let stored = || async {
        locks
            .find_one(doc! { "_id": "kept" })
            .await
            .unwrap()
            .expect("the document stays")
    };
    let first = acquire(Duration::from_secs(30)).await;
    assert_eq!(first.token.get(), 1);
    assert!(b.release(&first).await.unwrap());
    let doc = stored().await;
    assert_eq!(doc.get_i64("token").unwrap(), 1);
    assert!(doc.get("owner").is_none(), "{doc}");

    let second = acquire(Duration::from_secs(30)).await;
    assert_eq!(second.token.get(), 2);
    assert!(b.force_release(&key).await.unwrap().is_some());
    assert_eq!(stored().await.get_i64("token").unwrap(), 2);

    let third = acquire(Duration::from_millis(100)).await;
    assert_eq!(third.token.get(), 3);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(matches!(
        b.status(&key).await.unwrap(),
        LockState::Expired(_)
    ));
    assert!(b.release_expired().await.unwrap() >= 1);
    let doc = stored().await;
    assert_eq!(doc.get_i64("token").unwrap(), 3);
    assert!(doc.get("owner").is_none(), "{doc}");
    assert_eq!(acquire(Duration::from_secs(30)).await.token.get(), 4);
    drop_collection(&url, &config, &collection).await;
}

/// Leases carry the server's times: expires_at − acquired_at is the lease duration, and status
/// reports the remaining time by the server's clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_times_come_from_the_server() {
    let Some(url) = url() else { return };
    let b = backend(MongoConfig::from_url(&url).unwrap()).await;
    b.init_storage().await.unwrap();
    let key = LockKey::new(format!("times/{}", uuid::Uuid::new_v4())).unwrap();
    let ttl = Duration::from_secs(40);
    let request = AcquireRequest::new(key.clone(), owner("a"), ttl).unwrap();
    let AcquireOutcome::Acquired(lease) = b.try_acquire(&request).await.unwrap() else {
        panic!("free");
    };
    let span = lease
        .expires_at
        .unwrap()
        .duration_since(lease.acquired_at)
        .unwrap();
    assert_eq!(span, ttl);
    let LockState::Held(info) = b.status(&key).await.unwrap() else {
        panic!("held");
    };
    assert_eq!(info.acquired_at, Some(lease.acquired_at));
    assert_eq!(info.expires_at, lease.expires_at);
    let remaining = info.remaining.unwrap();
    assert!(
        remaining <= ttl && remaining > ttl - Duration::from_secs(10),
        "{remaining:?}"
    );
    let refreshed = b.refresh(&lease).await.unwrap();
    assert_eq!(refreshed.acquired_at, lease.acquired_at);
    assert!(refreshed.expires_at >= lease.expires_at);
    assert!(b.release(&refreshed).await.unwrap());
}

/// An unreachable server is `NotAccessible` (retryable), and neither the error nor the backend's
/// Debug output shows the password. Needs no server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_server_hides_the_password() {
    let url =
        "mongodb://app:hunter2%21@127.0.0.1:1/db?serverSelectionTimeoutMS=300&connectTimeoutMS=300";
    let b = leaselock_mongodb::from_url(url)
        .await
        .expect("no contact yet");
    assert!(!format!("{b:?}").contains("hunter2"));
    let err = b.check_storage().await.unwrap_err();
    assert!(matches!(err, Error::NotAccessible { .. }), "{err:?}");
    assert!(err.is_retryable());
    let mut text = format!("{err} {err:?}");
    let mut source = std::error::Error::source(&err);
    while let Some(s) = source {
        text.push_str(&format!(" {s} {s:?}"));
        source = s.source();
    }
    assert!(!text.contains("hunter2"), "{text}");
    // Init does not retry what a race cannot cause: it fails after one server selection or two.
    let start = std::time::Instant::now();
    assert!(matches!(
        b.init_storage().await,
        Err(Error::NotAccessible { .. })
    ));
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );

    for bad in [
        "mongodb://app:hunter2@h:notaport/db",
        "mongodb://app:hunter2@h/db?w=bogus&wtimeoutMS=x",
        "http://app:hunter2@h/db",
    ] {
        let err = leaselock_mongodb::from_url(bad).await.unwrap_err();
        assert!(
            matches!(err, Error::InvalidInput { field: "url", .. }),
            "{bad}: {err:?}"
        );
        assert!(!format!("{err} {err:?}").contains("hunter2"), "{err:?}");
    }
}

/// With linearizable reads, verify, status and list work the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linearizable_reads() {
    let Some(url) = url() else { return };
    let config = MongoConfig::from_url(&url)
        .unwrap()
        .read_consistency(leaselock_mongodb::ReadConsistency::Linearizable);
    let b = backend(config).await;
    b.init_storage().await.unwrap();
    let key = LockKey::new(format!("linearizable/{}", uuid::Uuid::new_v4())).unwrap();
    let request = AcquireRequest::new(key.clone(), owner("a"), Duration::from_secs(30)).unwrap();
    let AcquireOutcome::Acquired(lease) = b.try_acquire(&request).await.unwrap() else {
        panic!("free");
    };
    assert!(b.verify(&lease).await.unwrap());
    assert!(matches!(b.status(&key).await.unwrap(), LockState::Held(_)));
    assert!(b.list().await.unwrap().iter().any(|i| i.key == key));
    assert!(b.release(&lease).await.unwrap());
    assert!(!b.verify(&lease).await.unwrap());
    assert_eq!(b.status(&key).await.unwrap(), LockState::Free);
}
