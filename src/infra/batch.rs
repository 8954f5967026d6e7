//! Micro-batching of concurrent writes: callers submit one item each and wait for its result;
//! a task takes everything waiting (up to a limit), handles it in one go and answers each caller.
//! Used so that one Postgres commit (one WAL flush) serves many events. Nothing is acknowledged
//! before the batch holding it is done, so durability is that of one write per item.

use std::future::Future;
use std::sync::Arc;

use futures::future::BoxFuture;
use tokio::sync::{mpsc, oneshot, OnceCell};

type Handler<T, R> = Arc<dyn Fn(Vec<T>) -> BoxFuture<'static, Vec<R>> + Send + Sync>;

pub struct Batcher<T, R> {
    max_batch: usize,
    handler: Handler<T, R>,
    sender: OnceCell<mpsc::Sender<(T, oneshot::Sender<R>)>>,
}

impl<T: Send + 'static, R: Send + 'static> Batcher<T, R> {
    /// `handler` must return one result per item, in order.
    pub fn new<F, Fut>(max_batch: usize, handler: F) -> Self
    where
        F: Fn(Vec<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<R>> + Send + 'static,
    {
        let handler: Handler<T, R> = Arc::new(move |batch| Box::pin(handler(batch)));
        Batcher { max_batch: max_batch.max(1), handler, sender: OnceCell::new() }
    }

    /// The item's result, or why there is none ([`Unanswered`]).
    pub async fn submit(&self, item: T) -> Result<R, Unanswered<T>> {
        let sender = self
            .sender
            .get_or_init(|| async {
                // Spawned on first use, inside the runtime that uses it.
                let (sender, receiver) = mpsc::channel(self.max_batch * 4);
                tokio::spawn(run(self.max_batch, self.handler.clone(), receiver));
                sender
            })
            .await;
        let (reply, answer) = oneshot::channel();
        if let Err(mpsc::error::SendError((item, _))) = sender.send((item, reply)).await {
            return Err(Unanswered::NotTaken(item));
        }
        answer.await.map_err(|_| Unanswered::Lost)
    }
}

/// Why [`Batcher::submit`] has no result for an item. The item travels by value (no copy is
/// kept for this rare case), and comes back when it was never taken.
#[derive(Debug, PartialEq)]
pub enum Unanswered<T> {
    /// The batching task is gone (the runtime is shutting down) and never took the item: the
    /// caller handles it on its own.
    NotTaken(T),
    /// A batch took the item but gave no result for it (its task ended, or the handler returned
    /// too few results): whether it was handled is unknown.
    Lost,
}

/// The error a write reports for [`Unanswered::Lost`]: like a connection lost mid-write, a
/// transient failure (the caller retries the event).
pub fn lost_in_batch() -> sqlx::Error {
    sqlx::Error::Io(std::io::Error::other("a batched write ended without an answer"))
}

async fn run<T, R>(max_batch: usize, handler: Handler<T, R>, mut receiver: mpsc::Receiver<(T, oneshot::Sender<R>)>) {
    let mut waiting = Vec::with_capacity(max_batch);
    // Ends when the batcher is dropped and everything queued was answered.
    while receiver.recv_many(&mut waiting, max_batch).await > 0 {
        let (items, replies): (Vec<T>, Vec<oneshot::Sender<R>>) = std::mem::take(&mut waiting).into_iter().unzip();
        let results = handler(items).await;
        for (reply, result) in replies.into_iter().zip(results) {
            let _ = reply.send(result);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn answers_each_item_and_batches_concurrent_ones() {
        let sizes = Arc::new(std::sync::Mutex::new(Vec::new()));
        let recorded = sizes.clone();
        let batcher = Batcher::new(8, move |batch: Vec<u32>| {
            recorded.lock().unwrap().push(batch.len());
            async move { batch.into_iter().map(|item| item * 2).collect() }
        });
        let results = futures::future::join_all((0..20).map(|item| batcher.submit(item))).await;
        assert_eq!(results, (0..20).map(|item| Ok(item * 2)).collect::<Vec<_>>());
        let sizes = sizes.lock().unwrap();
        assert_eq!(sizes.iter().sum::<usize>(), 20);
        assert!(sizes.iter().all(|size| *size <= 8));
        assert!(sizes.len() < 20, "concurrent items share batches: {sizes:?}");
    }

    #[tokio::test]
    async fn an_item_its_batch_does_not_answer_is_lost() {
        let batcher = Batcher::new(8, |_batch: Vec<u32>| async { Vec::<u32>::new() });
        assert_eq!(batcher.submit(1).await, Err(Unanswered::Lost));
        assert!(matches!(lost_in_batch(), sqlx::Error::Io(_)), "reported as a lost connection: transient");
    }
}
