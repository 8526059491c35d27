//! The AVX-512 dot-product kernel of both block formats (AVX2 multiplies
//! packed weights, [`crate::packed`]): `C` matrix rows at a time against `R`
//! rows of `x`, each block of 32 weights unpacked once (by the format) into
//! two vectors of 16 lanes and multiplied-added into one of two accumulators
//! per output, which are summed at the end. The order of the sums does not
//! depend on `C` or `R`, so a row gives the same bits in any batch.

/// Blocks whose constants a kernel prepares at a time.
pub(crate) const CHUNK: usize = 16;

/// A matrix `[N, K]` of blocks of 32 weights along K, as a dot-product
/// kernel reads it; `V` is one block's weights as the instruction set holds
/// them: two 16-lane vectors (elements 0..16 and 16..32 of the block as `x`
/// holds it).
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
pub(crate) trait Blocks<V> {
    /// K, a multiple of 32.
    fn k(&self) -> usize;

    /// The per-block constants of blocks `b..b + count` (`count` ≤ [`CHUNK`])
    /// of matrix row `row` as f32s, in whatever layout [`Blocks::unpack`]
    /// reads them back in: where the matrix stores them so, a pointer into
    /// it, else converted into `scratch`. Done once per chunk, so that
    /// unpacking a block broadcasts them from memory instead of converting
    /// them.
    ///
    /// # Safety
    /// The instruction set of `V` must be available; `row < N` and `b +
    /// count ≤ K/32`.
    unsafe fn constants(
        &self,
        row: usize,
        b: usize,
        count: usize,
        scratch: &mut [f32; 2 * CHUNK],
    ) -> *const f32;

    /// The weights of block `b` of matrix row `row`; `constants` is what
    /// [`Blocks::constants`] returned for the chunk holding the block, `j`
    /// the block's index in it.
    ///
    /// # Safety
    /// The instruction set of `V` must be available; `row < N`, `b < K/32`,
    /// `j` less than the chunk's `count` and `constants` still valid.
    unsafe fn unpack(&self, row: usize, b: usize, constants: *const f32, j: usize) -> V;
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
pub(crate) mod avx512 {
    use std::arch::x86_64::*;

    use super::{Blocks, CHUNK};
    use crate::q4::BLOCK;

    /// `out[r · stride + c] = Σ_k xs[r · K + k] · W[c, k]` for `R` rows of
    /// `xs` and the matrix rows `columns`, `C` of them at a time (the last
    /// ones one at a time).
    ///
    /// # Safety
    /// AVX-512F/BW/VL must be available; `out` valid and unaliased at every
    /// element written; `xs` holding R rows of K; `columns` within `0..N`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(crate) unsafe fn tile<W: Blocks<(__m512, __m512)>, const C: usize, const R: usize>(
        w: &W,
        xs: &[f32],
        out: *mut f32,
        stride: usize,
        columns: std::ops::Range<usize>,
    ) {
        let k = w.k();
        let blocks = k / BLOCK;
        let mut c0 = columns.start;
        while c0 < columns.end {
            let width = if c0 + C <= columns.end { C } else { 1 };
            let mut low = [[_mm512_setzero_ps(); R]; C];
            let mut high = [[_mm512_setzero_ps(); R]; C];
            let mut scratch = [[0f32; 2 * CHUNK]; C];
            let mut constants = [std::ptr::null::<f32>(); C];
            for chunk in (0..blocks).step_by(CHUNK) {
                let count = (blocks - chunk).min(CHUNK);
                for c in 0..width {
                    // SAFETY: matrix row c0 + c < N (the caller's guarantee);
                    // chunk + count ≤ K/32.
                    constants[c] = unsafe { w.constants(c0 + c, chunk, count, &mut scratch[c]) };
                }
                for j in 0..count {
                    let b = chunk + j;
                    let mut x = [[_mm512_setzero_ps(); 2]; R];
                    for (r, x) in x.iter_mut().enumerate() {
                        // SAFETY: `xs` holds R rows of K values (the caller's
                        // guarantee), so 32 values from `r · K + 32b` are in it.
                        *x = unsafe {
                            let at = xs.as_ptr().add(r * k + b * BLOCK);
                            [_mm512_loadu_ps(at), _mm512_loadu_ps(at.add(16))]
                        };
                    }
                    for c in 0..width {
                        // SAFETY: matrix row c0 + c < N (the caller's
                        // guarantee), b < K/32, j < count.
                        let (w_lo, w_hi) = unsafe { w.unpack(c0 + c, b, constants[c], j) };
                        for r in 0..R {
                            low[c][r] = _mm512_fmadd_ps(w_lo, x[r][0], low[c][r]);
                            high[c][r] = _mm512_fmadd_ps(w_hi, x[r][1], high[c][r]);
                        }
                    }
                }
            }
            for c in 0..width {
                for r in 0..R {
                    let sum = _mm512_reduce_add_ps(_mm512_add_ps(low[c][r], high[c][r]));
                    // SAFETY: in bounds and unaliased, as the caller guarantees.
                    unsafe { *out.add(r * stride + c0 + c) = sum };
                }
            }
            c0 += width;
        }
    }
}
