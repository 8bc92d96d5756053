//! Compiles `proto/*.proto` with protox (a pure-Rust protobuf compiler, so no system
//! `protoc` is needed), then generates prost types and pbjson serde impls (the proto3
//! canonical JSON mapping used by browsers).
use std::path::PathBuf;

use prost::Message as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/client.proto", "proto/backbone.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptor_bytes = fds.encode_to_vec();
    std::fs::write(out.join("descriptors.bin"), &descriptor_bytes)?;

    let mut config = prost_build::Config::new();
    config.bytes(["."]);
    config.compile_fds(fds)?;

    pbjson_build::Builder::new().register_descriptors(&descriptor_bytes)?.build(&[".tern"])?;
    Ok(())
}
