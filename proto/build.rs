//! Compiles the `.proto` files with protox (a pure-Rust protoc), so that a
//! fresh machine builds with cargo alone, and keeps the descriptor set for
//! gRPC server reflection.

use std::{env, fs, path::PathBuf};

use prost::Message;

const PROTOS: &[&str] = &[
    "offload/v1/compute.proto",
    "offload/v1/jobs.proto",
    "offload/worker/v1/worker.proto",
    "offload/admin/v1/admin.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=offload");
    println!("cargo:rerun-if-changed=google");

    let fds = protox::compile(PROTOS, ["."])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out.join("offload_descriptor.bin"), fds.encode_to_vec())?;

    tonic_prost_build::configure()
        // Inputs and outputs are passed around without copies.
        .bytes(".")
        .compile_fds(fds)?;
    Ok(())
}
