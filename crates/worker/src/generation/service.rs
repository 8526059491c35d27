//! `Generate` and `GenerateStream` over a resolved model version: prepare
//! the request off the executor, submit it, and turn the scheduler's events
//! into responses.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use lmgrid_core::error::ErrorKind;
use lmgrid_proto::lmgrid::v1 as pb;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_stream::{Stream, StreamExt as _, wrappers::UnboundedReceiverStream};
use tonic::Status;

use super::{Event, Finish, Generator};
use crate::models::LoadedVersion;

pub(crate) type GenerateStream =
    Pin<Box<dyn Stream<Item = Result<pb::GenerateStreamResponse, Status>> + Send>>;

fn generator(model: &LoadedVersion) -> Result<&Generator, Status> {
    model.generator.as_ref().ok_or_else(|| {
        ErrorKind::InvalidArgument.status(format!(
            "model '{}' is a {} model, not a generation model",
            model.name,
            model.config.kind.as_str()
        ))
    })
}

/// Checks and submits a request; returns its events and prompt length.
async fn start(
    model: &Arc<LoadedVersion>,
    request: pb::GenerateRequest,
    deadline: Option<Instant>,
) -> Result<(UnboundedReceiver<Event>, Submitted), Status> {
    generator(model)?;
    let preparing = model.clone();
    let prepared = tokio::task::spawn_blocking(move || match &preparing.generator {
        Some(g) => g.prepare(&request),
        None => Err(ErrorKind::Internal.status("the generator went away")),
    })
    .await
    .map_err(|e| ErrorKind::Internal.status(format!("prepare the request: {e}")))??;
    let info = Submitted {
        prompt_tokens: prepared.prompt.len(),
        n: prepared.n,
    };
    let events = generator(model)?.submit(prepared, deadline)?;
    Ok((events, info))
}

/// What the response needs to know about the submitted request.
#[derive(Debug, Clone, Copy)]
struct Submitted {
    prompt_tokens: usize,
    n: usize,
}

fn model_ref(model: &LoadedVersion) -> pb::ModelRef {
    pb::ModelRef {
        name: model.name.clone(),
        version: model.version.to_string(),
    }
}

fn finish_reason(reason: Finish) -> pb::FinishReason {
    match reason {
        Finish::Stop => pb::FinishReason::Stop,
        Finish::Length => pb::FinishReason::Length,
    }
}

fn usage(prompt: usize, completion: usize) -> pb::Usage {
    let clamp = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    pb::Usage {
        prompt_tokens: clamp(prompt),
        completion_tokens: clamp(completion),
        total_tokens: clamp(prompt + completion),
    }
}

/// Generates every completion and answers once they all ended.
pub(crate) async fn generate(
    model: &Arc<LoadedVersion>,
    request: pb::GenerateRequest,
    deadline: Option<Instant>,
) -> Result<pb::GenerateResponse, Status> {
    let return_ids = request.return_token_ids;
    let (mut events, info) = start(model, request, deadline).await?;
    let mut completions: Vec<pb::Completion> = (0..info.n)
        .map(|index| pb::Completion {
            index: index as u32,
            ..pb::Completion::default()
        })
        .collect();
    let mut completion_tokens = 0;
    let mut finished = 0;
    while finished < info.n {
        let event = match deadline {
            Some(at) => tokio::time::timeout_at(at.into(), events.recv())
                .await
                .map_err(|_| {
                    ErrorKind::DeadlineExceeded
                        .status("the request's deadline passed during generation")
                })?,
            None => events.recv().await,
        };
        match event {
            Some(Event::Delta {
                index,
                text,
                token_ids,
            }) => {
                if let Some(c) = completions.get_mut(index) {
                    c.text.push_str(&text);
                    if return_ids {
                        c.token_ids.extend(token_ids);
                    }
                }
            }
            Some(Event::Finished {
                index,
                reason,
                stop_sequence,
                completion_tokens: tokens,
            }) => {
                if let Some(c) = completions.get_mut(index) {
                    c.finish_reason = finish_reason(reason) as i32;
                    c.stop_sequence = stop_sequence.unwrap_or_default();
                }
                completion_tokens += tokens;
                finished += 1;
            }
            Some(Event::Failed(status)) => return Err(status),
            None => {
                return Err(ErrorKind::Internal.status("generation ended without finishing"));
            }
        }
    }
    Ok(pb::GenerateResponse {
        model: Some(model_ref(model)),
        completions,
        usage: Some(usage(info.prompt_tokens, completion_tokens)),
    })
}

/// Streams text deltas as they are decoded. The last message of each
/// completion carries its finish reason; with `include_usage`, the very last
/// message carries the usage. Dropping the stream cancels the request.
pub(crate) async fn generate_stream(
    model: &Arc<LoadedVersion>,
    request: pb::GenerateRequest,
    deadline: Option<Instant>,
) -> Result<GenerateStream, Status> {
    let return_ids = request.return_token_ids;
    let include_usage = request.include_usage;
    let (events, info) = start(model, request, deadline).await?;
    let model_ref = model_ref(model);
    // The stream keeps the version alive while it decodes.
    let keep = model.clone();
    let mut finished = 0;
    let mut completion_tokens = 0;
    let stream = UnboundedReceiverStream::new(events).map(move |event| {
        let _ = &keep;
        match event {
            Event::Delta {
                index,
                text,
                token_ids,
            } => Ok(pb::GenerateStreamResponse {
                model: Some(model_ref.clone()),
                index: index as u32,
                text_delta: text,
                token_ids: if return_ids { token_ids } else { Vec::new() },
                finish_reason: pb::FinishReason::Unspecified as i32,
                usage: None,
            }),
            Event::Finished {
                index,
                reason,
                completion_tokens: tokens,
                ..
            } => {
                finished += 1;
                completion_tokens += tokens;
                let last = finished == info.n;
                Ok(pb::GenerateStreamResponse {
                    model: Some(model_ref.clone()),
                    index: index as u32,
                    text_delta: String::new(),
                    token_ids: Vec::new(),
                    finish_reason: finish_reason(reason) as i32,
                    usage: (last && include_usage)
                        .then(|| usage(info.prompt_tokens, completion_tokens)),
                })
            }
            Event::Failed(status) => Err(status),
        }
    });
    // The scheduler ends the stream with DEADLINE_EXCEEDED when the deadline passes.
    Ok(Box::pin(stream))
}
