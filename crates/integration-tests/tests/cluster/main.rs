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
//!
//! Every test starts its own etcd and keeps its keys under a unique prefix, so tests run in
//! any order and in parallel.

mod api;
mod discovery;
mod health;
mod inference;
mod shutdown;
