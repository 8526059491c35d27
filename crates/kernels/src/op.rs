//! The ONNX Runtime side: `ai.lmgrid.MatMulQ4` and `MatMulQ8` as custom
//! operators whose kernels spread their work over the session's intra-op
//! thread pool.

use ort::operator::{
    ComputeContext, Kernel, KernelContext, Operator, OperatorInput, OperatorOutput,
};
use ort::value::TensorElementType;

use crate::packed::{self, Format, Packed, PackedQ4, PackedQ8};
use crate::q4::{self, Q4Matrix};
use crate::q8::{self, Q8Matrix};
use crate::{Isa, gemm, norm};

/// Matrix columns one task of the thread pool computes.
const COLUMNS_PER_TASK: usize = 64;

/// Matrix columns one task computes on the packed AVX2 path, for every row
/// of the call: two groups (576 outputs make 18 tasks, which two threads
/// share evenly).
const PACKED_COLUMNS_PER_TASK: usize = 2 * packed::GROUP;

/// `MatMulQ4(x: f32 [..., K], q: u8 [N, K/32, 16], scale: f16 [N, K/32],
/// minimum: f16 [N, K/32]) -> y: f32 [..., N]`, attributes `K` and `N`; `x`'s
/// leading dimensions (T rows in all) are the output's. With
/// the optional attribute `swiglu = 1` (N even) the matrix is a fused
/// gate/up projection and `y` is `[..., N/2]`: `silu(x Wᵀ[:, :N/2]) ·
/// x Wᵀ[:, N/2:]` ([`crate::swiglu`]), in place of a graph's `Split`,
/// `QuickGelu` and `Mul`. With the optional inputs `skip` (f32, `x`'s shape) and
/// `gamma` (f32 `[K]`) and the attribute `epsilon`, `x` is first replaced by
/// `RMSNorm(x + skip) · gamma` ([`crate::norm`]) and the optional second output
/// is `x + skip`, in place of a graph's `SkipSimplifiedLayerNormalization`.
#[derive(Debug)]
pub(crate) struct MatMulQ4;

#[derive(Debug)]
pub(crate) struct MatMulQ4Kernel {
    k: usize,
    n: usize,
    /// The `swiglu` attribute: the output is the gated half.
    swiglu: bool,
    /// The `epsilon` attribute of the norm in front (with `skip` and `gamma`).
    epsilon: Option<f32>,
    /// The normalized activations, with `skip` and `gamma`, reused across calls.
    normed: Vec<f32>,
    /// Reused across calls: the activations reordered for the AVX-512 and
    /// portable kernels (split, and interleaved for prompts), and their block
    /// sums for the AVX2 one.
    split: Vec<f32>,
    sums: Vec<f32>,
    interleaved: Vec<f32>,
    /// On AVX2, the weights repacked ([`crate::packed`]): the whole matrix,
    /// or with `swiglu` its gate and up halves. Packed once when the kernel
    /// is created if the weights are constant (initializers), else on every
    /// call.
    packed: Vec<PackedQ4>,
    /// Whether `packed` holds the constant weights.
    packed_once: bool,
}

/// `w` repacked for the AVX2 path: whole, or as its gate and up halves.
fn pack(w: &Q4Matrix<'_>, swiglu: bool) -> Vec<PackedQ4> {
    if swiglu {
        let half = w.n / 2;
        vec![
            PackedQ4::new(&w.rows(0..half)),
            PackedQ4::new(&w.rows(half..w.n)),
        ]
    } else {
        vec![PackedQ4::new(w)]
    }
}

/// `MatMulQ8`'s weights (inputs 1 and 2) packed for AVX2 when they are
/// constant and well formed; `None` leaves packing, or naming what is wrong,
/// to `compute`.
fn pack_constant_q8(ctx: &KernelContext<'_>, k: usize, n: usize) -> Option<PackedQ8> {
    use ort::value::DynTensorValueType;
    let q = ctx.constant_input::<DynTensorValueType>(1).ok()?;
    let scale = ctx.constant_input::<DynTensorValueType>(2).ok()?;
    let (_, q) = q.try_extract_tensor::<i8>().ok()?;
    let (_, scale) = scale.try_extract_tensor::<f32>().ok()?;
    Some(PackedQ8::new(&Q8Matrix::new(k, n, q, scale).ok()?))
}

/// `MatMulQ4`'s weights (inputs 1 to 3) packed for AVX2 when they are
/// constant and well formed; `None` leaves packing, or naming what is wrong,
/// to `compute`.
fn pack_constant(
    ctx: &KernelContext<'_>,
    k: usize,
    n: usize,
    swiglu: bool,
) -> Option<Vec<PackedQ4>> {
    use ort::value::DynTensorValueType;
    let q = ctx.constant_input::<DynTensorValueType>(1).ok()?;
    let scale = ctx.constant_input::<DynTensorValueType>(2).ok()?;
    let minimum = ctx.constant_input::<DynTensorValueType>(3).ok()?;
    let (_, q) = q.try_extract_tensor::<u8>().ok()?;
    let (_, scale) = scale.try_extract_tensor::<half::f16>().ok()?;
    let (_, minimum) = minimum.try_extract_tensor::<half::f16>().ok()?;
    let w = Q4Matrix::new(k, n, q, scale, minimum).ok()?;
    Some(pack(&w, swiglu))
}

impl Operator for MatMulQ4 {
    type Kernel<'attr> = MatMulQ4Kernel;

    fn name(&self) -> &str {
        "MatMulQ4"
    }

    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        [
            OperatorInput::required(TensorElementType::Float32),
            OperatorInput::required(TensorElementType::Uint8),
            OperatorInput::required(TensorElementType::Float16),
            OperatorInput::required(TensorElementType::Float16),
            OperatorInput::optional(TensorElementType::Float32),
            OperatorInput::optional(TensorElementType::Float32),
        ]
    }

    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        [
            OperatorOutput::required(TensorElementType::Float32),
            OperatorOutput::optional(TensorElementType::Float32),
        ]
    }

    fn create_kernel<'attr>(&self, ctx: &KernelContext<'attr>) -> ort::Result<MatMulQ4Kernel> {
        let dim = |name: &str| -> ort::Result<usize> {
            match ctx.get::<i64>(name) {
                Some(v) if v > 0 => Ok(v as usize),
                Some(v) => Err(ort::Error::new(format!(
                    "MatMulQ4: attribute {name} is {v}; it must be positive"
                ))),
                None => Err(ort::Error::new(format!(
                    "MatMulQ4 needs an integer attribute {name}"
                ))),
            }
        };
        let (k, n) = (dim("K")?, dim("N")?);
        if !k.is_multiple_of(q4::BLOCK) {
            return Err(ort::Error::new(format!(
                "MatMulQ4: K is {k}; it must be a multiple of {}",
                q4::BLOCK
            )));
        }
        let swiglu = match ctx.get::<i64>("swiglu") {
            None | Some(0) => false,
            Some(1) if n.is_multiple_of(2) => true,
            Some(1) => {
                return Err(ort::Error::new(format!(
                    "MatMulQ4: swiglu needs an even N (gate and up halves); N is {n}"
                )));
            }
            Some(v) => {
                return Err(ort::Error::new(format!(
                    "MatMulQ4: attribute swiglu is {v}; it must be 0 or 1"
                )));
            }
        };
        let epsilon = ctx.get::<f32>("epsilon");
        if let Some(e) = epsilon
            && !(e.is_finite() && e >= 0.0)
        {
            return Err(ort::Error::new(format!(
                "MatMulQ4: attribute epsilon is {e}; it must be finite and not negative"
            )));
        }
        let packed = if Isa::best() == Isa::Avx2 {
            pack_constant(ctx, k, n, swiglu)
        } else {
            None
        };
        Ok(MatMulQ4Kernel {
            k,
            n,
            swiglu,
            epsilon,
            normed: Vec::new(),
            split: Vec::new(),
            sums: Vec::new(),
            interleaved: Vec::new(),
            packed_once: packed.is_some(),
            packed: packed.unwrap_or_default(),
        })
    }
}

/// The output pointer, shared by the pool's tasks, which write disjoint
/// elements of it.
#[derive(Clone, Copy)]
struct Output(*mut f32);

// SAFETY: the pointer is only written through by `tile`, at elements that
// no two tasks share (see `compute`), while the output tensor outlives the
// parallel loop.
#[allow(unsafe_code)]
unsafe impl Send for Output {}
#[allow(unsafe_code)]
unsafe impl Sync for Output {}

impl Kernel for MatMulQ4Kernel {
    fn compute(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        let (k, n) = (self.k, self.n);
        let (x_value, q_value, scale_value, minimum_value) = (
            input(ctx, 0)?,
            input(ctx, 1)?,
            input(ctx, 2)?,
            input(ctx, 3)?,
        );
        let (shape, x) = x_value.try_extract_tensor::<f32>()?;
        let (tokens, leading) = tokens("MatMulQ4", shape, k)?;
        let (_, q) = q_value.try_extract_tensor::<u8>()?;
        let (_, scale) = scale_value.try_extract_tensor::<half::f16>()?;
        let (_, minimum) = minimum_value.try_extract_tensor::<half::f16>()?;
        let w = Q4Matrix::new(k, n, q, scale, minimum)
            .map_err(|e| ort::Error::new(format!("MatMulQ4: {e}")))?;
        let isa = Isa::best();
        let x: &[f32] = match ctx.input(4)? {
            None => x,
            Some(skip_value) => {
                let (skip_shape, skip) = skip_value.try_extract_tensor::<f32>()?;
                if **skip_shape != **shape {
                    return Err(ort::Error::new(format!(
                        "MatMulQ4: skip has shape {:?}; expected x's, {:?}",
                        &**skip_shape, &**shape
                    )));
                }
                let gamma_value = ctx
                    .input(5)?
                    .ok_or_else(|| ort::Error::new("MatMulQ4: skip needs gamma (input 5) too"))?;
                let (_, gamma) = gamma_value.try_extract_tensor::<f32>()?;
                if gamma.len() != k {
                    return Err(ort::Error::new(format!(
                        "MatMulQ4: gamma holds {} values; expected K = {k}",
                        gamma.len()
                    )));
                }
                let epsilon = self.epsilon.ok_or_else(|| {
                    ort::Error::new("MatMulQ4: skip needs a float attribute epsilon")
                })?;
                let mut sum_value = ctx
                    .output(1, shape.to_vec())?
                    .ok_or_else(|| ort::Error::new("MatMulQ4: skip needs output 1, x + skip"))?;
                let (_, sum) = sum_value.try_extract_tensor_mut::<f32>()?;
                self.normed.resize(x.len(), 0.0);
                norm::skip_rms_norm(x, skip, gamma, epsilon, sum, &mut self.normed);
                &self.normed
            }
        };
        if isa == Isa::Avx2 {
            if !self.packed_once {
                self.packed = pack(&w, self.swiglu);
            }
            q4::block_sums(x, k, &mut self.sums);
            let (sums, packed) = (&self.sums[..], &self.packed[..]);
            return packed_product(ctx, "MatMulQ4", &leading, x, sums, tokens, packed);
        }
        q4::split_blocks(x, k, &mut self.split);
        let xs = &self.split[..];
        if self.swiglu {
            let half = n / 2;
            let prompt = tokens >= gemm::FROM_ROWS;
            if prompt {
                gemm::interleave(xs, k, &mut self.interleaved);
            }
            let interleaved = &self.interleaved[..];
            // Decode-sized calls: tasks of up to `ROWS` rows and 64 output columns; prompts:
            // a task per tile of output columns for every row, as below.
            let (rows_per_task, columns_per_task) = if prompt {
                (tokens, gemm::TILE)
            } else {
                (q4::ROWS, COLUMNS_PER_TASK)
            };
            return in_tiles(
                ctx,
                "MatMulQ4",
                &leading,
                tokens,
                half,
                rows_per_task,
                columns_per_task,
                |first, rows, out, columns| {
                    SCRATCH.with_borrow_mut(|scratch| {
                        UNPACKED.with_borrow_mut(|unpacked| {
                            // SAFETY: `in_tiles` hands this task rows `first..first + rows`
                            // of `columns` alone, `out` at row `first` of the `[T, N/2]`
                            // output; `isa` is this CPU's.
                            #[allow(unsafe_code)]
                            unsafe {
                                let xs = &xs[first * k..];
                                let interleaved = if prompt { interleaved } else { &[] };
                                crate::swiglu::gated_rows(
                                    &w,
                                    xs,
                                    interleaved,
                                    rows,
                                    out,
                                    half,
                                    columns,
                                    scratch,
                                    unpacked,
                                    isa,
                                );
                            }
                        })
                    });
                },
            );
        }
        if tokens < gemm::FROM_ROWS {
            return in_tiles(
                ctx,
                "MatMulQ4",
                &leading,
                tokens,
                n,
                q4::ROWS,
                COLUMNS_PER_TASK,
                |first, rows, out, columns| {
                    // SAFETY: `in_tiles` hands each task its own rectangle of the output;
                    // `isa` is this CPU's.
                    #[allow(unsafe_code)]
                    unsafe {
                        q4::tile(&w, &xs[first * k..], rows, out, n, columns, isa);
                    }
                },
            );
        }
        // Many rows: a task per tile of matrix rows, unpacked once for every row of `x`.
        gemm::interleave(xs, k, &mut self.interleaved);
        let interleaved = &self.interleaved[..];
        in_tiles(
            ctx,
            "MatMulQ4",
            &leading,
            tokens,
            n,
            tokens,
            gemm::TILE,
            |_, _, out, columns| {
                UNPACKED.with_borrow_mut(|unpacked| {
                    // SAFETY: `in_tiles` hands this task every row of `columns` alone;
                    // `isa` is this CPU's.
                    #[allow(unsafe_code)]
                    unsafe {
                        q4::all_rows(&w, xs, interleaved, tokens, out, columns, unpacked, isa);
                    }
                });
            },
        )
    }
}

/// The packed AVX2 path ([`crate::packed`]) of operator `op`: `x` (`tokens`
/// rows, in its own order; for 4-bit with its block sums) against `parts` —
/// the whole matrix, or a `MatMulQ4`'s gate and up halves whose product is
/// gated. A task per [`PACKED_COLUMNS_PER_TASK`] outputs, for every row.
fn packed_product<F: Format>(
    ctx: &ComputeContext,
    op: &str,
    leading: &[i64],
    x: &[f32],
    sums: &[f32],
    tokens: usize,
    parts: &[Packed<F>],
) -> ort::Result<()> {
    let k = parts[0].k();
    debug_assert!(x.len() >= tokens * k);
    debug_assert!(!F::MINIMUM || sums.len() >= tokens * q4::sums_per_row(k));
    let rows = tokens.max(1);
    if let [gate, up] = parts {
        let half = gate.n();
        return in_tiles(
            ctx,
            op,
            leading,
            tokens,
            half,
            rows,
            PACKED_COLUMNS_PER_TASK,
            |_, rows, out, columns| {
                let width = columns.len();
                let products = |g: &mut [f32], u: &mut [f32]| {
                    // SAFETY: `g` and `u` hold `[rows, width]` each; `columns` lie within
                    // the halves' 0..N/2 and start on a group (tasks of whole groups);
                    // AVX2 is this CPU's.
                    #[allow(unsafe_code)]
                    unsafe {
                        packed::rows(gate, x, sums, rows, g.as_mut_ptr(), width, columns.clone());
                        packed::rows(up, x, sums, rows, u.as_mut_ptr(), width, columns.clone());
                    }
                };
                SCRATCH.with_borrow_mut(|scratch| {
                    // SAFETY: `in_tiles` hands this task every row of `columns` of the
                    // `[tokens, N/2]` output alone; AVX2 is this CPU's.
                    #[allow(unsafe_code)]
                    unsafe {
                        let at = out.add(columns.start);
                        crate::swiglu::gate_rows(
                            rows,
                            width,
                            at,
                            half,
                            scratch,
                            Isa::Avx2,
                            products,
                        );
                    }
                });
            },
        );
    }
    let whole = &parts[0];
    let n = whole.n();
    in_tiles(
        ctx,
        op,
        leading,
        tokens,
        n,
        rows,
        PACKED_COLUMNS_PER_TASK,
        |_, rows, out, columns| {
            // SAFETY: `in_tiles` hands this task every row of `columns` (which
            // start on a group) alone, `out` at row 0 of the `[tokens, N]`
            // output; AVX2 is this CPU's.
            #[allow(unsafe_code)]
            unsafe {
                packed::rows(whole, x, sums, rows, out.add(columns.start), n, columns);
            }
        },
    )
}

thread_local! {
    /// The tile of f32 weights a thread of the pool unpacks a matrix into.
    static UNPACKED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// A thread's gate and up products before `swiglu` gates them.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `MatMulQ8(x: f32 [..., K], q: i8 [N, K/32, 32], scale: f32 [N, K/32]) -> y:
/// f32 [..., N]`, attributes `K` and `N`.
#[derive(Debug)]
pub(crate) struct MatMulQ8;

#[derive(Debug)]
pub(crate) struct MatMulQ8Kernel {
    k: usize,
    n: usize,
    /// On AVX2, the weights repacked ([`crate::packed`]), once when the
    /// kernel is created if they are constant, else on every call.
    packed: Option<PackedQ8>,
    /// Whether `packed` holds the constant weights.
    packed_once: bool,
}

impl Operator for MatMulQ8 {
    type Kernel<'attr> = MatMulQ8Kernel;

    fn name(&self) -> &str {
        "MatMulQ8"
    }

    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        [
            OperatorInput::required(TensorElementType::Float32),
            OperatorInput::required(TensorElementType::Int8),
            OperatorInput::required(TensorElementType::Float32),
        ]
    }

    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        [OperatorOutput::required(TensorElementType::Float32)]
    }

    fn create_kernel<'attr>(&self, ctx: &KernelContext<'attr>) -> ort::Result<MatMulQ8Kernel> {
        let (k, n) = dimensions(ctx, "MatMulQ8")?;
        let packed = if Isa::best() == Isa::Avx2 {
            pack_constant_q8(ctx, k, n)
        } else {
            None
        };
        Ok(MatMulQ8Kernel {
            k,
            n,
            packed_once: packed.is_some(),
            packed,
        })
    }
}

impl Kernel for MatMulQ8Kernel {
    fn compute(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        let (k, n) = (self.k, self.n);
        let (x_value, q_value, scale_value) = (input(ctx, 0)?, input(ctx, 1)?, input(ctx, 2)?);
        let (shape, x) = x_value.try_extract_tensor::<f32>()?;
        let (tokens, leading) = tokens("MatMulQ8", shape, k)?;
        let (_, q) = q_value.try_extract_tensor::<i8>()?;
        let (_, scale) = scale_value.try_extract_tensor::<f32>()?;
        let w =
            Q8Matrix::new(k, n, q, scale).map_err(|e| ort::Error::new(format!("MatMulQ8: {e}")))?;
        let isa = Isa::best();
        if isa == Isa::Avx2 {
            if !self.packed_once {
                self.packed = Some(PackedQ8::new(&w));
            }
            let packed = self.packed.as_slice();
            return packed_product(ctx, "MatMulQ8", &leading, x, &[], tokens, packed);
        }
        in_tiles(
            ctx,
            "MatMulQ8",
            &leading,
            tokens,
            n,
            q8::ROWS,
            COLUMNS_PER_TASK,
            |first, rows, out, columns| {
                // SAFETY: `in_tiles` hands each task its own rectangle of the output;
                // `isa` is this CPU's.
                #[allow(unsafe_code)]
                unsafe {
                    q8::tile(&w, &x[first * k..], rows, out, n, columns, isa);
                }
            },
        )
    }
}

/// The attributes `K` (a positive multiple of 32) and `N` (positive).
fn dimensions(ctx: &KernelContext<'_>, op: &str) -> ort::Result<(usize, usize)> {
    let dim = |name: &str| -> ort::Result<usize> {
        match ctx.get::<i64>(name) {
            Some(v) if v > 0 => Ok(v as usize),
            Some(v) => Err(ort::Error::new(format!(
                "{op}: attribute {name} is {v}; it must be positive"
            ))),
            None => Err(ort::Error::new(format!(
                "{op} needs an integer attribute {name}"
            ))),
        }
    };
    let (k, n) = (dim("K")?, dim("N")?);
    if !k.is_multiple_of(q4::BLOCK) {
        return Err(ort::Error::new(format!(
            "{op}: K is {k}; it must be a multiple of {}",
            q4::BLOCK
        )));
    }
    Ok((k, n))
}

fn input<'a>(ctx: &'a ComputeContext, i: usize) -> ort::Result<ort::value::ValueRef<'a>> {
    ctx.input(i)?
        .ok_or_else(|| ort::Error::new(format!("input {i} is missing")))
}

/// Rows of `x`, whose shape must be `[..., K]` (rank 2 or more): their number
/// and the leading dimensions, which the output keeps.
fn tokens(op: &str, shape: &ort::value::Shape, k: usize) -> ort::Result<(usize, Vec<i64>)> {
    match &**shape {
        [leading @ .., kk]
            if !leading.is_empty() && *kk as usize == k && leading.iter().all(|&d| d >= 0) =>
        {
            Ok((
                leading.iter().map(|&d| d as usize).product(),
                leading.to_vec(),
            ))
        }
        _ => Err(ort::Error::new(format!(
            "{op}: x has shape {:?}; expected [..., K={k}]",
            &**shape
        ))),
    }
}

/// Allocates the `[..., N]` output (`leading` dimensions, `tokens` rows in
/// all) and runs `task(first, rows, out, columns)` over the session's
/// intra-op thread pool for every rectangle of at most `rows_per_task` rows
/// and `columns_per_task` columns, `out` pointing at row `first` of the
/// output (row stride N).
#[allow(clippy::too_many_arguments)]
fn in_tiles(
    ctx: &ComputeContext,
    op: &str,
    leading: &[i64],
    tokens: usize,
    n: usize,
    rows_per_task: usize,
    columns_per_task: usize,
    task: impl Fn(usize, usize, *mut f32, std::ops::Range<usize>) + Sync + Send,
) -> ort::Result<()> {
    let mut y_value = ctx
        .output(0, [leading, &[n as i64]].concat())?
        .ok_or_else(|| ort::Error::new(format!("{op}: no output")))?;
    let (_, y) = y_value.try_extract_tensor_mut::<f32>()?;
    if tokens == 0 {
        return Ok(());
    }
    let out = Output(y.as_mut_ptr());
    let column_tasks = n.div_ceil(columns_per_task);
    let row_groups = tokens.div_ceil(rows_per_task);
    ctx.par_for(row_groups * column_tasks, 0, move |i| {
        let out = out;
        let (group, tile) = (i / column_tasks, i % column_tasks);
        let first = group * rows_per_task;
        let rows = (tokens - first).min(rows_per_task);
        let columns = tile * columns_per_task..((tile + 1) * columns_per_task).min(n);
        // Task `i` writes rows `first..first + rows` (< tokens) and `columns`
        // (< N) of the `[tokens, N]` output: tasks cover disjoint rectangles,
        // and the output tensor lives until this function returns, after the
        // parallel loop.
        task(first, rows, out.0.wrapping_add(first * n), columns);
    })
}
