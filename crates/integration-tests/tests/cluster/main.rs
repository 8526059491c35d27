//! Whole lmgrid clusters against a real etcd, one module per concern:
//!
//! - `discovery`: instances register with their address and metadata, side by side, and a
//!   crashed one disappears from every watcher within its lease TTL.
//! - `shutdown`: a stopping instance deregisters before it stops accepting connections.
//! - `health`: `/livez`, `/readyz`, `/metrics` and `grpc.health.v1` tell the truth as
//!   instances start, become ready, and drain, including the gateway's view of its peers.
//! - `api`: the gRPC surface answers what it implements and says what it does not.
//! - `inference`: the gateway forwards Open Inference Protocol model RPCs to a worker that
//!   serves the model, and traffic survives a worker leaving.
//! - `openai`: the OpenAI-compatible REST API: models, embeddings from the real MiniLM, and
//!   errors in the OpenAI shape (400, 404 `model_not_found`, 405, 413, 503 + `Retry-After`).
//! - `oip_rest`: the Open Inference Protocol's REST API: health, metadata, JSON tensors.
//! - `generation`: chat and completions, unary and streamed, and gRPC generation, through the
//!   gateway to a scripted generation worker; a client going away cancels the upstream.
//! - `routing`: a worker crashing under load fails no request; traffic weights and aliases
//!   from etcd steer versions, live; a failing worker is ejected, then returns.
//! - `attempt_timeout`: a worker that never answers is given up on per attempt, cancelled,
//!   retried around and ejected.
//! - `tenants`: API keys name tenants (401 without one, 403 for a model not allowed, over
//!   HTTP and gRPC); keys made on one gateway work on another, and rotation revokes.
//! - `admission`: limits shared by two gateways through a real Redis (429, `Retry-After`,
//!   `x-ratelimit-*`), requests in flight, a Redis outage (each gateway its share), usage.
//!
//! Every test starts its own etcd and keeps its keys under a unique prefix, so tests run in
//! any order and in parallel.

mod admission;
mod api;
mod attempt_timeout;
mod discovery;
mod generation;
mod health;
mod inference;
mod oip_rest;
mod openai;
mod routing;
mod scripted_worker;
mod shutdown;
mod tenants;
