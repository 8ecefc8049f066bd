//! Embeds libtorch's folder as an rpath so that `flotilla` and the tests run
//! without LD_LIBRARY_PATH. With the `cuda` feature and a CUDA libtorch, also
//! links libtorch_cuda explicitly: nothing references it by symbol, so the
//! linker would drop it and CUDA would read as absent.
fn main() {
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
        let cuda_lib = std::path::Path::new(&lib).join("libtorch_cuda.so");
        if std::env::var_os("CARGO_FEATURE_CUDA").is_some() && cuda_lib.exists() {
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
        }
    }
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
}
