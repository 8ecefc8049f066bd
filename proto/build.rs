//! Generates the flotilla.v1 and flotilla.raft.v1 client and server code.
//! protoc comes from the protoc-bin-vendored crate so that no system package
//! is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        // SAFETY: build scripts are single-threaded.
        unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    }
    const PROTOS: [&str; 2] = ["proto/flotilla/v1/flotilla.proto", "proto/flotilla/raft/v1/raft.proto"];
    tonic_prost_build::configure().compile_protos(&PROTOS, &["proto"])?;
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    Ok(())
}
