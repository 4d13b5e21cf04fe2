//! Batched refreshes: the leases of one locker that fall due together go to the backend in one
//! [`LockBackend::refresh_many`] call.
//!
//! Each guard's daemon still decides when its lease is due and how long it trusts it; only the
//! call to the backend is shared. A daemon hands its lease to the locker's collector and waits for
//! its own answer; the collector gathers what arrives within the batch window (or until a batch is
//! full) and sends each batch in a task of its own, so a slow batch never holds up the next one.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::backend::LockBackend;
use crate::error::{Error, Result};
use crate::types::Lease;

/// One lease waiting for its refresh, and where its answer goes.
struct Request {
    lease: Lease,
    reply: oneshot::Sender<Result<Lease>>,
}

/// The batching front of one locker's backend, shared by the guards it hands out.
pub(crate) struct Refresher {
    backend: Arc<dyn LockBackend>,
    window: Duration,
    max_batch: usize,
    /// The running collector's inbox. Started at the first refresh (a locker can be built outside
    /// a runtime), and again if its runtime went away.
    inbox: Mutex<Option<mpsc::UnboundedSender<Request>>>,
}

impl fmt::Debug for Refresher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Refresher")
            .field("window", &self.window)
            .field("max_batch", &self.max_batch)
            .finish_non_exhaustive()
    }
}

impl Refresher {
    /// A refresher over `backend` gathering for `window`, at most `max_batch` (above 1) a call.
    pub(crate) fn new(backend: Arc<dyn LockBackend>, window: Duration, max_batch: usize) -> Self {
        Self {
            backend,
            window,
            max_batch: max_batch.max(1),
            inbox: Mutex::new(None),
        }
    }

    /// Refreshes `lease` in the next batch. Must be called inside a tokio runtime.
    pub(crate) async fn refresh(&self, lease: Lease) -> Result<Lease> {
        let (reply, answer) = oneshot::channel();
        let mut request = Request { lease, reply };
        // A send fails only when the collector's runtime has shut down: start another, once.
        for _ in 0..2 {
            match self.inbox().send(request) {
                Ok(()) => break,
                Err(mpsc::error::SendError(back)) => request = back,
            }
        }
        answer.await.unwrap_or_else(|_| {
            Err(Error::transient(
                self.backend.capabilities().backend,
                "the batched refresh was dropped before it answered",
            ))
        })
    }

    fn inbox(&self) -> mpsc::UnboundedSender<Request> {
        let mut inbox = self.inbox.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = inbox.as_ref().filter(|tx| !tx.is_closed()) {
            return tx.clone();
        }
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(collect(
            Arc::clone(&self.backend),
            self.window,
            self.max_batch,
            rx,
        ));
        *inbox = Some(tx.clone());
        tx
    }
}

/// Gathers requests into batches until every sender (the locker and its guards) is gone.
async fn collect(
    backend: Arc<dyn LockBackend>,
    window: Duration,
    max_batch: usize,
    mut inbox: mpsc::UnboundedReceiver<Request>,
) {
    let mut batch = Vec::with_capacity(max_batch);
    loop {
        if inbox.recv_many(&mut batch, max_batch).await == 0 {
            return;
        }
        let until = Instant::now() + window;
        while batch.len() < max_batch {
            let room = max_batch - batch.len();
            tokio::select! {
                received = inbox.recv_many(&mut batch, room) => if received == 0 { break },
                () = tokio::time::sleep_until(until) => break,
            }
        }
        // A guard released meanwhile no longer waits for its answer: leave its lease alone.
        batch.retain(|request| !request.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        let full = std::mem::replace(&mut batch, Vec::with_capacity(max_batch));
        tokio::spawn(send(Arc::clone(&backend), full));
    }
}

/// One `refresh_many` call, its answers handed back lease by lease.
async fn send(backend: Arc<dyn LockBackend>, batch: Vec<Request>) {
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
