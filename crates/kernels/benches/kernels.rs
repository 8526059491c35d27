//! `cargo xtask bench kernels`: lmgrid's 4-bit and 8-bit kernels over
//! matrices of SmolLM2-135M's shapes, against reading the same bytes from
//! memory — the limit a kernel that only streams its weights would reach.
//!
//! The matrices are the model's: 30 layers of q, o (576 × 576), k, v
//! (192 × 576), gate, up (1536 × 576) and down (576 × 1536) as 4-bit blocks,
//! and the 49152 × 576 LM head as 8-bit blocks, filled with pseudo-random
//! weights (speed does not depend on the values). Each row of the table
//! multiplies `rows` rows of activations by all of them on 1 or 2 threads
//! (each thread takes every other matrix, and the head is stored as two
//! halves of its rows; the operator inside ONNX Runtime splits matrices by
//! rows of the weight matrix instead, which reads the same bytes) and
//! reports weight bytes read per second, multiply-adds per second, and the
//! ratio to a plain read of the same bytes on as many threads. The layers
//! also run 48 rows (a prompt: on AVX-512 the outer-product path, [`q4`]'s
//! module doc; on AVX2 every call takes the packed path, the weights
//! repacked once as the operator does when its kernel is created).
//! The first line names the instruction set the kernels ran on. Each time is
//! the fastest pass within the measuring time, for the kernel and the plain
//! read alike.
//!
//! `LMGRID_BENCH_SECONDS` (default 2) sets the measuring time per row.

use std::hint::black_box;
use std::time::Instant;

use half::f16;
use lmgrid_kernels::packed::{PackedQ4, PackedQ8};
use lmgrid_kernels::q4::{self, Q4Matrix};
use lmgrid_kernels::q8::{self, Q8Matrix};

const LAYERS: usize = 30;
const HIDDEN: usize = 576;
const KV: usize = 192;
const FFN: usize = 1536;
const VOCABULARY: usize = 49152;

/// A matrix's storage, as the graph holds its initializers.
enum Stored {
    Q4 {
        k: usize,
        n: usize,
        q: Vec<u8>,
        scale: Vec<f16>,
        minimum: Vec<f16>,
        /// The operator's repacked form, where it repacks (AVX2).
        packed: Option<PackedQ4>,
    },
    Q8 {
        k: usize,
        n: usize,
        q: Vec<i8>,
        scale: Vec<f32>,
        /// The operator's repacked form, where it repacks (AVX2).
        packed: Option<PackedQ8>,
    },
}

impl Stored {
    fn k(&self) -> usize {
        match self {
            Stored::Q4 { k, .. } | Stored::Q8 { k, .. } => *k,
        }
    }

    fn n(&self) -> usize {
        match self {
            Stored::Q4 { n, .. } | Stored::Q8 { n, .. } => *n,
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Stored::Q4 {
                q, scale, minimum, ..
            } => q.len() + 2 * (scale.len() + minimum.len()),
            Stored::Q8 { q, scale, .. } => q.len() + 4 * scale.len(),
        }
    }

    /// `x · Wᵀ` through the kernel.
    fn multiply(&self, x: &[f32]) -> Vec<f32> {
        match self {
            Stored::Q4 {
                packed: Some(packed),
                ..
            } => packed.matmul(x),
            Stored::Q4 {
                k,
                n,
                q,
                scale,
                minimum,
                packed: None,
            } => q4::matmul(&Q4Matrix::new(*k, *n, q, scale, minimum).expect("sizes"), x),
            Stored::Q8 {
                packed: Some(packed),
                ..
            } => packed.matmul(x),
            Stored::Q8 {
                k,
                n,
                q,
                scale,
                packed: None,
            } => q8::matmul(&Q8Matrix::new(*k, *n, q, scale).expect("sizes"), x),
        }
    }

    /// Reads every byte once, the way a kernel streams its weights.
    fn read(&self) -> u64 {
        match self {
            Stored::Q4 {
                q, scale, minimum, ..
            } => sum(q, u32::from)
                .wrapping_add(sum(scale, |h| u32::from(h.to_bits())))
                .wrapping_add(sum(minimum, |h| u32::from(h.to_bits()))),
            Stored::Q8 { q, scale, .. } => {
                sum(q, |b| u32::from(b as u8)).wrapping_add(sum(scale, f32::to_bits))
            }
        }
    }
}

/// Sums `values` as `u32`s 4096 at a time, which vectorizes to a read at
/// memory speed.
fn sum<T: Copy>(values: &[T], widen: impl Fn(T) -> u32) -> u64 {
    values
        .chunks(4096)
        .map(|c| u64::from(c.iter().map(|&v| widen(v)).fold(0u32, u32::wrapping_add)))
        .fold(0u64, u64::wrapping_add)
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn q4_matrix(rng: &mut Rng, n: usize, k: usize) -> Stored {
    let blocks = n * k / q4::BLOCK;
    let q: Vec<u8> = (0..blocks * 16).map(|_| rng.next() as u8).collect();
    let scale: Vec<f16> = (0..blocks)
        .map(|_| f16::from_f32((rng.next() % 1000) as f32 * 2e-5))
        .collect();
    let minimum: Vec<f16> = (0..blocks)
        .map(|_| f16::from_f32(-((rng.next() % 1000) as f32) * 1.6e-4))
        .collect();
    let packed = (lmgrid_kernels::Isa::best() == lmgrid_kernels::Isa::Avx2)
        .then(|| PackedQ4::new(&Q4Matrix::new(k, n, &q, &scale, &minimum).expect("sizes")));
    Stored::Q4 {
        k,
        n,
        q,
        scale,
        minimum,
        packed,
    }
}

fn q8_matrix(rng: &mut Rng, n: usize, k: usize) -> Stored {
    let q: Vec<i8> = (0..n * k).map(|_| rng.next() as i8).collect();
    let scale: Vec<f32> = (0..n * k / q4::BLOCK)
        .map(|_| (rng.next() % 1000) as f32 * 1e-5)
        .collect();
    let packed = (lmgrid_kernels::Isa::best() == lmgrid_kernels::Isa::Avx2)
        .then(|| PackedQ8::new(&Q8Matrix::new(k, n, &q, &scale).expect("sizes")));
    Stored::Q8 {
        k,
        n,
        q,
        scale,
        packed,
    }
}

fn main() {
    let seconds: f64 = std::env::var("LMGRID_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2.0);
    println!(
        "lmgrid kernels: {:?} path; {LAYERS} layers of SmolLM2-135M's matrices (4-bit) and its LM head (8-bit)",
        lmgrid_kernels::Isa::best()
    );
    let mut rng = Rng(0x5eed);
    let mut layers = Vec::new();
    for _ in 0..LAYERS {
        for (n, k) in [
            (HIDDEN, HIDDEN),
            (KV, HIDDEN),
            (KV, HIDDEN),
            (HIDDEN, HIDDEN),
            (FFN, HIDDEN),
            (FFN, HIDDEN),
            (HIDDEN, FFN),
        ] {
            layers.push(q4_matrix(&mut rng, n, k));
        }
    }
    // The head in two halves of its rows, so that two threads share it.
    let head: Vec<Stored> = (0..2)
        .map(|_| q8_matrix(&mut rng, VOCABULARY / 2, HIDDEN))
        .collect();
    println!();
    println!(
        "| matrices | rows | threads | ms per pass | weights GB/s | GMAC/s | memory read ms | kernel / read |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for (name, set) in [("layers (4-bit)", &layers), ("head (8-bit)", &head)] {
        let bytes: usize = set.iter().map(Stored::bytes).sum();
        let macs: usize = set.iter().map(|m| m.k() * m.n()).sum();
        for threads in [1, 2] {
            let read = timed(seconds, || {
                on_threads(set, threads, |m| {
                    black_box(m.read());
                })
            });
            // 48 rows, a prompt, take the 4-bit kernel's outer-product path on
            // AVX-512; the LM head only ever sees a step's rows.
            let counts: &[usize] = if name.starts_with("layers") {
                &[1, 2, 4, 8, 16, 48]
            } else {
                &[1, 2, 4, 8, 16]
            };
            for &rows in counts {
                let inputs: Vec<Vec<f32>> = [HIDDEN, FFN]
                    .iter()
                    .map(|&k| {
                        (0..rows * k)
                            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.03)
                            .collect()
                    })
                    .collect();
                let pass = timed(seconds, || {
                    on_threads(set, threads, |m| {
                        let x = if m.k() == HIDDEN {
                            &inputs[0]
                        } else {
                            &inputs[1]
                        };
                        black_box(m.multiply(x));
                    })
                });
                println!(
                    "| {name} | {rows} | {threads} | {:.2} | {:.1} | {:.1} | {:.2} | {:.2}× |",
                    pass * 1e3,
                    bytes as f64 / pass / 1e9,
                    (macs * rows) as f64 / pass / 1e9,
                    read * 1e3,
                    read / pass,
                );
            }
        }
    }
}

/// Runs `f` over every matrix, matrix `i` on thread `i % threads`.
fn on_threads(set: &[Stored], threads: usize, f: impl Fn(&Stored) + Sync) {
    if threads == 1 {
        set.iter().for_each(&f);
        return;
    }
    std::thread::scope(|s| {
        for t in 0..threads {
            let f = &f;
            s.spawn(move || {
                set.iter().skip(t).step_by(threads).for_each(f);
            });
        }
    });
}

/// Seconds of the fastest call of `f` over about `seconds`, after one warm-up
/// call: the call least disturbed by whatever else the machine runs, which
/// makes runs minutes apart comparable where the mean moved by ±30%.
fn timed(seconds: f64, mut f: impl FnMut()) -> f64 {
    f();
    let start = Instant::now();
    let mut fastest = f64::INFINITY;
    while start.elapsed().as_secs_f64() < seconds || fastest.is_infinite() {
        let call = Instant::now();
        f();
        fastest = fastest.min(call.elapsed().as_secs_f64());
    }
    fastest
}
