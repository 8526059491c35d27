//! The worker from the outside, over gRPC: a real worker on a loopback port serving a model
//! repository of small ONNX models in a temporary directory, with in-process discovery.
//!
//! - `embeddings`: `Embed` over the real all-MiniLM-L6-v2 (`cargo xtask models`); batched
//!   across requests of different lengths, equal to each text alone.
//! - `generation`: `Generate`/`GenerateStream` over the real SmolLM2-135M-Instruct: Paris,
//!   continuous batching equal to decoding alone, stops, seeds, cancellation, bad requests.
//! - `cpu_graph`: the 4-bit SmolLM2's graph for lmgrid's CPU kernels computes what its
//!   portable `model.onnx` computes, and the worker loads it on the CPU.
//! - `datatypes`: every datatype round-trips exactly; outputs come back as named.
//! - `batching`: batched equals unbatched; shapes never mix; full queues and deadlines.
//! - `errors`: bad requests get the right code and a message naming what is wrong.
//! - `lifecycle`: unload and reload under traffic; failed loads leave the rest serving.
//! - `models`: version policies, metadata, execution providers, the record in discovery.

mod batching;
mod cpu_graph;
mod datatypes;
mod embeddings;
mod errors;
mod generation;
mod lifecycle;
mod models;
mod support;
