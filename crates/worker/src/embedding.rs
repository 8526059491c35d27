//! Sentence embeddings (`lmgrid.v1.EmbeddingService/Embed`) over a model of
//! kind `embedding`: texts are tokenized in the request handler (on a
//! blocking thread), padded to the longest text of the request and submitted
//! to the version's batcher as one padded job. The batcher pads a batch of
//! such jobs to its longest sequence, so requests of any length share
//! executions; padding is masked by the model, so a text embeds the same
//! alone or in any batch.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use lmgrid_core::error::ErrorKind;
use lmgrid_proto::lmgrid::v1 as pb;
use tokenizers::Tokenizer;
use tonic::Status;

use crate::batcher::BatchKey;
use crate::engine::{Signature, TensorSpec};
use crate::models::LoadedVersion;
use crate::tensor::{DataType, Tensor, TensorData};

const INPUT_IDS: &str = "input_ids";
const ATTENTION_MASK: &str = "attention_mask";
const TOKEN_TYPE_IDS: &str = "token_type_ids";
/// The output read when a model has more than one.
const EMBEDDING_OUTPUT: &str = "sentence_embedding";

/// The tokenizer and the signature facts of one embedding model version.
pub(crate) struct Embedder {
    tokenizer: Tokenizer,
    /// Index of the embedding among the model's outputs.
    output: usize,
    /// Length of the model's embeddings.
    dimensions: usize,
}

impl std::fmt::Debug for Embedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedder")
            .field("output", &self.output)
            .field("dimensions", &self.dimensions)
            .finish_non_exhaustive()
    }
}

impl Embedder {
    /// Loads `tokenizer.json` and checks that the signature is a sentence
    /// encoder's. Blocking.
    pub(crate) fn load(tokenizer: &Path, signature: &Signature) -> Result<Embedder, String> {
        for spec in &signature.inputs {
            if ![INPUT_IDS, ATTENTION_MASK, TOKEN_TYPE_IDS].contains(&spec.name.as_str()) {
                return Err(format!(
                    "an embedding model takes only {INPUT_IDS}, {ATTENTION_MASK} and {TOKEN_TYPE_IDS}, not '{}'",
                    spec.name
                ));
            }
            if spec.dtype != DataType::Int64 || spec.shape.len() != 2 {
                return Err(format!(
                    "embedding model input '{}' must be INT64 [batch, sequence], not {} {:?}",
                    spec.name, spec.dtype, spec.shape
                ));
            }
        }
        for required in [INPUT_IDS, ATTENTION_MASK] {
            if !signature.inputs.iter().any(|s| s.name == required) {
                return Err(format!("an embedding model needs the input '{required}'"));
            }
        }
        let output = match signature.outputs.as_slice() {
            [_] => 0,
            outputs => outputs
                .iter()
                .position(|s| s.name == EMBEDDING_OUTPUT)
                .ok_or_else(|| {
                    format!(
                        "an embedding model with several outputs needs one named '{EMBEDDING_OUTPUT}'"
                    )
                })?,
        };
        let dimensions = match &signature.outputs[output] {
            TensorSpec {
                dtype: DataType::Fp32,
                shape,
                ..
            } if shape.len() == 2 && shape[1] > 0 => usize::try_from(shape[1]).unwrap_or(0),
            spec => {
                return Err(format!(
                    "embedding model output '{}' must be FP32 [batch, dimensions] with fixed dimensions, not {} {:?}",
                    spec.name, spec.dtype, spec.shape
                ));
            }
        };
        let mut tokenizer = Tokenizer::from_file(tokenizer)
            .map_err(|e| format!("load tokenizer {}: {e}", tokenizer.display()))?;
        // Each text is encoded alone and padded where it is batched; the
        // truncation of tokenizer.json stays.
        tokenizer.with_padding(None);
        Ok(Embedder {
            tokenizer,
            output,
            dimensions,
        })
    }

    /// Token ids of each text, special tokens included, truncated as the
    /// tokenizer says. Errors name the text's index.
    fn tokenize(&self, texts: &[String]) -> Result<Vec<Vec<i64>>, String> {
        texts
            .iter()
            .enumerate()
            .map(|(i, text)| {
                let encoding = self
                    .tokenizer
                    .encode(text.as_str(), true)
                    .map_err(|e| format!("inputs[{i}]: tokenize: {e}"))?;
                Ok(encoding.get_ids().iter().map(|&id| i64::from(id)).collect())
            })
            .collect()
    }
}

/// The model's inputs for `sequences`, padded to the longest with zeros.
fn encoder_inputs(signature: &Signature, sequences: &[Vec<i64>]) -> Vec<Tensor> {
    let longest = sequences.iter().map(Vec::len).max().unwrap_or(0);
    let shape = vec![
        i64::try_from(sequences.len()).unwrap_or(i64::MAX),
        i64::try_from(longest).unwrap_or(i64::MAX),
    ];
    let padded = |row: &dyn Fn(&[i64]) -> Vec<i64>| -> Vec<i64> {
        let mut out = Vec::with_capacity(sequences.len() * longest);
        for ids in sequences {
            out.extend(row(ids));
            out.resize(out.len() + longest - ids.len(), 0);
        }
        out
    };
    signature
        .inputs
        .iter()
        .map(|spec| {
            let data = match spec.name.as_str() {
                INPUT_IDS => padded(&|ids| ids.to_vec()),
                ATTENTION_MASK => padded(&|ids| vec![1; ids.len()]),
                _ => vec![0; sequences.len() * longest],
            };
            Tensor {
                name: spec.name.clone(),
                shape: shape.clone(),
                data: TensorData::Int64(data),
            }
        })
        .collect()
}

/// Truncates an embedding to `dimensions` and scales it back to norm 1.
fn shorten(values: &mut Vec<f32>, dimensions: usize) {
    values.truncate(dimensions);
    let norm = values.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
    values.iter_mut().for_each(|v| *v /= norm);
}

fn invalid(message: impl Into<String>) -> Status {
    ErrorKind::InvalidArgument.status(message)
}

/// Answers one `Embed` request on a resolved model version.
pub(crate) async fn embed(
    model: &Arc<LoadedVersion>,
    request: pb::EmbedRequest,
    deadline: Option<Instant>,
) -> Result<pb::EmbedResponse, Status> {
    let Some(embedder) = &model.embedder else {
        return Err(invalid(format!(
            "model '{}' is not an embedding model (its config.yaml does not say 'kind: embedding')",
            model.name
        )));
    };
    let texts = request.inputs;
    if texts.is_empty() {
        return Err(invalid("inputs is empty"));
    }
    let limit = model.config.max_batch_size;
    if texts.len() > limit {
        return Err(invalid(format!(
            "inputs has {} texts; model '{}' embeds at most {limit} per request",
            texts.len(),
            model.name
        )));
    }
    if let Some(i) = texts.iter().position(String::is_empty) {
        return Err(invalid(format!("inputs[{i}] is empty")));
    }
    let full = embedder.dimensions;
    let dimensions = match usize::try_from(request.dimensions) {
        Ok(0) => full,
        Ok(d) if d <= full => d,
        _ => {
            return Err(invalid(format!(
                "dimensions {} is more than the {full} of model '{}'",
                request.dimensions, model.name
            )));
        }
    };

    // Tokenizing a full request takes milliseconds: off the executor.
    let tokenizing = model.clone();
    let sequences = tokio::task::spawn_blocking(move || {
        tokenizing
            .embedder
            .as_ref()
            .map_or_else(|| Ok(Vec::new()), |e| e.tokenize(&texts))
    })
    .await
    .map_err(|e| ErrorKind::Internal.status(format!("tokenize: {e}")))?
    .map_err(invalid)?;
    let tokens: usize = sequences.iter().map(Vec::len).sum();
    let rows = sequences.len();
    let inputs = encoder_inputs(&model.signature, &sequences);
    let level = model
        .config
        .dynamic_batching
        .as_ref()
        .map_or(1, |d| d.default_priority_level);
    let key = BatchKey::padded(&inputs);
    let outputs = crate::grpc::compute(model, inputs, key, rows, level - 1, deadline).await?;

    let Some(Tensor {
        data: TensorData::Fp32(values),
        ..
    }) = outputs.into_iter().nth(embedder.output)
    else {
        return Err(ErrorKind::Internal.status("the model returned no FP32 embedding output"));
    };
    if values.len() != rows * full {
        return Err(ErrorKind::Internal.status(format!(
            "the model returned {} values for {rows} embeddings of {full}",
            values.len()
        )));
    }
    let embeddings = values
        .chunks_exact(full)
        .zip(0u32..)
        .map(|(row, index)| {
            let mut values = row.to_vec();
            if dimensions < full {
                shorten(&mut values, dimensions);
            }
            pb::Embedding { index, values }
        })
        .collect();
    let prompt_tokens = u32::try_from(tokens).unwrap_or(u32::MAX);
    Ok(pb::EmbedResponse {
        model: Some(pb::ModelRef {
            name: model.name.clone(),
            version: model.version.to_string(),
        }),
        embeddings,
        usage: Some(pb::Usage {
            prompt_tokens,
            completion_tokens: 0,
            total_tokens: prompt_tokens,
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str) -> TensorSpec {
        TensorSpec {
            name: name.to_string(),
            dtype: DataType::Int64,
            shape: vec![-1, -1],
        }
    }

    #[test]
    fn inputs_are_padded_to_the_longest_sequence_in_model_order() {
        let signature = Signature {
            inputs: vec![spec(TOKEN_TYPE_IDS), spec(INPUT_IDS), spec(ATTENTION_MASK)],
            outputs: Vec::new(),
        };
        let inputs = encoder_inputs(&signature, &[vec![101, 7, 102], vec![101, 102]]);
        let names: Vec<&str> = inputs.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, [TOKEN_TYPE_IDS, INPUT_IDS, ATTENTION_MASK]);
        assert!(inputs.iter().all(|t| t.shape == [2, 3]));
        assert_eq!(inputs[0].data, TensorData::Int64(vec![0; 6]));
        assert_eq!(
            inputs[1].data,
            TensorData::Int64(vec![101, 7, 102, 101, 102, 0])
        );
        assert_eq!(inputs[2].data, TensorData::Int64(vec![1, 1, 1, 1, 1, 0]));
    }

    #[test]
    fn shortened_embeddings_have_norm_one() {
        let mut values = vec![3.0, 4.0, 12.0];
        shorten(&mut values, 2);
        assert_eq!(values, [0.6, 0.8]);
    }
}
