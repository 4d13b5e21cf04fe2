//! Batched refreshes: the leases of one locker that fall due together go to the backend in one
//! [`LockBackend::refresh_many`] call.
//!
//! Each guard's daemon still decides when its lease is due and how long it trusts it; only the
//! call to the backend is shared. A daemon puts its lease in the locker's queue and waits for its
//! own answer. The first lease into an empty queue starts one flush task, which sleeps for the
//! batch window and then sends everything queued in one call; a queue that fills a batch
//! (`max_batch` leases) before the window ends is sent at once, so no call carries more. Queuing wakes no task, so
//! a batch costs one timer and one task however many leases it carries.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::oneshot;

use crate::backend::LockBackend;
use crate::error::{Error, Result};
use crate::types::Lease;

/// One lease waiting for its refresh, and where its answer goes.
struct Request {
    lease: Lease,
    reply: oneshot::Sender<Result<Lease>>,
}

/// What waits for the next flush.
#[derive(Default)]
struct Queue {
    requests: Vec<Request>,
    /// A flush task is sleeping out the window and will send what is queued.
    flushing: bool,
}

/// The batching front of one locker's backend, shared by the guards it hands out.
pub(crate) struct Refresher {
    backend: Arc<dyn LockBackend>,
    window: Duration,
    max_batch: usize,
    queue: Arc<Mutex<Queue>>,
}

impl fmt::Debug for Refresher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Refresher")
            .field("window", &self.window)
            .field("max_batch", &self.max_batch)
            .finish_non_exhaustive()
    }
}

fn lock(queue: &Mutex<Queue>) -> MutexGuard<'_, Queue> {
    queue.lock().unwrap_or_else(|p| p.into_inner())
}

impl Refresher {
    /// A refresher over `backend` gathering for `window`, at most `max_batch` (above 1) a call.
    pub(crate) fn new(backend: Arc<dyn LockBackend>, window: Duration, max_batch: usize) -> Self {
        Self {
            backend,
            window,
            max_batch: max_batch.max(1),
            queue: Arc::default(),
        }
    }

    /// How long the first lease due waits for others.
    pub(crate) fn window(&self) -> Duration {
        self.window
    }

    /// Refreshes `lease` in the next batch. Must be called inside a tokio runtime.
    pub(crate) async fn refresh(&self, lease: Lease) -> Result<Lease> {
        let (reply, answer) = oneshot::channel();
        let (full, start_flush) = {
            let mut queue = lock(&self.queue);
            queue.requests.push(Request { lease, reply });
            if queue.requests.len() >= self.max_batch {
                (Some(std::mem::take(&mut queue.requests)), false)
            } else {
                let start = !queue.flushing;
                queue.flushing = true;
                (None, start)
            }
        };
        if let Some(batch) = full {
            tokio::spawn(send(Arc::clone(&self.backend), batch));
        }
        if start_flush {
            tokio::spawn(flush(
                Arc::clone(&self.backend),
                Arc::clone(&self.queue),
                self.window,
            ));
        }
        answer.await.unwrap_or_else(|_| {
            Err(Error::transient(
                self.backend.capabilities().backend,
                "the batched refresh was dropped before it answered",
            ))
        })
    }
}

/// Resets the queue when a flush task ends without flushing (its runtime shut down): the waiting
/// leases get an error rather than a wait for a flush that never comes, and the next lease
/// starts another flush task.
struct Unflushed<'a>(Option<&'a Mutex<Queue>>);

impl Drop for Unflushed<'_> {
    fn drop(&mut self) {
        if let Some(queue) = self.0.take() {
            let mut queue = lock(queue);
            queue.flushing = false;
            queue.requests.clear();
        }
    }
}

/// Sleeps out the window, then sends every queued lease in one batch.
async fn flush(backend: Arc<dyn LockBackend>, queue: Arc<Mutex<Queue>>, window: Duration) {
    let mut unflushed = Unflushed(Some(&queue));
    tokio::time::sleep(window).await;
    let requests = {
        let mut queue = lock(&queue);
        queue.flushing = false;
        std::mem::take(&mut queue.requests)
    };
    unflushed.0 = None;
    // Never more than a batch: `refresh` sends the queue itself when it fills one.
    send(backend, requests).await;
}

/// One `refresh_many` call, its answers handed back lease by lease.
async fn send(backend: Arc<dyn LockBackend>, mut batch: Vec<Request>) {
    // A guard released meanwhile no longer waits for its answer: leave its lease alone.
    batch.retain(|request| !request.reply.is_closed());
    if batch.is_empty() {
        return;
    }
    let leases: Vec<Lease> = batch.iter().map(|r| r.lease.clone()).collect();
    let results = backend.refresh_many(&leases).await;
    tracing::trace!(leases = leases.len(), "batched refresh done");
    if results.len() != leases.len() {
        let name = backend.capabilities().backend;
        let message = format!(
            "refresh_many returned {} results for {} leases",
            results.len(),
            leases.len()
        );
        tracing::error!(backend = name, "{message}");
        for request in batch {
            let _ = request
                .reply
                .send(Err(Error::permanent(name, message.clone())));
        }
        return;
    }
    for (request, result) in batch.into_iter().zip(results) {
        let _ = request.reply.send(result);
    }
}
