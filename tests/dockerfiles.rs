//! What can be checked of the container images without a Docker engine:
//! every base image pinned to an exact version, the libtorch they build
//! against the one `tch` wants (and `scripts/bootstrap` assembles), the
//! flotilla binary as entrypoint where the Kubernetes manifests call it,
//! libtorch where the binary's rpath looks for it.

mod support;

use std::path::Path;

use support::repo;

/// A Dockerfile's instructions: (keyword, arguments), continuation lines joined.
fn instructions(path: &Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let t = line.trim();
        if current.is_empty() && (t.is_empty() || t.starts_with('#')) {
            continue;
        }
        match t.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(t);
                let (k, v) = current.split_once(char::is_whitespace).unwrap_or((&current, ""));
                out.push((k.to_ascii_uppercase(), v.trim().to_string()));
                current.clear();
            }
        }
    }
    out
}

/// The value of `name=` in a shell script or Dockerfile ARG.
fn assignment(text: &str, name: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let l = l.trim().trim_start_matches("ARG ").trim();
        l.strip_prefix(&format!("{name}=")).map(|v| v.trim_matches('"').to_string())
    })
}

/// The version of a package in Cargo.lock.
fn locked_version(package: &str) -> String {
    let lock = std::fs::read_to_string(repo().join("Cargo.lock")).unwrap();
    let at = lock.find(&format!("name = \"{package}\"\n")).unwrap_or_else(|| panic!("{package} not in Cargo.lock"));
    let rest = &lock[at..];
    rest.lines().nth(1).and_then(|l| l.strip_prefix("version = ")).unwrap().trim_matches('"').to_string()
}

/// The libtorch version torch-sys (the crate under `tch`) is written for,
/// read from its build script in cargo's registry.
fn torch_sys_libtorch_version() -> String {
    let version = locked_version("torch-sys");
    let home = std::env::var("CARGO_HOME")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::path::PathBuf::from(std::env::var("HOME").unwrap()).join(".cargo"));
    let src = home.join("registry/src");
    for index in std::fs::read_dir(&src).unwrap_or_else(|e| panic!("read {}: {e}", src.display())).flatten() {
        let build = index.path().join(format!("torch-sys-{version}/build.rs"));
        if let Ok(text) = std::fs::read_to_string(&build) {
            let line = text.lines().find(|l| l.contains("const TORCH_VERSION")).expect("TORCH_VERSION in torch-sys");
            return line.split('"').nth(1).unwrap().to_string();
        }
    }
    panic!("torch-sys {version} sources not found under {}", src.display());
}

fn dockerfiles() -> Vec<std::path::PathBuf> {
    ["Dockerfile.cpu", "Dockerfile.cuda"].iter().map(|f| repo().join("deploy/docker").join(f)).collect()
}

#[test]
fn base_images_are_pinned_to_exact_versions() {
    let rust_version = {
        let cargo = std::fs::read_to_string(repo().join("Cargo.toml")).unwrap();
        assignment(&cargo.replace(" = ", "="), "rust-version").unwrap()
    };
    for path in dockerfiles() {
        let froms: Vec<String> = instructions(&path).into_iter().filter(|(k, _)| k == "FROM").map(|(_, v)| v).collect();
        assert!(froms.len() >= 2, "{}: a build stage and a runtime stage", path.display());
        for from in &froms {
            let image = from.split_whitespace().next().unwrap();
            if let Some((_, digest)) = image.split_once("@sha256:") {
                assert!(digest.len() == 64 && digest.chars().all(|c| c.is_ascii_hexdigit()), "{image}");
                continue;
            }
            let (_, tag) = image.rsplit_once(':').unwrap_or_else(|| panic!("{}: {image} has no tag", path.display()));
            let version = tag.split('-').next().unwrap();
            let parts: Vec<&str> = version.split('.').collect();
            assert!(
                parts.len() >= 2 && parts.iter().all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit())),
                "{}: {image} is not pinned to an exact version",
                path.display()
            );
            if image.starts_with("rust:") {
                let have: Vec<u32> = parts.iter().map(|p| p.parse().unwrap()).collect();
                let need: Vec<u32> = rust_version.split('.').map(|p| p.parse().unwrap()).collect();
                assert!(have >= need, "{}: {image} is older than rust-version {rust_version}", path.display());
            }
        }
    }
}

#[test]
fn images_build_against_the_libtorch_that_tch_wants() {
    let wanted = torch_sys_libtorch_version();
    let bootstrap = std::fs::read_to_string(repo().join("scripts/bootstrap")).unwrap();
    assert_eq!(assignment(&bootstrap, "torch_version").as_deref(), Some(wanted.as_str()), "scripts/bootstrap");
    for path in dockerfiles() {
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            assignment(&text, "TORCH_VERSION").as_deref(),
            Some(wanted.as_str()),
            "{}: TORCH_VERSION must be torch-sys {}'s libtorch",
            path.display(),
            locked_version("torch-sys")
        );
        let runs: Vec<String> = instructions(&path).into_iter().filter(|(k, _)| k == "RUN").map(|(_, v)| v).collect();
        let builds: Vec<&String> = runs.iter().filter(|r| r.contains("cargo build")).collect();
        assert_eq!(builds.len(), 1, "{}: one cargo build", path.display());
        assert!(builds[0].contains("--release") && builds[0].contains("--locked"), "{}", builds[0]);
        let cuda = path.ends_with("Dockerfile.cuda");
        assert_eq!(builds[0].contains("--features cuda"), cuda, "{}: {}", path.display(), builds[0]);
        // libtorch as scripts/bootstrap assembles it (the CUDA build with
        // --cuda: CUDA, cuDNN, NCCL and the libnccl.so link), checked
        // against TORCH_VERSION.
        let bootstrap = runs
            .iter()
            .find(|r| r.contains("./scripts/bootstrap"))
            .unwrap_or_else(|| panic!("{}: no ./scripts/bootstrap in {runs:?}", path.display()));
        assert!(bootstrap.contains("\"$TORCH_VERSION\""), "{bootstrap}");
        assert_eq!(bootstrap.contains("./scripts/bootstrap --cuda"), cuda, "{}: {bootstrap}", path.display());
    }
}

/// The binary's rpath is the build stage's `$LIBTORCH/lib` (build.rs), so
/// the runtime stage must have that folder at the same place.
#[test]
fn the_runtime_image_keeps_libtorch_where_the_binary_was_linked() {
    for path in dockerfiles() {
        let ins = instructions(&path);
        let libtorch = ins
            .iter()
            .find_map(|(k, v)| (k == "ENV").then(|| v.strip_prefix("LIBTORCH=")).flatten())
            .unwrap_or_else(|| panic!("{}: no ENV LIBTORCH=", path.display()))
            .trim_matches('"')
            .to_string();
        assert!(libtorch.starts_with('/'), "{}: LIBTORCH={libtorch} is not absolute", path.display());
        let last_from = ins.iter().rposition(|(k, _)| k == "FROM").unwrap();
        let lib = format!("{libtorch}/lib");
        assert!(
            ins[last_from..].iter().any(|(k, v)| k == "COPY" && *v == format!("--from=build {lib} {lib}")),
            "{}: the runtime stage does not copy {lib} to the same place",
            path.display()
        );
    }
}

#[test]
fn the_entrypoint_is_the_flotilla_binary() {
    for path in dockerfiles() {
        let ins = instructions(&path);
        let entry: Vec<&String> = ins.iter().filter(|(k, _)| k == "ENTRYPOINT").map(|(_, v)| v).collect();
        assert_eq!(entry.len(), 1, "{}", path.display());
        let argv: Vec<String> = serde_json::from_str(entry[0]).expect("ENTRYPOINT in exec form (a JSON array)");
        assert_eq!(argv, [flotilla::deploy::IMAGE_BINARY], "{}", path.display());
        // The last stage copies the binary the build stage made to that path.
        let last_from = ins.iter().rposition(|(k, _)| k == "FROM").unwrap();
        assert!(
            ins[last_from..].iter().any(|(k, v)| k == "COPY"
                && v.starts_with("--from=build")
                && v.ends_with(&format!(" {}", flotilla::deploy::IMAGE_BINARY))),
            "{}: the runtime stage does not copy the binary to {}",
            path.display(),
            flotilla::deploy::IMAGE_BINARY
        );
        let build_stage_copies_it = ins[..last_from].iter().any(|(k, v)| {
            k == "RUN" && v.contains(&format!("cp target/release/flotilla {}", flotilla::deploy::IMAGE_BINARY))
        });
        assert!(build_stage_copies_it, "{}", path.display());
    }
}
