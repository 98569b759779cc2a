//! Offload's protocol types, generated from the `.proto` files in this crate.
//!
//! - [`offload::v1`]: the public gRPC API (service `offload.v1.Compute`).
//! - [`offload::worker::v1`]: the internal front <-> worker process protocol.
//! - [`google::rpc`]: the standard `google.rpc.Status`, carried by batch items.
//! - [`framing`]: how worker protocol frames are laid out on the socket.
//! - [`FILE_DESCRIPTOR_SET`]: the encoded descriptors, for server reflection.

pub mod framing;

/// Generated code, in the package hierarchy of the `.proto` files.
#[allow(clippy::all, missing_docs)]
pub mod offload {
    /// The public API, version 1.
    pub mod v1 {
        tonic::include_proto!("offload.v1");
    }
    /// The internal protocol between the front and its worker processes.
    pub mod worker {
        /// Version 1.
        pub mod v1 {
            tonic::include_proto!("offload.worker.v1");
        }
    }
}

/// Standard Google types used by the API.
#[allow(clippy::all, missing_docs)]
pub mod google {
    /// `google.rpc`: the rich status model.
    pub mod rpc {
        tonic::include_proto!("google.rpc");
    }
}

/// The encoded `FileDescriptorSet` of every file here, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/offload_descriptor.bin"));
