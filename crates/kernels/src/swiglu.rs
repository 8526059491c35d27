//! SwiGLU's gating, `silu(g) · u = (g · σ(g)) · u` with σ the logistic
//! function, elementwise: what `MatMulQ4` with `swiglu = 1` applies to its
//! gate and up halves (op.rs) in place of a graph's `Split`, `QuickGelu`
//! (α = 1) and `Mul` nodes.
//!
//! σ(g) is `1 / (1 + e^-g)` with a correctly rounded division and an
//! exponential within ~2 ulp: ONNX Runtime's `QuickGelu` uses its own
//! rational approximation of σ, so the two differ in the last bits, well
//! inside the 4-bit graph's tolerance against `model.onnx` (docs/models.md).
//! The products are taken in `QuickGelu` then `Mul`'s order.

use crate::q4::{self, Q4Matrix};
use crate::{Isa, gemm};

/// `out[i] = (gate[i] · σ(gate[i])) · up[i]` for every `i` of `out`, on the
/// path `isa` (AVX-512 CPUs take the AVX2 one).
///
/// # Panics
/// If `gate` or `up` is shorter than `out`.
#[allow(unsafe_code)]
pub fn swiglu(gate: &[f32], up: &[f32], out: &mut [f32], isa: Isa) {
    let n = out.len();
    assert!(
        gate.len() >= n && up.len() >= n,
        "swiglu: inputs shorter than the output"
    );
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if isa != Isa::Portable && Isa::Avx2.available() {
        // SAFETY: AVX2 and FMA are available (checked); each slice holds
        // at least `n` values.
        unsafe { avx2::swiglu(gate.as_ptr(), up.as_ptr(), out.as_mut_ptr(), n / 8) };
        done = n / 8 * 8;
    }
    let _ = isa;
    for i in done..n {
        out[i] = silu(gate[i]) * up[i];
    }
}

/// The gated half of a gate/up projection: for a matrix `W` whose rows
/// `0..N/2` are the gate's and `N/2..N` the up projection's,
/// `out[r · stride + c] = swiglu((x Wᵀ)[r, c], (x Wᵀ)[r, N/2 + c])` for
/// every row of `x` and the output columns `columns` (within `0..N/2`). The
/// two halves go through [`q4::all_rows`] as matrices of their own, into
/// `scratch`, so each product has the bits the unfused matrix gives it
/// (for prompts when N/2 is a multiple of [`gemm::TILE`], so that the
/// halves' tiles are the whole matrix's; otherwise a partial tile's
/// products are summed in the per-row path's order instead).
/// Arguments as for [`q4::all_rows`], `out` pointing at row 0 of the
/// `[tokens, N/2]` output.
///
/// # Safety
/// As for [`q4::all_rows`], with `out` valid for writes and unaliased at
/// rows `0..tokens` and `columns` (row stride `stride`), and N even.
#[allow(unsafe_code, clippy::too_many_arguments)]
pub(crate) unsafe fn gated_rows(
    w: &Q4Matrix<'_>,
    xs: &[f32],
    interleaved: &[f32],
    tokens: usize,
    out: *mut f32,
    stride: usize,
    columns: std::ops::Range<usize>,
    scratch: &mut Vec<f32>,
    unpacked: &mut Vec<f32>,
    isa: Isa,
) {
    let half = w.n / 2;
    debug_assert!(w.n.is_multiple_of(2) && columns.end <= half && !columns.is_empty());
    let width = columns.len();
    let gate = w.rows(columns.clone());
    let up = w.rows(half + columns.start..half + columns.end);
    let products = |g: &mut [f32], u: &mut [f32]| {
        for (part, into) in [(&gate, g), (&up, u)] {
            // SAFETY: `into` holds `tokens × width` values, the `[tokens, width]`
            // output of a matrix of `width` rows, all of whose columns are asked;
            // the rest as the caller guarantees.
            unsafe {
                let into = into.as_mut_ptr();
                q4::all_rows(part, xs, interleaved, tokens, into, 0..width, unpacked, isa);
            }
        }
    };
    // SAFETY: `out` at `columns.start` is valid and unaliased for `tokens` rows of
    // `width` at `stride` (the caller's guarantee).
    unsafe {
        gate_rows(
            tokens,
            width,
            out.add(columns.start),
            stride,
            scratch,
            isa,
            products,
        )
    };
}

/// Gates `rows` rows of `width` products: `products(gate, up)` writes the
/// gate's and the up projection's `[rows, width]` products into its two
/// buffers (halves of `scratch`), then `out[r · stride + i] = swiglu(gate[r,
/// i], up[r, i])`.
///
/// # Safety
/// `isa` must be available; `out` must be valid for writes, and unaliased,
/// at `r · stride + i` for every `r < rows`, `i < width`.
#[allow(unsafe_code)]
pub(crate) unsafe fn gate_rows(
    rows: usize,
    width: usize,
    out: *mut f32,
    stride: usize,
    scratch: &mut Vec<f32>,
    isa: Isa,
    products: impl FnOnce(&mut [f32], &mut [f32]),
) {
    if scratch.len() < 2 * rows * width {
        scratch.resize(2 * rows * width, 0.0);
    }
    let (g, u) = scratch[..2 * rows * width].split_at_mut(rows * width);
    products(&mut *g, &mut *u);
    for r in 0..rows {
        // SAFETY: row r's `width` outputs, valid and unaliased (the caller's
        // guarantee).
        let row = unsafe { std::slice::from_raw_parts_mut(out.add(r * stride), width) };
        swiglu(
            &g[r * width..(r + 1) * width],
            &u[r * width..(r + 1) * width],
            row,
            isa,
        );
    }
}

/// [`gated_rows`] over every output column on the calling thread, in the
/// operator's tiles: its arithmetic without ONNX Runtime (tests and
/// benchmarks compare against it). `x` is `[T, K]`; the result `[T, N/2]`.
///
/// # Panics
/// If N is odd.
pub fn gated_matmul(w: &Q4Matrix<'_>, x: &[f32], isa: Isa) -> Vec<f32> {
    assert!(
        w.n.is_multiple_of(2),
        "a gate/up matrix has an even number of rows"
    );
    assert!(isa.available(), "{isa:?} is not available on this CPU");
    let (tokens, half) = (x.len() / w.k, w.n / 2);
    if isa == Isa::Avx2 {
        // The operator's AVX2 path: the halves packed, each multiplied whole.
        let gate = crate::packed::PackedQ4::new(&w.rows(0..half)).matmul(x);
        let up = crate::packed::PackedQ4::new(&w.rows(half..w.n)).matmul(x);
        let mut y = vec![0f32; tokens * half];
        swiglu(&gate, &up, &mut y, isa);
        return y;
    }
    let (mut xs, mut interleaved) = (Vec::new(), Vec::new());
    q4::split_blocks(&x[..tokens * w.k], w.k, &mut xs);
    let step = if tokens >= gemm::FROM_ROWS {
        gemm::interleave(&xs, w.k, &mut interleaved);
        gemm::TILE
    } else {
        half
    };
    let mut y = vec![0f32; tokens * half];
    let (mut scratch, mut unpacked) = (Vec::new(), Vec::new());
    for start in (0..half).step_by(step) {
        // SAFETY: `y` is `[tokens, N/2]`, owned here; the columns lie within
        // 0..N/2; `isa` is available (asserted).
        #[allow(unsafe_code)]
        unsafe {
            gated_rows(
                w,
                &xs,
                &interleaved,
                tokens,
                y.as_mut_ptr(),
                half,
                start..(start + step).min(half),
                &mut scratch,
                &mut unpacked,
                isa,
            );
        }
    }
    y
}

/// `g · σ(g)` in plain Rust.
fn silu(g: f32) -> f32 {
    g * (1.0 / (1.0 + (-g).exp()))
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx2 {
    use std::arch::x86_64::*;

    /// `e^x` for 8 lanes, within ~2 ulp: `x = n ln 2 + r` with `|r| ≤ ln 2 /
    /// 2` (ln 2 in two parts, so that `r` is exact), `e^r` by its Taylor
    /// polynomial to degree 7 (truncation below 1e-8 relative), times `2^n`
    /// built in the exponent bits. `x` is clamped to ±87.3, where `2^n` is
    /// still a normal f32: for gates beyond it `silu(g)` is `g` to f32 (g
    /// large) or within 1e-35 of 0 (g very negative). NaN stays NaN.
    #[target_feature(enable = "avx2,fma")]
    fn exp(x: __m256) -> __m256 {
        // `min` and `max` return their second operand when either is NaN.
        let x = _mm256_max_ps(
            _mm256_set1_ps(-87.3),
            _mm256_min_ps(_mm256_set1_ps(87.3), x),
        );
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        // ln 2 = 355/512 (exact in 9 bits, so n · it is exact) − 2.12194440e-4.
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(355.0 / 512.0), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(1.0 / 5040.0);
        for c in [
            1.0 / 720.0,
            1.0 / 120.0,
            1.0 / 24.0,
            1.0 / 6.0,
            0.5,
            1.0,
            1.0,
        ] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        // 2^n: n + 127 in the exponent field (n within -126..=126 here).
        let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        _mm256_mul_ps(p, _mm256_castsi256_ps(bits))
    }

    /// [`super::swiglu`] for `vectors` groups of 8 values.
    ///
    /// # Safety
    /// AVX2 and FMA must be available; `gate`, `up` and `out` must hold
    /// `8 · vectors` values, `out` not overlapping the others.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn swiglu(gate: *const f32, up: *const f32, out: *mut f32, vectors: usize) {
        let one = _mm256_set1_ps(1.0);
        for v in 0..vectors {
            // SAFETY: 8 values from 8v in each (the caller's guarantee).
            unsafe {
                let g = _mm256_loadu_ps(gate.add(8 * v));
                let u = _mm256_loadu_ps(up.add(8 * v));
                let e = exp(_mm256_sub_ps(_mm256_setzero_ps(), g));
                let sigmoid = _mm256_div_ps(one, _mm256_add_ps(one, e));
                _mm256_storeu_ps(out.add(8 * v), _mm256_mul_ps(_mm256_mul_ps(g, sigmoid), u));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(g: f32, u: f32) -> f64 {
        let g = f64::from(g);
        g / (1.0 + (-g).exp()) * f64::from(u)
    }

    #[test]
    fn every_path_gates_like_the_float64_formula() {
        // Values across the range a model's gate projections reach, the
        // clamped tails, zero, and lengths that leave a scalar tail.
        let mut gate: Vec<f32> = (-400..=400).map(|i| i as f32 * 0.05).collect();
        gate.extend([-100.0, -87.5, -30.0, -1e-6, 0.0, 1e-6, 30.0, 87.5, 100.0]);
        let up: Vec<f32> = gate
            .iter()
            .enumerate()
            .map(|(i, _)| 1.5 - (i % 7) as f32 * 0.4)
            .collect();
        for isa in Isa::all_available() {
            for n in [gate.len(), 13, 8, 3] {
                let mut out = vec![0f32; n];
                swiglu(&gate, &up, &mut out, isa);
                for i in 0..n {
                    let want = reference(gate[i], up[i]);
                    let err = (f64::from(out[i]) - want).abs();
                    // A few ulp of the result (three roundings and the
                    // exponential's ~2 ulp); in the clamped negative tail,
                    // where the result is ~g · e^g, within 1e-35 of it.
                    let limit = want.abs() * 4e-7 + 1e-35;
                    assert!(
                        err <= limit,
                        "{isa:?}, n {n}: swiglu({}, {}) = {} against {want} (error {err:e})",
                        gate[i],
                        up[i],
                        out[i]
                    );
                }
            }
        }
    }

    #[test]
    fn the_gated_product_is_the_gating_of_the_unfused_product_bit_for_bit() {
        // K = 96 (3 blocks: a short group of scales) and 576; N/2 = 64 and
        // 96 (a partial 64-column task), multiples of the prompt path's tile
        // as SmolLM2's 1536 is; rows for the per-row path (1, 3, 5) and the
        // prompt path (30).
        for (k, half) in [(96, 64), (576, 96)] {
            let (q, scale, minimum) = crate::q4::tests::matrix(k, 2 * half, 11);
            let w = Q4Matrix::new(k, 2 * half, &q, &scale, &minimum).expect("matrix");
            for tokens in [1, 3, 5, 30] {
                let x = crate::q4::tests::activations(tokens, k);
                for isa in Isa::all_available() {
                    let full = q4::matmul_with(&w, &x, isa);
                    let gated = gated_matmul(&w, &x, isa);
                    for r in 0..tokens {
                        let row = &full[r * 2 * half..(r + 1) * 2 * half];
                        let mut want = vec![0f32; half];
                        swiglu(&row[..half], &row[half..], &mut want, isa);
                        assert_eq!(
                            &gated[r * half..(r + 1) * half],
                            &want[..],
                            "{isa:?}, K {k}, N/2 {half}, {tokens} rows: row {r}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn nan_stays_nan_and_infinities_saturate() {
        let gate = [
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            1.0,
            2.0,
            3.0,
            4.0,
            5.0,
        ];
        let up = [1.0; 8];
        for isa in Isa::all_available() {
            let mut out = [0f32; 8];
            swiglu(&gate, &up, &mut out, isa);
            assert!(out[0].is_nan(), "{isa:?}: {out:?}");
            assert_eq!(out[1], f32::INFINITY, "{isa:?}");
            // -inf · σ(-inf): σ is 0 exactly in plain Rust (0 · -inf = NaN),
            // ~1e-38 in the vector path's clamp (-inf · tiny = -inf).
            assert!(
                out[2].is_nan() || out[2] == f32::NEG_INFINITY,
                "{isa:?}: {}",
                out[2]
            );
        }
    }
}
