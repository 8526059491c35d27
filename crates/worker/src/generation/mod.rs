//! Text generation (`lmgrid.v1.GenerationService`) over decoder models with
//! a KV cache, batched continuously: a sequence joins the running batch
//! between two decode steps and leaves it as soon as it finishes, so the batch
//! is always as full as the waiting work allows.
//!
//! [`Generator`] is the handle a loaded model version keeps: it renders chat
//! templates, tokenizes and checks requests on the caller's task, then hands
//! them to the version's scheduler thread (`scheduler`), which owns the
//! ONNX Runtime session and the KV cache. Events flow back over a channel per
//! request; dropping the receiver cancels the request at the next step.

mod decoder;
mod prefix;
mod sampling;
mod scheduler;
pub(crate) mod service;
mod text;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Instant;

use lmgrid_core::error::ErrorKind;
use lmgrid_proto::lmgrid::v1 as pb;
use ort::session::Session;
use tokenizers::Tokenizer;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tonic::Status;

use crate::engine::Signature;
use crate::metrics::GenerationMetrics;
use crate::repository::{GenerationConfig, KvCache};
pub(crate) use decoder::DecoderSpec;
pub(crate) use sampling::SamplingParams;
use text::{ChatTemplate, Message};

/// Stop sequences a request may give, at most.
pub(crate) const MAX_STOP_SEQUENCES: usize = 16;
/// Completions one request may ask for, at most (also bounded by the
/// model's `max_sequences`).
pub(crate) const MAX_N: usize = 16;

/// Why a completion ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Finish {
    /// An end-of-sequence token or a stop sequence.
    Stop,
    /// `max_tokens` or the context length.
    Length,
}

/// What the scheduler reports about a request.
#[derive(Debug)]
pub(crate) enum Event {
    /// New text (possibly empty while a stop sequence is undecided) and the
    /// tokens that made it.
    Delta {
        index: usize,
        text: String,
        token_ids: Vec<u32>,
    },
    /// Completion `index` ended; `completion_tokens` counts every token the
    /// model produced for it.
    Finished {
        index: usize,
        reason: Finish,
        stop_sequence: Option<String>,
        completion_tokens: usize,
    },
    /// The whole request failed; nothing follows.
    Failed(Status),
}

/// A checked, tokenized request, ready for the scheduler.
#[derive(Debug)]
pub(crate) struct Prepared {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub n: usize,
}

/// Sent to the scheduler thread.
#[derive(Debug)]
pub(crate) struct Submission {
    pub request: Prepared,
    pub deadline: Option<Instant>,
    pub events: UnboundedSender<Event>,
    pub enqueued: Instant,
}

/// Occupancy, for the load report.
#[derive(Debug, Default)]
pub(crate) struct Occupancy {
    pub waiting: AtomicUsize,
    pub running: AtomicUsize,
}

/// A generation model version: its tokenizer, template, limits and scheduler.
#[derive(Debug)]
pub(crate) struct Generator {
    name: String,
    config: GenerationConfig,
    tokenizer: Arc<Tokenizer>,
    template: Option<ChatTemplate>,
    occupancy: Arc<Occupancy>,
    sender: Option<mpsc::Sender<Submission>>,
    thread: Option<JoinHandle<()>>,
}

fn invalid(message: impl Into<String>) -> Status {
    ErrorKind::InvalidArgument.status(message)
}

impl Generator {
    /// Checks the graph, loads the tokenizer and template, and starts the
    /// scheduler thread on `session`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn start(
        name: &str,
        version: u64,
        config: GenerationConfig,
        session: Session,
        signature: &Signature,
        provider: &str,
        tokenizer: &std::path::Path,
        chat_template: Option<String>,
    ) -> Result<Generator, String> {
        let spec = DecoderSpec::from_signature(signature, config.padding)?;
        let mut decoder = decoder::Decoder { session, spec };
        if config.kv_cache == KvCache::Shared {
            if provider.starts_with("cpu") {
                decoder.share_cache()?;
            } else {
                // The cache lives in host memory; a CUDA session would copy
                // past and present to and from the device, so they never
                // share an address there.
                tracing::warn!(
                    model = name,
                    version,
                    provider,
                    "generation.kv_cache: shared runs on the CPU only; this model copies its cache every step"
                );
            }
        }
        let tokenizer = Tokenizer::from_file(tokenizer)
            .map_err(|e| format!("load tokenizer {}: {e}", tokenizer.display()))?;
        let vocab = tokenizer.get_vocab_size(true);
        if let Some(bad) = config
            .eos_token_ids
            .iter()
            .find(|&&id| id as usize >= vocab)
        {
            return Err(format!(
                "generation.eos_token_ids: {bad} is outside the tokenizer's {vocab} tokens"
            ));
        }
        let template = chat_template
            .map(|source| ChatTemplate::new(source, &config.bos_token, &config.eos_token))
            .transpose()?;
        tracing::info!(
            model = name,
            version,
            layers = decoder.spec.layers,
            kv_cache = decoder.spec.cache.as_str(),
            kv_bytes_per_token = decoder.spec.bytes_per_token(),
            kv_budget_bytes = decoder.spec.bytes_per_token() * config.max_total_tokens,
            max_sequences = config.max_sequences,
            "generation model ready"
        );
        let tokenizer = Arc::new(tokenizer);
        let occupancy = Arc::new(Occupancy::default());
        let (sender, receiver) = mpsc::channel();
        let scheduler = scheduler::Scheduler::new(
            decoder,
            config.clone(),
            tokenizer.clone(),
            occupancy.clone(),
            GenerationMetrics::new(name, &version.to_string()),
        );
        let thread = std::thread::Builder::new()
            .name(format!("gen-{name}-{version}"))
            .spawn(move || scheduler.run(receiver))
            .map_err(|e| format!("start the scheduler thread: {e}"))?;
        Ok(Generator {
            name: name.to_string(),
            config,
            tokenizer,
            template,
            occupancy,
            sender: Some(sender),
            thread: Some(thread),
        })
    }

    /// Requests waiting for a slot and sequences decoding.
    pub(crate) fn occupancy(&self) -> (usize, usize) {
        (
            self.occupancy.waiting.load(Ordering::Relaxed),
            self.occupancy.running.load(Ordering::Relaxed),
        )
    }

    /// Renders, tokenizes and checks a request. Blocking (tokenizing a long
    /// prompt takes milliseconds): call it off the executor.
    pub(crate) fn prepare(&self, request: &pb::GenerateRequest) -> Result<Prepared, Status> {
        let text = match &request.input {
            None => {
                return Err(invalid(
                    "the request has neither a prompt nor chat messages",
                ));
            }
            Some(pb::generate_request::Input::Prompt(prompt)) => prompt.clone(),
            Some(pb::generate_request::Input::Chat(chat)) => self.render(&chat.messages)?,
        };
        if text.is_empty() {
            return Err(invalid("the prompt is empty"));
        }
        let encoding = self
            .tokenizer
            .encode(text.as_str(), true)
            .map_err(|e| invalid(format!("tokenize the prompt: {e}")))?;
        let prompt = encoding.get_ids().to_vec();
        if prompt.is_empty() {
            return Err(invalid("the prompt has no tokens"));
        }
        let sampling = request.sampling.clone().unwrap_or_default();
        let params = SamplingParams {
            temperature: sampling.temperature.unwrap_or(0.0),
            top_p: sampling.top_p.unwrap_or(1.0),
            top_k: sampling.top_k.unwrap_or(0) as usize,
            repetition_penalty: sampling.repetition_penalty.unwrap_or(1.0),
            presence_penalty: sampling.presence_penalty.unwrap_or(0.0),
            frequency_penalty: sampling.frequency_penalty.unwrap_or(0.0),
            seed: sampling.seed,
        };
        params.validate().map_err(invalid)?;
        if sampling.stop.len() > MAX_STOP_SEQUENCES {
            return Err(invalid(format!(
                "stop has {} sequences; at most {MAX_STOP_SEQUENCES} are allowed",
                sampling.stop.len()
            )));
        }
        if sampling.stop.iter().any(String::is_empty) {
            return Err(invalid("stop sequences must not be empty"));
        }
        let n = match sampling.n as usize {
            0 => 1,
            n if n > MAX_N.min(self.config.max_sequences) => {
                return Err(invalid(format!(
                    "n is {n}; model '{}' gives at most {} completions per request",
                    self.name,
                    MAX_N.min(self.config.max_sequences)
                )));
            }
            n => n,
        };
        let context = self.config.context_length;
        if prompt.len() >= context {
            return Err(invalid(format!(
                "the prompt has {} tokens; model '{}' has a context of {context} tokens",
                prompt.len(),
                self.name
            )));
        }
        let room = context - prompt.len();
        let max_tokens = match sampling.max_tokens as usize {
            0 => self.config.default_max_tokens.min(room),
            asked if asked > room => {
                return Err(invalid(format!(
                    "max_tokens is {asked} but the prompt has {} tokens and model '{}' has a context of {context}: at most {room} more fit",
                    prompt.len(),
                    self.name
                )));
            }
            asked => asked,
        };
        let reserved = n * (prompt.len() + max_tokens);
        if reserved > self.config.max_total_tokens {
            return Err(invalid(format!(
                "the request needs {reserved} KV-cache positions (n × (prompt {} + max_tokens {max_tokens})); model '{}' holds at most {}",
                prompt.len(),
                self.name,
                self.config.max_total_tokens
            )));
        }
        Ok(Prepared {
            prompt,
            max_tokens,
            sampling: params,
            stop: sampling.stop,
            n,
        })
    }

    fn render(&self, messages: &[pb::ChatMessage]) -> Result<String, Status> {
        let Some(template) = &self.template else {
            return Err(ErrorKind::FailedPrecondition.status(format!(
                "model '{}' has no chat template; send a prompt instead of messages",
                self.name
            )));
        };
        if messages.is_empty() {
            return Err(invalid("messages is empty"));
        }
        for (i, m) in messages.iter().enumerate() {
            if !matches!(m.role.as_str(), "system" | "user" | "assistant" | "tool") {
                return Err(invalid(format!(
                    "messages[{i}].role is '{}'; expected system, user, assistant or tool",
                    m.role
                )));
            }
        }
        let messages: Vec<Message<'_>> = messages
            .iter()
            .map(|m| Message {
                role: &m.role,
                content: &m.content,
                name: &m.name,
            })
            .collect();
        template.render(&messages).map_err(invalid)
    }

    /// Queues a prepared request; its events arrive on the receiver.
    /// Dropping the receiver cancels it.
    pub(crate) fn submit(
        &self,
        request: Prepared,
        deadline: Option<Instant>,
    ) -> Result<UnboundedReceiver<Event>, Status> {
        let waiting = self.occupancy.waiting.fetch_add(1, Ordering::Relaxed);
        if waiting >= self.config.max_queue_size {
            self.occupancy.waiting.fetch_sub(1, Ordering::Relaxed);
            return Err(ErrorKind::ResourceExhausted.status(format!(
                "model '{}' has {waiting} requests waiting, its limit; retry later",
                self.name
            )));
        }
        let (events, receiver) = unbounded_channel();
        let submission = Submission {
            request,
            deadline,
            events,
            enqueued: Instant::now(),
        };
        let sent = self
            .sender
            .as_ref()
            .is_some_and(|sender| sender.send(submission).is_ok());
        if !sent {
            self.occupancy.waiting.fetch_sub(1, Ordering::Relaxed);
            return Err(
                ErrorKind::Unavailable.status(format!("model '{}' is shutting down", self.name))
            );
        }
        Ok(receiver)
    }
}

impl Drop for Generator {
    /// Closes the queue; the scheduler finishes what it holds and stops.
    fn drop(&mut self) {
        self.sender.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
