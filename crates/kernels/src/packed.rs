//! `MatMulQ4` on AVX2: the weights repacked once, when the operator's kernel
//! is created, so that 8 adjacent matrix rows sit in the 8 lanes of a vector,
//! and every output summed along K in one order whatever the number of rows.
//!
//! **Layout.** Matrix rows (outputs) go in groups of [`GROUP`] = 16; the
//! last group is padded with zero nibbles, scales and minimums. For each
//! group and block of 32 positions along K, 256 bytes: for each pair of
//! positions `2i, 2i + 1` of the block, 16 bytes, byte `c` holding matrix
//! row `c` of the group — its nibble at `2i` low, at `2i + 1` high. That is
//! the group's 16 source blocks of 16 bytes transposed (a source byte `i`
//! already holds elements `2i` and `2i + 1`), so repacking moves bytes and
//! changes no value. Scales and minimums follow the same order: for each
//! group and block, the 16 matrix rows' fp16 values.
//!
//! **Arithmetic.** For a position `k`, 8 bytes widen to 8 lanes (`vpmovzxbd`),
//! a mask or a shift keeps one nibble, and one conversion gives 8 matrix
//! rows' nibbles as f32s; each row of `x` broadcasts its activation at `k`
//! and multiply-adds it in. So a block's dot product `Σ_k x_k · q_k` is one
//! chain of multiply-adds in the order of `k`, per output; at the end of the
//! block the output's total takes `d · dot` and then `m · Σ x` (the block's
//! scale and minimum, `Σ x` the block sum of `x`'s row, [`crate::q4::block_sums`]
//! of `x` in its own order) — the factored form of `Σ_k x_k (d q_k + m)`,
//! fp32 with unrounded activations, as the old dot-product path had. None of
//! this depends on how many rows a call has or which rows are beside it, so a
//! row gives the same bits alone, in a decode batch and in a prompt: one path
//! for every call.
//!
//! **Why.** Per block, 8 matrix rows and 4 rows of `x`, the loop issues 32
//! multiply-adds, 8 conversions, 8 mask-or-shifts, 8 widening loads and 32
//! broadcast loads, and the scale's multiply-add is once per block and 8
//! outputs instead of once per block and output; the dot-product path it
//! replaced issued 5 multiply-adds per block and output and 4 vector loads
//! of activations. Measured alone (one core, matrices in cache): 1.3–1.7×
//! its speed for 1 to 23 rows, and faster than the outer-product prompt path
//! from 24 rows on (docs/performance.md).

use crate::q4::{BLOCK, Q4Matrix};

/// Matrix rows to a group: two vectors of 8 lanes.
pub const GROUP: usize = 16;

/// Bytes of one group's block's nibbles: 32 positions × 16 matrix rows, 4
/// bits each.
const GROUP_BYTES: usize = GROUP * BLOCK / 2;

/// Bytes of one group's block as stored: its nibbles, then its 16 scales,
/// then its 16 minimums (fp16), so that a pass over a group reads one
/// stream of memory.
const RECORD: usize = GROUP_BYTES + 2 * 2 * GROUP;

/// Rows of `x` one pass over the weights multiplies at most (8 accumulators
/// and 8 totals of 16 registers).
pub const ROWS: usize = 4;

/// A [`Q4Matrix`] repacked for the AVX2 kernel (module doc), owning its
/// bytes: as many as the source.
#[derive(Debug, Clone)]
pub struct PackedQ4 {
    k: usize,
    n: usize,
    /// [`RECORD`] bytes per group and block, groups outermost.
    data: Vec<u8>,
}

impl PackedQ4 {
    /// Repacks `w`.
    pub fn new(w: &Q4Matrix<'_>) -> PackedQ4 {
        let blocks = w.k / BLOCK;
        let groups = w.n.div_ceil(GROUP);
        let mut data = vec![0u8; groups * blocks * RECORD];
        for row in 0..w.n {
            let (g, c) = (row / GROUP, row % GROUP);
            for b in 0..blocks {
                let source = row * blocks + b;
                let record = &mut data[(g * blocks + b) * RECORD..][..RECORD];
                let bytes = &w.q[source * (BLOCK / 2)..(source + 1) * (BLOCK / 2)];
                for (i, &byte) in bytes.iter().enumerate() {
                    record[i * GROUP + c] = byte;
                }
                let scale = GROUP_BYTES + 2 * c;
                let minimum = GROUP_BYTES + 2 * GROUP + 2 * c;
                record[scale..scale + 2].copy_from_slice(&w.scale[source].to_le_bytes());
                record[minimum..minimum + 2].copy_from_slice(&w.minimum[source].to_le_bytes());
            }
        }
        PackedQ4 {
            k: w.k,
            n: w.n,
            data,
        }
    }

    /// Columns of `x` (the reduction length).
    pub fn k(&self) -> usize {
        self.k
    }

    /// Matrix rows (outputs).
    pub fn n(&self) -> usize {
        self.n
    }

    /// `x [T, K] · Wᵀ` on the calling thread, the operator's arithmetic
    /// without ONNX Runtime (tests and benchmarks).
    ///
    /// # Panics
    /// If the CPU lacks AVX2, FMA or F16C ([`crate::Isa::Avx2`]).
    pub fn matmul(&self, x: &[f32]) -> Vec<f32> {
        assert!(
            crate::Isa::Avx2.available(),
            "the packed 4-bit kernel needs AVX2, FMA and F16C"
        );
        let tokens = x.len() / self.k;
        let mut sums = Vec::new();
        crate::q4::block_sums(&x[..tokens * self.k], self.k, &mut sums);
        let mut y = vec![0f32; tokens * self.n];
        // SAFETY: the CPU has AVX2, FMA and F16C (asserted); `y` is `[tokens,
        // N]`, owned here; `sums` holds the tokens' block sums.
        #[allow(unsafe_code)]
        unsafe {
            rows(self, x, &sums, tokens, y.as_mut_ptr(), self.n, 0..self.n)
        };
        y
    }

    /// The same outputs in plain Rust, in the same order of operations
    /// (multiply-adds rounded once, as the vector ones): the tests hold the
    /// AVX2 kernel to it bit for bit.
    #[cfg(test)]
    fn matmul_portable(&self, x: &[f32]) -> Vec<f32> {
        let blocks = self.k / BLOCK;
        let tokens = x.len() / self.k;
        let mut sums = Vec::new();
        crate::q4::block_sums(&x[..tokens * self.k], self.k, &mut sums);
        let per_row = crate::q4::sums_per_row(self.k);
        let mut y = vec![0f32; tokens * self.n];
        for t in 0..tokens {
            let x = &x[t * self.k..(t + 1) * self.k];
            for row in 0..self.n {
                let (g, c) = (row / GROUP, row % GROUP);
                let mut total = 0f32;
                for b in 0..blocks {
                    let bytes = &self.data[(g * blocks + b) * RECORD..][..RECORD];
                    let mut dot = 0f32;
                    for j in 0..BLOCK {
                        let byte = bytes[(j / 2) * GROUP + c];
                        let nibble = if j % 2 == 0 { byte & 0x0F } else { byte >> 4 };
                        dot = f32::from(nibble).mul_add(x[b * BLOCK + j], dot);
                    }
                    let (d, m) = (
                        constant(bytes, GROUP_BYTES + 2 * c),
                        constant(bytes, GROUP_BYTES + 2 * GROUP + 2 * c),
                    );
                    total = d.mul_add(dot, total);
                    total = m.mul_add(sums[t * per_row + b], total);
                }
                y[t * self.n + row] = total;
            }
        }
        y
    }
}

/// The fp16 value at byte `at` of a record, as f32.
#[cfg(test)]
fn constant(record: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([record[at], record[at + 1]]).to_f32()
}

/// `out[r · stride + (c − columns.start)] = Σ_k x[r · K + k] · W[c, k]` for
/// the `rows` rows of `x` (in its own order, with their [`crate::q4::block_sums`]
/// `sums`, [`crate::q4::sums_per_row`] to a row) and the matrix rows
/// `columns`, whose start is a multiple of [`GROUP`]: [`ROWS`] rows and one
/// group at a time. (A lone row over two groups at a time, 4 chains of
/// multiply-adds instead of 2, measured 10% slower on the model's matrices:
/// one row is bound by reading the weights, and one stream reads faster.)
///
/// # Safety
/// AVX2, FMA and F16C must be available; `out` must be valid for writes at
/// `r · stride + i` for every `r < rows` and `i < columns.len()`, unaliased
/// during the call; `x` must hold `rows · K` values and `sums` `rows ·`
/// [`crate::q4::sums_per_row`]; `columns` must lie within `0..N`.
#[allow(unsafe_code)]
pub(crate) unsafe fn rows(
    p: &PackedQ4,
    x: &[f32],
    sums: &[f32],
    rows: usize,
    out: *mut f32,
    stride: usize,
    columns: std::ops::Range<usize>,
) {
    debug_assert!(columns.start.is_multiple_of(GROUP) && columns.end <= p.n);
    debug_assert!(x.len() >= rows * p.k && crate::Isa::Avx2.available());
    let per_row = crate::q4::sums_per_row(p.k);
    debug_assert!(sums.len() >= rows * per_row);
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("AVX2 is x86-64's");
    #[cfg(target_arch = "x86_64")]
    for first in (0..rows).step_by(ROWS) {
        let count = (rows - first).min(ROWS);
        for start in columns.clone().step_by(GROUP) {
            let width = (columns.end - start).min(GROUP);
            // SAFETY: rows first..first + count of `x`, `sums` and `out`, and
            // columns start..start + width, within the caller's; the CPU
            // has the instruction sets (the caller's guarantee).
            unsafe {
                let x = x.as_ptr().add(first * p.k);
                let sums = sums.as_ptr().add(first * per_row);
                let out = out.add(first * stride + (start - columns.start));
                let group = start / GROUP;
                let call = avx2::Call {
                    p,
                    x,
                    sums,
                    per_row,
                    out,
                    stride,
                    group,
                    width,
                };
                match count {
                    1 => call.run::<1>(),
                    2 => call.run::<2>(),
                    3 => call.run::<3>(),
                    _ => call.run::<4>(),
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{BLOCK, GROUP, GROUP_BYTES, PackedQ4, RECORD};

    /// Records ahead that a call asks the memory for: −2.5% at 8 rows, −1%
    /// at one, against the hardware prefetcher alone (2, 4 and 8 measured;
    /// 4 best by a hair).
    const PREFETCH: usize = 4;

    /// Vectors of 8 outputs a call covers: one group.
    const V: usize = GROUP / 8;

    /// One call of the kernel: `R` rows of `x` from `x`, their block sums
    /// from `sums`, against the first `width` matrix rows of group `group`,
    /// into `out`.
    pub(super) struct Call<'a> {
        pub(super) p: &'a PackedQ4,
        pub(super) x: *const f32,
        pub(super) sums: *const f32,
        pub(super) per_row: usize,
        pub(super) out: *mut f32,
        pub(super) stride: usize,
        pub(super) group: usize,
        pub(super) width: usize,
    }

    impl Call<'_> {
        /// The group's two vectors of 8 outputs for `R` rows: `2R` chains of
        /// multiply-adds along each block, then the block's scale and minimum
        /// into `2R` totals (module doc).
        ///
        /// # Safety
        /// AVX2, FMA and F16C must be available; `x` must hold R rows of K,
        /// `sums` R rows of `per_row`; group `group` must exist; `out` must be
        /// valid and unaliased at `r · stride + i` for `r < R`, `i < width`.
        #[target_feature(enable = "avx2,fma,f16c")]
        pub(super) unsafe fn run<const R: usize>(&self) {
            let p = self.p;
            let blocks = p.k / BLOCK;
            let nibble = _mm256_set1_epi32(0x0F);
            let mut total = [[_mm256_setzero_ps(); V]; R];
            for b in 0..blocks {
                let record = (self.group * blocks + b) * RECORD;
                // The record PREFETCH blocks on (past the end of the data, a
                // prefetch is a no-op: it never faults).
                let ahead = p.data.as_ptr().wrapping_add(record + PREFETCH * RECORD);
                for line in (0..RECORD).step_by(64) {
                    _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line).cast());
                }
                let mut acc = [[_mm256_setzero_ps(); V]; R];
                for pair in 0..BLOCK / 2 {
                    for high in [false, true] {
                        let mut w = [_mm256_setzero_ps(); V];
                        for (v, w) in w.iter_mut().enumerate() {
                            // SAFETY: the group's block's record holds 256 bytes
                            // of nibbles; this pair's 16 from pair · 16, vector
                            // v's 8 of them.
                            let wide = unsafe {
                                let at = p.data.as_ptr().add(record + pair * GROUP + 8 * v);
                                _mm256_cvtepu8_epi32(_mm_loadl_epi64(at.cast()))
                            };
                            let q = if high {
                                _mm256_srli_epi32::<4>(wide)
                            } else {
                                _mm256_and_si256(wide, nibble)
                            };
                            *w = _mm256_cvtepi32_ps(q);
                        }
                        let k = b * BLOCK + 2 * pair + usize::from(high);
                        for (r, acc) in acc.iter_mut().enumerate() {
                            // SAFETY: row r < R of `x` holds K values, k < K.
                            let x = unsafe { _mm256_broadcast_ss(&*self.x.add(r * p.k + k)) };
                            for (acc, w) in acc.iter_mut().zip(&w) {
                                *acc = _mm256_fmadd_ps(*w, x, *acc);
                            }
                        }
                    }
                }
                for v in 0..V {
                    // SAFETY: the record's 16 scales and 16 minimums follow
                    // its nibbles; vector v's 8 of each.
                    let (d, m) = unsafe {
                        let half = p.data.as_ptr().add(record + GROUP_BYTES + 16 * v);
                        (
                            _mm256_cvtph_ps(_mm_loadu_si128(half.cast())),
                            _mm256_cvtph_ps(_mm_loadu_si128(half.add(2 * GROUP).cast())),
                        )
                    };
                    for r in 0..R {
                        // SAFETY: row r's sums hold `per_row` ≥ K/32 values.
                        let s =
                            unsafe { _mm256_broadcast_ss(&*self.sums.add(r * self.per_row + b)) };
                        total[r][v] =
                            _mm256_fmadd_ps(m, s, _mm256_fmadd_ps(d, acc[r][v], total[r][v]));
                    }
                }
            }
            for (r, total) in total.iter().enumerate() {
                // SAFETY: row r < R of `out`, as the caller guarantees.
                let row = unsafe { self.out.add(r * self.stride) };
                if self.width == V * 8 {
                    for (v, total) in total.iter().enumerate() {
                        // SAFETY: 8 outputs from 8v < width.
                        unsafe { _mm256_storeu_ps(row.add(8 * v), *total) };
                    }
                } else {
                    let mut all = [0f32; GROUP];
                    for (v, total) in total.iter().enumerate() {
                        // SAFETY: `all` holds 8V values.
                        unsafe { _mm256_storeu_ps(all.as_mut_ptr().add(8 * v), *total) };
                    }
                    // SAFETY: `width` outputs of row r, as the caller guarantees.
                    unsafe { std::ptr::copy_nonoverlapping(all.as_ptr(), row, self.width) };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::q4::tests::{activations, matrix};

    fn shapes() -> [(usize, usize); 6] {
        // N = 67 and 35: a padded last group; N = 16 and 48: one and three whole groups
        // (a lone row takes two at a time, so one is left); K = 1536 like ffn_down.
        [
            (64, 67),
            (1536, 48),
            (576, 96),
            (96, 35),
            (576, 16),
            (32, 200),
        ]
    }

    #[test]
    fn repacking_moves_every_weight_and_constant_to_its_place() {
        let (k, n) = (96, 35);
        let (q, scale, minimum) = matrix(k, n, 5);
        let w = Q4Matrix::new(k, n, &q, &scale, &minimum).unwrap();
        let p = PackedQ4::new(&w);
        let blocks = k / BLOCK;
        assert_eq!(p.data.len(), 3 * blocks * RECORD);
        for row in 0..n {
            for j in 0..k {
                let (g, c, b) = (row / GROUP, row % GROUP, j / BLOCK);
                let record = &p.data[(g * blocks + b) * RECORD..][..RECORD];
                let byte = record[(j % BLOCK / 2) * GROUP + c];
                let nibble = if j % 2 == 0 { byte & 0x0F } else { byte >> 4 };
                let (d, m) = (
                    constant(record, GROUP_BYTES + 2 * c),
                    constant(record, GROUP_BYTES + 2 * GROUP + 2 * c),
                );
                let weight = f32::from(nibble).mul_add(d, m);
                assert_eq!(weight, w.weight(row, j), "row {row} position {j}");
            }
        }
        // The padding of the last group is zero.
        for row in n..3 * GROUP {
            let (g, c) = (row / GROUP, row % GROUP);
            for b in 0..blocks {
                let record = &p.data[(g * blocks + b) * RECORD..][..RECORD];
                assert_eq!(constant(record, GROUP_BYTES + 2 * c), 0.0);
                assert_eq!(constant(record, GROUP_BYTES + 2 * GROUP + 2 * c), 0.0);
            }
        }
    }

    #[test]
    fn the_vector_kernel_gives_the_plain_rust_order_bit_for_bit_and_an_f64_product_closely() {
        if !crate::Isa::Avx2.available() {
            return;
        }
        for (k, n) in shapes() {
            let (q, scale, minimum) = matrix(k, n, 11 + k as u64);
            let w = Q4Matrix::new(k, n, &q, &scale, &minimum).unwrap();
            let p = PackedQ4::new(&w);
            for tokens in [1, 2, 3, 4, 5, 8, 9, 24, 33] {
                let x = activations(tokens, k);
                let got = p.matmul(&x);
                assert_eq!(got, p.matmul_portable(&x), "k {k} n {n} tokens {tokens}");
                for t in 0..tokens {
                    for c in 0..n {
                        let want: f64 = (0..k)
                            .map(|j| f64::from(w.weight(c, j)) * f64::from(x[t * k + j]))
                            .sum();
                        let g = f64::from(got[t * n + c]);
                        assert!(
                            (g - want).abs() <= 1e-5 * (1.0 + want.abs()),
                            "k {k} n {n} tokens {tokens} output {t},{c}: {g} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_row_gives_the_same_bits_alone_and_in_any_batch_decode_or_prompt() {
        if !crate::Isa::Avx2.available() {
            return;
        }
        let (k, n) = (576, 72);
        let (q, scale, minimum) = matrix(k, n, 3);
        let w = Q4Matrix::new(k, n, &q, &scale, &minimum).unwrap();
        let p = PackedQ4::new(&w);
        let x = activations(40, k);
        let all = p.matmul(&x);
        for tokens in [1, 2, 3, 5, 7, 8, 16, 23, 24, 31] {
            let some = p.matmul(&x[..tokens * k]);
            assert_eq!(some[..], all[..tokens * n], "{tokens} rows");
        }
        for t in [0, 6, 17, 39] {
            let alone = p.matmul(&x[t * k..(t + 1) * k]);
            assert_eq!(alone[..], all[t * n..(t + 1) * n], "row {t}");
        }
        // Any columns range that starts on a group gives the same bits as the whole.
        let mut sums = Vec::new();
        crate::q4::block_sums(&x[..5 * k], k, &mut sums);
        let mut part = vec![0f32; 5 * 40];
        // SAFETY: AVX2 is available; `part` is [5, 40], the columns 16..56.
        #[allow(unsafe_code)]
        unsafe {
            rows(&p, &x, &sums, 5, part.as_mut_ptr(), 40, 16..56)
        };
        for t in 0..5 {
            assert_eq!(
                part[t * 40..(t + 1) * 40],
                all[t * n + 16..t * n + 56],
                "row {t}"
            );
        }
    }
}
