//! CPU kernels lmgrid registers with ONNX Runtime as custom operators, in
//! the operator domain [`DOMAIN`].
//!
//! - `MatMulQ4`: a matrix product with 4-bit block-quantized weights that
//!   computes in fp32 on exactly dequantized weights ([`q4`]). ONNX
//!   Runtime's own `MatMulNBits` is exact only at `accuracy_level` 0, where
//!   its fp32 path is several times slower than this kernel on AVX-512
//!   CPUs; its faster paths round the activations to int8.
//! - `MatMulQ8`: the same for 8-bit blocks (GGUF's Q8_0), whose weights are
//!   exact in f32 ([`q8`]); SmolLM2's tied embedding / LM head is one.
//!
//! The worker registers the domain with every session; graphs that do not
//! use it are unaffected. See `docs/models.md` for the graphs that do.

mod dot;
mod gemm;
mod op;
pub mod q4;
pub mod q8;

/// The operator domain of lmgrid's custom operators.
pub const DOMAIN: &str = "ai.lmgrid";

/// The operator domain to register with a session builder
/// (`SessionBuilder::with_operators`).
pub fn domain() -> ort::Result<ort::operator::OperatorDomain> {
    ort::operator::OperatorDomain::new(DOMAIN)?
        .add(op::MatMulQ4)?
        .add(op::MatMulQ8)
}
