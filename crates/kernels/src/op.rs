//! The ONNX Runtime side: `ai.lmgrid.MatMulQ4` as a custom operator whose
//! kernel spreads its work over the session's intra-op thread pool.

use ort::operator::{
    ComputeContext, Kernel, KernelContext, Operator, OperatorInput, OperatorOutput,
};
use ort::value::TensorElementType;

use crate::q4::{self, Q4Matrix};

/// Matrix columns one task of the thread pool computes.
const COLUMNS_PER_TASK: usize = 64;

/// `MatMulQ4(x: f32 [T, K], q: u8 [N, K/32, 16], scale: f32 [N, K/32],
/// minimum: f32 [N, K/32]) -> y: f32 [T, N]`, attributes `K` and `N`.
#[derive(Debug)]
pub(crate) struct MatMulQ4;

#[derive(Debug)]
pub(crate) struct MatMulQ4Kernel {
    k: usize,
    n: usize,
    /// The activations reordered for the kernel, reused across calls.
    split: Vec<f32>,
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
            OperatorInput::required(TensorElementType::Float32),
            OperatorInput::required(TensorElementType::Float32),
        ]
    }

    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        [OperatorOutput::required(TensorElementType::Float32)]
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
        Ok(MatMulQ4Kernel {
            k,
            n,
            split: Vec::new(),
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
        let input = |i: usize| {
            ctx.input(i)?
                .ok_or_else(|| ort::Error::new(format!("MatMulQ4: input {i} is missing")))
        };
        let (x_value, q_value, scale_value, minimum_value) =
            (input(0)?, input(1)?, input(2)?, input(3)?);
        let (shape, x) = x_value.try_extract_tensor::<f32>()?;
        let (k, n) = (self.k, self.n);
        let tokens = match **shape {
            [t, kk] if kk as usize == k => t as usize,
            _ => {
                return Err(ort::Error::new(format!(
                    "MatMulQ4: x has shape {:?}; expected [tokens, K={k}]",
                    &**shape
                )));
            }
        };
        let (_, q) = q_value.try_extract_tensor::<u8>()?;
        let (_, scale) = scale_value.try_extract_tensor::<f32>()?;
        let (_, minimum) = minimum_value.try_extract_tensor::<f32>()?;
        let w = Q4Matrix::new(k, n, q, scale, minimum)
            .map_err(|e| ort::Error::new(format!("MatMulQ4: {e}")))?;
        let mut y_value = ctx
            .output(0, vec![tokens as i64, n as i64])?
            .ok_or_else(|| ort::Error::new("MatMulQ4: no output"))?;
        let (_, y) = y_value.try_extract_tensor_mut::<f32>()?;
        if tokens == 0 {
            return Ok(());
        }
        q4::split_blocks(x, k, &mut self.split);
        let xs = &self.split[..];
        let out = Output(y.as_mut_ptr());
        let column_tasks = n.div_ceil(COLUMNS_PER_TASK);
        let row_groups = tokens.div_ceil(q4::ROWS);
        let task = move |i: usize| {
            let out = out;
            let (group, tile) = (i / column_tasks, i % column_tasks);
            let first = group * q4::ROWS;
            let rows = (tokens - first).min(q4::ROWS);
            let columns = tile * COLUMNS_PER_TASK..((tile + 1) * COLUMNS_PER_TASK).min(n);
            // SAFETY: task `i` writes rows `first..first + rows` (< tokens)
            // and `columns` (< N) of the `[tokens, N]` output: tasks cover
            // disjoint rectangles, and the output tensor lives until
            // `compute` returns, after the parallel loop.
            #[allow(unsafe_code)]
            unsafe {
                q4::tile(
                    &w,
                    &xs[first * k..],
                    rows,
                    out.0.add(first * n),
                    n,
                    columns,
                    true,
                );
            }
        };
        ctx.par_for(row_groups * column_tasks, 0, task)
    }
}
