//! Compiles `proto/es/v1/es.proto` without a system `protoc`: `protox` parses it into a
//! descriptor set, `tonic-prost-build` generates the messages, the client and the server.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let include = manifest_dir.join("../../proto");
    let proto = include.join("es/v1/es.proto");
    println!("cargo:rerun-if-changed={}", proto.display());

    let descriptors = protox::compile([&proto], [&include])?;
    tonic_prost_build::configure()
        // θ is encoded once per generation and shared by the messages to every worker: a
        // `Bytes` clone is a reference count, a `Vec<u8>` clone would copy 2.7 MB each time.
        .bytes(".underflow.es.v1.Generation.theta")
        // The weights go to many workers per generation: encoded once, shared the same way.
        .bytes(".underflow.es.v1.SumNoise.weights")
        // A relay hands on the bytes it received, without copying them per fetch.
        .bytes(".underflow.es.v1.FetchThetaReply.theta")
        // Its derived `Debug` would print those megabytes; `work.rs` shows the digest instead.
        .skip_debug([
            ".underflow.es.v1.Generation",
            ".underflow.es.v1.FetchThetaReply",
        ])
        .compile_fds(descriptors)?;
    Ok(())
}
