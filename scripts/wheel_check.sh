#!/usr/bin/env bash
# The installable package, checked end to end (CI runs it after `make test`):
#   scripts/wheel_check.sh [OUTDIR]
# 1. `pip install .` in a fresh venv without torch (isolated and --no-build-isolation) stops in
#    seconds with setup.py's one-line message, before any download of torch.
# 2. `pip wheel --no-build-isolation --no-deps .` with $PYTHON (its torch and build tools, as
#    scripts/setup.sh left them) builds the wheel; its name and metadata carry that torch, and it
#    holds the op library, the build info, every subpackage, the evaluation's corpus and
#    kvzap's weights.
# 3. In that venv: the torch the wheel pins and transformers, then the wheel without any index
#    (its dependency must already be satisfied: nothing is downloaded); then, from an empty
#    folder outside the checkout with PATH = the venv's bin only (no compiler, cmake or nvcc):
#    import mixkv, torch.ops.mixkv.compress, mixkv.patch on a tiny random Llama, the mixkv-eval
#    and mixkv-calibrate entry points.
# Prints the wheel's name and size; exits non-zero on any failure. The wheel is kept in OUTDIR
# when given. pip's cache is reused (torch and transformers install from it).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
OUTDIR=${1:-$WORK/dist}
mkdir -p "$OUTDIR"
V="$WORK/venv"
say() { echo "== wheel check: $*"; }
fail() { echo "wheel check FAILED: $*" >&2; exit 1; }

"$PY" -m venv "$V"
"$V/bin/python" -c "import torch" 2>/dev/null && fail "torch is importable in a new venv"
for isolation in "" --no-build-isolation; do
  start=$(date +%s)
  if "$V/bin/python" -m pip install --disable-pip-version-check $isolation "$ROOT" \
      >"$WORK/no-torch.log" 2>&1; then
    fail "pip install $isolation . succeeded without torch"
  fi
  took=$(($(date +%s) - start))
  grep -q "mixkv: building needs torch >= 2.11 already installed (.*): pip install 'torch>=2.11', then pip install --no-build-isolation \.$" \
    "$WORK/no-torch.log" || { cat "$WORK/no-torch.log" >&2; fail "no one-line message (pip install $isolation .)"; }
  ! grep -qi "collecting torch\|downloading.*torch" "$WORK/no-torch.log" || fail "torch was fetched"
  [ "$took" -le 30 ] || fail "pip install $isolation . took $took s to stop"
  say "pip install ${isolation:+$isolation }. without torch stopped in $took s with the message"
done

TORCH_VERSION=$("$PY" -c 'import torch; print(torch.__version__)')
"$PY" -m pip wheel --quiet --disable-pip-version-check --no-build-isolation --no-deps . \
  -w "$WORK/built" >"$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log" >&2; fail "pip wheel"; }
WHEEL=$(ls "$WORK"/built/mixkv-*.whl)
cp "$WHEEL" "$OUTDIR/"
WHEEL="$OUTDIR/$(basename "$WHEEL")"
# Every file git tracks in mixkv/ must be in the wheel (every subpackage, the corpus), with the
# library and the build info; the metadata names the torch.
tracked=$(git ls-files mixkv 2>/dev/null || find mixkv -type f ! -path '*__pycache__*' ! -name '_C*.so' ! -name '_build_info.py')
"$PY" - "$WHEEL" "$TORCH_VERSION" $tracked <<'PY' || fail "wheel contents"
import re, sys, zipfile
wheel, torch_version, tracked = sys.argv[1], sys.argv[2], sys.argv[3:]
names = set(zipfile.ZipFile(wheel).namelist())
local = re.sub(r"[^a-z0-9]+", ".", f"torch{torch_version}".lower()).strip(".")
assert f"+{local}-" in wheel.rsplit("/", 1)[-1], (wheel, local)
missing = [f for f in tracked if f not in names]
assert not missing, f"not in the wheel: {missing}"
assert any(re.fullmatch(r"mixkv/_C\..*\.so", n) for n in names), "no mixkv/_C*.so"
assert "mixkv/_build_info.py" in names, "no mixkv/_build_info.py"
meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA")))
meta = meta.decode()
assert re.search(rf"^Version: \d+\.\d+\.\d+\+{re.escape(local)}$", meta, re.M), meta[:400]
assert f"\nRequires-Dist: torch=={torch_version}\n" in meta, meta[:800]
info = zipfile.ZipFile(wheel).read("mixkv/_build_info.py").decode()
assert f"TORCH_VERSION = {torch_version!r}" in info, info
PY
say "built $(basename "$WHEEL") ($(du -k "$WHEEL" | cut -f1) KiB) for torch $TORCH_VERSION"

pip_v() { "$V/bin/python" -m pip install --quiet --disable-pip-version-check "$@"; }
pip_v "torch==$TORCH_VERSION" "transformers>=5.3,<6"
pip_v --no-index "$WHEEL" || fail "installing the wheel needs more than the installed torch"
mkdir -p "$WORK/run" "$WORK/home"
cd "$WORK/run"
env -i PATH="$V/bin" HOME="$WORK/home" "$V/bin/python" - "$ROOT" <<'PY' || fail "the installed wheel"
import shutil, subprocess, sys
from pathlib import Path
root = Path(sys.argv[1]).resolve()
for tool in ("cc", "c++", "gcc", "g++", "clang", "cmake", "ninja", "nvcc"):
    assert shutil.which(tool) is None, f"{tool} is on the PATH: {shutil.which(tool)}"
import torch, transformers
import mixkv, mixkv.methods, mixkv.hf, mixkv.eval, mixkv.eval.tasks, mixkv.reference, mixkv.ops
from mixkv import _build_info
here = Path(mixkv.__file__).resolve().parent
assert root not in here.parents and mixkv.LIBRARY_PATH.parent == here, (here, mixkv.LIBRARY_PATH)
assert _build_info.TORCH_VERSION == torch.__version__, (_build_info.TORCH_VERSION, torch.__version__)
corpus = sorted(p.name for p in mixkv.eval.tasks.BUILTIN_CORPUS.glob("*.txt"))
assert corpus, "no corpus"
surrogates = sorted(mixkv.methods.kvzap.shipped())  # kvzap's shipped weights (package data)
assert len(surrogates) == 2, surrogates

g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, n, s, 16, generator=g) for n, s in ((4, 8), (2, 96), (2, 96)))
kept_k, kept_v, kept_pos = torch.ops.mixkv.compress(q, k, v, None, 32, 8)
assert kept_k.shape == (1, 2, 32, 16) and kept_pos.shape == (1, 2, 32), kept_k.shape

torch.manual_seed(0)
config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=512)
model = transformers.LlamaForCausalLM(config).eval()
ids = torch.randint(2, 120, (1, 96), generator=g)
with mixkv.patch(model, "mixkv", budget=32, window=8) as handle:
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                         min_new_tokens=4, do_sample=False, pad_token_id=0)
    total = handle.stats()["total"]
assert out.shape == (1, 100), out.shape
assert total["bytes_after"] < total["bytes_before"], total

bin_dir = Path(sys.executable).parent
for script in ("mixkv-eval", "mixkv-calibrate"):
    run = subprocess.run([str(bin_dir / script), "--help"], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.startswith("usage: "), (script, run.stderr[-2000:])
print(f"installed wheel: mixkv {mixkv.__file__}, torch {torch.__version__}, transformers "
      f"{transformers.__version__}; compress, patch (K/V {total['bytes_before']} -> {total['bytes_after']} "
      f"bytes), mixkv-eval and mixkv-calibrate --help, corpus {len(corpus)} files, kvzap weights {surrogates}; no compiler")
PY
cd "$ROOT"
say "ok: $(basename "$WHEEL") $(stat -c %s "$WHEEL") bytes"
