//! The 4-bit kernel's path for calls of many rows of `x` (prompts, wide
//! decode batches): each tile of [`TILE`] matrix rows is unpacked once into
//! f32, transposed so that each position along K holds the tile's weights as
//! two vectors, and every row of `x` runs over it as an outer product —
//! broadcast one activation, multiply-add it into 32 outputs — with no
//! horizontal sums.
//!
//! Every output is summed along K in one fixed order (the blocks' even
//! elements, then their odd ones, block by block), whatever the number of
//! rows: calls of [`FROM_ROWS`] rows or more give a row the same bits in any
//! batch. The weights are the same `fl(d · q + m)` as the AVX-512 per-row
//! path ([`crate::q4::tile`]), whose sums are in another order. AVX-512 and
//! the portable loop only: AVX2 CPUs multiply packed weights, one path for
//! every call ([`crate::packed`]).

use crate::Isa;
use crate::q4::{BLOCK, Q4Matrix};

/// Rows of `x` from which a call takes this path: prompts. Decode steps
/// (at most `max_sequences` rows, 16 by default) stay on the per-row path,
/// which is as fast at 16 rows and gives a row the same bits alone or in
/// any batch of them.
pub(crate) const FROM_ROWS: usize = 24;

/// Matrix rows (outputs) one unpacked tile holds: two 16-lane vectors.
pub(crate) const TILE: usize = 32;

/// The most rows of `x` one pass over a tile multiplies.
pub(crate) const GROUP: usize = 8;

/// Unpacks matrix rows `first..first + TILE` into `out` (`K × TILE` f32):
/// `out[p · TILE + c]` is the weight of matrix row `first + c` at position
/// `p` of the kernels' order along K (per block: its 16 even elements, then
/// its 16 odd ones), on the path `isa`.
///
/// # Safety
/// `isa` must be available on this CPU.
#[allow(unsafe_code)]
pub(crate) unsafe fn unpack_tile(w: &Q4Matrix<'_>, first: usize, out: &mut Vec<f32>, isa: Isa) {
    debug_assert!(first + TILE <= w.n && isa.available());
    let blocks = w.k / BLOCK;
    out.clear();
    out.resize(w.k * TILE, 0.0);
    #[cfg(target_arch = "x86_64")]
    match isa {
        // SAFETY: the CPU has the instruction set (the caller's guarantee);
        // `out` holds K × TILE; matrix rows first..first + TILE exist.
        Isa::Avx512 => unsafe { return avx512::unpack_tile(w, first, out) },
        Isa::Avx2 => unreachable!("AVX2 multiplies packed weights (crate::packed)"),
        Isa::Portable => {}
    }
    let mut block = [0f32; BLOCK];
    for c in 0..TILE {
        for b in 0..blocks {
            let i = (first + c) * blocks + b;
            let (d, m) = (w.scale[i].to_f32(), w.minimum[i].to_f32());
            let q = &w.q[i * (BLOCK / 2)..(i + 1) * (BLOCK / 2)];
            for (j, &byte) in q.iter().enumerate() {
                block[j] = f32::from(byte & 0x0F).mul_add(d, m);
                block[BLOCK / 2 + j] = f32::from(byte >> 4).mul_add(d, m);
            }
            for (p, &weight) in block.iter().enumerate() {
                out[(b * BLOCK + p) * TILE + c] = weight;
            }
        }
    }
}

/// Interleaves the rows of `xs` (split, `tokens × K`) group by group: the
/// [`GROUP`] rows of group `g` (fewer in the last) start at `g · GROUP ·
/// K`, position `p` of its row `r` at `p · rows + r`, so a pass over a tile
/// reads its activations in order.
pub(crate) fn interleave(xs: &[f32], k: usize, out: &mut Vec<f32>) {
    let tokens = xs.len() / k;
    let size = GROUP;
    out.clear();
    out.resize(tokens * k, 0.0);
    for first in (0..tokens).step_by(size) {
        let rows = (tokens - first).min(size);
        let group = &mut out[first * k..(first + rows) * k];
        for r in 0..rows {
            let row = &xs[(first + r) * k..(first + r + 1) * k];
            for (p, &value) in row.iter().enumerate() {
                group[p * rows + r] = value;
            }
        }
    }
}

/// `out[r · stride + c] = Σ_p x_r[p] · unpacked[p · TILE + c]` for the
/// `rows` (≤ [`GROUP`]) rows of one group of `xs` as [`interleave`] left it
/// (starting at the group) and the tile's [`TILE`] outputs.
///
/// # Safety
/// `isa` must be available; `out` must be valid for writes at `r · stride +
/// c` for every `r < rows` and `c < TILE`, unaliased during the call; `xs`
/// must hold the group's `rows · K` interleaved values and `unpacked` `K ×
/// TILE`.
#[allow(unsafe_code)]
pub(crate) unsafe fn tile(
    k: usize,
    unpacked: &[f32],
    xs: &[f32],
    rows: usize,
    out: *mut f32,
    stride: usize,
    isa: Isa,
) {
    debug_assert!(rows <= GROUP && xs.len() >= rows * k && unpacked.len() >= k * TILE);
    debug_assert!(isa != Isa::Avx2, "AVX2 multiplies packed weights");
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 {
        // SAFETY: the CPU has AVX-512F (the caller's guarantee), who also
        // guarantees the memory conditions.
        unsafe {
            match rows {
                1 => avx512::tile::<1>(k, unpacked, xs, out, stride),
                2 => avx512::tile::<2>(k, unpacked, xs, out, stride),
                3 => avx512::tile::<3>(k, unpacked, xs, out, stride),
                4 => avx512::tile::<4>(k, unpacked, xs, out, stride),
                5 => avx512::tile::<5>(k, unpacked, xs, out, stride),
                6 => avx512::tile::<6>(k, unpacked, xs, out, stride),
                7 => avx512::tile::<7>(k, unpacked, xs, out, stride),
                _ => avx512::tile::<8>(k, unpacked, xs, out, stride),
            }
        }
        return;
    }
    for r in 0..rows {
        let mut acc = [0f32; TILE];
        for p in 0..k {
            let xp = xs[p * rows + r];
            let w = &unpacked[p * TILE..(p + 1) * TILE];
            for (a, &wc) in acc.iter_mut().zip(w) {
                *a = wc.mul_add(xp, *a);
            }
        }
        for (c, value) in acc.into_iter().enumerate() {
            // SAFETY: in bounds and unaliased, as the caller guarantees.
            unsafe { *out.add(r * stride + c) = value };
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx512 {
    use std::arch::x86_64::*;

    use super::TILE;
    use crate::q4::{BLOCK, Q4Matrix};

    /// The fp16 value with bits `bits` in all 16 lanes.
    #[target_feature(enable = "avx512f")]
    fn broadcast_f16(bits: u16) -> __m512 {
        _mm512_cvtph_ps(_mm256_set1_epi16(bits as i16))
    }

    /// Transposes 16 vectors of 16 (`rows[i]` element `j` → `out[j]`
    /// element `i`): 4×4 blocks within 128-bit lanes, then the lanes.
    #[target_feature(enable = "avx512f")]
    fn transpose16(rows: &[__m512; 16]) -> [__m512; 16] {
        let mut t = [_mm512_setzero_ps(); 16];
        for i in 0..8 {
            t[2 * i] = _mm512_unpacklo_ps(rows[2 * i], rows[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_ps(rows[2 * i], rows[2 * i + 1]);
        }
        // u[4g + m], lane j: column 4j + m of rows 4g .. 4g + 3.
        let mut u = [_mm512_setzero_ps(); 16];
        for g in 0..4 {
            u[4 * g] = _mm512_shuffle_ps::<0x44>(t[4 * g], t[4 * g + 2]);
            u[4 * g + 1] = _mm512_shuffle_ps::<0xEE>(t[4 * g], t[4 * g + 2]);
            u[4 * g + 2] = _mm512_shuffle_ps::<0x44>(t[4 * g + 1], t[4 * g + 3]);
            u[4 * g + 3] = _mm512_shuffle_ps::<0xEE>(t[4 * g + 1], t[4 * g + 3]);
        }
        let mut out = [_mm512_setzero_ps(); 16];
        for m in 0..4 {
            let even = _mm512_shuffle_f32x4::<0x88>(u[m], u[4 + m]);
            let odd = _mm512_shuffle_f32x4::<0xDD>(u[m], u[4 + m]);
            let even_high = _mm512_shuffle_f32x4::<0x88>(u[8 + m], u[12 + m]);
            let odd_high = _mm512_shuffle_f32x4::<0xDD>(u[8 + m], u[12 + m]);
            out[m] = _mm512_shuffle_f32x4::<0x88>(even, even_high);
            out[8 + m] = _mm512_shuffle_f32x4::<0xDD>(even, even_high);
            out[4 + m] = _mm512_shuffle_f32x4::<0x88>(odd, odd_high);
            out[12 + m] = _mm512_shuffle_f32x4::<0xDD>(odd, odd_high);
        }
        out
    }

    /// The vector form of [`super::unpack_tile`]: per block and 16 matrix
    /// rows, each row's 16-entry table `d · i + m` indexed by its low and
    /// high nibbles (as [`crate::q4::tile`] does), then the 16 × 16 weights
    /// of each half transposed so that a position along K holds 16 rows.
    ///
    /// # Safety
    /// AVX-512F must be available; `out` holds K × TILE values and matrix
    /// rows `first..first + TILE` exist.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn unpack_tile(w: &Q4Matrix<'_>, first: usize, out: &mut [f32]) {
        let blocks = w.k / BLOCK;
        let iota = _mm512_setr_ps(
            0., 1., 2., 3., 4., 5., 6., 7., 8., 9., 10., 11., 12., 13., 14., 15.,
        );
        let nibble = _mm512_set1_epi32(0x0F);
        let base = out.as_mut_ptr();
        for b in 0..blocks {
            for half in 0..TILE / 16 {
                let mut low = [_mm512_setzero_ps(); 16];
                let mut high = [_mm512_setzero_ps(); 16];
                for c in 0..16 {
                    let i = (first + half * 16 + c) * blocks + b;
                    // SAFETY: block i exists: matrix row first + half·16 + c
                    // < N and b < K/32.
                    let (packed, d, m) = unsafe {
                        (
                            _mm_loadu_si128(w.q.as_ptr().add(i * (BLOCK / 2)).cast()),
                            w.scale.get_unchecked(i).to_bits(),
                            w.minimum.get_unchecked(i).to_bits(),
                        )
                    };
                    let table = _mm512_fmadd_ps(iota, broadcast_f16(d), broadcast_f16(m));
                    let wide = _mm512_cvtepu8_epi32(packed);
                    low[c] = _mm512_permutexvar_ps(_mm512_and_si512(wide, nibble), table);
                    high[c] = _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(wide), table);
                }
                let (low, high) = (transpose16(&low), transpose16(&high));
                for p in 0..16 {
                    // SAFETY: positions b·32 + p and b·32 + 16 + p < K, columns
                    // half·16 .. half·16 + 16 ≤ TILE: within `out`.
                    unsafe {
                        let at = base.add((b * BLOCK + p) * TILE + half * 16);
                        _mm512_storeu_ps(at, low[p]);
                        _mm512_storeu_ps(at.add(BLOCK / 2 * TILE), high[p]);
                    }
                }
            }
        }
    }

    /// `R` rows against one tile: per position along K, the tile's two
    /// weight vectors are loaded once and each row's activation is
    /// broadcast and multiplied-added into its two accumulators.
    ///
    /// # Safety
    /// AVX-512F must be available; the conditions of [`super::tile`] hold.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile<const R: usize>(
        k: usize,
        unpacked: &[f32],
        xs: &[f32],
        out: *mut f32,
        stride: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        let (w, x) = (unpacked.as_ptr(), xs.as_ptr());
        for p in 0..k {
            // SAFETY: p < K, and `unpacked` holds K × TILE values, `xs` a
            // group of R interleaved rows of K (the caller's guarantee).
            unsafe {
                let w0 = _mm512_loadu_ps(w.add(p * TILE));
                let w1 = _mm512_loadu_ps(w.add(p * TILE + 16));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let xb = _mm512_set1_ps(*x.add(p * R + r));
                    acc[0] = _mm512_fmadd_ps(w0, xb, acc[0]);
                    acc[1] = _mm512_fmadd_ps(w1, xb, acc[1]);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            // SAFETY: row r < R and columns 0..32 of the tile, valid and
            // unaliased as the caller guarantees.
            unsafe {
                _mm512_storeu_ps(out.add(r * stride), acc[0]);
                _mm512_storeu_ps(out.add(r * stride + 16), acc[1]);
            }
        }
    }
}
