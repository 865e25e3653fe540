//! Compiles proto/eps.proto with protox (pure Rust), so building needs no protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=../../proto/eps.proto");
    let fds = protox::compile(["eps.proto"], ["../../proto"])?;
    tonic_prost_build::configure()
        .bytes(".eps.v1")
        .compile_fds(fds)?;
    Ok(())
}
