//! The decoder graph and its KV cache.
//!
//! A generation model's ONNX graph takes `input_ids`, `attention_mask`,
//! `position_ids` (INT64; optional for right padding) and
//! `past_key_values.{i}.key|value` (FP32 `[batch, kv_heads, past,
//! head_dim]`), and returns `logits` (FP32 `[batch, 1, vocab]`, each row's
//! last new token) and `present.{i}.key|value` (`[batch, kv_heads, past +
//! new, head_dim]`).
//!
//! Rows of a batch are padded on the side the model's configuration names
//! ([`Padding`]): left, each row's real positions end at the last column and
//! new tokens are appended there; right, each row's real positions start at
//! column 0 and the graph writes a row's new token right after its own last
//! one, at the column its mask sum says.
//!
//! A right-padded graph may also update its cache in place ([`KvCache::Shared`]):
//! each `past_key_values.*` and its `present.*` are bound to one tensor wider
//! than the longest row (its *capacity*), and ONNX Runtime's
//! `GroupQueryAttention`, seeing the two at one address, writes only the new
//! columns instead of copying the whole cache into a new output every step.

use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
use ort::session::Session;
use ort::value::{DynValue, Tensor};

use crate::engine::{EngineError, Signature};
use crate::repository::{KvCache, Padding};
use crate::tensor::DataType;

/// The shape of a decoder, read from its graph.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DecoderSpec {
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// The padding side the graph takes.
    pub padding: Padding,
    /// Whether the graph takes `position_ids`.
    pub positions: bool,
    /// How the cache passes from one step to the next.
    pub cache: KvCache,
    /// `past_key_values.{i}.key`, `past_key_values.{i}.value`, … in layer order.
    past: Vec<String>,
    /// `present.{i}.key`, `present.{i}.value`, … in the same order.
    present: Vec<String>,
}

impl DecoderSpec {
    /// Checks that a graph has the decoder interface for `padding`; errors
    /// say what differs. A left-padded graph must take `position_ids` (its
    /// rows' positions do not follow from their columns); a right-padded one
    /// may. The cache starts out [`KvCache::Copy`]; the caller switches it to
    /// shared once [`Decoder::check_in_place`] passes.
    pub(crate) fn from_signature(signature: &Signature, padding: Padding) -> Result<Self, String> {
        let input = |name: &str| signature.inputs.iter().find(|s| s.name == name);
        let output = |name: &str| signature.outputs.iter().find(|s| s.name == name);
        for name in ["input_ids", "attention_mask", "position_ids"] {
            match input(name) {
                Some(spec) if spec.dtype == DataType::Int64 => {}
                Some(spec) => {
                    return Err(format!(
                        "input '{name}' is {:?}; a generation model needs INT64",
                        spec.dtype
                    ));
                }
                None if name == "position_ids" && padding == Padding::Right => {}
                None if name == "position_ids" => {
                    return Err(
                        "a left-padded generation model needs an input 'position_ids' (or set generation.padding: right for a graph that reads positions off the mask)"
                            .into(),
                    );
                }
                None => return Err(format!("a generation model needs an input '{name}'")),
            }
        }
        match output("logits") {
            Some(spec) if spec.dtype == DataType::Fp32 && spec.shape.len() == 3 => {}
            _ => {
                return Err(
                    "a generation model needs an FP32 output 'logits' [batch, 1, vocab]".into(),
                );
            }
        }
        let layers = (0..)
            .take_while(|i| input(&format!("past_key_values.{i}.key")).is_some())
            .count();
        if layers == 0 {
            return Err("a generation model needs inputs 'past_key_values.0.key' and on".into());
        }
        let first = input("past_key_values.0.key").map(|s| s.shape.clone());
        let (kv_heads, head_dim) = match first.as_deref() {
            Some([_, heads, _, dim]) if *heads > 0 && *dim > 0 => (*heads as usize, *dim as usize),
            other => {
                return Err(format!(
                    "'past_key_values.0.key' has shape {other:?}; expected [batch, kv_heads, past, head_dim] with fixed kv_heads and head_dim"
                ));
            }
        };
        let mut past = Vec::with_capacity(2 * layers);
        let mut present = Vec::with_capacity(2 * layers);
        for i in 0..layers {
            for part in ["key", "value"] {
                let p = format!("past_key_values.{i}.{part}");
                let q = format!("present.{i}.{part}");
                match input(&p) {
                    Some(s)
                        if s.dtype == DataType::Fp32
                            && s.shape == first.clone().unwrap_or_default() => {}
                    _ => {
                        return Err(format!(
                            "input '{p}' is missing or differs from past_key_values.0.key"
                        ));
                    }
                }
                if output(&q).is_none() {
                    return Err(format!("a generation model needs an output '{q}'"));
                }
                past.push(p);
                present.push(q);
            }
        }
        Ok(DecoderSpec {
            layers,
            kv_heads,
            head_dim,
            padding,
            positions: input("position_ids").is_some(),
            cache: KvCache::Copy,
            past,
            present,
        })
    }

    /// Bytes of KV cache one token position of one row takes.
    pub(crate) fn bytes_per_token(&self) -> usize {
        2 * self.layers * self.kv_heads * self.head_dim * std::mem::size_of::<f32>()
    }
}

/// The KV cache of a batch: one tensor per past input, `[rows, heads,
/// capacity, dim]`, of which each row's real positions fill `len` columns on
/// the padding's side and `width` is the longest row.
#[derive(Debug)]
pub(crate) struct Kv {
    values: Vec<DynValue>,
    pub rows: usize,
    pub width: usize,
    /// Columns of the tensors: `width` for a cache the graph copies into a
    /// new output every step, more for one it updates in place.
    pub capacity: usize,
}

/// One row of a new batch: which cache it comes from, which row there, and
/// how many real positions it has (at the padding's end of the row).
#[derive(Debug, Clone, Copy)]
pub(crate) struct RowSource<'a> {
    pub kv: &'a Kv,
    pub row: usize,
    pub len: usize,
}

fn run_error(e: impl std::fmt::Display) -> EngineError {
    EngineError::Run(e.to_string())
}

impl Kv {
    /// A new batch of `sources.len()` rows whose longest row is `width`
    /// positions, in tensors `capacity` columns wide: each row's real
    /// positions copied to the end of the row the padding leaves them at and
    /// zeros (masked) beside them. A cache the graph updates in place is
    /// allocated by ONNX Runtime (the binding needs tensors it owns).
    pub(crate) fn gather(
        decoder: &Decoder,
        sources: &[RowSource<'_>],
        width: usize,
        capacity: usize,
    ) -> Result<Kv, EngineError> {
        let spec = &decoder.spec;
        let (h, d) = (spec.kv_heads, spec.head_dim);
        let rows = sources.len();
        debug_assert!(capacity >= width);
        let shared = spec.cache == KvCache::Shared;
        let mut values = Vec::with_capacity(spec.past.len());
        let mut placed = Vec::with_capacity(rows);
        for index in 0..spec.past.len() {
            placed.clear();
            for source in sources {
                let (_, data) = source.kv.values[index]
                    .try_extract_tensor::<f32>()
                    .map_err(run_error)?;
                placed.push(Placed {
                    data,
                    capacity: source.kv.capacity,
                    row: source.row,
                    len: source.len,
                });
            }
            let shape = [rows, h, capacity, d];
            let value = if shared {
                // ONNX Runtime zeroes a CPU tensor it allocates.
                let mut value = Tensor::<f32>::new(decoder.session.allocator(), shape)
                    .map_err(run_error)?
                    .into_dyn();
                let (_, out) = value.try_extract_tensor_mut::<f32>().map_err(run_error)?;
                place_rows(out, capacity, h, d, &placed, spec.padding);
                value
            } else {
                let mut out = vec![0f32; rows * h * capacity * d];
                place_rows(&mut out, capacity, h, d, &placed, spec.padding);
                tensor(shape.to_vec(), out)?
            };
            values.push(value);
        }
        Ok(Kv {
            values,
            rows,
            width,
            capacity,
        })
    }

    /// A copy of the first `len` positions of this one-row cache, which the
    /// graph copied (no padding: capacity = width), as a one-row cache of
    /// `len` positions.
    pub(crate) fn head(&self, spec: &DecoderSpec, len: usize) -> Result<Kv, EngineError> {
        if self.rows != 1 || self.capacity != self.width || len > self.width {
            return Err(EngineError::Run(format!(
                "the first {len} positions of a cache of {} rows, {} of {} columns used",
                self.rows, self.width, self.capacity
            )));
        }
        let (h, d) = (spec.kv_heads, spec.head_dim);
        let values = self
            .values
            .iter()
            .map(|value| {
                let (_, data) = value.try_extract_tensor::<f32>().map_err(run_error)?;
                let mut out = Vec::with_capacity(h * len * d);
                for head in 0..h {
                    let from = head * self.capacity * d;
                    out.extend_from_slice(&data[from..from + len * d]);
                }
                tensor(vec![1, h, len, d], out)
            })
            .collect::<Result<_, _>>()?;
        Ok(Kv {
            values,
            rows: 1,
            width: len,
            capacity: len,
        })
    }

    /// An empty cache (no positions) for `rows` rows, copied by the graph.
    pub(crate) fn empty(spec: &DecoderSpec, rows: usize) -> Result<Kv, EngineError> {
        let values = (0..spec.past.len())
            .map(|_| {
                tensor(
                    vec![rows, spec.kv_heads, 0, spec.head_dim],
                    Vec::<f32>::new(),
                )
            })
            .collect::<Result<_, _>>()?;
        Ok(Kv {
            values,
            rows,
            width: 0,
            capacity: 0,
        })
    }
}

fn tensor<T: ort::value::PrimitiveTensorElementType + Clone + std::fmt::Debug + 'static>(
    shape: Vec<usize>,
    data: Vec<T>,
) -> Result<DynValue, EngineError> {
    let shape: Vec<i64> = shape.into_iter().map(|n| n as i64).collect();
    Ok(Tensor::from_array((shape, data))
        .map_err(run_error)?
        .into_dyn())
}

/// One source row of [`place_rows`]: `data` is `[rows, heads, capacity, dim]`.
#[derive(Debug)]
struct Placed<'a> {
    data: &'a [f32],
    capacity: usize,
    row: usize,
    len: usize,
}

/// Copies the `len` real positions of each source row into row `r` of `out`
/// (`[rows, heads, capacity, dim]`): the last `len` columns to the last ones
/// for left padding, the first to the first for right padding.
fn place_rows(
    out: &mut [f32],
    capacity: usize,
    heads: usize,
    dim: usize,
    sources: &[Placed<'_>],
    padding: Padding,
) {
    for (r, source) in sources.iter().enumerate() {
        let len = source.len.min(capacity).min(source.capacity);
        let (from_column, to_column) = match padding {
            Padding::Left => (source.capacity - len, capacity - len),
            Padding::Right => (0, 0),
        };
        for head in 0..heads {
            let from = ((source.row * heads + head) * source.capacity + from_column) * dim;
            let to = ((r * heads + head) * capacity + to_column) * dim;
            out[to..to + len * dim].copy_from_slice(&source.data[from..from + len * dim]);
        }
    }
}

/// One decoder session.
#[derive(Debug)]
pub(crate) struct Decoder {
    pub session: Session,
    pub spec: DecoderSpec,
}

/// A step's inputs: `rows × seq` tokens with their positions (fed when the
/// graph takes them) and the mask over `past + seq` columns.
#[derive(Debug)]
pub(crate) struct StepInput {
    pub ids: Vec<i64>,
    pub positions: Vec<i64>,
    pub mask: Vec<i64>,
    pub rows: usize,
    pub seq: usize,
}

impl Decoder {
    /// Runs one forward pass over `past`, a cache the graph copies, and
    /// returns each row's logits (`rows × vocab`, row-major) and the grown
    /// cache.
    pub(crate) fn run(
        &mut self,
        input: StepInput,
        past: Kv,
    ) -> Result<(Vec<f32>, usize, Kv), EngineError> {
        let rows = input.rows;
        let width = past.width + input.seq;
        debug_assert_eq!(past.capacity, past.width);
        let mut inputs = self.step_inputs(input, past.width)?;
        for (name, value) in self.spec.past.iter().zip(past.values) {
            inputs.push((name.clone(), value));
        }
        let mut outputs = self.session.run(inputs).map_err(run_error)?;
        let (logits, vocab) = logits(&mut outputs, rows)?;
        let mut values = Vec::with_capacity(self.spec.present.len());
        for name in &self.spec.present {
            values.push(
                outputs
                    .remove(name.as_str())
                    .ok_or_else(|| EngineError::Run(format!("the model produced no '{name}'")))?,
            );
        }
        Ok((
            logits,
            vocab,
            Kv {
                values,
                rows,
                width,
                capacity: width,
            },
        ))
    }

    /// Runs one decode step over a cache the graph updates in place: each
    /// past tensor is bound as its present output too, the graph writes each
    /// row's new positions after its own, and `kv` grows by `input.seq`
    /// columns within its capacity. Returns the logits as [`Decoder::run`].
    pub(crate) fn run_in_place(
        &mut self,
        input: StepInput,
        kv: &mut Kv,
    ) -> Result<(Vec<f32>, usize), EngineError> {
        let rows = input.rows;
        let width = kv.width + input.seq;
        if width > kv.capacity || rows != kv.rows {
            return Err(EngineError::Run(format!(
                "a step to {width} positions over {rows} rows does not fit a cache of {} rows and {} columns",
                kv.rows, kv.capacity
            )));
        }
        let mut binding = self.session.create_binding().map_err(run_error)?;
        for (name, value) in self.step_inputs(input, kv.width)? {
            binding.bind_input(name, &value).map_err(run_error)?;
        }
        for (index, value) in kv.values.iter_mut().enumerate() {
            binding
                .bind_input(self.spec.past[index].as_str(), value)
                .map_err(run_error)?;
            binding
                .bind_output(self.spec.present[index].as_str(), value)
                .map_err(run_error)?;
        }
        let cpu = MemoryInfo::new(
            AllocationDevice::CPU,
            0,
            AllocatorType::Device,
            MemoryType::Default,
        )
        .map_err(run_error)?;
        binding
            .bind_output_to_device("logits", &cpu)
            .map_err(run_error)?;
        let mut outputs = self.session.run_binding(&binding).map_err(run_error)?;
        let result = logits(&mut outputs, rows)?;
        kv.width = width;
        Ok(result)
    }

    /// `input_ids`, `attention_mask` and (when the graph takes them)
    /// `position_ids` of a step over `past` cached columns.
    fn step_inputs(
        &self,
        input: StepInput,
        past: usize,
    ) -> Result<Vec<(String, DynValue)>, EngineError> {
        let StepInput {
            ids,
            positions,
            mask,
            rows,
            seq,
        } = input;
        let width = past + seq;
        debug_assert_eq!(mask.len(), rows * width);
        let mut inputs: Vec<(String, DynValue)> = Vec::with_capacity(3 + self.spec.past.len());
        inputs.push(("input_ids".into(), tensor(vec![rows, seq], ids)?));
        inputs.push(("attention_mask".into(), tensor(vec![rows, width], mask)?));
        if self.spec.positions {
            inputs.push(("position_ids".into(), tensor(vec![rows, seq], positions)?));
        }
        Ok(inputs)
    }

    /// Switches to a cache the graph updates in place ([`KvCache::Shared`])
    /// after checking, with one token over a two-column cache, that it
    /// really does: ONNX Runtime refuses the binding when the graph's present
    /// output would be wider than its past (a graph that concatenates), and
    /// the token's keys must land in column 0. On failure the decoder keeps
    /// copying.
    pub(crate) fn share_cache(&mut self) -> Result<(), String> {
        self.spec.cache = KvCache::Shared;
        let checked = self.check_in_place();
        if checked.is_err() {
            self.spec.cache = KvCache::Copy;
        }
        checked.map_err(|e| {
            format!(
                "generation.kv_cache: shared needs a graph that writes its new keys and values into the past tensors in place (ONNX Runtime's GroupQueryAttention); this one does not: {e}"
            )
        })
    }

    fn check_in_place(&mut self) -> Result<(), EngineError> {
        let empty = Kv::empty(&self.spec, 1)?;
        let source = RowSource {
            kv: &empty,
            row: 0,
            len: 0,
        };
        let mut kv = Kv::gather(self, &[source], 0, 2)?;
        let input = StepInput {
            ids: vec![0],
            positions: vec![0],
            mask: vec![1],
            rows: 1,
            seq: 1,
        };
        self.run_in_place(input, &mut kv)?;
        let dim = self.spec.head_dim;
        let (_, keys) = kv.values[0]
            .try_extract_tensor::<f32>()
            .map_err(run_error)?;
        // Head 0: column 0 holds the new key, column 1 is still untouched.
        let written = keys[..dim].iter().any(|&v| v != 0.0);
        let untouched = keys[dim..2 * dim].iter().all(|&v| v == 0.0);
        if written && untouched {
            Ok(())
        } else {
            Err(EngineError::Run(
                "the new keys did not appear in column 0 of past_key_values.0.key".into(),
            ))
        }
    }
}

/// Takes `logits` (`[rows, 1, vocab]`) out of a run's outputs.
fn logits(
    outputs: &mut ort::session::SessionOutputs<'_>,
    rows: usize,
) -> Result<(Vec<f32>, usize), EngineError> {
    let logits = outputs
        .remove("logits")
        .ok_or_else(|| EngineError::Run("the model produced no 'logits'".into()))?;
    let (shape, data) = logits.try_extract_tensor::<f32>().map_err(run_error)?;
    let vocab = shape.last().copied().unwrap_or(0) as usize;
    if shape.len() != 3 || shape[0] as usize != rows || vocab == 0 || data.len() != rows * vocab {
        return Err(EngineError::Run(format!(
            "'logits' has shape {shape:?}; expected [{rows}, 1, vocab]"
        )));
    }
    Ok((data.to_vec(), vocab))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::TensorSpec;

    fn spec(name: &str, dtype: DataType, shape: &[i64]) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
        }
    }

    fn decoder_signature(layers: usize) -> Signature {
        let mut inputs = vec![
            spec("input_ids", DataType::Int64, &[-1, -1]),
            spec("attention_mask", DataType::Int64, &[-1, -1]),
            spec("position_ids", DataType::Int64, &[-1, -1]),
        ];
        let mut outputs = vec![spec("logits", DataType::Fp32, &[-1, 1, 100])];
        for i in 0..layers {
            for part in ["key", "value"] {
                inputs.push(spec(
                    &format!("past_key_values.{i}.{part}"),
                    DataType::Fp32,
                    &[-1, 3, -1, 64],
                ));
                outputs.push(spec(
                    &format!("present.{i}.{part}"),
                    DataType::Fp32,
                    &[-1, 3, -1, 64],
                ));
            }
        }
        Signature { inputs, outputs }
    }

    #[test]
    fn the_decoder_interface_is_read_from_the_signature() {
        let spec = DecoderSpec::from_signature(&decoder_signature(2), Padding::Left).unwrap();
        assert_eq!((spec.layers, spec.kv_heads, spec.head_dim), (2, 3, 64));
        assert!(spec.positions);
        assert_eq!(spec.past[3], "past_key_values.1.value");
        assert_eq!(spec.present[3], "present.1.value");
        assert_eq!(spec.bytes_per_token(), 2 * 2 * 3 * 64 * 4);
    }

    /// Rows 1 (2 real positions) then 0 (3) of a source of 2 rows, 1 head,
    /// width 3, dim 2 holding 0..12, placed into a batch 4 wide.
    fn placed_pair(padding: Padding) -> Vec<f32> {
        let source: Vec<f32> = (0..12).map(|v| v as f32).collect();
        let placed = [(1, 2), (0, 3)].map(|(row, len)| Placed {
            data: &source,
            capacity: 3,
            row,
            len,
        });
        let mut out = vec![0.0; 2 * 4 * 2];
        place_rows(&mut out, 4, 1, 2, &placed, padding);
        out
    }

    #[test]
    fn rows_are_placed_right_aligned_with_zeros_before() {
        assert_eq!(
            placed_pair(Padding::Left),
            vec![
                0.0, 0.0, 0.0, 0.0, 8.0, 9.0, 10.0, 11.0, // row 1's last 2 positions
                0.0, 0.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, // row 0 whole
            ]
        );
    }

    #[test]
    fn right_padded_rows_are_placed_from_column_zero_with_zeros_after() {
        // Row 1's real positions are its columns 0 and 1; column 2 is what the
        // graph wrote past its end.
        assert_eq!(
            placed_pair(Padding::Right),
            vec![
                6.0, 7.0, 8.0, 9.0, 0.0, 0.0, 0.0, 0.0, // row 1's first 2 positions
                0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 0.0, 0.0, // row 0 whole
            ]
        );
    }

    #[test]
    fn position_ids_are_optional_only_for_right_padding() {
        let mut signature = decoder_signature(1);
        signature.inputs.remove(2);
        let error = DecoderSpec::from_signature(&signature, Padding::Left).unwrap_err();
        assert!(error.contains("position_ids"), "{error}");
        let spec = DecoderSpec::from_signature(&signature, Padding::Right).unwrap();
        assert!(!spec.positions);
        assert_eq!(spec.padding, Padding::Right);
    }

    #[test]
    fn a_graph_without_the_interface_is_refused_with_the_reason() {
        let mut no_cache = decoder_signature(0);
        assert!(
            DecoderSpec::from_signature(&no_cache, Padding::Left)
                .unwrap_err()
                .contains("past_key_values.0.key")
        );
        no_cache.inputs.remove(1);
        assert!(
            DecoderSpec::from_signature(&no_cache, Padding::Left)
                .unwrap_err()
                .contains("attention_mask")
        );
        let mut no_present = decoder_signature(2);
        no_present.outputs.pop();
        assert!(
            DecoderSpec::from_signature(&no_present, Padding::Left)
                .unwrap_err()
                .contains("present.1.value")
        );
        let mut float_ids = decoder_signature(1);
        float_ids.inputs[0].dtype = DataType::Fp32;
        assert!(
            DecoderSpec::from_signature(&float_ids, Padding::Left)
                .unwrap_err()
                .contains("INT64")
        );
    }
}
