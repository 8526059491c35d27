//! Server-level answers of the Open Inference Protocol that every server
//! speaking it (gateway and worker) gives the same way.

use lmgrid_proto::inference as pb;

use crate::health::Readiness;

/// Name reported by `ServerMetadata`.
pub const SERVER_NAME: &str = "lmgrid";

/// `ServerLive`: the process is up and answering.
pub fn server_live() -> pb::ServerLiveResponse {
    pb::ServerLiveResponse { live: true }
}

/// `ServerReady`: the node's readiness latch.
pub fn server_ready(readiness: &Readiness) -> pb::ServerReadyResponse {
    pb::ServerReadyResponse {
        ready: readiness.is_ready(),
    }
}

/// `ServerMetadata`: name, version and the protocol extensions supported
/// (none yet).
pub fn server_metadata() -> pb::ServerMetadataResponse {
    pb::ServerMetadataResponse {
        name: SERVER_NAME.to_string(),
        version: crate::VERSION.to_string(),
        extensions: Vec::new(),
    }
}
