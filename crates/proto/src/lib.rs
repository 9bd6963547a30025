//! Drover's gRPC schema (`proto/drover.proto`) and the code tonic generates from it.

#![allow(missing_docs, clippy::all)]

/// Version 1 of the protocol.
pub mod v1 {
    tonic::include_proto!("drover.v1");
}

pub use v1::*;
