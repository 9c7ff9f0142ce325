#!/usr/bin/env bash
# Mutation testing of the Python layers above the ops (mutmut): mutate a file, run the tests
# that should notice, list the mutants that survive. Slow, so not part of `make test`.
#   scripts/mutation.sh                      every default target (long: hours on 2 cores)
#   scripts/mutation.sh mixkv/hf/headwise.py  one file, with its tests from the table below
#   TESTS="tests/a.py tests/b.py" scripts/mutation.sh mixkv/hf/patch.py   other tests
# Runs in a scratch copy (build/mutation) so the tree is never mutated; prints the survivors and
# the score (killed / (killed + survived)). MAX_CHILDREN sets the parallel workers; SCRATCH another
# scratch folder, for a second run at the same time; RESUME=1 continues an interrupted run of the
# same sources (mutmut skips the mutants it already decided), e.g. runner.py's hours over sessions.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -c "import mutmut" 2>/dev/null || "$PY" -m pip install --quiet --disable-pip-version-check "mutmut>=3.3,<4"

EVAL_TESTS="tests/eval/test_eval_report_files.py tests/eval/test_eval_report_golden.py tests/eval/test_eval_records.py tests/eval/test_eval_runner_inputs.py tests/eval/test_eval_engine.py tests/eval/test_eval_resume.py tests/eval/test_eval_regimes.py tests/eval/test_eval_decode.py tests/eval/test_eval_corpus.py tests/eval/test_eval_packaged.py"
tests_for() {
  case "$1" in
    mixkv/hf/headwise.py) echo "tests/hf/test_hf_headwise_cache.py tests/hf/test_hf_differential.py tests/hf/test_hf_patch.py" ;;
    mixkv/hf/layers.py) echo "tests/hf/test_hf_layers.py tests/hf/test_hf_patch.py tests/hf/test_hf_differential.py tests/hf/test_hf_model_inputs.py tests/hf/test_hf_architectures.py tests/methods/test_methods.py" ;;
    mixkv/hf/capture.py) echo "tests/hf/test_hf_capture.py tests/hf/test_hf_patch.py tests/hf/test_hf_differential.py tests/hf/test_hf_model_inputs.py tests/hf/test_hf_architectures.py tests/methods/test_methods.py" ;;
    mixkv/hf/patch.py) echo "tests/hf/test_hf_patch.py tests/hf/test_hf_differential.py tests/hf/test_hf_model_inputs.py tests/hf/test_hf_architectures.py tests/methods/test_methods.py tests/methods/test_kvzip.py tests/hf/test_hf_decode_compression.py tests/eval/test_eval_engine.py tests/test_kvpress_optional.py" ;;
    mixkv/hf/compressor.py) echo "tests/hf/test_hf_compressor.py tests/hf/test_hf_patch.py tests/hf/test_hf_differential.py tests/methods/test_methods.py tests/methods/test_global_policy.py tests/methods/test_kvzap.py tests/hf/test_hf_decode_compression.py" ;;
    mixkv/hf/decode.py) echo "tests/hf/test_hf_decode_compression.py tests/eval/test_eval_decode.py tests/methods/test_kvzip.py" ;;  # kvzip: the refusal
    mixkv/eval/engine.py) echo "$EVAL_TESTS" ;;
    mixkv/eval/runner.py) echo "$EVAL_TESTS tests/methods/test_methods.py" ;;  # import_plugins
    mixkv/eval/report.py|mixkv/eval/records.py) echo "$EVAL_TESTS" ;;
    *) echo "tests" ;;
  esac
}

TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(mixkv/hf/headwise.py mixkv/hf/layers.py mixkv/hf/capture.py mixkv/hf/patch.py
                                     mixkv/hf/compressor.py mixkv/hf/decode.py mixkv/eval/engine.py mixkv/eval/runner.py)
SCRATCH_ROOT=${SCRATCH:-build/mutation}  # one scratch root per concurrent run
# mutmut forks one child per mutant from a process that has run torch: with OpenMP worker
# threads alive in the parent, a forked child's first parallel op deadlocks (libgomp is not
# fork-safe). One thread per process avoids the pool; MAX_CHILDREN gives the parallelism.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
for target in "${TARGETS[@]}"; do
  selection=${TESTS:-$(tests_for "$target")}
  SCRATCH="$SCRATCH_ROOT/$(basename "$target" .py)"
  [ "${RESUME:-0}" = 1 ] || rm -rf "$SCRATCH"
  mkdir -p "$SCRATCH"
  # The tracked tree plus the built op library; mutmut copies it again into mutants/.
  git ls-files -z | xargs -0 cp --parents -t "$SCRATCH"
  cp mixkv/_C*.so "$SCRATCH/mixkv/"
  rm -f "$SCRATCH/pyproject.toml"  # its [tool.*] sections are not mutmut's; setup.cfg is
  {  # list options: one item per (indented) line
    echo "[mutmut]"
    echo "source_paths = mixkv/"
    echo "only_mutate = $target"
    echo "also_copy = mixkv/"
    # mutmut's timeout is a CPU-time limit scaled from the clean run; torch's threads and
    # import cost make short tests exceed it (SIGXCPU), so give every mutant a fixed margin.
    echo "timeout_constant = 60"
    printf 'pytest_add_cli_args =\n  -p\n  no:cacheprovider\n'
    echo "pytest_add_cli_args_test_selection ="
    for t in $selection; do echo "  $t"; done
  } > "$SCRATCH/setup.cfg"
  echo "== mutmut: $target against $selection"
  (cd "$SCRATCH" && "$PY" -m mutmut run --max-children "${MAX_CHILDREN:-2}" >/dev/null 2>&1 || true
   "$PY" -m mutmut results --all true > results.txt || true)
  killed=$(grep -c ": killed$" "$SCRATCH/results.txt" || true)
  survived=$(grep -c ": survived$" "$SCRATCH/results.txt" || true)
  other=$(grep -vc ": killed$\|: survived$" "$SCRATCH/results.txt" || true)
  echo "killed $killed, survived $survived, other (timeout, not checked, ...) $other"
  [ $((killed + survived)) -gt 0 ] && echo "score $(( 100 * killed / (killed + survived) ))%"
  { grep ": survived$" "$SCRATCH/results.txt" || true; } | sed 's/: survived$//' | while read -r name; do
    echo "-- survivor $name"
    (cd "$SCRATCH" && "$PY" -m mutmut show "$name" | grep '^[-+][^-+]' || true)
  done
  cp "$SCRATCH/results.txt" "build/mutation-$(basename "$target" .py).txt"
done
