#!/usr/bin/env bash
# The one prepared GPU run (docs/design.md section 10): environment, build for sm_90, the CUDA
# tests, the GPU benchmarks, and a short summary table printed LAST.
#
#   bash benchmarks/gpu_check.sh OUTDIR        # on the device machine: bash benchmarks/gpu_check.sh $OUT
#
# Every stage runs under `timeout`, logs in full to OUTDIR/<stage>.log (also on stdout) and a
# failing stage never stops the later ones. Time budget (GPU_CHECK_BUDGET, default 470 s, under
# the device tool's 600 s per command): each stage gets min(its own cap, what is left of the
# budget minus a reserve for the stages after it):
#   env 30 s | build 240 s | test_cuda_ops 120 s | test_ragged_attention 45 s |
#   test_hf_multidevice 60 s | bench_ops 90 s | bench_e2e 200 s (--quick if under 170 s are left)
# Typical total on an H200: about 5-6 minutes. Needs no network: python3 and its torch (CUDA),
# nvcc, cmake, ninja, pytest, transformers, accelerate already on the machine. The op library
# built here for another Python is not used there: this script rebuilds it in place
# (setup.py build_ext --inplace -> mixkv/_C.<python suffix>.so), so nothing is pip-installed.
#
# Knobs for a dry run of the script itself on a machine without a GPU (the tests then skip):
#   GPU_CHECK_SKIP_BUILD=1                       keep the op library already built
#   GPU_CHECK_BENCH_ARGS="--device cpu --tiny"   appended to both benchmark commands
#   GPU_CHECK_PYTEST_ARGS="--collect-only"       appended to the three pytest commands
#   GPU_CHECK_TIME_SCALE=10                      every stage cap, reserve and the budget x10 (a
#                                                busy CPU; the H200 run keeps the default 1)
# tests/test_bench_gpu.py runs such a dry run in every `make test`, so the script cannot rot.
set -u
OUTDIR=${1:?usage: bash benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SCALE=${GPU_CHECK_TIME_SCALE:-1}
BUDGET=$((${GPU_CHECK_BUDGET:-470} * SCALE))
START=$(date +%s)
export PY OUTDIR BUDGET SCALE START PYTHONUNBUFFERED=1
: >"$OUTDIR/stages.tsv"

# stage NAME CAP RESERVE CMD...: run CMD with timeout min(CAP, budget left - RESERVE).
stage() {
  local name=$1 cap=$(($2 * SCALE)) reserve=$(($3 * SCALE))
  shift 3
  local now left limit t0 rc
  now=$(date +%s)
  left=$((START + BUDGET - now - reserve))
  limit=$((cap < left ? cap : left))
  if [ "$limit" -lt 15 ]; then
    echo "== $name: SKIPPED (budget spent: ${left}s left after the reserve)" | tee "$OUTDIR/$name.log"
    printf '%s\t%s\t%s\t%s\n' "$name" "skipped" 0 0 >>"$OUTDIR/stages.tsv"
    return 0
  fi
  echo
  echo "================ $name (timeout ${limit}s, $((now - START))s elapsed) ================"
  t0=$(date +%s)
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$OUTDIR/$name.log"
  rc=${PIPESTATUS[0]}
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - t0))" "$limit" >>"$OUTDIR/stages.tsv"
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && echo "== $name: TIMED OUT after ${limit}s"
  return 0
}

env_info() {
  date -u
  nvidia-smi || echo "nvidia-smi: not available"
  nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,clocks.mem,temperature.gpu \
    --format=csv 2>/dev/null
  command -v nvcc >/dev/null && nvcc --version | tail -2
  cmake --version 2>/dev/null | head -1
  ninja --version 2>/dev/null | sed 's/^/ninja /'
  nproc
  free -g | head -2
  "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device:", torch.cuda.get_device_name(0), f"sm_{p.major}{p.minor}",
          f"{p.multi_processor_count} SMs", f"{p.total_memory / 2**30:.0f} GiB")
else:
    print("torch.cuda.is_available() is False")
for name in ("transformers", "accelerate", "pytest", "xdist", "pytest_timeout"):
    try:
        module = __import__(name)
        print(name, getattr(module, "__version__", "present"))
    except ImportError:
        print(name, "MISSING")
EOF
}

report_kernels() {
  "$PY" - <<'EOF'
import torch, mixkv
ops = ("window_importance", "value_norm", "key_diversity", "mix_scores", "head_budgets",
       "select_kv", "select_kv_ragged", "compress", "compress_ragged", "ragged_attention")
have = [op for op in ops if torch._C._dispatch_has_kernel_for_dispatch_key(f"mixkv::{op}", "CUDA")]
print("library:", mixkv.LIBRARY_PATH)
print(f"CUDA kernels: {len(have)}/{len(ops)} ops; missing: {', '.join(sorted(set(ops) - set(have))) or 'none'}")
EOF
}

# Fallback build if CMake fails (e.g. Torch's CMake CUDA configuration on this image): the same
# sources through torch.utils.cpp_extension (ninja), the library copied to where mixkv looks.
# build_fallback [DEST]; MIXKV_WITH_CUDA=0 builds the CPU sources only.
build_fallback() {
  "$PY" - "${1:-}" <<'EOF'
import glob, os, shutil, sys, sysconfig, time
import torch
from torch.utils.cpp_extension import load

cuda = os.environ.get("MIXKV_WITH_CUDA", "1") not in ("0", "") and torch.version.cuda is not None
sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp") + glob.glob("csrc/meta/*.cpp"))
if cuda:
    sources += sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
defines = ["-DMIXKV_WITH_CUDA"] if cuda else []
build = os.path.abspath(os.environ.get("MIXKV_FALLBACK_BUILD_DIR", "build/fallback"))
os.makedirs(build, exist_ok=True)
t0 = time.time()
load(name="mixkv_ops", sources=sources, extra_include_paths=[os.path.abspath("csrc")],
     extra_cflags=["-O3", "-std=c++20", "-fassociative-math", "-fno-signed-zeros",
                   "-fno-trapping-math", *defines],
     extra_cuda_cflags=["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo", *defines],
     build_directory=build, is_python_module=False, verbose=True)
dest = sys.argv[1] or "mixkv/_C" + sysconfig.get_config_var("EXT_SUFFIX")
shutil.copy(os.path.join(build, "mixkv_ops.so"), dest + ".tmp")
os.replace(dest + ".tmp", dest)
print(f"fallback build ({'CPU+CUDA' if cuda else 'CPU'}, {len(sources)} sources) -> {dest} "
      f"in {time.time() - t0:.0f} s")
EOF
}

build() {
  command -v nvcc >/dev/null || export PATH="/usr/local/cuda/bin:$PATH"
  export CUDACXX=${CUDACXX:-$(command -v nvcc)}
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} MIXKV_WITH_CUDA=1
  echo "nvcc: ${CUDACXX:-not found}; TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
  # setup.py drives CMakeLists.txt (the one build of record); --inplace puts the library where
  # `import mixkv` finds it from the checkout. Fresh build folder: a copied one is stale.
  rm -rf build/cmake
  if ! "$PY" setup.py build_ext --inplace; then
    echo "== setup.py/CMake build FAILED; trying the torch.utils.cpp_extension fallback"
    build_fallback || return 1
    echo "NOTE: built with the cpp_extension FALLBACK, not CMake"
  fi
  report_kernels
}

pytest_args() {  # parallel workers and a per-test timeout when the plugins are there
  local args=(-q -rfE -p no:cacheprovider)
  "$PY" -c "import xdist" 2>/dev/null && [ "$1" -gt 1 ] && args+=(-n "$1")
  "$PY" -c "import pytest_timeout" 2>/dev/null && args+=(--timeout=90 --timeout-method=thread)
  # shellcheck disable=SC2206
  args+=(${GPU_CHECK_PYTEST_ARGS:-})
  echo "${args[@]}"
}

bench_e2e() {
  local left=$((START + BUDGET - $(date +%s) - 10)) extra=()
  [ "$left" -lt 170 ] && extra=(--quick) && echo "only ${left}s left: --quick (8K and 32K contexts)"
  # shellcheck disable=SC2086
  "$PY" benchmarks/bench_gpu.py --skip-ops --out "$OUTDIR/bench_e2e" "${extra[@]}" \
    ${GPU_CHECK_BENCH_ARGS:-}
}

# Stages run under `timeout`, which runs programs, not shell functions: export them to bash -c.
export -f env_info report_kernels build_fallback build bench_e2e
stage env 30 440 bash -c env_info
if [ "${GPU_CHECK_SKIP_BUILD:-0}" = 1 ]; then
  stage build 240 200 bash -c 'echo "build skipped (GPU_CHECK_SKIP_BUILD=1)"; report_kernels'
else
  stage build 240 200 bash -c build
fi
# shellcheck disable=SC2046
stage test_cuda_ops 120 150 "$PY" -m pytest $(pytest_args 8) tests/ops/test_cuda_ops.py
# shellcheck disable=SC2046
stage test_ragged_attention 45 130 "$PY" -m pytest $(pytest_args 1) tests/ops/test_ragged_attention.py
# shellcheck disable=SC2046
stage test_hf_multidevice 60 120 "$PY" -m pytest $(pytest_args 4) tests/hf/test_hf_multidevice.py
# shellcheck disable=SC2086
stage bench_ops 90 110 "$PY" benchmarks/bench_gpu.py --skip-e2e --out "$OUTDIR/bench_ops" \
  ${GPU_CHECK_BENCH_ARGS:-}
stage bench_e2e 200 5 bash -c bench_e2e

# ---- summary, printed last ----------------------------------------------------------------------
"$PY" - "$OUTDIR" "$((($(date +%s) - START)))" <<'EOF'
import json, re, sys
from pathlib import Path

out, total = Path(sys.argv[1]), sys.argv[2]
print("\n" + "=" * 30 + " SUMMARY " + "=" * 30)
print(f"{'stage':<24}{'rc':>8}{'seconds':>9}{'limit':>7}")
for line in (out / "stages.tsv").read_text().splitlines():
    name, rc, secs, limit = line.split("\t")
    note = {"0": "ok", "124": "TIMEOUT", "137": "KILLED", "skipped": "skipped"}.get(rc, "FAILED")
    print(f"{name:<24}{rc:>8}{secs:>9}{limit:>7}  {note}")
print(f"total {total} s")

def log(name):
    path = out / f"{name}.log"
    return path.read_text(errors="replace") if path.exists() else ""

m = re.search(r"CUDA kernels: .*", log("build"))
print("\n" + (m.group(0) if m else "CUDA kernels: unknown (build failed?)"))
print("\ntests:")
for name in ("test_cuda_ops", "test_ragged_attention", "test_hf_multidevice"):
    text = log(name)
    counts = {}
    for line in reversed(text.splitlines()):  # pytest's final "N passed, M failed in Xs" line
        found = re.findall(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|tests? collected)",
                           line)
        if found and (" in " in line):
            counts = {k.rstrip("s") if k.startswith("error") else k: int(n) for n, k in found}
            break
    text_counts = ", ".join(f"{n} {k}" for k, n in counts.items()) or "no pytest summary line"
    print(f"  {name:<24}{text_counts}")
    failed = [l for l in text.splitlines() if l.startswith(("FAILED ", "ERROR "))]
    for l in failed[:8]:
        print(f"      {l[:150]}")
    if len(failed) > 8:
        print(f"      ... and {len(failed) - 8} more (see {name}.log)")

def load(name):
    path = out / name / "bench_gpu.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None

ops, e2e = load("bench_ops"), load("bench_e2e")
print("\ncompress (Llama-3-8B layer, bf16, budget 2048):")
for r in (ops or {}).get("ops", []):
    if "error" in r:
        print(f"  N={r.get('N')}: ERROR {r['error']}")
        continue
    def x(key, fmt):
        return fmt.format(r[key]) if key in r else "-"
    print(f"  N={r['N']:>6}: op {r['op_ms']:.3f} ms ({r['op_GBps']:.0f} GB/s), copy-floor "
          f"{r['floor_ms']:.3f} ms -> {r['op_over_floor']:.2f}x floor; copy {r['copy_GBps']:.0f} GB/s; "
          f"vs reference {x('reference_over_op', '{:.1f}x')}, vs official-style "
          f"{x('baseline_over_op', '{:.1f}x')}, kept == reference {x('kept_agreement_with_reference', '{:.4f}')}")
if ops is None:
    print("  no results (see bench_ops.log)")
print("\nend to end (Llama-3-8B-sized, random weights, bf16, sdpa, B=1):")
rows = (e2e or {}).get("e2e", [])
full = {r["context"]: r for r in rows if r.get("cache") == "full" and "error" not in r}
for r in rows:
    if "error" in r:
        print(f"  {r['context']:>6} {r['cache']:<9} ERROR {r['error'][:120]}")
        continue
    base = full.get(r["context"])
    vs = f"{r['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}x full" if base else ""
    share = f", compress {r['compress_ms']:.0f} ms = {100 * r['compress_share']:.2f}%" \
        if "compress_ms" in r else ""
    print(f"  {r['context']:>6} {r['cache']:<9} prefill {r['prefill_ms']:8.0f} ms{share}; decode "
          f"{r['decode_tokens_per_s']:6.1f} tok/s {vs}; KV {r['kv_cache_MB']:.0f} MB, peak "
          f"{r.get('decode_peak_MB', 0):.0f} MB")
if e2e is None:
    print("  no results (see bench_e2e.log)")

# Targets: the ops file judged the op targets, the e2e file the end-to-end ones.
print("\ntargets:")
merged = []
a = (ops or {}).get("targets", [])
b = (e2e or {}).get("targets", [])
for i in range(max(len(a), len(b))):
    candidates = [t for t in (a[i] if i < len(a) else None, b[i] if i < len(b) else None) if t]
    measured = [t for t in candidates if t.get("met") is not None]
    merged.append((measured or candidates)[0])
for t in merged:
    v = t["value"]
    text = "-" if v is None else (f"{100 * v:.2f}%" if "%" in t["limit"] else f"{v:.2f}x")
    met = {None: "not measured", True: "MET", False: "NOT MET"}[t["met"]]
    print(f"  [{met:>12}] {t['target']}: {text} (limit {t['limit']})")
print(f"\nlogs and JSON: {out}")
EOF
