//! `MatMulQ4` and `MatMulQ8` on AVX2: the weights repacked once, when the
//! operator's kernel is created, so that 8 adjacent matrix rows sit in the 8
//! lanes of a vector, and every output summed along K in one order whatever
//! the number of rows.
//!
//! **Layout.** Matrix rows (outputs) go in groups of [`GROUP`] = 16; the
//! last group is padded with zero weights and constants. Each group's block
//! of 32 positions along K is one record: the weights with the group's 16
//! matrix rows side by side at each position, then the block's constants
//! for the 16 rows, so that a pass over a group reads one stream of memory.
//! - 4-bit ([`Q4`], 320 bytes): for each pair of positions `2i, 2i + 1`, 16
//!   bytes, byte `c` holding matrix row `c`'s nibble at `2i` low and at
//!   `2i + 1` high — the group's 16 source blocks of 16 bytes transposed (a
//!   source byte `i` already holds elements `2i` and `2i + 1`), so repacking
//!   moves bytes and changes no value; then 16 fp16 scales and 16 fp16
//!   minimums.
//! - 8-bit ([`Q8`], 576 bytes): for each position, 16 signed bytes; then 16
//!   f32 scales.
//!
//! **Arithmetic.** For a position `k`, 8 bytes widen to 8 lanes
//! (`vpmovzxbd`, `vpmovsxbd`), a mask or a shift keeps one nibble (4-bit),
//! and one conversion gives 8 matrix rows' quantized weights as f32s; each
//! row of `x` broadcasts its activation at `k` and multiply-adds it in. So
//! a block's dot product `Σ_k x_k · q_k` is one chain of multiply-adds in
//! the order of `k`, per output; at the end of the block the output's total
//! takes `d · dot` and, for 4-bit, then `m · Σ x` (the block's scale and
//! minimum, `Σ x` the block sum of `x`'s row, [`crate::q4::block_sums`] of
//! `x` in its own order) — the factored form of `Σ_k x_k (d q_k + m)`, fp32
//! with unrounded activations. None of this depends on how many rows a call
//! has or which rows are beside it, so a row gives the same bits alone, in
//! a decode batch and in a prompt: one path for every call.
//!
//! **Why.** Per block, one group (16 outputs) and 4 rows of `x`, the loop
//! issues 256 multiply-adds for the products and 16 for the constants, 64
//! conversions, 32 widening loads and 128 broadcast loads of activations;
//! the 4-bit dot-product path it replaced issued 256 + 64 multiply-adds (a
//! scale per block, output and row), 64 conversions and 256 vector loads of
//! activations (each output re-read them), then horizontal sums. Measured
//! alone (one core, matrices in cache): 1.3–1.7× its speed for 1 to 23 rows,
//! and faster than the outer-product prompt path from 24 rows on
//! (docs/performance.md).

use std::marker::PhantomData;

use crate::q4::{BLOCK, Q4Matrix};
use crate::q8::Q8Matrix;

/// Matrix rows to a group: two vectors of 8 lanes.
pub const GROUP: usize = 16;

/// Rows of `x` one pass over the weights multiplies at most (8 accumulators
/// and 8 totals of 16 registers; 6 rows measured much slower: spills).
pub const ROWS: usize = 4;

/// A block format the packed kernel reads: where a record's parts are, and
/// how a position's 8 weights and a block's constants come out of it.
pub trait Format {
    /// Bytes of one group's block of weights.
    const WEIGHTS: usize;
    /// Bytes of one record: the weights, then the constants.
    const RECORD: usize;
    /// Whether blocks have a minimum, so that rows need their block sums.
    const MINIMUM: bool;

    /// The quantized weights of vector `v`'s 8 matrix rows (of the group's
    /// 16) at position `2 · pair + high` of the block whose record starts
    /// at `record`, as f32s. `unpack` holds 0x0F and 4 in every lane (the
    /// nibble mask and shift), which the kernel hides from the compiler once
    /// per call: given constants, LLVM narrows the mask and the shift to
    /// the 8 bytes before widening them, and widens a second time — 7
    /// instructions per two vectors instead of 5 (measured: 1 row −10%, 8
    /// rows −6%).
    ///
    /// # Safety
    /// AVX2 must be available; `record` must point at a whole record.
    #[cfg(target_arch = "x86_64")]
    #[doc(hidden)]
    #[allow(unsafe_code)]
    unsafe fn weights(
        record: *const u8,
        pair: usize,
        high: bool,
        v: usize,
        unpack: [std::arch::x86_64::__m256i; 2],
    ) -> std::arch::x86_64::__m256;

    /// Vector `v`'s 8 scales and (zeros without them) minimums.
    ///
    /// # Safety
    /// AVX2 and F16C must be available; `record` must point at a whole record.
    #[cfg(target_arch = "x86_64")]
    #[doc(hidden)]
    #[allow(unsafe_code)]
    unsafe fn constants(
        record: *const u8,
        v: usize,
    ) -> (std::arch::x86_64::__m256, std::arch::x86_64::__m256);
}

/// GGUF's Q4_1 as [`Q4Matrix`] holds it: nibbles, fp16 scales and minimums.
#[derive(Debug, Clone, Copy)]
pub struct Q4;

impl Format for Q4 {
    const WEIGHTS: usize = GROUP * BLOCK / 2;
    const RECORD: usize = Self::WEIGHTS + 2 * 2 * GROUP;
    const MINIMUM: bool = true;

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2")]
    #[allow(unsafe_code)]
    unsafe fn weights(
        record: *const u8,
        pair: usize,
        high: bool,
        v: usize,
        unpack: [std::arch::x86_64::__m256i; 2],
    ) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the record's 256 bytes of nibbles; this pair's 16 from
        // pair · 16, vector v's 8 of them.
        let wide = unsafe {
            _mm256_cvtepu8_epi32(_mm_loadl_epi64(record.add(pair * GROUP + 8 * v).cast()))
        };
        let q = if high {
            _mm256_srlv_epi32(wide, unpack[1])
        } else {
            _mm256_and_si256(wide, unpack[0])
        };
        _mm256_cvtepi32_ps(q)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    #[allow(unsafe_code)]
    unsafe fn constants(
        record: *const u8,
        v: usize,
    ) -> (std::arch::x86_64::__m256, std::arch::x86_64::__m256) {
        use std::arch::x86_64::*;
        // SAFETY: 16 fp16 scales then 16 fp16 minimums follow the nibbles;
        // vector v's 8 of each.
        unsafe {
            let scales = record.add(Self::WEIGHTS + 16 * v);
            (
                _mm256_cvtph_ps(_mm_loadu_si128(scales.cast())),
                _mm256_cvtph_ps(_mm_loadu_si128(scales.add(2 * GROUP).cast())),
            )
        }
    }
}

/// GGUF's Q8_0 as [`Q8Matrix`] holds it: signed bytes, f32 scales.
#[derive(Debug, Clone, Copy)]
pub struct Q8;

impl Format for Q8 {
    const WEIGHTS: usize = GROUP * BLOCK;
    const RECORD: usize = Self::WEIGHTS + 4 * GROUP;
    const MINIMUM: bool = false;

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2")]
    #[allow(unsafe_code)]
    unsafe fn weights(
        record: *const u8,
        pair: usize,
        high: bool,
        v: usize,
        _unpack: [std::arch::x86_64::__m256i; 2],
    ) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        let position = 2 * pair + usize::from(high);
        // SAFETY: the record's 512 bytes of weights; this position's 16 from
        // position · 16, vector v's 8 of them.
        unsafe {
            let at = record.add(position * GROUP + 8 * v);
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(at.cast())))
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2")]
    #[allow(unsafe_code)]
    unsafe fn constants(
        record: *const u8,
        v: usize,
    ) -> (std::arch::x86_64::__m256, std::arch::x86_64::__m256) {
        use std::arch::x86_64::*;
        // SAFETY: 16 f32 scales follow the weights; vector v's 8.
        let scales = unsafe { _mm256_loadu_ps(record.add(Self::WEIGHTS + 32 * v).cast()) };
        (scales, _mm256_setzero_ps())
    }
}

/// A matrix repacked for the AVX2 kernel (module doc), owning its bytes: as
/// many as the source, plus the padding of a last group.
#[derive(Debug, Clone)]
pub struct Packed<F: Format> {
    k: usize,
    n: usize,
    /// `F::RECORD` bytes per group and block, groups outermost.
    data: Vec<u8>,
    format: PhantomData<fn() -> F>,
}

/// A 4-bit matrix, packed.
pub type PackedQ4 = Packed<Q4>;

/// An 8-bit matrix, packed.
pub type PackedQ8 = Packed<Q8>;

impl<F: Format> Packed<F> {
    /// The packing of an `[n, k]` matrix: zeros (the last group's padding
    /// stays so), then `fill(record, row, b, c)` writes matrix row `row`'s
    /// block `b` into lane `c` of its record.
    fn build(k: usize, n: usize, mut fill: impl FnMut(&mut [u8], usize, usize, usize)) -> Self {
        let blocks = k / BLOCK;
        let mut data = vec![0u8; n.div_ceil(GROUP) * blocks * F::RECORD];
        for row in 0..n {
            let (g, c) = (row / GROUP, row % GROUP);
            for b in 0..blocks {
                let record = &mut data[(g * blocks + b) * F::RECORD..][..F::RECORD];
                fill(record, row, b, c);
            }
        }
        Packed {
            k,
            n,
            data,
            format: PhantomData,
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

    /// The record of group `g`'s block `b`.
    #[cfg(test)]
    fn record(&self, g: usize, b: usize) -> &[u8] {
        &self.data[(g * (self.k / BLOCK) + b) * F::RECORD..][..F::RECORD]
    }

    /// `x [T, K] · Wᵀ` on the calling thread, the operator's arithmetic
    /// without ONNX Runtime (tests and benchmarks).
    ///
    /// # Panics
    /// If the CPU lacks AVX2, FMA or F16C ([`crate::Isa::Avx2`]).
    pub fn matmul(&self, x: &[f32]) -> Vec<f32> {
        assert!(
            crate::Isa::Avx2.available(),
            "the packed kernel needs AVX2, FMA and F16C"
        );
        let tokens = x.len() / self.k;
        let mut sums = Vec::new();
        if F::MINIMUM {
            crate::q4::block_sums(&x[..tokens * self.k], self.k, &mut sums);
        }
        let mut y = vec![0f32; tokens * self.n];
        // Tiles of two groups for every row, as the operator's pool tasks take them.
        for start in (0..self.n).step_by(2 * GROUP) {
            let columns = start..(start + 2 * GROUP).min(self.n);
            // SAFETY: the CPU has AVX2, FMA and F16C (asserted); `y` is `[tokens,
            // N]`, owned here, and `columns` start on a group within it; `sums`
            // holds the tokens' block sums where the format has minimums.
            #[allow(unsafe_code)]
            unsafe {
                rows(
                    self,
                    x,
                    &sums,
                    tokens,
                    y.as_mut_ptr().add(start),
                    self.n,
                    columns,
                )
            };
        }
        y
    }
}

impl PackedQ4 {
    /// Repacks `w`.
    pub fn new(w: &Q4Matrix<'_>) -> PackedQ4 {
        let blocks = w.k / BLOCK;
        Packed::build(w.k, w.n, |record, row, b, c| {
            let source = row * blocks + b;
            let bytes = &w.q[source * (BLOCK / 2)..(source + 1) * (BLOCK / 2)];
            for (i, &byte) in bytes.iter().enumerate() {
                record[i * GROUP + c] = byte;
            }
            let (scale, minimum) = (Q4::WEIGHTS + 2 * c, Q4::WEIGHTS + 2 * GROUP + 2 * c);
            record[scale..scale + 2].copy_from_slice(&w.scale[source].to_le_bytes());
            record[minimum..minimum + 2].copy_from_slice(&w.minimum[source].to_le_bytes());
        })
    }
}

impl PackedQ8 {
    /// Repacks `w`.
    pub fn new(w: &Q8Matrix<'_>) -> PackedQ8 {
        let blocks = w.k / BLOCK;
        Packed::build(w.k, w.n, |record, row, b, c| {
            let source = row * blocks + b;
            for (j, &q) in w.q[source * BLOCK..(source + 1) * BLOCK].iter().enumerate() {
                record[j * GROUP + c] = q as u8;
            }
            let scale = Q8::WEIGHTS + 4 * c;
            record[scale..scale + 4].copy_from_slice(&w.scale[source].to_le_bytes());
        })
    }
}

/// `out[r · stride + (c − columns.start)] = Σ_k x[r · K + k] · W[c, k]` for
/// the `rows` rows of `x` (in its own order; for 4-bit with their
/// [`crate::q4::block_sums`] `sums`, [`crate::q4::sums_per_row`] to a row)
/// and the matrix rows `columns`, whose start is a multiple of [`GROUP`]:
/// [`ROWS`] rows and one group at a time. (A lone row over two groups at a
/// time, 4 chains of multiply-adds instead of 2, measured 10% slower on the
/// model's matrices: one stream of weights reads faster.)
///
/// # Safety
/// AVX2, FMA and F16C must be available; `out` must be valid for writes at
/// `r · stride + i` for every `r < rows` and `i < columns.len()`, unaliased
/// during the call; `x` must hold `rows · K` values and, for 4-bit, `sums`
/// `rows ·` [`crate::q4::sums_per_row`]; `columns` must lie within `0..N`.
#[allow(unsafe_code)]
pub(crate) unsafe fn rows<F: Format>(
    p: &Packed<F>,
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
    debug_assert!(!F::MINIMUM || sums.len() >= rows * per_row);
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
                let call = avx2::Call {
                    p,
                    x: x.as_ptr().add(first * p.k),
                    sums: if F::MINIMUM {
                        sums.as_ptr().add(first * per_row)
                    } else {
                        std::ptr::null()
                    },
                    per_row,
                    out: out.add(first * stride + (start - columns.start)),
                    stride,
                    group: start / GROUP,
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

    use super::{BLOCK, Format, GROUP, Packed};

    /// Vectors of 8 outputs a call covers: one group.
    const V: usize = GROUP / 8;

    /// Records ahead that a call asks the memory for: −2.5% at 8 rows, −1%
    /// at one, against the hardware prefetcher alone (2, 4 and 8 measured;
    /// 4 best by a hair).
    const PREFETCH: usize = 4;

    /// One call of the kernel: `R` rows of `x` from `x` (and their block sums
    /// from `sums`, for formats with minimums) against the first `width`
    /// matrix rows of group `group`, into `out`.
    pub(super) struct Call<'a, F: Format> {
        pub(super) p: &'a Packed<F>,
        pub(super) x: *const f32,
        pub(super) sums: *const f32,
        pub(super) per_row: usize,
        pub(super) out: *mut f32,
        pub(super) stride: usize,
        pub(super) group: usize,
        pub(super) width: usize,
    }

    impl<F: Format> Call<'_, F> {
        /// The group's two vectors of 8 outputs for `R` rows: `2R` chains of
        /// multiply-adds along each block, then the block's constants into
        /// `2R` totals (module doc).
        ///
        /// # Safety
        /// AVX2, FMA and F16C must be available; `x` must hold R rows of K,
        /// and for formats with minimums `sums` R rows of `per_row`; group
        /// `group` must exist; `out` must be valid and unaliased at `r ·
        /// stride + i` for `r < R`, `i < width`.
        #[target_feature(enable = "avx2,fma,f16c")]
        pub(super) unsafe fn run<const R: usize>(&self) {
            let k = self.p.k;
            let blocks = k / BLOCK;
            let data = self.p.data.as_ptr();
            // The nibble mask and shift, opaque to the compiler (`Format::weights`).
            let unpack = [
                _mm256_set1_epi32(std::hint::black_box(0x0F)),
                _mm256_set1_epi32(std::hint::black_box(4)),
            ];
            let mut total = [[_mm256_setzero_ps(); V]; R];
            for b in 0..blocks {
                let record = data.wrapping_add((self.group * blocks + b) * F::RECORD);
                // The record PREFETCH blocks on (past the end of the data, a
                // prefetch is a no-op: it never faults).
                let ahead = record.wrapping_add(PREFETCH * F::RECORD);
                for line in (0..F::RECORD).step_by(64) {
                    _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line).cast());
                }
                let mut acc = [[_mm256_setzero_ps(); V]; R];
                for pair in 0..BLOCK / 2 {
                    for high in [false, true] {
                        let mut w = [_mm256_setzero_ps(); V];
                        for (v, w) in w.iter_mut().enumerate() {
                            // SAFETY: the group's block's record exists.
                            *w = unsafe { F::weights(record, pair, high, v, unpack) };
                        }
                        let position = b * BLOCK + 2 * pair + usize::from(high);
                        for (r, acc) in acc.iter_mut().enumerate() {
                            // SAFETY: row r < R of `x` holds K values.
                            let x = unsafe { _mm256_broadcast_ss(&*self.x.add(r * k + position)) };
                            for (acc, w) in acc.iter_mut().zip(&w) {
                                *acc = _mm256_fmadd_ps(*w, x, *acc);
                            }
                        }
                    }
                }
                for v in 0..V {
                    // SAFETY: the record exists.
                    let (d, m) = unsafe { F::constants(record, v) };
                    for r in 0..R {
                        let scaled = _mm256_fmadd_ps(d, acc[r][v], total[r][v]);
                        total[r][v] = if F::MINIMUM {
                            // SAFETY: row r's sums hold `per_row` ≥ K/32 values.
                            let s = unsafe {
                                _mm256_broadcast_ss(&*self.sums.add(r * self.per_row + b))
                            };
                            _mm256_fmadd_ps(m, s, scaled)
                        } else {
                            scaled
                        };
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

    /// The fp16 value at byte `at` of a record, as f32.
    fn f16_at(record: &[u8], at: usize) -> f32 {
        half::f16::from_le_bytes([record[at], record[at + 1]]).to_f32()
    }

    /// Matrix row `c`'s (of its group) quantized weight at position `j` of a
    /// record, and its block's scale and minimum.
    trait Scalar: Format {
        fn weight(record: &[u8], j: usize, c: usize) -> f32;
        fn constants(record: &[u8], c: usize) -> (f32, f32);
    }

    impl Scalar for Q4 {
        fn weight(record: &[u8], j: usize, c: usize) -> f32 {
            let byte = record[(j / 2) * GROUP + c];
            f32::from(if j.is_multiple_of(2) {
                byte & 0x0F
            } else {
                byte >> 4
            })
        }
        fn constants(record: &[u8], c: usize) -> (f32, f32) {
            (
                f16_at(record, Q4::WEIGHTS + 2 * c),
                f16_at(record, Q4::WEIGHTS + 2 * GROUP + 2 * c),
            )
        }
    }

    impl Scalar for Q8 {
        fn weight(record: &[u8], j: usize, c: usize) -> f32 {
            f32::from(record[j * GROUP + c] as i8)
        }
        fn constants(record: &[u8], c: usize) -> (f32, f32) {
            let at = Q8::WEIGHTS + 4 * c;
            let bytes = [record[at], record[at + 1], record[at + 2], record[at + 3]];
            (f32::from_le_bytes(bytes), 0.0)
        }
    }

    /// The kernel's outputs in plain Rust, in its order of operations
    /// (multiply-adds rounded once, as the vector ones).
    fn portable<F: Scalar>(p: &Packed<F>, x: &[f32]) -> Vec<f32> {
        let (k, blocks) = (p.k, p.k / BLOCK);
        let tokens = x.len() / k;
        let mut sums = Vec::new();
        crate::q4::block_sums(&x[..tokens * k], k, &mut sums);
        let per_row = crate::q4::sums_per_row(k);
        let mut y = vec![0f32; tokens * p.n];
        for t in 0..tokens {
            for row in 0..p.n {
                let (g, c) = (row / GROUP, row % GROUP);
                let mut total = 0f32;
                for b in 0..blocks {
                    let record = p.record(g, b);
                    let mut dot = 0f32;
                    for j in 0..BLOCK {
                        dot = F::weight(record, j, c).mul_add(x[t * k + b * BLOCK + j], dot);
                    }
                    let (d, m) = <F as Scalar>::constants(record, c);
                    total = d.mul_add(dot, total);
                    if F::MINIMUM {
                        total = m.mul_add(sums[t * per_row + b], total);
                    }
                }
                y[t * p.n + row] = total;
            }
        }
        y
    }

    fn shapes() -> [(usize, usize); 6] {
        // N = 67 and 35: a padded last group; N = 16 and 48: one and three whole
        // groups; K = 1536 like ffn_down.
        [
            (64, 67),
            (1536, 48),
            (576, 96),
            (96, 35),
            (576, 16),
            (32, 200),
        ]
    }

    /// A Q8 matrix of pseudo-random bytes and scales like a model's.
    fn q8_matrix(k: usize, n: usize, seed: u64) -> (Vec<i8>, Vec<f32>) {
        let (q, scale, _) = matrix(2 * k, n, seed);
        let q = q.iter().map(|&b| b as i8).collect();
        let scale = scale
            .iter()
            .take(n * k / BLOCK)
            .map(|s| s.to_f32())
            .collect();
        (q, scale)
    }

    #[test]
    fn repacking_moves_every_weight_and_constant_to_its_place() {
        let (k, n) = (96, 35);
        let blocks = k / BLOCK;
        let (q, scale, minimum) = matrix(k, n, 5);
        let w = Q4Matrix::new(k, n, &q, &scale, &minimum).unwrap();
        let p = PackedQ4::new(&w);
        let (q8, scale8) = q8_matrix(k, n, 6);
        let w8 = Q8Matrix::new(k, n, &q8, &scale8).unwrap();
        let p8 = PackedQ8::new(&w8);
        assert_eq!(p.data.len(), 3 * blocks * Q4::RECORD);
        assert_eq!(p8.data.len(), 3 * blocks * Q8::RECORD);
        for row in 0..n {
            for j in 0..k {
                let (g, c, b) = (row / GROUP, row % GROUP, j / BLOCK);
                let (d, m) = <Q4 as Scalar>::constants(p.record(g, b), c);
                let weight = Q4::weight(p.record(g, b), j % BLOCK, c).mul_add(d, m);
                assert_eq!(weight, w.weight(row, j), "4-bit row {row} position {j}");
                let (d, _) = <Q8 as Scalar>::constants(p8.record(g, b), c);
                let weight = Q8::weight(p8.record(g, b), j % BLOCK, c) * d;
                assert_eq!(weight, w8.weight(row, j), "8-bit row {row} position {j}");
            }
        }
        // The padding of the last group is zero.
        for row in n..3 * GROUP {
            let (g, c) = (row / GROUP, row % GROUP);
            for b in 0..blocks {
                assert_eq!(<Q4 as Scalar>::constants(p.record(g, b), c), (0.0, 0.0));
                assert_eq!(<Q8 as Scalar>::constants(p8.record(g, b), c), (0.0, 0.0));
            }
        }
    }

    /// The kernel against [`portable`] bit for bit and against an f64 product
    /// of `weight` within an fp32 rounding.
    fn check<F: Scalar>(p: &Packed<F>, weight: impl Fn(usize, usize) -> f32, what: &str) {
        let (k, n) = (p.k, p.n);
        for tokens in [1, 2, 3, 4, 5, 8, 9, 24, 33] {
            let x = activations(tokens, k);
            let got = p.matmul(&x);
            assert_eq!(got, portable(p, &x), "{what} k {k} n {n} tokens {tokens}");
            for t in 0..tokens {
                for c in 0..n {
                    let want: f64 = (0..k)
                        .map(|j| f64::from(weight(c, j)) * f64::from(x[t * k + j]))
                        .sum();
                    let g = f64::from(got[t * n + c]);
                    assert!(
                        (g - want).abs() <= 1e-5 * (1.0 + want.abs()),
                        "{what} k {k} n {n} tokens {tokens} output {t},{c}: {g} vs {want}"
                    );
                }
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
            check(&PackedQ4::new(&w), |c, j| w.weight(c, j), "4-bit");
            let (q, scale) = q8_matrix(k, n, 12 + k as u64);
            let w = Q8Matrix::new(k, n, &q, &scale).unwrap();
            check(&PackedQ8::new(&w), |c, j| w.weight(c, j), "8-bit");
        }
    }

    /// A row of `p`'s product has the same bits alone, in batches of every
    /// size up to 31, and in a part of the columns that starts on a group.
    fn invariant<F: Format>(p: &Packed<F>, what: &str) {
        let (k, n) = (p.k, p.n);
        let x = activations(40, k);
        let all = p.matmul(&x);
        for tokens in [1, 2, 3, 5, 7, 8, 16, 23, 24, 31] {
            let some = p.matmul(&x[..tokens * k]);
            assert_eq!(some[..], all[..tokens * n], "{what}: {tokens} rows");
        }
        for t in [0, 6, 17, 39] {
            let alone = p.matmul(&x[t * k..(t + 1) * k]);
            assert_eq!(alone[..], all[t * n..(t + 1) * n], "{what}: row {t}");
        }
        let mut sums = Vec::new();
        crate::q4::block_sums(&x[..5 * k], k, &mut sums);
        let mut part = vec![0f32; 5 * 40];
        // SAFETY: AVX2 is available (the caller checked); `part` is [5, 40],
        // the columns 16..56.
        #[allow(unsafe_code)]
        unsafe {
            rows(p, &x, &sums, 5, part.as_mut_ptr(), 40, 16..56)
        };
        for t in 0..5 {
            assert_eq!(
                part[t * 40..(t + 1) * 40],
                all[t * n + 16..t * n + 56],
                "{what}: row {t}"
            );
        }
    }

    #[test]
    fn a_row_gives_the_same_bits_alone_and_in_any_batch_decode_or_prompt() {
        if !crate::Isa::Avx2.available() {
            return;
        }
        let (k, n) = (576, 72);
        let (q, scale, minimum) = matrix(k, n, 3);
        invariant(
            &PackedQ4::new(&Q4Matrix::new(k, n, &q, &scale, &minimum).unwrap()),
            "4-bit",
        );
        let (q, scale) = q8_matrix(k, n, 4);
        invariant(
            &PackedQ8::new(&Q8Matrix::new(k, n, &q, &scale).unwrap()),
            "8-bit",
        );
    }
}
