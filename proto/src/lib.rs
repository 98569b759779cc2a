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
    /// The admin API: a replica's live state, and levers on its workers.
    pub mod admin {
        /// Version 1.
        pub mod v1 {
            tonic::include_proto!("offload.admin.v1");
        }
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

/// The worker protocol's file descriptor (`offload/worker/v1/worker.proto`,
/// without source info): what the Python SDK builds its message classes
/// from at run time, so that it needs no protoc and no generated code.
pub fn worker_protocol_descriptor() -> Vec<u8> {
    use prost::Message as _;
    let set = prost_types::FileDescriptorSet::decode(FILE_DESCRIPTOR_SET).expect("the build wrote a valid set");
    let mut file = set
        .file
        .into_iter()
        .find(|f| f.name() == "offload/worker/v1/worker.proto")
        .expect("the worker protocol is in the set");
    file.source_code_info = None;
    file.encode_to_vec()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    /// The SDKs carry copies of the worker protocol; they must be current.
    /// `OFFLOAD_BLESS=1 cargo test -p offload-proto` rewrites them.
    #[test]
    fn the_sdks_copies_of_the_worker_protocol_are_current() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root");
        let proto =
            std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("offload/worker/v1/worker.proto")).unwrap();
        let copies: [(&str, Vec<u8>); 2] = [
            ("sdk/python/src/offload_worker/worker.desc", super::worker_protocol_descriptor()),
            ("sdk/node/worker.proto", proto),
        ];
        for (path, current) in copies {
            let path = root.join(path);
            if std::env::var_os("OFFLOAD_BLESS").is_some() {
                std::fs::write(&path, &current).unwrap();
            }
            let committed = std::fs::read(&path).unwrap_or_default();
            assert!(
                committed == current,
                "{} is stale: run OFFLOAD_BLESS=1 cargo test -p offload-proto",
                path.display()
            );
        }
    }
}
