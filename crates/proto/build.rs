//! Generates the tonic/prost code from `proto/` with a vendored `protoc`, so a
//! fresh machine needs no hand-installed protobuf compiler.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let protos = [
        "inference.proto",
        "lmgrid/v1/common.proto",
        "lmgrid/v1/generation.proto",
        "lmgrid/v1/embeddings.proto",
        "lmgrid/v1/jobs.proto",
        "lmgrid/v1/registry.proto",
        "lmgrid/v1/notify.proto",
        "lmgrid/v1/worker.proto",
    ]
    .map(|p| root.join(p));
    for proto in &protos {
        println!("cargo:rerun-if-changed={}", proto.display());
    }

    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let include = protoc_bin_vendored::include_path()?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);

    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("lmgrid_descriptor.bin"))
        .compile_with_config(config, &protos, &[root.clone(), include.clone()])?;

    // etcd's v3 API: lmgrid is only ever a client of it.
    let etcd = ["etcd/mvccpb.proto", "etcd/etcdserverpb.proto"].map(|p| root.join(p));
    for proto in &etcd {
        println!("cargo:rerun-if-changed={}", proto.display());
    }
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .build_server(false)
        .compile_with_config(config, &etcd, &[root, include])?;
    Ok(())
}
