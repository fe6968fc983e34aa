//! Compiles `svcbroker/v1/*.proto` with protox (pure Rust), so building needs
//! no system `protoc`, and writes a file descriptor set for server reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "svcbroker/v1/allocator.proto",
        "svcbroker/v1/node.proto",
        "svcbroker/v1/registry.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["."])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("svcbroker_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        // These carry passwords or files that hold them: their Debug impls
        // are written by hand in src/redact.rs so secrets never reach a log.
        .skip_debug([
            ".svcbroker.v1.Credential",
            ".svcbroker.v1.FileSpec",
            ".svcbroker.v1.ProcessSpec",
            ".svcbroker.v1.BindRequest",
            ".svcbroker.v1.CommandHook",
            ".svcbroker.v1.HttpHook",
        ])
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
