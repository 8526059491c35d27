//! `y = x · Wᵀ` for a matrix `W [N, K]` stored as 4-bit blocks (GGUF's Q4_1):
//! each block of 32 weights along K has an fp16 scale `d` and an fp16
//! minimum `m`, as the GGUF stores them, and weight `i` of the block is
//! `d · qᵢ + m` for a nibble `qᵢ` in 0..15.
//!
//! The AVX-512 paths (per row and, for prompts, [`gemm`]) and the portable
//! one dequantize each weight as `fl(d · q + m)`, one rounding (a fused
//! multiply-add), which is exactly the fp32 value a converter that
//! dequantizes the same blocks ahead of time stores, and sum the products
//! in f32: an fp32 matrix product of the dequantized weights, differing
//! from one only in summation order. AVX2 CPUs multiply the weights
//! repacked ([`crate::packed`]) and factor each block's constants out,
//! `d · Σ x·q + m · Σ x` in f32 (the same sum in exact arithmetic). None
//! rounds the activations (unlike int8 kernels).
//!
//! Nibbles are packed two per byte in the order ONNX Runtime's
//! `MatMulNBits` uses: byte `j` of a block holds element `2j` in its low
//! nibble and `2j + 1` in its high nibble. The vector kernel unpacks a
//! block's 16 low nibbles and 16 high nibbles as two vectors, so the
//! activations are first reordered per block into evens then odds
//! ([`split_blocks`]).

use half::f16;

use crate::{Isa, gemm};

/// Weights per block.
pub const BLOCK: usize = 32;

/// A 4-bit matrix `[N, K]`, borrowed.
#[derive(Debug, Clone, Copy)]
pub struct Q4Matrix<'a> {
    /// Columns of `x` (the reduction length), a multiple of [`BLOCK`].
    pub k: usize,
    /// Rows of the matrix (outputs).
    pub n: usize,
    /// `[N, K/32, 16]` packed nibbles.
    pub q: &'a [u8],
    /// `[N, K/32]` block scales.
    pub scale: &'a [f16],
    /// `[N, K/32]` block minimums.
    pub minimum: &'a [f16],
}

impl<'a> Q4Matrix<'a> {
    /// Checks the sizes; errors say which part is wrong.
    pub fn new(
        k: usize,
        n: usize,
        q: &'a [u8],
        scale: &'a [f16],
        minimum: &'a [f16],
    ) -> Result<Self, String> {
        if k == 0 || !k.is_multiple_of(BLOCK) {
            return Err(format!(
                "K is {k}; it must be a positive multiple of {BLOCK}"
            ));
        }
        if n == 0 {
            return Err("N must be positive".into());
        }
        let blocks = n * (k / BLOCK);
        if q.len() != blocks * BLOCK / 2 {
            return Err(format!(
                "the packed weights hold {} bytes; [N={n}, K/32={}, 16] needs {}",
                q.len(),
                k / BLOCK,
                blocks * BLOCK / 2
            ));
        }
        for (name, values) in [("scale", scale), ("minimum", minimum)] {
            if values.len() != blocks {
                return Err(format!(
                    "{name} holds {} values; [N={n}, K/32={}] needs {blocks}",
                    values.len(),
                    k / BLOCK
                ));
            }
        }
        Ok(Q4Matrix {
            k,
            n,
            q,
            scale,
            minimum,
        })
    }

    /// Matrix rows `rows` as a matrix of their own.
    ///
    /// # Panics
    /// If `rows` is empty or does not lie within `0..N`.
    pub fn rows(&self, rows: std::ops::Range<usize>) -> Q4Matrix<'a> {
        assert!(
            rows.start < rows.end && rows.end <= self.n,
            "rows {rows:?} of {}",
            self.n
        );
        let blocks = self.k / BLOCK;
        let (first, last) = (rows.start * blocks, rows.end * blocks);
        Q4Matrix {
            k: self.k,
            n: rows.len(),
            q: &self.q[first * (BLOCK / 2)..last * (BLOCK / 2)],
            scale: &self.scale[first..last],
            minimum: &self.minimum[first..last],
        }
    }

    /// Weight `[row, column]` as the kernels compute it: `fl(d · q + m)`.
    pub fn weight(&self, row: usize, column: usize) -> f32 {
        let block = row * (self.k / BLOCK) + column / BLOCK;
        let j = column % BLOCK;
        let byte = self.q[block * (BLOCK / 2) + j / 2];
        let nibble = if j.is_multiple_of(2) {
            byte & 0x0F
        } else {
            byte >> 4
        };
        f32::from(nibble).mul_add(self.scale[block].to_f32(), self.minimum[block].to_f32())
    }
}

/// Copies `x` (rows of `k` values) into `out` with each block of 32 reordered
/// as its 16 even-indexed values followed by its 16 odd ones.
pub fn split_blocks(x: &[f32], k: usize, out: &mut Vec<f32>) {
    out.clear();
    out.reserve(x.len());
    for block in x.chunks_exact(BLOCK) {
        out.extend(block.iter().step_by(2));
        out.extend(block.iter().skip(1).step_by(2));
    }
    debug_assert_eq!(out.len() % k, 0);
}

/// Blocks of one row of [`block_sums`]: K/32 rounded up to a multiple of 8,
/// the sums past K/32 zero.
pub(crate) fn sums_per_row(k: usize) -> usize {
    (k / BLOCK).next_multiple_of(8)
}

/// The sum of each block of 32 values of each row of `x` (`k` values a row,
/// summed in their order), [`sums_per_row`] to a row: the AVX2 kernel
/// ([`crate::packed`]) multiplies them by the blocks' minimums. Each is a
/// function of its block alone, so a row's sums do not depend on the rows
/// beside it.
pub fn block_sums(x: &[f32], k: usize, out: &mut Vec<f32>) {
    let per_row = sums_per_row(k);
    out.clear();
    out.resize(x.len() / k * per_row, 0.0);
    for (row, sums) in x.chunks_exact(k).zip(out.chunks_exact_mut(per_row)) {
        for (block, sum) in row.chunks_exact(BLOCK).zip(sums.iter_mut()) {
            *sum = block.iter().sum();
        }
    }
}

/// Whether this CPU runs a vector kernel (AVX-512 or AVX2, [`Isa`]);
/// otherwise the portable one runs, which is exact too but far slower than
/// ONNX Runtime's own 4-bit kernels.
pub fn accelerated() -> bool {
    Isa::best() != Isa::Portable
}

/// Output rows a kernel call covers at most: the weights a call unpacks are
/// reused for this many rows of `x`, whose blocks stay in L1 (4 rows of
/// K = 1536 take 24 KiB).
pub const ROWS: usize = 4;

/// Computes `out[r · stride + c] = Σ_k xs[r · K + k] · W[c, k]` for the
/// `rows` (≤ [`ROWS`]) rows of `xs` (already [`split_blocks`]) and the
/// matrix rows `columns`, on the path `isa` (AVX-512 or portable; AVX2
/// multiplies packed weights).
///
/// # Safety
/// `isa` must be available on this CPU; `out` must be valid for writes at
/// `r · stride + c` for every `r < rows` and `c` in `columns`, and nothing
/// else may access those elements during the call; `xs` must hold `rows ·
/// K` values; `columns` must lie within `0..N`.
#[allow(unsafe_code)]
pub(crate) unsafe fn tile(
    w: &Q4Matrix<'_>,
    xs: &[f32],
    rows: usize,
    out: *mut f32,
    stride: usize,
    columns: std::ops::Range<usize>,
    isa: Isa,
) {
    debug_assert!(rows <= ROWS && xs.len() >= rows * w.k && columns.end <= w.n);
    debug_assert!(isa.available());
    #[cfg(target_arch = "x86_64")]
    match isa {
        // SAFETY: the CPU has the instruction set (the caller's guarantee);
        // the caller guarantees the memory conditions the kernel relies on.
        Isa::Avx512 => unsafe {
            use crate::dot::avx512::tile;
            match rows {
                1 => tile::<_, 4, 1>(w, xs, out, stride, columns),
                2 => tile::<_, 4, 2>(w, xs, out, stride, columns),
                3 => tile::<_, 2, 3>(w, xs, out, stride, columns),
                _ => tile::<_, 2, 4>(w, xs, out, stride, columns),
            }
            return;
        },
        Isa::Avx2 => unreachable!("AVX2 multiplies packed weights (crate::packed)"),
        Isa::Portable => {}
    }
    for r in 0..rows {
        let x = &xs[r * w.k..(r + 1) * w.k];
        for c in columns.clone() {
            let value = portable_dot(w, x, c);
            // SAFETY: in bounds and unaliased, as the caller guarantees.
            unsafe { *out.add(r * stride + c) = value };
        }
    }
}

/// `x [T, K] · Wᵀ` on the calling thread: the operator's arithmetic without
/// ONNX Runtime (tests and benchmarks compare against it).
pub fn matmul(w: &Q4Matrix<'_>, x: &[f32]) -> Vec<f32> {
    matmul_with(w, x, Isa::best())
}

pub(crate) fn matmul_with(w: &Q4Matrix<'_>, x: &[f32], isa: Isa) -> Vec<f32> {
    if isa == Isa::Avx2 {
        return crate::packed::PackedQ4::new(w).matmul(x);
    }
    let tokens = x.len() / w.k;
    let mut xs = Vec::new();
    split_blocks(&x[..tokens * w.k], w.k, &mut xs);
    let mut y = vec![0f32; tokens * w.n];
    let (mut interleaved, mut unpacked) = (Vec::new(), Vec::new());
    let step = if tokens >= gemm::FROM_ROWS {
        gemm::interleave(&xs, w.k, &mut interleaved);
        gemm::TILE
    } else {
        w.n
    };
    for start in (0..w.n).step_by(step) {
        let columns = start..(start + step).min(w.n);
        // SAFETY: `y` is `[tokens, N]`, owned here, and `columns` lie within
        // 0..N; `isa` is available (`best`, or the tests' `all_available`).
        #[allow(unsafe_code)]
        unsafe {
            all_rows(
                w,
                &xs,
                &interleaved,
                tokens,
                y.as_mut_ptr(),
                columns,
                &mut unpacked,
                isa,
            );
        }
    }
    y
}

/// Every row of `x` against the matrix rows `columns`: through the
/// outer-product path ([`gemm`]) when there are [`gemm::FROM_ROWS`] rows or
/// more and `columns` is one whole tile of it, else per group of [`ROWS`]
/// rows, on the path `isa` (AVX-512 or portable). `xs` is `x`
/// [`split_blocks`]; `interleaved` is `xs` as
/// [`gemm::interleave`] leaves it (read by the outer-product path only);
/// `unpacked` is a buffer for the tile; `out` points at row 0 of the
/// `[tokens, N]` output.
///
/// # Safety
/// `isa` must be available; `out` must be valid for writes, and unaliased
/// during the call, at rows `0..tokens` and `columns` (row stride N);
/// `columns` must lie within `0..N`; `xs` (and `interleaved` for the
/// outer-product path) must hold `tokens × K` values.
#[allow(unsafe_code, clippy::too_many_arguments)]
pub(crate) unsafe fn all_rows(
    w: &Q4Matrix<'_>,
    xs: &[f32],
    interleaved: &[f32],
    tokens: usize,
    out: *mut f32,
    columns: std::ops::Range<usize>,
    unpacked: &mut Vec<f32>,
    isa: Isa,
) {
    if tokens >= gemm::FROM_ROWS && columns.len() == gemm::TILE {
        // SAFETY: `isa` is available (the caller's guarantee); the tile's
        // matrix rows exist as `columns` lies within 0..N.
        unsafe { gemm::unpack_tile(w, columns.start, unpacked, isa) };
        for first in (0..tokens).step_by(gemm::GROUP) {
            let rows = (tokens - first).min(gemm::GROUP);
            // SAFETY: rows `first..first + rows` and the tile's columns, as
            // the caller guarantees.
            unsafe {
                let at = out.add(first * w.n + columns.start);
                gemm::tile(
                    w.k,
                    unpacked,
                    &interleaved[first * w.k..],
                    rows,
                    at,
                    w.n,
                    isa,
                );
            }
        }
        return;
    }
    for first in (0..tokens).step_by(ROWS) {
        let rows = (tokens - first).min(ROWS);
        // SAFETY: as above, for `columns` of rows `first..first + rows`.
        unsafe {
            let at = out.add(first * w.n);
            tile(w, &xs[first * w.k..], rows, at, w.n, columns.clone(), isa);
        }
    }
}

/// One output of the portable kernel: row `c` of `W` against one split row.
fn portable_dot(w: &Q4Matrix<'_>, x: &[f32], c: usize) -> f32 {
    let blocks = w.k / BLOCK;
    let mut lanes = [0f32; BLOCK];
    for b in 0..blocks {
        let i = c * blocks + b;
        let (d, m) = (w.scale[i].to_f32(), w.minimum[i].to_f32());
        let q = &w.q[i * (BLOCK / 2)..(i + 1) * (BLOCK / 2)];
        let x = &x[b * BLOCK..(b + 1) * BLOCK];
        for j in 0..BLOCK / 2 {
            let low = f32::from(q[j] & 0x0F).mul_add(d, m);
            let high = f32::from(q[j] >> 4).mul_add(d, m);
            lanes[j] = low.mul_add(x[j], lanes[j]);
            lanes[BLOCK / 2 + j] = high.mul_add(x[BLOCK / 2 + j], lanes[BLOCK / 2 + j]);
        }
    }
    (0..BLOCK / 2)
        .map(|j| lanes[j] + lanes[BLOCK / 2 + j])
        .sum()
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
pub(crate) mod avx512 {
    use std::arch::x86_64::*;

    use super::{BLOCK, Q4Matrix};
    use crate::dot::{Blocks, CHUNK};

    /// A block of a 4-bit matrix: its 16 bytes widened to 16 lanes, the low
    /// and high nibbles indexing a 16-entry table `d · i + m` (`vpermps`,
    /// which reads only the low 4 bits of each index): the block's even
    /// elements, then its odd ones, as [`super::split_blocks`] lays out `x`.
    /// A chunk's constants are its scales then its minimums, in f32.
    impl Blocks<(__m512, __m512)> for Q4Matrix<'_> {
        fn k(&self) -> usize {
            self.k
        }

        #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
        unsafe fn constants(
            &self,
            row: usize,
            b: usize,
            count: usize,
            scratch: &mut [f32; 2 * CHUNK],
        ) -> *const f32 {
            let i = row * (self.k / BLOCK) + b;
            let mask = if count >= CHUNK {
                u16::MAX
            } else {
                (1u16 << count) - 1
            };
            let (d, m) = scratch.split_at_mut(CHUNK);
            // SAFETY: blocks i..i + count exist (row < N, b + count ≤ K/32,
            // the caller's guarantee) in `scale` and `minimum`, whose sizes
            // `Q4Matrix::new` checked; the masked loads read only those;
            // `d` and `m` hold 16 f32s each.
            unsafe {
                let scale = _mm256_maskz_loadu_epi16(mask, self.scale.as_ptr().add(i).cast());
                let minimum = _mm256_maskz_loadu_epi16(mask, self.minimum.as_ptr().add(i).cast());
                _mm512_storeu_ps(d.as_mut_ptr(), _mm512_cvtph_ps(scale));
                _mm512_storeu_ps(m.as_mut_ptr(), _mm512_cvtph_ps(minimum));
            }
            scratch.as_ptr()
        }

        #[target_feature(enable = "avx512f")]
        unsafe fn unpack(
            &self,
            row: usize,
            b: usize,
            constants: *const f32,
            j: usize,
        ) -> (__m512, __m512) {
            let i = row * (self.k / BLOCK) + b;
            // SAFETY: block i exists (row < N, b < K/32, the caller's
            // guarantee) in `q` (16 bytes), whose size `Q4Matrix::new`
            // checked; `constants` is the scratch of 2 × 16 values that
            // `constants` filled, and j < CHUNK.
            let (packed, d, m) = unsafe {
                (
                    _mm_loadu_si128(self.q.as_ptr().add(i * (BLOCK / 2)).cast()),
                    *constants.add(j),
                    *constants.add(CHUNK + j),
                )
            };
            let iota = _mm512_setr_ps(
                0., 1., 2., 3., 4., 5., 6., 7., 8., 9., 10., 11., 12., 13., 14., 15.,
            );
            let wide = _mm512_cvtepu8_epi32(packed);
            let table = _mm512_fmadd_ps(iota, _mm512_set1_ps(d), _mm512_set1_ps(m));
            (
                _mm512_permutexvar_ps(wide, table),
                _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(wide), table),
            )
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A matrix of pseudo-random nibbles, scales and minimums like a
    /// model's (scales ~1e-2, minimums negative).
    pub(crate) fn matrix(k: usize, n: usize, seed: u64) -> (Vec<u8>, Vec<f16>, Vec<f16>) {
        let mut s = seed;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let blocks = n * k / BLOCK;
        let q = (0..blocks * 16).map(|_| next() as u8).collect();
        let scale = (0..blocks)
            .map(|_| f16::from_f32((next() % 1000) as f32 * 2e-5))
            .collect();
        let minimum = (0..blocks)
            .map(|_| f16::from_f32(-((next() % 1000) as f32) * 1.6e-4))
            .collect();
        (q, scale, minimum)
    }

    fn h(values: &[f32]) -> Vec<f16> {
        values.iter().map(|&v| f16::from_f32(v)).collect()
    }

    pub(crate) fn activations(tokens: usize, k: usize) -> Vec<f32> {
        (0..tokens * k)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.03)
            .collect()
    }

    /// The same product in f64 over the weights as [`Q4Matrix::weight`]
    /// gives them, each written out element by element.
    fn reference(w: &Q4Matrix<'_>, x: &[f32]) -> Vec<f64> {
        let tokens = x.len() / w.k;
        let mut y = vec![0f64; tokens * w.n];
        for t in 0..tokens {
            for c in 0..w.n {
                y[t * w.n + c] = (0..w.k)
                    .map(|j| f64::from(w.weight(c, j)) * f64::from(x[t * w.k + j]))
                    .sum();
            }
        }
        y
    }

    #[test]
    fn weights_unpack_in_matmul_nbits_order() {
        // Block 0 of row 0: byte 0 = 0x21 holds element 0 (1) and element 1 (2).
        let mut q = vec![0u8; 16];
        q[0] = 0x21;
        q[15] = 0xF0;
        let (scale, minimum) = (h(&[0.5]), h(&[-1.0]));
        let w = Q4Matrix::new(32, 1, &q, &scale, &minimum).unwrap();
        assert_eq!(w.weight(0, 0), -0.5);
        assert_eq!(w.weight(0, 1), 0.0);
        assert_eq!(w.weight(0, 30), -1.0);
        assert_eq!(w.weight(0, 31), 6.5);
        let mut x = vec![0f32; 32];
        x[1] = 1.0;
        x[31] = 2.0;
        assert_eq!(matmul(&w, &x), vec![13.0]);
        for isa in Isa::all_available() {
            assert_eq!(matmul_with(&w, &x, isa), vec![13.0], "{isa:?}");
        }
    }

    #[test]
    fn both_kernels_match_an_f64_product_for_every_row_count_and_ragged_columns() {
        // N = 67: column tiles of 4 and 2 leave a ragged end, and 3 columns past the
        // outer-product path's tiles of 32; K = 1536 like ffn_down; K = 96, an odd number
        // of blocks; N = 200 of K = 576, more blocks than the AVX2 kernel converts at once.
        for (k, n) in [(64, 67), (1536, 9), (576, 96), (96, 35), (576, 200)] {
            let (q, scale, minimum) = matrix(k, n, 7 + k as u64);
            let w = Q4Matrix::new(k, n, &q, &scale, &minimum).unwrap();
            for tokens in [1, 2, 3, 4, 5, 9, 16, 23, 24, 33] {
                let x = activations(tokens, k);
                let want = reference(&w, &x);
                for isa in Isa::all_available() {
                    let got = matmul_with(&w, &x, isa);
                    for (i, (g, r)) in got.iter().zip(&want).enumerate() {
                        let err = (f64::from(*g) - r).abs();
                        assert!(
                            err <= 1e-5 * (1.0 + r.abs()),
                            "k {k} n {n} tokens {tokens} {isa:?} output {i}: {g} vs {r}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_row_gives_the_same_bits_in_any_batch_of_its_path() {
        // N = 72: two whole tiles of 32 and 8 columns left to the per-row path.
        let (k, n) = (576, 72);
        let (q, scale, minimum) = matrix(k, n, 3);
        let w = Q4Matrix::new(k, n, &q, &scale, &minimum).unwrap();
        let x = activations(29, k);
        assert_eq!(gemm::FROM_ROWS, 24);
        for isa in Isa::all_available() {
            let matmul = |x: &[f32]| matmul_with(&w, x, isa);
            // Fewer than 16 rows: the per-row path, the same bits alone and in 7 or 15 rows.
            let seven = matmul(&x[..7 * k]);
            let fifteen = matmul(&x[..15 * k]);
            assert_eq!(seven[..], fifteen[..7 * n], "{isa:?}");
            for t in 0..7 {
                let alone = matmul(&x[t * k..(t + 1) * k]);
                assert_eq!(alone[..], seven[t * n..(t + 1) * n], "{isa:?} row {t}");
            }
            // From 24 rows on: the outer-product path, the same bits in 24, 25 or 29 rows,
            // and within an f32 rounding or so of the per-row path.
            let many = matmul(&x[..24 * k]);
            let more = matmul(&x[..25 * k]);
            let all = matmul(&x);
            assert_eq!(many[..], all[..24 * n], "{isa:?}");
            assert_eq!(more[..], all[..25 * n], "{isa:?}");
            for (a, b) in fifteen.iter().zip(&all) {
                assert!(
                    (a - b).abs() <= 1e-5 * (1.0 + a.abs()),
                    "{isa:?}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn wrong_sizes_are_named() {
        let q = vec![0u8; 16];
        let err = Q4Matrix::new(48, 1, &q, &h(&[1.0]), &h(&[0.0])).unwrap_err();
        assert!(err.contains("multiple of 32"), "{err}");
        let err = Q4Matrix::new(32, 2, &q, &h(&[1.0, 1.0]), &h(&[0.0, 0.0])).unwrap_err();
        assert!(err.contains("packed weights hold 16 bytes"), "{err}");
        let err = Q4Matrix::new(32, 1, &q, &h(&[1.0, 2.0]), &h(&[0.0])).unwrap_err();
        assert!(err.contains("scale holds 2 values"), "{err}");
    }
}
