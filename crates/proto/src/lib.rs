//! Generated gRPC code for lmgrid's wire contract, and nothing else.
//!
//! - [`inference`]: the Open Inference Protocol (KServe v2)
//!   `inference.GRPCInferenceService`, wire-compatible with existing clients.
//! - [`lmgrid::v1`]: lmgrid's own APIs (generation, embeddings, jobs,
//!   registry, notification, worker control).
//!
//! Domain types live with the services that own them and convert from these
//! messages with `TryFrom`, validating on the receiving side.

#![allow(unreachable_pub, missing_docs, clippy::all, clippy::pedantic)]

pub mod inference {
    tonic::include_proto!("inference");
}

pub mod lmgrid {
    pub mod v1 {
        tonic::include_proto!("lmgrid.v1");
    }
}

/// The subset of etcd's v3 API that lmgrid's discovery and metadata use
/// (client side only).
pub mod etcd {
    pub mod mvccpb {
        tonic::include_proto!("mvccpb");
    }
    pub mod etcdserverpb {
        tonic::include_proto!("etcdserverpb");
    }
}

/// Serialized `FileDescriptorSet` of every lmgrid proto, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("lmgrid_descriptor");

/// Fully-qualified gRPC service names, as used by `grpc.health.v1` and routing.
pub mod service_names {
    pub const INFERENCE: &str = "inference.GRPCInferenceService";
    pub const GENERATION: &str = "lmgrid.v1.GenerationService";
    pub const EMBEDDING: &str = "lmgrid.v1.EmbeddingService";
    pub const JOBS: &str = "lmgrid.v1.JobService";
    pub const REGISTRY: &str = "lmgrid.v1.RegistryService";
    pub const NOTIFICATION: &str = "lmgrid.v1.NotificationService";
    pub const WORKER_CONTROL: &str = "lmgrid.v1.WorkerControlService";
}
