//! The dynamic batcher of one model version.
//!
//! Requests wait in a bounded queue, one FIFO per priority level. Each model
//! instance (an ONNX Runtime session) runs on its own thread and, when idle,
//! forms the next batch itself: the oldest request of the highest priority,
//! plus every queued request that has the same datatypes and non-batch
//! dimensions, up to `max_batch_size` rows. It runs the batch as soon as it is
//! full, or reaches a preferred size, or the oldest request has waited
//! `max_queue_delay`. Inputs are concatenated along the batch dimension and
//! outputs split back exactly.
//!
//! A request whose caller went away is skipped; one whose deadline passed is
//! answered `DEADLINE_EXCEEDED` without being computed. A full queue refuses
//! new requests instead of growing.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ort::session::Session;
use tokio::sync::oneshot;

use crate::engine::{self, EngineError};
use crate::metrics::VersionMetrics;
use crate::repository::DynamicBatching;
use crate::tensor::{self, DataType, Tensor};

/// What makes two requests batchable together: each input's datatype and
/// dimensions after the first, or, for padded requests, after the second.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct BatchKey {
    inputs: Vec<(DataType, Vec<i64>)>,
    padded: bool,
}

impl BatchKey {
    /// Requests that batch only with requests of the same shape.
    pub(crate) fn of(inputs: &[Tensor]) -> BatchKey {
        BatchKey::from_dims(inputs, 1, false)
    }

    /// Sequence requests (`[batch, length]` inputs, zero the padding value,
    /// the padding masked by the model) that batch whatever their length:
    /// the batch is padded to its longest sequence. Never mixed with
    /// unpadded requests.
    pub(crate) fn padded(inputs: &[Tensor]) -> BatchKey {
        BatchKey::from_dims(inputs, 2, true)
    }

    fn from_dims(inputs: &[Tensor], skip: usize, padded: bool) -> BatchKey {
        BatchKey {
            inputs: inputs
                .iter()
                .map(|t| (t.dtype(), t.shape.get(skip..).unwrap_or_default().to_vec()))
                .collect(),
            padded,
        }
    }
}

/// Why a request got no result.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum BatchError {
    #[error("the queue of {limit} requests is full; retry later")]
    QueueFull { limit: usize },
    #[error("the deadline passed before the request was computed")]
    DeadlineExceeded,
    #[error("the model version is being unloaded")]
    Closed,
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// One request for the batcher.
pub(crate) struct Job {
    /// Inputs in the model's input order.
    pub(crate) inputs: Vec<Tensor>,
    /// Rows along the batch dimension.
    pub(crate) rows: usize,
    pub(crate) key: BatchKey,
    /// 0 is the highest priority.
    pub(crate) priority: usize,
    pub(crate) deadline: Option<Instant>,
    pub(crate) enqueued: Instant,
    /// Receives every model output, in the model's output order.
    pub(crate) reply: oneshot::Sender<Result<Vec<Tensor>, BatchError>>,
}

/// How a version batches.
#[derive(Debug, Clone)]
pub(crate) struct Policy {
    pub(crate) max_batch_size: usize,
    pub(crate) dynamic: Option<DynamicBatching>,
}

impl Policy {
    fn max_queue(&self) -> usize {
        self.dynamic.as_ref().map_or(1024, |d| d.max_queue_size)
    }

    fn levels(&self) -> usize {
        self.dynamic
            .as_ref()
            .map_or(1, |d| d.priority_levels.max(1))
    }
}

struct State {
    queues: Vec<VecDeque<Job>>,
    queued: usize,
    closed: bool,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    policy: Policy,
    outputs: Vec<(String, DataType)>,
    in_flight: AtomicUsize,
    metrics: VersionMetrics,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The batcher of one model version and its instance threads.
pub(crate) struct Batcher {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Batcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher")
            .field("policy", &self.shared.policy)
            .finish_non_exhaustive()
    }
}

impl Batcher {
    /// Starts one thread per session.
    pub(crate) fn start(
        thread_name: &str,
        policy: Policy,
        sessions: Vec<Session>,
        outputs: Vec<(String, DataType)>,
        metrics: VersionMetrics,
    ) -> std::io::Result<Batcher> {
        let levels = policy.levels();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                queues: (0..levels).map(|_| VecDeque::new()).collect(),
                queued: 0,
                closed: false,
            }),
            wake: Condvar::new(),
            policy,
            outputs,
            in_flight: AtomicUsize::new(0),
            metrics,
        });
        for (i, session) in sessions.into_iter().enumerate() {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("{thread_name}-{i}"))
                .spawn(move || instance(&shared, session))?;
        }
        Ok(Batcher { shared })
    }

    /// Queues a job, or refuses it when the queue is full or closing.
    pub(crate) fn submit(&self, job: Job) -> Result<(), BatchError> {
        let limit = self.shared.policy.max_queue();
        let mut state = self.shared.lock();
        if state.closed {
            return Err(BatchError::Closed);
        }
        if state.queued >= limit {
            return Err(BatchError::QueueFull { limit });
        }
        let level = job.priority.min(state.queues.len() - 1);
        state.queues[level].push_back(job);
        state.queued += 1;
        self.shared.metrics.queue_depth.set(gauge(state.queued));
        drop(state);
        self.shared.wake.notify_one();
        Ok(())
    }

    /// Requests waiting.
    pub(crate) fn queue_depth(&self) -> usize {
        self.shared.lock().queued
    }

    /// Requests taken from the queue and not answered yet.
    pub(crate) fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::Relaxed)
    }
}

impl Drop for Batcher {
    // The last holder (the model table, or the last in-flight request after
    // an unload) lets go: the threads finish what is queued, then exit.
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.wake.notify_all();
    }
}

fn gauge(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn instance(shared: &Shared, mut session: Session) {
    while let Some(jobs) = next_batch(shared) {
        execute(shared, &mut session, jobs);
    }
}

/// Blocks until a batch is due; `None` once closed and drained.
fn next_batch(shared: &Shared) -> Option<Vec<Job>> {
    let mut state = shared.lock();
    loop {
        drop_dead(&mut state);
        shared.metrics.queue_depth.set(gauge(state.queued));
        if state.queued == 0 {
            if state.closed {
                return None;
            }
            state = shared.wake.wait(state).unwrap_or_else(|e| e.into_inner());
            continue;
        }
        let Some(batching) = &shared.policy.dynamic else {
            let job = pop_first(&mut state);
            return Some(vec![job]);
        };
        let (picked, rows, oldest) = gather(&state, shared.policy.max_batch_size);
        let waited = oldest.elapsed();
        let preferred = preferred_prefix(&state, &picked, &batching.preferred_batch_sizes);
        let due = rows >= shared.policy.max_batch_size
            || waited >= batching.max_queue_delay
            || state.closed;
        if let Some(count) = preferred.filter(|_| !due) {
            return Some(take(&mut state, &picked[..count]));
        }
        if due {
            return Some(take(&mut state, &picked));
        }
        let remaining = batching
            .max_queue_delay
            .saturating_sub(waited)
            .max(Duration::from_micros(50));
        state = shared
            .wake
            .wait_timeout(state, remaining)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}

/// Answers expired requests and forgets abandoned ones.
fn drop_dead(state: &mut State) {
    let now = Instant::now();
    let mut removed = 0;
    for queue in &mut state.queues {
        queue.retain_mut(|job| {
            if job.reply.is_closed() {
                removed += 1;
                return false;
            }
            if job.deadline.is_some_and(|d| d <= now) {
                let (reply, _) = oneshot::channel();
                let reply = std::mem::replace(&mut job.reply, reply);
                let _ = reply.send(Err(BatchError::DeadlineExceeded));
                removed += 1;
                return false;
            }
            true
        });
    }
    state.queued -= removed;
}

fn pop_first(state: &mut State) -> Job {
    state.queued -= 1;
    state
        .queues
        .iter_mut()
        .find_map(VecDeque::pop_front)
        .expect("queued > 0 means some queue holds a job")
}

/// The jobs batchable with the first (highest priority, oldest) one, in
/// priority then arrival order: `(level, index)` pairs, total rows, and when
/// the first was queued.
fn gather(state: &State, max_rows: usize) -> (Vec<(usize, usize)>, usize, Instant) {
    let mut picked = Vec::new();
    let mut rows = 0;
    let mut head: Option<(&BatchKey, Instant)> = None;
    for (level, queue) in state.queues.iter().enumerate() {
        for (index, job) in queue.iter().enumerate() {
            match head {
                None => {
                    head = Some((&job.key, job.enqueued));
                    picked.push((level, index));
                    rows += job.rows;
                }
                Some((key, _)) if *key == job.key && rows + job.rows <= max_rows => {
                    picked.push((level, index));
                    rows += job.rows;
                }
                Some(_) => {}
            }
        }
    }
    let oldest = head.map_or_else(Instant::now, |(_, at)| at);
    (picked, rows, oldest)
}

/// How many of the picked jobs make up the largest preferred batch size
/// exactly, if any.
fn preferred_prefix(
    state: &State,
    picked: &[(usize, usize)],
    preferred: &[usize],
) -> Option<usize> {
    if preferred.is_empty() {
        return None;
    }
    let mut rows = 0;
    let mut best = None;
    for (count, &(level, index)) in picked.iter().enumerate() {
        rows += state.queues[level][index].rows;
        if preferred.contains(&rows) {
            best = Some(count + 1);
        }
    }
    best
}

fn take(state: &mut State, picked: &[(usize, usize)]) -> Vec<Job> {
    let mut by_level: Vec<Vec<usize>> = vec![Vec::new(); state.queues.len()];
    for &(level, index) in picked {
        by_level[level].push(index);
    }
    let mut jobs = Vec::with_capacity(picked.len());
    for (level, mut indices) in by_level.into_iter().enumerate() {
        // Remove from the back so earlier indices stay valid, then restore order.
        indices.sort_unstable_by(|a, b| b.cmp(a));
        let mut taken: Vec<Job> = indices
            .into_iter()
            .filter_map(|i| state.queues[level].remove(i))
            .collect();
        taken.reverse();
        jobs.extend(taken);
    }
    state.queued -= jobs.len();
    jobs
}

fn execute(shared: &Shared, session: &mut Session, mut jobs: Vec<Job>) {
    let started = Instant::now();
    // Last look before spending compute: the caller may have gone or expired.
    jobs.retain_mut(|job| {
        if job.reply.is_closed() {
            return false;
        }
        if job.deadline.is_some_and(|d| d <= started) {
            let (reply, _) = oneshot::channel();
            let _ =
                std::mem::replace(&mut job.reply, reply).send(Err(BatchError::DeadlineExceeded));
            return false;
        }
        true
    });
    if jobs.is_empty() {
        return;
    }
    let now_in_flight = shared.in_flight.fetch_add(jobs.len(), Ordering::Relaxed) + jobs.len();
    shared.metrics.in_flight.set(gauge(now_in_flight));
    for job in &jobs {
        shared
            .metrics
            .queue_seconds
            .observe(started.duration_since(job.enqueued).as_secs_f64());
    }
    let rows: Vec<usize> = jobs.iter().map(|j| j.rows).collect();
    let total: usize = rows.iter().sum();
    let inputs = if jobs.len() == 1 {
        std::mem::take(&mut jobs[0].inputs)
    } else {
        if jobs[0].key.padded {
            pad_to_longest(&mut jobs);
        }
        let count = jobs[0].inputs.len();
        (0..count)
            .map(|k| tensor::concat(&jobs.iter().map(|j| &j.inputs[k]).collect::<Vec<_>>()))
            .collect()
    };
    let result = engine::run(session, inputs, &shared.outputs);
    shared
        .metrics
        .compute_seconds
        .observe(started.elapsed().as_secs_f64());
    shared.metrics.executions.inc();
    shared.metrics.batch_size.observe(total as f64);

    match result {
        Err(error) => {
            for job in jobs {
                let _ = job.reply.send(Err(BatchError::Engine(error.clone())));
            }
        }
        Ok(outputs) if jobs.len() == 1 => {
            if let Some(job) = jobs.pop() {
                let _ = job.reply.send(Ok(outputs));
            }
        }
        Ok(outputs) => {
            let mut per_job: Vec<Vec<Tensor>> = vec![Vec::with_capacity(outputs.len()); jobs.len()];
            let mut failure = None;
            for output in &outputs {
                match tensor::split(output, &rows) {
                    Some(parts) => per_job
                        .iter_mut()
                        .zip(parts)
                        .for_each(|(acc, p)| acc.push(p)),
                    None => {
                        failure = Some(EngineError::Run(format!(
                            "output '{}' has shape {:?}, whose first dimension is not the batch of {total}; the model cannot be batched (set max_batch_size: 0)",
                            output.name, output.shape
                        )));
                        break;
                    }
                }
            }
            for (job, result) in jobs.into_iter().zip(per_job) {
                let _ = job.reply.send(match &failure {
                    Some(error) => Err(BatchError::Engine(error.clone())),
                    None => Ok(result),
                });
            }
        }
    }
    let left = shared.in_flight.fetch_sub(rows.len(), Ordering::Relaxed) - rows.len();
    shared.metrics.in_flight.set(gauge(left));
}

/// Pads every input of padded jobs to the longest sequence among them.
fn pad_to_longest(jobs: &mut [Job]) {
    let longest = jobs
        .iter()
        .flat_map(|j| j.inputs.iter().filter_map(|t| t.shape.get(1).copied()))
        .max()
        .and_then(|l| usize::try_from(l).ok())
        .unwrap_or(0);
    for job in jobs {
        job.inputs = std::mem::take(&mut job.inputs)
            .into_iter()
            .map(|t| tensor::pad_sequence(t, longest))
            .collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::TensorData;

    fn job(
        rows: usize,
        inner: i64,
        priority: usize,
    ) -> (Job, oneshot::Receiver<Result<Vec<Tensor>, BatchError>>) {
        let (reply, rx) = oneshot::channel();
        let n = rows * usize::try_from(inner).unwrap();
        let inputs = vec![Tensor {
            name: "x".into(),
            shape: vec![i64::try_from(rows).unwrap(), inner],
            data: TensorData::Fp32(vec![0.0; n]),
        }];
        let key = BatchKey::of(&inputs);
        (
            Job {
                inputs,
                rows,
                key,
                priority,
                deadline: None,
                enqueued: Instant::now(),
                reply,
            },
            rx,
        )
    }

    fn state(jobs: Vec<Job>, levels: usize) -> State {
        let mut state = State {
            queues: (0..levels).map(|_| VecDeque::new()).collect(),
            queued: 0,
            closed: false,
        };
        for job in jobs {
            let level = job.priority;
            state.queues[level].push_back(job);
            state.queued += 1;
        }
        state
    }

    #[test]
    fn gather_takes_compatible_jobs_in_priority_order_up_to_the_limit() {
        let (a, _ra) = job(2, 4, 1);
        let (b, _rb) = job(3, 4, 0);
        let (c, _rc) = job(1, 8, 0); // different non-batch shape: never mixed
        let (d, _rd) = job(4, 4, 1);
        let (e, _re) = job(1, 4, 1);
        let mut s = state(vec![a, b, c, d, e], 2);
        let (picked, rows, _) = gather(&s, 6);
        assert_eq!(picked, vec![(0, 0), (1, 0), (1, 2)]);
        assert_eq!(rows, 6);
        let jobs = take(&mut s, &picked);
        assert_eq!(
            jobs.iter().map(|j| j.rows).collect::<Vec<_>>(),
            vec![3, 2, 1]
        );
        assert_eq!(s.queued, 2);
        assert_eq!(s.queues[0].len(), 1);
        assert_eq!(s.queues[1][0].rows, 4);
    }

    #[test]
    fn padded_jobs_batch_across_lengths_and_are_padded_to_the_longest() {
        let ids = |rows: i64, length: i64| Tensor {
            name: "input_ids".into(),
            shape: vec![rows, length],
            data: TensorData::Int64((1..=rows * length).collect()),
        };
        assert_ne!(BatchKey::of(&[ids(1, 3)]), BatchKey::of(&[ids(1, 5)]));
        assert_eq!(
            BatchKey::padded(&[ids(1, 3)]),
            BatchKey::padded(&[ids(2, 5)])
        );
        assert_ne!(BatchKey::padded(&[ids(1, 3)]), BatchKey::of(&[ids(1, 3)]));

        let (mut short, _rs) = job(1, 1, 0);
        short.inputs = vec![ids(1, 2)];
        let (mut long, _rl) = job(1, 1, 0);
        long.inputs = vec![ids(1, 4)];
        let mut jobs = vec![short, long];
        pad_to_longest(&mut jobs);
        assert_eq!(jobs[0].inputs[0].shape, vec![1, 4]);
        assert_eq!(jobs[0].inputs[0].data, TensorData::Int64(vec![1, 2, 0, 0]));
        assert_eq!(jobs[1].inputs[0].data, TensorData::Int64(vec![1, 2, 3, 4]));
    }

    #[test]
    fn preferred_prefix_finds_the_largest_exact_size() {
        let jobs: Vec<_> = [1, 1, 2, 4].iter().map(|&r| job(r, 2, 0)).collect();
        let (jobs, _rx): (Vec<_>, Vec<_>) = jobs.into_iter().unzip();
        let s = state(jobs, 1);
        let (picked, rows, _) = gather(&s, 16);
        assert_eq!(rows, 8);
        assert_eq!(preferred_prefix(&s, &picked, &[2, 4]), Some(3));
        assert_eq!(preferred_prefix(&s, &picked, &[3]), None);
        assert_eq!(preferred_prefix(&s, &picked, &[]), None);
    }

    #[test]
    fn dead_jobs_are_dropped_and_expired_ones_answered() {
        let (mut a, ra) = job(1, 2, 0);
        a.deadline = Some(Instant::now() - Duration::from_millis(1));
        let (b, rb) = job(1, 2, 0);
        drop(rb);
        let (c, _rc) = job(1, 2, 0);
        let mut s = state(vec![a, b, c], 1);
        drop_dead(&mut s);
        assert_eq!(s.queued, 1);
        assert!(matches!(
            ra.blocking_recv(),
            Ok(Err(BatchError::DeadlineExceeded))
        ));
    }
}
