//! `y = x · Wᵀ` for a matrix `W [N, K]` stored as 8-bit blocks (GGUF's
//! Q8_0): each block of 32 weights along K has a scale `d`, and weight `i`
//! is `d · qᵢ` for a signed byte `qᵢ`.
//!
//! `d · q` is exact in f32 (an fp16-sized scale times an 8-bit integer
//! needs at most 19 significant bits), so the kernel multiplies with exactly
//! the weights a converter that dequantizes the table stores, and sums in
//! f32, like [`crate::q4`].

use crate::Isa;
use crate::q4::BLOCK;

/// Rows of `x` a kernel call covers at most: an LM head's K is small (576
/// here), so 8 rows of it stay in L1 and the 8-bit table is read once per 8
/// rows.
pub const ROWS: usize = 8;

/// An 8-bit matrix `[N, K]`, borrowed.
#[derive(Debug, Clone, Copy)]
pub struct Q8Matrix<'a> {
    /// Columns of `x` (the reduction length), a multiple of [`BLOCK`].
    pub k: usize,
    /// Rows of the matrix (outputs).
    pub n: usize,
    /// `[N, K/32, 32]` signed bytes.
    pub q: &'a [i8],
    /// `[N, K/32]` block scales.
    pub scale: &'a [f32],
}

impl<'a> Q8Matrix<'a> {
    /// Checks the sizes; errors say which part is wrong.
    pub fn new(k: usize, n: usize, q: &'a [i8], scale: &'a [f32]) -> Result<Self, String> {
        if k == 0 || !k.is_multiple_of(BLOCK) {
            return Err(format!(
                "K is {k}; it must be a positive multiple of {BLOCK}"
            ));
        }
        if n == 0 {
            return Err("N must be positive".into());
        }
        if q.len() != n * k {
            return Err(format!(
                "the weights hold {} bytes; [N={n}, K/32={}, 32] needs {}",
                q.len(),
                k / BLOCK,
                n * k
            ));
        }
        if scale.len() != n * k / BLOCK {
            return Err(format!(
                "scale holds {} values; [N={n}, K/32={}] needs {}",
                scale.len(),
                k / BLOCK,
                n * k / BLOCK
            ));
        }
        Ok(Q8Matrix { k, n, q, scale })
    }

    /// The scales of matrix row `row` from block `b` on: the kernels' block
    /// constants, which need no conversion.
    ///
    /// # Safety
    /// `row < N` and `b < K/32`.
    #[cfg(target_arch = "x86_64")]
    #[allow(unsafe_code)]
    unsafe fn scales_from(&self, row: usize, b: usize) -> *const f32 {
        // SAFETY: within `scale` (`[N, K/32]`), by the caller's guarantee.
        unsafe { self.scale.as_ptr().add(row * (self.k / BLOCK) + b) }
    }

    /// Weight `[row, column]`: `d · q`, exact.
    pub fn weight(&self, row: usize, column: usize) -> f32 {
        let block = row * (self.k / BLOCK) + column / BLOCK;
        f32::from(self.q[row * self.k + column]) * self.scale[block]
    }
}

/// `x [T, K] · Wᵀ` on the calling thread (tests and benchmarks).
pub fn matmul(w: &Q8Matrix<'_>, x: &[f32]) -> Vec<f32> {
    matmul_with(w, x, Isa::best())
}

fn matmul_with(w: &Q8Matrix<'_>, x: &[f32], isa: Isa) -> Vec<f32> {
    if isa == Isa::Avx2 {
        return crate::packed::PackedQ8::new(w).matmul(x);
    }
    let tokens = x.len() / w.k;
    let mut y = vec![0f32; tokens * w.n];
    for first in (0..tokens).step_by(ROWS) {
        let rows = (tokens - first).min(ROWS);
        // SAFETY: `y` is `[tokens, N]`, owned here; rows `first..first +
        // rows` and columns `0..N` are in bounds; `isa` is available.
        #[allow(unsafe_code)]
        unsafe {
            tile(
                w,
                &x[first * w.k..],
                rows,
                y.as_mut_ptr().add(first * w.n),
                w.n,
                0..w.n,
                isa,
            );
        }
    }
    y
}

/// Computes `out[r · stride + c] = Σ_k x[r · K + k] · W[c, k]` for `rows`
/// (≤ [`ROWS`]) rows of `x` and the matrix rows `columns`, on the path
/// `isa` (AVX-512 or portable; AVX2 multiplies packed weights).
///
/// # Safety
/// As [`crate::q4::tile`]: `isa` available, `out` valid and unaliased at
/// every `r · stride + c` written, `x` holding `rows · K` values, `columns`
/// within `0..N`.
#[allow(unsafe_code)]
pub(crate) unsafe fn tile(
    w: &Q8Matrix<'_>,
    x: &[f32],
    rows: usize,
    out: *mut f32,
    stride: usize,
    columns: std::ops::Range<usize>,
    isa: Isa,
) {
    debug_assert!(rows <= ROWS && x.len() >= rows * w.k && columns.end <= w.n);
    debug_assert!(isa.available());
    #[cfg(target_arch = "x86_64")]
    match isa {
        // SAFETY: the CPU has the instruction set (the caller's guarantee);
        // the caller guarantees the memory conditions the kernel relies on.
        Isa::Avx512 => unsafe {
            use crate::dot::avx512::tile;
            match rows {
                1 => tile::<_, 4, 1>(w, x, out, stride, columns),
                2 => tile::<_, 4, 2>(w, x, out, stride, columns),
                3 => tile::<_, 2, 3>(w, x, out, stride, columns),
                4 => tile::<_, 2, 4>(w, x, out, stride, columns),
                5 => tile::<_, 1, 5>(w, x, out, stride, columns),
                6 => tile::<_, 1, 6>(w, x, out, stride, columns),
                7 => tile::<_, 1, 7>(w, x, out, stride, columns),
                _ => tile::<_, 1, 8>(w, x, out, stride, columns),
            }
            return;
        },
        Isa::Avx2 => unreachable!("AVX2 multiplies packed weights (crate::packed)"),
        Isa::Portable => {}
    }
    let blocks = w.k / BLOCK;
    for r in 0..rows {
        let x = &x[r * w.k..(r + 1) * w.k];
        for c in columns.clone() {
            let mut lanes = [0f32; BLOCK];
            for b in 0..blocks {
                let d = w.scale[c * blocks + b];
                let q = &w.q[c * w.k + b * BLOCK..c * w.k + (b + 1) * BLOCK];
                for (j, lane) in lanes.iter_mut().enumerate() {
                    *lane = (f32::from(q[j]) * d).mul_add(x[b * BLOCK + j], *lane);
                }
            }
            // SAFETY: in bounds and unaliased, as the caller guarantees.
            unsafe { *out.add(r * stride + c) = lanes.iter().sum() };
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{BLOCK, Q8Matrix};
    use crate::dot::{Blocks, CHUNK};

    /// A block of an 8-bit matrix: its 32 bytes widened to f32 lanes in two
    /// halves and multiplied by the block's scale (exact).
    impl Blocks<(__m512, __m512)> for Q8Matrix<'_> {
        fn k(&self) -> usize {
            self.k
        }

        #[target_feature(enable = "avx512f")]
        unsafe fn constants(
            &self,
            row: usize,
            b: usize,
            _count: usize,
            _scratch: &mut [f32; 2 * CHUNK],
        ) -> *const f32 {
            // SAFETY: block row · K/32 + b exists (the caller's guarantee).
            unsafe { self.scales_from(row, b) }
        }

        #[target_feature(enable = "avx512f")]
        unsafe fn unpack(
            &self,
            row: usize,
            b: usize,
            constants: *const f32,
            j: usize,
        ) -> (__m512, __m512) {
            // SAFETY: matrix row `row` < N and b < K/32 (the caller's
            // guarantee): its block's 32 bytes exist, as `Q8Matrix::new`
            // checked the sizes; `constants` points at the chunk's scales
            // in the matrix, and j < its count.
            let (lo, hi, d) = unsafe {
                let at = self.q.as_ptr().add(row * self.k + b * BLOCK);
                (
                    _mm_loadu_si128(at.cast()),
                    _mm_loadu_si128(at.add(16).cast()),
                    *constants.add(j),
                )
            };
            let d = _mm512_set1_ps(d);
            (
                _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(lo)), d),
                _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(hi)), d),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matrix(k: usize, n: usize) -> (Vec<i8>, Vec<f32>) {
        let q = (0..n * k)
            .map(|i| ((i * 7919 % 255) as i32 - 127) as i8)
            .collect();
        let scale = (0..n * k / BLOCK)
            .map(|i| (1 + i % 13) as f32 * 1.5e-3)
            .collect();
        (q, scale)
    }

    #[test]
    fn both_kernels_match_an_f64_product_for_every_row_count_and_ragged_columns() {
        for (k, n) in [(64, 67), (576, 11)] {
            let (q, scale) = matrix(k, n);
            let w = Q8Matrix::new(k, n, &q, &scale).unwrap();
            for tokens in [1, 2, 3, 4, 6, 8, 11] {
                let x: Vec<f32> = (0..tokens * k)
                    .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.03)
                    .collect();
                for isa in Isa::all_available() {
                    let got = matmul_with(&w, &x, isa);
                    for t in 0..tokens {
                        for c in 0..n {
                            let want: f64 = (0..k)
                                .map(|j| f64::from(w.weight(c, j)) * f64::from(x[t * k + j]))
                                .sum();
                            let g = f64::from(got[t * n + c]);
                            assert!(
                                (g - want).abs() <= 1e-5 * (1.0 + want.abs()),
                                "k {k} n {n} tokens {tokens} {isa:?} [{t}, {c}]: {g} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_row_gives_the_same_bits_alone_and_in_any_batch() {
        // N = 37: column tiles and AVX2's groups of 16 leave ragged ends.
        let (k, n) = (576, 37);
        let (q, scale) = matrix(k, n);
        let w = Q8Matrix::new(k, n, &q, &scale).unwrap();
        let x: Vec<f32> = (0..11 * k)
            .map(|i| ((i * 53 % 97) as f32 - 48.0) * 0.02)
            .collect();
        for isa in Isa::all_available() {
            let all = matmul_with(&w, &x, isa);
            for t in 0..11 {
                let alone = matmul_with(&w, &x[t * k..(t + 1) * k], isa);
                assert_eq!(alone[..], all[t * n..(t + 1) * n], "{isa:?} row {t}");
            }
        }
    }

    #[test]
    fn weights_are_scale_times_byte_and_sizes_are_checked() {
        let mut q = vec![0i8; 32];
        q[3] = -128;
        q[31] = 127;
        let w = Q8Matrix::new(32, 1, &q, &[0.25]).unwrap();
        assert_eq!(w.weight(0, 3), -32.0);
        let mut x = vec![0f32; 32];
        x[3] = 1.0;
        x[31] = 4.0;
        assert_eq!(matmul(&w, &x), vec![-32.0 + 127.0]);
        assert!(
            Q8Matrix::new(32, 2, &q, &[1.0, 1.0])
                .unwrap_err()
                .contains("hold 32 bytes")
        );
        assert!(
            Q8Matrix::new(32, 1, &q, &[1.0, 1.0])
                .unwrap_err()
                .contains("scale holds 2")
        );
    }
}
