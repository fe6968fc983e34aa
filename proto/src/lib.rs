//! Generated code for the `svcbroker.v1` protobuf package, shared by the
//! gateway, the node agent, the allocator and their clients, plus the few
//! helpers every svcbroker gRPC server needs (health, reflection, shutdown,
//! logging).

/// Messages, clients and servers of package `svcbroker.v1`.
pub mod v1 {
    tonic::include_proto!("svcbroker.v1");
}

/// Encoded `FileDescriptorSet` of every svcbroker proto, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("svcbroker_descriptor");

#[cfg(feature = "server")]
pub mod auth;
#[cfg(feature = "server")]
pub mod logging;
#[cfg(feature = "server")]
pub mod server;

mod redact;
