//! A bounded hand-off from async tasks to dedicated threads.
//!
//! RocksDB calls block, so they run on threads of their own (DESIGN.md §6).
//! Those threads read a crossbeam channel; async senders must never block a
//! tokio worker on it, so each queued item carries a semaphore permit that
//! the async side awaits before sending. The permit is released when the
//! thread takes the item off the queue, which keeps the queue's length at
//! most the number of permits and makes `try_send` below infallible for lack
//! of room. A second semaphore bounds the bytes queued the same way, so
//! that a queue of large items stays within its memory budget too.

use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The async end of the queue.
#[derive(Debug)]
pub struct AsyncSender<T> {
    tx: Sender<Queued<T>>,
    permits: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
    max_bytes: u32,
}

impl<T> Clone for AsyncSender<T> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
            permits: self.permits.clone(),
            bytes: self.bytes.clone(),
            max_bytes: self.max_bytes,
        }
    }
}

/// An item on the queue; dropping it frees its place and its bytes.
#[derive(Debug)]
pub struct Queued<T> {
    /// The item.
    pub item: T,
    _permit: OwnedSemaphorePermit,
    _bytes: Option<OwnedSemaphorePermit>,
}

/// The queue's consumer is gone, or the queue was closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closed;

/// Why `try_send` did not queue an item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrySendError {
    /// No room now.
    Full,
    /// The queue is closed.
    Closed,
}

/// A queue holding at most `capacity` items.
pub fn bounded<T>(capacity: usize) -> (AsyncSender<T>, Receiver<Queued<T>>) {
    bounded_with_bytes(capacity, u32::MAX)
}

/// A queue holding at most `capacity` items and, of items sent with
/// [`AsyncSender::send_sized`], at most `max_bytes` bytes.
pub fn bounded_with_bytes<T>(
    capacity: usize,
    max_bytes: u32,
) -> (AsyncSender<T>, Receiver<Queued<T>>) {
    // The crossbeam channel is one larger than the permits so that a send
    // holding a permit always finds room.
    let (tx, rx) = crossbeam_channel::bounded(capacity + 1);
    let max_bytes = max_bytes.max(1);
    (
        AsyncSender {
            tx,
            permits: Arc::new(Semaphore::new(capacity)),
            bytes: Arc::new(Semaphore::new(max_bytes as usize)),
            max_bytes,
        },
        rx,
    )
}

impl<T> AsyncSender<T> {
    /// Queues `item`, waiting (asynchronously) while the queue is full.
    pub async fn send(&self, item: T) -> Result<(), Closed> {
        self.send_sized(item, 0).await
    }

    /// Queues `item`, which holds `bytes` bytes, waiting while the queue
    /// holds as many items or bytes as it may. An item larger than the
    /// whole budget waits for an empty queue.
    pub async fn send_sized(&self, item: T, bytes: usize) -> Result<(), Closed> {
        let cost = u32::try_from(bytes).unwrap_or(u32::MAX).min(self.max_bytes);
        let bytes = self
            .bytes
            .clone()
            .acquire_many_owned(cost)
            .await
            .map_err(|_| Closed)?;
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Closed)?;
        self.put(item, permit, Some(bytes))
    }

    /// Queues `item` only if there is room now.
    pub fn try_send(&self, item: T) -> Result<(), TrySendError> {
        let permit = self
            .permits
            .clone()
            .try_acquire_owned()
            .map_err(|e| match e {
                tokio::sync::TryAcquireError::NoPermits => TrySendError::Full,
                tokio::sync::TryAcquireError::Closed => TrySendError::Closed,
            })?;
        self.put(item, permit, None)
            .map_err(|Closed| TrySendError::Closed)
    }

    /// Refuses all further sends.
    pub fn close(&self) {
        self.permits.close();
        self.bytes.close();
    }

    fn put(
        &self,
        item: T,
        permit: OwnedSemaphorePermit,
        bytes: Option<OwnedSemaphorePermit>,
    ) -> Result<(), Closed> {
        match self.tx.try_send(Queued {
            item,
            _permit: permit,
            _bytes: bytes,
        }) {
            Ok(()) => Ok(()),
            Err(_) => Err(Closed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn holds_at_most_capacity_and_frees_places_on_take() {
        let (tx, rx) = bounded::<u32>(2);
        tx.send(1).await.expect("room");
        tx.send(2).await.expect("room");
        assert_eq!(tx.try_send(3), Err(TrySendError::Full));
        let first = rx.recv().expect("item");
        assert_eq!(first.item, 1);
        drop(first);
        tx.try_send(3).expect("a place was freed");
        tx.close();
        assert_eq!(tx.send(4).await, Err(Closed));
        assert_eq!(tx.try_send(4), Err(TrySendError::Closed));
        drop(rx);
    }

    #[tokio::test]
    async fn holds_at_most_its_bytes_however_few_the_items() {
        let (tx, rx) = bounded_with_bytes::<u32>(100, 1000);
        tx.send_sized(1, 600).await.expect("room");
        // Room for 99 more items, not for 600 more bytes.
        let blocked =
            tokio::time::timeout(std::time::Duration::from_millis(50), tx.send_sized(2, 600)).await;
        assert!(blocked.is_err(), "the byte budget was exceeded");
        drop(rx.recv().expect("item"));
        tx.send_sized(2, 600).await.expect("the bytes were freed");
        // Larger than the whole budget: waits for an empty queue, then goes.
        drop(rx.recv().expect("item"));
        tx.send_sized(3, 5000).await.expect("alone in the queue");
        assert_eq!(rx.recv().expect("item").item, 3);
    }
}
