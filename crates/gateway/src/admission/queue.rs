//! The bounded queue in front of each model's workers. Up to
//! `max_outstanding` requests per model go through at once from one gateway;
//! more wait, by priority lane (high, normal, low), and within a lane in
//! turn across tenants, so one tenant's burst cannot starve another's
//! requests. The queue is bounded in size (`max_queued`) and in time (the
//! request's deadline and `max_wait`).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::auth::Priority;
use crate::metrics;

/// Why a request could not get through the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum QueueError {
    /// The model's queue is full.
    Full,
    /// The request waited as long as it may.
    Timeout,
}

/// The queues of every model this gateway forwards to.
#[derive(Debug)]
pub(crate) struct Queues {
    max_outstanding: usize,
    max_queued: usize,
    max_wait: Duration,
    models: Mutex<HashMap<String, ModelQueue>>,
    next_id: std::sync::atomic::AtomicU64,
}

#[derive(Debug, Default)]
struct ModelQueue {
    outstanding: usize,
    queued: usize,
    lanes: [Lane; 3],
}

/// One priority lane: tenants in turn, each with its waiters in order.
#[derive(Debug, Default)]
struct Lane {
    turn: VecDeque<String>,
    waiting: HashMap<String, VecDeque<Waiter>>,
}

#[derive(Debug)]
struct Waiter {
    id: u64,
    wake: oneshot::Sender<()>,
}

/// A request's place among its model's outstanding requests; dropping it
/// lets the next waiter in.
#[derive(Debug)]
pub(crate) struct Slot {
    queues: Arc<Queues>,
    model: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.queues.release(&self.model);
    }
}

impl Queues {
    /// `max_outstanding` 0 turns the queue off: every request goes through.
    pub(crate) fn new(max_outstanding: usize, max_queued: usize, max_wait: Duration) -> Self {
        Queues {
            max_outstanding,
            max_queued,
            max_wait,
            models: Mutex::new(HashMap::new()),
            next_id: Default::default(),
        }
    }

    /// Waits for a slot for `model` (a bounded label: a served model or
    /// `unknown`) until `deadline` at the latest.
    pub(crate) async fn acquire(
        self: &Arc<Self>,
        model: &str,
        tenant: &str,
        priority: Priority,
        deadline: Instant,
    ) -> Result<Option<Slot>, QueueError> {
        if self.max_outstanding == 0 {
            return Ok(None);
        }
        let slot = || Slot {
            queues: self.clone(),
            model: model.to_string(),
        };
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (wake, woken) = oneshot::channel();
        {
            let mut models = self.models.lock().unwrap_or_else(|e| e.into_inner());
            let queue = models.entry(model.to_string()).or_default();
            if queue.outstanding < self.max_outstanding {
                queue.outstanding += 1;
                return Ok(Some(slot()));
            }
            if queue.queued >= self.max_queued {
                return Err(QueueError::Full);
            }
            let lane = &mut queue.lanes[priority.lane()];
            let waiters = lane.waiting.entry(tenant.to_string()).or_default();
            if waiters.is_empty() {
                lane.turn.push_back(tenant.to_string());
            }
            waiters.push_back(Waiter { id, wake });
            queue.queued += 1;
            metrics::queue_depth(model, queue.queued);
        }
        let started = Instant::now();
        let until = deadline.min(started + self.max_wait);
        let woken = tokio::time::timeout_at(until.into(), woken).await;
        metrics::queue_wait(model, started.elapsed());
        match woken {
            Ok(Ok(())) => Ok(Some(slot())),
            // The sender went away without waking: only when the queue is
            // gone, which cannot happen while `self` is held; treat it as a
            // timeout rather than panic.
            Ok(Err(_)) => Err(QueueError::Timeout),
            Err(_) => {
                if !self.forget(model, tenant, priority, id) {
                    // Woken just as the wait ended: the slot is ours; give it on.
                    self.release(model);
                }
                Err(QueueError::Timeout)
            }
        }
    }

    /// Removes a waiter that gave up; false when it was already woken.
    fn forget(&self, model: &str, tenant: &str, priority: Priority, id: u64) -> bool {
        let mut models = self.models.lock().unwrap_or_else(|e| e.into_inner());
        let Some(queue) = models.get_mut(model) else {
            return false;
        };
        let lane = &mut queue.lanes[priority.lane()];
        let Some(waiters) = lane.waiting.get_mut(tenant) else {
            return false;
        };
        let Some(position) = waiters.iter().position(|w| w.id == id) else {
            return false;
        };
        waiters.remove(position);
        if waiters.is_empty() {
            lane.waiting.remove(tenant);
            lane.turn.retain(|t| t != tenant);
        }
        queue.queued -= 1;
        metrics::queue_depth(model, queue.queued);
        true
    }

    /// Hands a finished request's slot to the next waiter, or frees it.
    fn release(&self, model: &str) {
        let mut models = self.models.lock().unwrap_or_else(|e| e.into_inner());
        let Some(queue) = models.get_mut(model) else {
            return;
        };
        while let Some(waiter) = queue.next() {
            queue.queued -= 1;
            metrics::queue_depth(model, queue.queued);
            if waiter.wake.send(()).is_ok() {
                return;
            }
        }
        queue.outstanding = queue.outstanding.saturating_sub(1);
        if queue.outstanding == 0 && queue.queued == 0 {
            models.remove(model);
        }
    }
}

impl ModelQueue {
    /// The next waiter: the highest lane with any, the tenant whose turn it
    /// is there (who then goes to the back of the turn).
    fn next(&mut self) -> Option<Waiter> {
        for lane in &mut self.lanes {
            while let Some(tenant) = lane.turn.pop_front() {
                let Some(waiters) = lane.waiting.get_mut(&tenant) else {
                    continue;
                };
                let waiter = waiters.pop_front();
                if waiters.is_empty() {
                    lane.waiting.remove(&tenant);
                } else {
                    lane.turn.push_back(tenant);
                }
                if waiter.is_some() {
                    return waiter;
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(60)
    }

    #[tokio::test]
    async fn waiters_go_by_lane_then_in_turn_across_tenants() {
        let queues = Arc::new(Queues::new(1, 16, Duration::from_secs(60)));
        let first = queues
            .acquire("m", "a", Priority::Normal, far())
            .await
            .unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut tasks = Vec::new();
        for (tenant, priority, label) in [
            ("a", Priority::Normal, "a1"),
            ("a", Priority::Normal, "a2"),
            ("b", Priority::Normal, "b1"),
            ("c", Priority::Low, "c1"),
            ("d", Priority::High, "d1"),
        ] {
            let queues = queues.clone();
            let tx = tx.clone();
            tasks.push(tokio::spawn(async move {
                let slot = queues.acquire("m", tenant, priority, far()).await.unwrap();
                tx.send(label).unwrap();
                // Hold the slot a moment so the order is the queue's.
                tokio::time::sleep(Duration::from_millis(5)).await;
                drop(slot);
            }));
            // Let each waiter enqueue before the next.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        drop(first);
        let mut order = Vec::new();
        for _ in 0..5 {
            order.push(rx.recv().await.unwrap());
        }
        assert_eq!(order, ["d1", "a1", "b1", "a2", "c1"]);
        for task in tasks {
            task.await.unwrap();
        }
        assert!(queues.models.lock().unwrap().is_empty(), "all slots freed");
    }

    #[tokio::test]
    async fn the_queue_is_bounded_in_size_and_time() {
        let queues = Arc::new(Queues::new(1, 1, Duration::from_millis(50)));
        let held = queues
            .acquire("m", "a", Priority::Normal, far())
            .await
            .unwrap();
        let waiting = {
            let queues = queues.clone();
            tokio::spawn(async move { queues.acquire("m", "b", Priority::Normal, far()).await })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(
            queues
                .acquire("m", "c", Priority::High, far())
                .await
                .unwrap_err(),
            QueueError::Full
        );
        assert_eq!(waiting.await.unwrap().unwrap_err(), QueueError::Timeout);
        // A waiter that timed out left the queue: the next one may wait.
        let soon = Instant::now() + Duration::from_millis(20);
        assert_eq!(
            queues
                .acquire("m", "c", Priority::Normal, soon)
                .await
                .unwrap_err(),
            QueueError::Timeout
        );
        drop(held);
        assert!(
            queues
                .acquire("m", "c", Priority::Normal, far())
                .await
                .unwrap()
                .is_some()
        );
        let off = Arc::new(Queues::new(0, 0, Duration::ZERO));
        assert!(
            off.acquire("m", "a", Priority::Low, far())
                .await
                .unwrap()
                .is_none()
        );
    }
}
