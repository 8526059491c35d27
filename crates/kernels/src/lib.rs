//! CPU kernels lmgrid registers with ONNX Runtime as custom operators, in
//! the operator domain [`DOMAIN`].
//!
//! - `MatMulQ4`: a matrix product with 4-bit block-quantized weights that
//!   computes in fp32 with the weights' exact values and unrounded
//!   activations ([`q4`]). ONNX
//!   Runtime's own `MatMulNBits` is exact only at `accuracy_level` 0, where
//!   its fp32 path is several times slower than this kernel (AVX-512 or
//!   AVX2, [`Isa`]); its faster paths round the activations to int8.
//! - `MatMulQ8`: the same for 8-bit blocks (GGUF's Q8_0), whose weights are
//!   exact in f32 ([`q8`]); SmolLM2's tied embedding / LM head is one.
//!
//! The worker registers the domain with every session; graphs that do not
//! use it are unaffected. See `docs/models.md` for the graphs that do.

mod dot;
mod gemm;
pub mod norm;
mod op;
pub mod packed;
pub mod q4;
pub mod q8;
pub mod swiglu;

/// The instruction sets the kernels have a path for, fastest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512 F, BW and VL: 16-lane vectors, a block's weights by 16-entry
    /// table lookups.
    Avx512,
    /// AVX2 with FMA and F16C (x86-64-v3, every x86 server CPU since 2015):
    /// 8-lane vectors over weights repacked 16 matrix rows to a group
    /// ([`packed`]), 8 matrix rows in the lanes.
    Avx2,
    /// Plain Rust, any CPU: the same arithmetic, but far slower than ONNX
    /// Runtime's own kernels.
    Portable,
}

impl Isa {
    /// The fastest path this CPU runs.
    pub fn best() -> Isa {
        [Isa::Avx512, Isa::Avx2]
            .into_iter()
            .find(|isa| isa.available())
            .unwrap_or(Isa::Portable)
    }

    /// Whether this CPU runs this path.
    pub fn available(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            match self {
                Isa::Avx512 => has!("avx512f") && has!("avx512bw") && has!("avx512vl"),
                Isa::Avx2 => has!("avx2") && has!("fma") && has!("f16c"),
                Isa::Portable => true,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Isa::Portable
        }
    }

    /// Every path this CPU runs, fastest first (tests run them all).
    pub fn all_available() -> Vec<Isa> {
        [Isa::Avx512, Isa::Avx2, Isa::Portable]
            .into_iter()
            .filter(|isa| isa.available())
            .collect()
    }
}

/// The operator domain of lmgrid's custom operators.
pub const DOMAIN: &str = "ai.lmgrid";

/// The operator domain to register with a session builder
/// (`SessionBuilder::with_operators`).
pub fn domain() -> ort::Result<ort::operator::OperatorDomain> {
    ort::operator::OperatorDomain::new(DOMAIN)?
        .add(op::MatMulQ4)?
        .add(op::MatMulQ8)
}

#[cfg(test)]
mod tests {
    use super::Isa;

    #[test]
    fn the_best_path_is_the_first_available_and_the_portable_one_is_always_there() {
        let all = Isa::all_available();
        assert_eq!(all.first(), Some(&Isa::best()));
        assert_eq!(all.last(), Some(&Isa::Portable));
        assert!(all.iter().all(|isa| isa.available()));
        assert_eq!(crate::q4::accelerated(), Isa::best() != Isa::Portable);
    }
}
