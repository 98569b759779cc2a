//! Offload's protocol types, generated from the `.proto` files in this crate.
//!
//! - [`offload::v1`]: the public gRPC API (service `offload.v1.Compute`).
//! - [`google::rpc`]: the standard `google.rpc.Status`, carried by batch items.
//! - [`FILE_DESCRIPTOR_SET`]: the encoded descriptors, for server reflection.

#![allow(clippy::all, missing_docs)]

/// Generated code, in the package hierarchy of the `.proto` files.
pub mod offload {
    /// The public API, version 1.
    pub mod v1 {
        tonic::include_proto!("offload.v1");
    }
}

/// Standard Google types used by the API.
pub mod google {
    /// `google.rpc`: the rich status model.
    pub mod rpc {
        tonic::include_proto!("google.rpc");
    }
}

/// The encoded `FileDescriptorSet` of every file here, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/offload_descriptor.bin"));
