//! Drover's gRPC schema (`proto/drover.proto`) and the code tonic generates from it, with the
//! rules both ends of an agent session share: the protocol version, the batch limits, and the
//! failure classes as `drover_core` knows them.

#![allow(missing_docs, clippy::all)]

/// Version 1 of the protocol.
pub mod v1 {
    tonic::include_proto!("drover.v1");
}

pub use v1::*;

mod bearer;
pub use bearer::{BadCredential, Bearer};

#[warn(missing_docs, clippy::all)]
mod failure;
pub use failure::UnknownFailureClass;

#[warn(missing_docs, clippy::all)]
mod session;
pub use session::{
    MAX_ASSIGNS_PER_MESSAGE, MAX_OUTPUT_CHUNKS, MAX_OUTPUT_LINE, MAX_REPORTS_PER_MESSAGE, PROTOCOL_VERSION,
    ProtocolMismatch, protocol_of,
};

/// The encoded `FileDescriptorSet` of `proto/drover.proto`: every service and method, for tests
/// and tools that must cover all of them.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/drover_descriptor.bin"));
