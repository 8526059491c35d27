//! The scheduler thread of one generation model version: continuous
//! batching over a padded KV cache.
//!
//! Each turn it takes new requests, drops the ones whose caller went away or
//! whose deadline passed, admits waiting requests in arrival order while the
//! KV budget allows and prefills them (each prompt alone, in chunks, at most
//! `prefill_chunk_tokens` per turn: a long prompt's prefill is spread over
//! turns so the running sequences keep decoding), rebuilds the batch's cache
//! when rows joined or left, and runs one decode step for every running
//! sequence. A cache the graph updates in place is built with
//! [`SHARED_HEADROOM`] free columns and rebuilt wider only when its longest
//! row reaches the edge.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::time::Instant;

use lmgrid_core::error::ErrorKind;
use tokenizers::Tokenizer;
use tokio::sync::mpsc::UnboundedSender;

use super::decoder::{Decoder, Kv, RowSource, StepInput};
use super::prefix::{Entry, PrefixCache};
use super::sampling::Sampler;
use super::text::{Detokenizer, StopMatcher};
use super::{Event, Finish, Occupancy, Submission};
use crate::metrics::GenerationMetrics;
use crate::repository::{GenerationConfig, KvCache, Padding};

/// Free columns a shared cache is built with beyond its longest row (capped
/// by the longest reservation): the batch decodes this many steps before its
/// cache must be copied into a wider one, and memory held stays near what
/// the rows use rather than what they reserve.
const SHARED_HEADROOM: usize = 128;

/// Fewest tokens a prompt must share with a cached one to start its prefill
/// from that cache (the same prompt always does): fewer save little, and a
/// prompt prefilled from scratch computes its first tokens in the same pass
/// as the rest.
const MIN_SHARED: usize = 16;

/// One completion being decoded.
#[derive(Debug)]
struct Sequence {
    index: usize,
    events: UnboundedSender<Event>,
    deadline: Option<Instant>,
    sampler: Sampler,
    detokenizer: Detokenizer,
    stops: StopMatcher,
    /// Its row in the batch's cache.
    row: usize,
    /// Positions in the KV cache: prompt + generated − the pending token.
    kv_len: usize,
    /// The token sampled last, not yet in the cache.
    pending: u32,
    generated: usize,
    max_tokens: usize,
    /// Prompt + max_tokens: the most positions this sequence can hold.
    reserved: usize,
}

/// A prefilled request about to join the batch.
#[derive(Debug)]
struct Joiner {
    kv: Kv,
    sequences: Vec<Sequence>,
}

/// An admitted request whose prompt is partly through the model.
#[derive(Debug)]
struct Prefill {
    submission: Submission,
    /// The cache of the prompt's first `done` tokens.
    kv: Kv,
    done: usize,
    /// The last chunk's logits: the prompt's last token's once `done` is the
    /// whole prompt.
    logits: Vec<f32>,
    /// Time spent running its chunks.
    busy: std::time::Duration,
    /// Whether the prefix cache holds this very prompt already.
    cached: bool,
}

pub(super) struct Scheduler {
    decoder: Decoder,
    config: GenerationConfig,
    tokenizer: Arc<Tokenizer>,
    occupancy: Arc<Occupancy>,
    metrics: GenerationMetrics,
    waiting: VecDeque<Submission>,
    /// The request being prefilled across turns, if any; it holds its KV
    /// reservation already.
    prefilling: Option<Prefill>,
    running: Vec<Sequence>,
    /// The running sequences' cache; `Sequence::row` indexes it.
    kv: Option<Kv>,
    /// Rows left since the cache was last rebuilt.
    dirty: bool,
    /// Recently prefilled prompts: each one's cache and last logits.
    prefixes: PrefixCache<(Kv, Vec<f32>)>,
}

impl Scheduler {
    pub(super) fn new(
        decoder: Decoder,
        config: GenerationConfig,
        tokenizer: Arc<Tokenizer>,
        occupancy: Arc<Occupancy>,
        metrics: GenerationMetrics,
    ) -> Self {
        Scheduler {
            prefixes: PrefixCache::new(config.prefix_cache_tokens),
            decoder,
            config,
            tokenizer,
            occupancy,
            metrics,
            waiting: VecDeque::new(),
            prefilling: None,
            running: Vec::new(),
            kv: None,
            dirty: false,
        }
    }

    /// Runs until the queue is closed and every request is answered.
    pub(super) fn run(mut self, queue: Receiver<Submission>) {
        let mut open = true;
        loop {
            if self.running.is_empty() && self.waiting.is_empty() && self.prefilling.is_none() {
                self.publish();
                if !open {
                    break;
                }
                match queue.recv() {
                    Ok(submission) => self.waiting.push_back(submission),
                    Err(_) => break,
                }
            }
            while open {
                match queue.try_recv() {
                    Ok(submission) => self.waiting.push_back(submission),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => open = false,
                }
            }
            self.drop_abandoned(Instant::now());
            let joiners = self.admit();
            if (self.dirty || !joiners.is_empty())
                && let Err(e) = self.rebuild(joiners)
            {
                self.fail_running(&format!("rebuild the KV cache: {e}"));
                continue;
            }
            if !self.running.is_empty()
                && let Err(e) = self.step()
            {
                self.fail_running(&format!("decode step: {e}"));
            }
            self.publish();
        }
    }

    fn publish(&self) {
        self.occupancy
            .running
            .store(self.running.len(), Ordering::Relaxed);
        self.metrics.running.set(self.running.len() as i64);
        self.metrics
            .waiting
            .set(self.occupancy.waiting.load(Ordering::Relaxed) as i64);
        self.metrics
            .kv_positions
            .set(self.kv.as_ref().map_or(0, |kv| kv.rows * kv.capacity) as i64);
        self.metrics
            .prefix_positions
            .set(self.prefixes.held() as i64);
    }

    /// A submission leaves the queue (admitted or dropped).
    fn dequeued(&self) {
        self.occupancy.waiting.fetch_sub(1, Ordering::Relaxed);
    }

    /// Drops waiting requests and running sequences whose caller went away
    /// or whose deadline passed.
    fn drop_abandoned(&mut self, now: Instant) {
        let expired = |deadline: Option<Instant>| deadline.is_some_and(|d| d <= now);
        let mut dropped = 0;
        self.waiting.retain(|s| {
            if s.events.is_closed() {
                dropped += 1;
                return false;
            }
            if expired(s.deadline) {
                let _ = s.events.send(Event::Failed(deadline_status()));
                dropped += 1;
                return false;
            }
            true
        });
        for _ in 0..dropped {
            self.dequeued();
        }
        if let Some(prefill) = &self.prefilling {
            let events = &prefill.submission.events;
            if events.is_closed() || expired(prefill.submission.deadline) {
                if !events.is_closed() {
                    let _ = events.send(Event::Failed(deadline_status()));
                }
                self.prefilling = None;
                dropped += 1;
            }
        }
        let before = self.running.len();
        self.running.retain(|seq| {
            if seq.events.is_closed() {
                return false;
            }
            if expired(seq.deadline) {
                let _ = seq.events.send(Event::Failed(deadline_status()));
                return false;
            }
            true
        });
        let gone = before - self.running.len();
        if gone > 0 {
            self.dirty = true;
        }
        self.metrics.cancelled.inc_by((dropped + gone) as u64);
    }

    /// Whether `n` more sequences reserving `reserved` positions each fit the
    /// KV budget: rows × the longest reservation (the cache is as wide as its
    /// longest row) and the sequence limit.
    fn fits(&self, joining: &[Joiner], n: usize, reserved: usize) -> bool {
        let (prefill_rows, prefill_reserved) = self.prefilling.as_ref().map_or((0, 0), |p| {
            (p.submission.request.n, reservation(&p.submission))
        });
        let rows = self.running.len()
            + joining.iter().map(|j| j.sequences.len()).sum::<usize>()
            + prefill_rows
            + n;
        let widest = self
            .running
            .iter()
            .chain(joining.iter().flat_map(|j| &j.sequences))
            .map(|s| s.reserved)
            .fold(reserved.max(prefill_reserved), usize::max);
        rows <= self.config.max_sequences && rows * widest <= self.config.max_total_tokens
    }

    /// Prefills for this turn: first more of the prompt being prefilled, then
    /// waiting requests in arrival order while they fit, until the turn's
    /// `prefill_chunk_tokens` would be exceeded by the next chunk (a request
    /// starts only if its first chunk fits). A prompt the budget does not finish
    /// stays [`Scheduler::prefilling`] and goes on next turn, after a decode
    /// step of the running sequences. Returns the requests whose prompt is
    /// done.
    fn admit(&mut self) -> Vec<Joiner> {
        let mut joiners = Vec::new();
        let chunk = self.config.prefill_chunk_tokens.max(1);
        let mut budget = chunk;
        loop {
            let prefill = match self.prefilling.take() {
                Some(prefill) => prefill,
                None => {
                    let Some(next) = self.waiting.front() else {
                        break;
                    };
                    let first_chunk = next.request.prompt.len().min(chunk);
                    if first_chunk > budget
                        || !self.fits(&joiners, next.request.n, reservation(next))
                    {
                        break;
                    }
                    let Some(submission) = self.waiting.pop_front() else {
                        break;
                    };
                    self.dequeued();
                    match self.start(submission) {
                        Ok(prefill) => prefill,
                        Err((events, e)) => {
                            prefill_failed(&events, &e);
                            continue;
                        }
                    }
                }
            };
            match self.prefill(prefill, &mut budget) {
                Ok(Progress::Done(Some(joiner))) => joiners.push(joiner),
                Ok(Progress::Done(None)) => {}
                Ok(Progress::Partial(prefill)) => {
                    self.prefilling = Some(prefill);
                    break;
                }
                Err((events, e)) => prefill_failed(&events, &e),
            }
        }
        joiners
    }

    /// A new prefill over what the prefix cache has of its prompt: for the
    /// same prompt, the entry's cache and last logits (nothing left to run);
    /// for a shared beginning of at least [`MIN_SHARED`] tokens, a copy of
    /// the entry's cache of it (at most all but the prompt's last token,
    /// whose logits must be computed); else an empty cache.
    #[allow(clippy::result_large_err)]
    fn start(
        &mut self,
        submission: Submission,
    ) -> Result<Prefill, (UnboundedSender<Event>, crate::engine::EngineError)> {
        let prompt = &submission.request.prompt;
        let mut reused = None;
        if let Some((common, entry)) = self.prefixes.lookup(prompt) {
            let (kv, logits) = &entry.value;
            let same = common == prompt.len() && entry.tokens.len() == prompt.len();
            let done = if same {
                common
            } else {
                common.min(prompt.len().saturating_sub(1))
            };
            if same || done >= MIN_SHARED {
                match kv.head(&self.decoder.spec, done) {
                    Ok(kv) => reused = Some((kv, done, same.then(|| logits.clone()))),
                    Err(e) => tracing::warn!(error = %e, "prefix cache entry not reused"),
                }
            }
        }
        let (kv, done, logits) = match reused {
            Some((kv, done, logits)) => {
                self.metrics.prefix_cache_tokens.inc_by(done as u64);
                (kv, done, logits)
            }
            None => match Kv::empty(&self.decoder.spec, 1) {
                Ok(kv) => (kv, 0, None),
                Err(e) => return Err((submission.events.clone(), e)),
            },
        };
        Ok(Prefill {
            submission,
            kv,
            done,
            cached: logits.is_some(),
            logits: logits.unwrap_or_default(),
            busy: std::time::Duration::ZERO,
        })
    }

    /// Runs chunks of a prompt through the model while `budget` covers them, and
    /// once the whole prompt is in, samples each of its completions' first
    /// token (`Done(None)` when every completion already ended).
    fn prefill(
        &mut self,
        mut prefill: Prefill,
        budget: &mut usize,
    ) -> Result<Progress, (UnboundedSender<Event>, crate::engine::EngineError)> {
        let prompt_len = prefill.submission.request.prompt.len();
        let chunk = self.config.prefill_chunk_tokens.max(1);
        // Chunks start at multiples of `chunk` past what the prefix cache gave
        // (none, or the same for the same cache), however the turns fall, so a
        // prompt's prefill computes the same whatever else is running.
        while prefill.done < prompt_len {
            let (start, end) = (prefill.done, (prefill.done + chunk).min(prompt_len));
            if end - start > *budget {
                break;
            }
            let started = Instant::now();
            let input = StepInput {
                ids: prefill.submission.request.prompt[start..end]
                    .iter()
                    .map(|&t| i64::from(t))
                    .collect(),
                positions: (start as i64..end as i64).collect(),
                mask: vec![1; end],
                rows: 1,
                seq: end - start,
            };
            let (logits, _, kv) = self
                .decoder
                .run(input, prefill.kv)
                .map_err(|e| (prefill.submission.events.clone(), e))?;
            prefill.kv = kv;
            prefill.logits = logits;
            prefill.done = end;
            prefill.busy += started.elapsed();
            *budget -= end - start;
        }
        if prefill.done < prompt_len {
            return Ok(Progress::Partial(prefill));
        }
        let Prefill {
            submission:
                Submission {
                    request,
                    deadline,
                    events,
                    enqueued,
                },
            kv,
            logits,
            busy,
            cached,
            ..
        } = prefill;
        if self.prefixes.enabled() && !cached {
            // The logits count too, as the positions their bytes would fill.
            let per_position = self.decoder.spec.bytes_per_token().max(1);
            let logits_cost = (logits.len() * std::mem::size_of::<f32>()).div_ceil(per_position);
            match kv.head(&self.decoder.spec, prompt_len) {
                Ok(copy) => self.prefixes.insert(Entry {
                    tokens: request.prompt.clone(),
                    value: (copy, logits.clone()),
                    cost: prompt_len + logits_cost,
                }),
                Err(e) => tracing::warn!(error = %e, "prompt not kept in the prefix cache"),
            }
        }
        self.metrics.prefill_seconds.observe(busy.as_secs_f64());
        self.metrics.prompt_tokens.inc_by(prompt_len as u64);
        self.metrics
            .time_to_first_token
            .observe(enqueued.elapsed().as_secs_f64());

        let mut sequences = Vec::with_capacity(request.n);
        for index in 0..request.n {
            let sampling = super::SamplingParams {
                seed: request.sampling.seed.map(|s| s.wrapping_add(index as u64)),
                ..request.sampling.clone()
            };
            let mut seq = Sequence {
                index,
                events: events.clone(),
                deadline,
                sampler: Sampler::new(sampling, &request.prompt),
                detokenizer: Detokenizer::default(),
                stops: StopMatcher::new(request.stop.clone()),
                row: 0,
                kv_len: prompt_len,
                pending: 0,
                generated: 0,
                max_tokens: request.max_tokens,
                reserved: prompt_len + request.max_tokens,
            };
            let token = seq.sampler.sample(&logits);
            if self.accept(&mut seq, token) {
                sequences.push(seq);
            }
        }
        Ok(Progress::Done(
            (!sequences.is_empty()).then_some(Joiner { kv, sequences }),
        ))
    }

    /// Handles a sampled token: sends its text, and finishes the sequence on
    /// an end-of-sequence token, a stop sequence or its token limit. Returns
    /// whether the sequence goes on.
    fn accept(&self, seq: &mut Sequence, token: u32) -> bool {
        seq.generated += 1;
        self.metrics.generated_tokens.inc();
        let send = |seq: &Sequence, text: String, token_ids: Vec<u32>| {
            if !text.is_empty() || !token_ids.is_empty() {
                let _ = seq.events.send(Event::Delta {
                    index: seq.index,
                    text,
                    token_ids,
                });
            }
        };
        let finish = |seq: &Sequence, reason: Finish, stop_sequence: Option<String>| {
            let _ = seq.events.send(Event::Finished {
                index: seq.index,
                reason,
                stop_sequence,
                completion_tokens: seq.generated,
            });
        };
        if self.config.eos_token_ids.contains(&token) {
            let held = seq.stops.flush();
            send(seq, held, Vec::new());
            finish(seq, Finish::Stop, None);
            return false;
        }
        let delta = seq.detokenizer.push(&self.tokenizer, token);
        let matched = seq.stops.push(&delta);
        if let Some(stop) = matched.stop {
            send(seq, matched.text, vec![token]);
            finish(seq, Finish::Stop, Some(stop));
            return false;
        }
        if seq.generated >= seq.max_tokens {
            let text = matched.text + &seq.stops.flush();
            send(seq, text, vec![token]);
            finish(seq, Finish::Length, None);
            return false;
        }
        send(seq, matched.text, vec![token]);
        seq.pending = token;
        true
    }

    /// Gathers the running rows and the joiners' rows into a new cache as
    /// wide as the longest of them.
    fn rebuild(&mut self, joiners: Vec<Joiner>) -> Result<(), crate::engine::EngineError> {
        self.dirty = false;
        let old = self.kv.take();
        let started = Instant::now();
        // One new request alone with one completion: its cache is the batch.
        if self.running.is_empty() && joiners.len() == 1 && joiners[0].sequences.len() == 1 {
            let Some(Joiner { kv, mut sequences }) = joiners.into_iter().next() else {
                return Ok(());
            };
            sequences[0].row = 0;
            self.running = sequences;
            self.kv = Some(kv);
            return Ok(());
        }
        let mut sources = Vec::new();
        if let Some(old) = &old {
            for seq in &self.running {
                sources.push(RowSource {
                    kv: old,
                    row: seq.row,
                    len: seq.kv_len,
                });
            }
        }
        for joiner in &joiners {
            for seq in &joiner.sequences {
                sources.push(RowSource {
                    kv: &joiner.kv,
                    row: 0,
                    len: seq.kv_len,
                });
            }
        }
        let width = sources.iter().map(|s| s.len).max().unwrap_or(0);
        let reserved = self
            .running
            .iter()
            .chain(joiners.iter().flat_map(|j| &j.sequences))
            .map(|s| s.reserved);
        let capacity = self.capacity(width, reserved);
        let kv = if sources.is_empty() {
            None
        } else {
            Some(Kv::gather(&self.decoder, &sources, width, capacity)?)
        };
        drop(sources);
        self.running
            .extend(joiners.into_iter().flat_map(|j| j.sequences));
        for (row, seq) in self.running.iter_mut().enumerate() {
            seq.row = row;
        }
        self.kv = kv;
        self.metrics
            .rebuild_seconds
            .observe(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// Columns of a cache whose longest row holds `width` positions: that
    /// many when the graph copies it, [`SHARED_HEADROOM`] more (within the
    /// longest reservation, at least one more) when it writes in place.
    fn capacity(&self, width: usize, reserved: impl Iterator<Item = usize>) -> usize {
        match self.decoder.spec.cache {
            KvCache::Copy => width,
            KvCache::Shared => {
                let widest = reserved.max().unwrap_or(0);
                (width + SHARED_HEADROOM).min(widest).max(width + 1)
            }
        }
    }

    /// The running rows' cache, copied into tensors with room for the next
    /// steps when the graph writes in place and the cache is full (a cache
    /// a lone prefill produced is exactly full).
    fn with_room(&mut self, kv: Kv) -> Result<Kv, crate::engine::EngineError> {
        if self.decoder.spec.cache == KvCache::Copy || kv.width < kv.capacity {
            return Ok(kv);
        }
        let started = Instant::now();
        let sources: Vec<_> = self
            .running
            .iter()
            .map(|seq| RowSource {
                kv: &kv,
                row: seq.row,
                len: seq.kv_len,
            })
            .collect();
        let capacity = self.capacity(kv.width, self.running.iter().map(|s| s.reserved));
        let wider = Kv::gather(&self.decoder, &sources, kv.width, capacity)?;
        drop(sources);
        for (row, seq) in self.running.iter_mut().enumerate() {
            seq.row = row;
        }
        self.metrics
            .rebuild_seconds
            .observe(started.elapsed().as_secs_f64());
        Ok(wider)
    }

    /// One decode step for every running sequence.
    fn step(&mut self) -> Result<(), crate::engine::EngineError> {
        let Some(kv) = self.kv.take() else {
            return Err(crate::engine::EngineError::Run(
                "running sequences without a KV cache".into(),
            ));
        };
        let kv = self.with_room(kv)?;
        let rows = self.running.len();
        let width = kv.width;
        let mut ids = Vec::with_capacity(rows);
        let mut positions = Vec::with_capacity(rows);
        let mut mask = Vec::with_capacity(rows * (width + 1));
        for seq in &self.running {
            ids.push(i64::from(seq.pending));
            positions.push(seq.kv_len as i64);
            // The row's cached positions and its new token, padding beside them.
            let (real, padding) = (seq.kv_len + 1, width - seq.kv_len);
            match self.decoder.spec.padding {
                Padding::Left => {
                    mask.extend(std::iter::repeat_n(0, padding));
                    mask.extend(std::iter::repeat_n(1, real));
                }
                Padding::Right => {
                    mask.extend(std::iter::repeat_n(1, real));
                    mask.extend(std::iter::repeat_n(0, padding));
                }
            }
        }
        let input = StepInput {
            ids,
            positions,
            mask,
            rows,
            seq: 1,
        };
        let started = Instant::now();
        let (logits, vocab) = match self.decoder.spec.cache {
            KvCache::Copy => {
                let (logits, vocab, kv) = self.decoder.run(input, kv)?;
                self.kv = Some(kv);
                (logits, vocab)
            }
            KvCache::Shared => {
                let mut kv = kv;
                let result = self.decoder.run_in_place(input, &mut kv)?;
                self.kv = Some(kv);
                result
            }
        };
        self.metrics
            .step_seconds
            .observe(started.elapsed().as_secs_f64());
        self.metrics.step_rows.observe(rows as f64);
        let mut running = std::mem::take(&mut self.running);
        let before = running.len();
        running.retain_mut(|seq| {
            seq.kv_len += 1;
            let row = &logits[seq.row * vocab..(seq.row + 1) * vocab];
            let token = seq.sampler.sample(row);
            self.accept(seq, token)
        });
        if running.len() != before {
            self.dirty = true;
        }
        self.running = running;
        Ok(())
    }

    /// Fails every running sequence after an engine error; the batch starts over.
    fn fail_running(&mut self, message: &str) {
        tracing::error!(error = message, "generation failed");
        for seq in self.running.drain(..) {
            let _ = seq.events.send(Event::Failed(
                ErrorKind::Internal.status(message.to_string()),
            ));
        }
        self.kv = None;
        self.dirty = false;
    }
}

/// Where a prefill stands after a turn.
#[derive(Debug)]
enum Progress {
    Done(Option<Joiner>),
    Partial(Prefill),
}

/// Positions a request reserves: its prompt and `max_tokens`.
fn reservation(submission: &Submission) -> usize {
    submission.request.prompt.len() + submission.request.max_tokens
}

fn prefill_failed(events: &UnboundedSender<Event>, e: &crate::engine::EngineError) {
    tracing::error!(error = %e, "prefill failed");
    let _ = events.send(Event::Failed(
        ErrorKind::Internal.status(format!("prefill: {e}")),
    ));
}

fn deadline_status() -> tonic::Status {
    ErrorKind::DeadlineExceeded.status("the request's deadline passed during generation")
}
