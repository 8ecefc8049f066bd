# Sourced on the GPU check machine before running the flotilla that
# scripts/gpu-build made (which copies this file to target/gpu/env.sh):
#   . target/gpu/env.sh && "$FLOTILLA_BIN" --help
# That machine has no Rust; its libtorch (2.11.0+cu130) is the one in its
# Python venv. This
#   - unpacks target/gpu/flotilla.xz to target/gpu/flotilla if that is what
#     was carried (xz-utils, present on Debian and Ubuntu);
#   - asks the venv's python where torch is installed, without importing it
#     ($FLOTILLA_TORCH_PYTHON, default /opt/torch/.venv/bin/python3, else
#     python3 on PATH);
#   - links target/gpu/lib/libnccl.so to the NCCL wheel's libnccl.so.2: NCCL
#     and the CUDA runtime are dlopened by cudarc, which asks for
#     `libnccl.so` (and `libnccl.so.13`, `.12`, ...), never `.so.2`;
#   - exports LD_LIBRARY_PATH (target/gpu/lib, torch/lib, nvidia/nccl/lib,
#     nvidia/cu13/lib, then what was there), FLOTILLA_BIN (the binary),
#     FLOTILLA_TORCH_LIB and FLOTILLA_TORCH_VERSION;
#   - returns 1 with a message naming what is missing (no binary, no torch,
#     no libtorch_cuda.so, no NCCL, a library `ldd` cannot find).
# The binary also carries rpaths to /opt/torch/.venv/lib/python3.{10..13}
# and $ORIGIN/lib, so after this has run once it starts without
# LD_LIBRARY_PATH too.

flotilla_gpu_env() {
  local dir python site torch_lib nccl cudart missing
  dir="$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")" && pwd)"
  say() { printf 'gpu env: %s\n' "$*" >&2; }
  if [ -f "$dir/flotilla.xz" ] && { [ ! -x "$dir/flotilla" ] || [ "$dir/flotilla.xz" -nt "$dir/flotilla" ]; }; then
    command -v xz >/dev/null 2>&1 || { say "xz is needed to unpack $dir/flotilla.xz (apt-get install xz-utils)"; return 1; }
    xz -dc "$dir/flotilla.xz" > "$dir/flotilla.partial" && chmod +x "$dir/flotilla.partial" \
      && mv "$dir/flotilla.partial" "$dir/flotilla" || { say "could not unpack $dir/flotilla.xz"; return 1; }
  fi
  [ -x "$dir/flotilla" ] || { say "no $dir/flotilla (run scripts/gpu-build and carry target/gpu)"; return 1; }

  python="${FLOTILLA_TORCH_PYTHON:-/opt/torch/.venv/bin/python3}"
  [ -x "$python" ] || python="$(command -v python3)" || { say "no python with torch found"; return 1; }
  site="$("$python" -c 'import importlib.util, os, sys
spec = importlib.util.find_spec("torch")
if spec is None or not spec.submodule_search_locations:
    sys.exit(1)
print(os.path.dirname(list(spec.submodule_search_locations)[0]))')" \
    || { say "$python has no torch installed"; return 1; }
  torch_lib="$site/torch/lib"
  [ -f "$torch_lib/libtorch_cuda.so" ] || { say "$torch_lib has no libtorch_cuda.so: not a CUDA build of torch"; return 1; }

  nccl="$(find "$site/nvidia" -name 'libnccl.so.2' 2>/dev/null | head -1)"
  [ -n "$nccl" ] || { say "no libnccl.so.2 under $site/nvidia (the nvidia-nccl wheel)"; return 1; }
  cudart="$(find "$site/nvidia" -name 'libcudart.so.13' 2>/dev/null | head -1)"
  [ -n "$cudart" ] || { say "no libcudart.so.13 under $site/nvidia (the CUDA 13 runtime wheel)"; return 1; }
  mkdir -p "$dir/lib"
  ln -sfn "$nccl" "$dir/lib/libnccl.so"

  LD_LIBRARY_PATH="$dir/lib:$torch_lib:$(dirname "$nccl"):$(dirname "$cudart")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  FLOTILLA_BIN="$dir/flotilla"
  FLOTILLA_TORCH_LIB="$torch_lib"
  FLOTILLA_TORCH_VERSION="$(sed -n "s/^__version__ = '\(.*\)'.*/\1/p" "$site/torch/version.py" 2>/dev/null | head -1)"
  export LD_LIBRARY_PATH FLOTILLA_BIN FLOTILLA_TORCH_LIB FLOTILLA_TORCH_VERSION
  case "$FLOTILLA_TORCH_VERSION" in
    2.11.0*) ;;
    *) say "warning: torch here is ${FLOTILLA_TORCH_VERSION:-of unknown version}; the binary was built against 2.11.0" ;;
  esac
  missing="$(ldd "$FLOTILLA_BIN" 2>&1 | awk '/not found/ { print $1 }' | tr '\n' ' ')"
  [ -z "$missing" ] || { say "libraries not found for $FLOTILLA_BIN: $missing"; return 1; }
  say "flotilla at $FLOTILLA_BIN, torch ${FLOTILLA_TORCH_VERSION:-?} at $torch_lib, NCCL $nccl"
}

flotilla_gpu_env
