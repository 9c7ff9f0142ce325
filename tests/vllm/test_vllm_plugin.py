"""mixkv.vllm inside vLLM 0.32 (CPU): inert without its setting, mixkv.patch's greedy outputs
with it (several methods, batched prompts of different lengths), leading blocks freed, and
every refusal's message."""

# First: it sets the environment vLLM and torch.compile read when they load.
from vllm_engine import (BLOCK, MAX_TOKENS, PROMPT_LENGTHS, generate, hf_generate,  # isort: skip
                         hf_resumed, make_llm, scheduler_manager, with_engine)
from vllm_engine import hf_model, model_dir, plugin, prompts, vanilla  # noqa: F401 (fixtures)

import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import types  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from mixkv.vllm.config import MixKVConfig, kept_tokens, plan, refusal  # noqa: E402
from mixkv.methods import Scorer, register_scorer  # noqa: E402

LOGPROB_TOL = 1e-4
ROOT = Path(__file__).resolve().parents[2]


def test_import_mixkv_never_needs_vllm():
    """mixkv does not import mixkv.vllm, and mixkv.vllm imports without vLLM."""
    code = ("import sys; sys.modules['vllm'] = None\n"
            "import mixkv; assert 'mixkv.vllm' not in sys.modules\n"
            "import mixkv.vllm, mixkv.vllm.config, mixkv.vllm.compress\n"
            "assert sys.modules['vllm'] is None\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_entry_point_declared():
    text = (ROOT / "pyproject.toml").read_text()
    assert '[project.entry-points."vllm.general_plugins"]\nmixkv = "mixkv.vllm:register"' in text


def test_plugin_inactive_is_vanilla(model_dir, prompts, vanilla, plugin):
    """Registered but not configured: the same tokens and bit-equal logprobs, vLLM's spec and
    manager, the override backend serving as plain CPU attention."""
    from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager

    def use(llm):
        assert type(scheduler_manager(llm)) is FullAttentionManager
        return generate(llm, prompts)

    for extra in ({}, {"additional_config": {"other": 1}}):
        assert with_engine(model_dir, use, **extra) == vanilla


def run_plugin(model_dir, prompts, monkeypatch, **setting):
    """Plugin run: outputs, blocks freed early, and kept positions per (layer, prompt length)."""
    import mixkv.vllm.compress as compress

    kept_positions = {}
    select = compress.select

    def recording_select(method, queries, keys, *args, layer, **kwargs):
        out = select(method, queries, keys, *args, layer=layer, **kwargs)
        kept_positions[(layer, keys.shape[0])] = out[2]
        return out

    monkeypatch.setattr(compress, "select", recording_select)
    def use(llm):
        manager = scheduler_manager(llm)
        assert type(manager).__name__ == "MixKVAttentionManager"
        results = generate(llm, prompts)
        pool = manager.block_pool
        assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1, "blocks leaked"
        return results, manager.freed_blocks

    results, freed = with_engine(model_dir, use, additional_config={"mixkv": setting})
    return results, freed, kept_positions


@register_scorer("vllm_test_value_norm")
class LargeValues(Scorer):
    """A user-registered scorer (not fused): keep the largest values."""

    def score(self, p):
        return p.values[:, :, :p.candidates].float().norm(dim=-1)


# method, its options, and whether heads keep different positions in some layer and prompt
CASES = [
    ("mixkv", dict(budget=24, window=8), True),
    ("snapkv", dict(ratio=0.5, window=8), True),
    ("knorm", dict(budget=24, window=8), True),
    ("streamingllm", dict(budget=24, window=8), False),
    ("tova", dict(budget=40, window=8), False),       # TOVA scores average the heads
    ("mixkv(tova)", dict(budget=24, window=8), True),
    ("keydiff", dict(budget=24, window=8, pool_kernel=1), True),
    ("vllm_test_value_norm", dict(budget=24, window=8), True),
]


@pytest.mark.parametrize("method,options,heads_differ", CASES,
                         ids=[c[0] for c in CASES])
def test_greedy_equals_mixkv_patch(model_dir, prompts, vanilla, plugin, hf_model, monkeypatch,
                                   method, options, heads_differ):
    got, freed, kept_positions = run_plugin(model_dir, prompts, monkeypatch, method=method,
                                            **options)
    want = hf_generate(hf_model, prompts, method=method, **options)
    kept = [kept_tokens(n, options.get("budget"), options.get("ratio"), options["window"])
            for n in PROMPT_LENGTHS]
    for n, k, (g_tokens, g_lp), (w_tokens, w_lp), (v_tokens, _) in zip(
            PROMPT_LENGTHS, kept, got, want, vanilla):
        assert g_tokens == w_tokens, f"prompt {n}: {g_tokens} != mixkv.patch's {w_tokens}"
        assert max(abs(a - b) for a, b in zip(g_lp, w_lp)) < LOGPROB_TOL, f"prompt {n}"
        assert len(g_tokens) == MAX_TOKENS
        if n <= k:       # nothing to drop: untouched, as vanilla
            assert g_tokens == v_tokens
            assert all(key[1] != n for key in kept_positions), f"prompt {n} was compressed"
    assert freed == sum(plan(n, k, BLOCK)[0] for n, k in zip(PROMPT_LENGTHS, kept) if n > k)
    compressed = {(layer, n) for layer, n in kept_positions}
    assert compressed == {(layer, n) for layer in (0, 1) for n, k in zip(PROMPT_LENGTHS, kept)
                          if n > k}
    differ = [key for key, pos in kept_positions.items()
              if not torch.equal(pos[0].sort().values, pos[1].sort().values)]
    assert bool(differ) == heads_differ, differ


def test_compression_changes_outputs_and_frees(model_dir, prompts, vanilla, plugin,
                                               monkeypatch):
    """The setting used in the docs: 4 blocks freed (1 for the 75-token prompt, 3 for the
    150-token one; 40 tokens drop 16 < a block), and the compressed outputs differ from the
    full cache's for the prompts that lost tokens."""
    got, freed, _ = run_plugin(model_dir, prompts, monkeypatch, method="mixkv", budget=24,
                               window=8)
    assert freed == 4
    assert got[0] == vanilla[0]                          # 7 tokens <= budget: untouched
    assert any(g[0] != v[0] for g, v in zip(got[1:], vanilla[1:]))


# ----------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("setting,message", [
    ({"method": "adakv", "budget": 64}, r"different budgets \(policy 'adakv'\).*uniform"),
    ({"method": "pyramidkv", "budget": 64}, r"different budgets \(policy 'pyramidkv'\)"),
    ({"method": "mixkv+adakv", "budget": 64}, r"'mixkv\+adakv' gives KV heads different"),
    ({"method": "snapkv", "base": "explicit", "budget": 64, "profile": [[1.0, 1.0]] * 2},
     r"policy 'explicit'"),
    ({"method": "expected_attention", "budget": 64}, r"hidden states"),
    ({"method": "kvzip", "budget": 64}, r"re-reads the\s+context"),
    ({"method": "mixkv", "budget": 64, "decode_budget": 32}, r"\['decode_budget'\].*not supported"),
    ({"method": "full"}, r"does not compress"),
    ({"method": "nosuch", "budget": 64}, r'additional_config\["mixkv"\].*nosuch'),
    ({"method": "mixkv", "budget": 8, "window": 8}, r"budget \(8\) must be larger than window"),
    ({"method": "mixkv"}, r"exactly one of budget="),
    ("mixkv", r"must be a dict"),
])
def test_method_refusals(setting, message):
    with pytest.raises(ValueError, match=message):
        MixKVConfig.from_additional({"mixkv": setting})


def fake_engine(**changes):
    """A stand-in for VllmConfig holding the fields refusal() reads, set as the plugin needs."""
    ns = types.SimpleNamespace
    cfg = ns(cache_config=ns(enable_prefix_caching=False, cache_dtype="auto"),
             scheduler_config=ns(enable_chunked_prefill=False, long_prefill_token_threshold=0),
             parallel_config=ns(tensor_parallel_size=1, pipeline_parallel_size=1,
                                decode_context_parallel_size=1),
             model_config=ns(get_sliding_window=lambda: None),
             speculative_config=None, kv_transfer_config=None)
    for path, value in changes.items():
        part, _, field = path.rpartition(".")
        setattr(getattr(cfg, part) if part else cfg, field, value)
    return cfg


@pytest.mark.parametrize("change,message", [
    ({"cache_config.enable_prefix_caching": True}, "enable_prefix_caching=False"),
    ({"scheduler_config.enable_chunked_prefill": True}, "enable_chunked_prefill=False"),
    ({"scheduler_config.long_prefill_token_threshold": 64}, "long_prefill_token_threshold"),
    ({"speculative_config": object()}, "speculative decoding"),
    ({"cache_config.cache_dtype": "fp8"}, "kv_cache_dtype='fp8'"),
    ({"kv_transfer_config": object()}, "kv_transfer_config"),
    ({"parallel_config.pipeline_parallel_size": 2}, "parallelism"),
    ({"parallel_config.decode_context_parallel_size": 2}, "parallelism"),
    ({"model_config.get_sliding_window": lambda: 64}, "sliding-window"),
])
def test_engine_refusals(change, message):
    assert refusal(fake_engine()) is None
    assert refusal(fake_engine(**{"parallel_config.tensor_parallel_size": 2})) is None
    why = refusal(fake_engine(**change))
    assert why is not None and message in why and 'additional_config["mixkv"]' in why


@pytest.mark.parametrize("overrides,message", [
    (dict(enable_prefix_caching=True), "enable_prefix_caching=False"),
    (dict(enable_chunked_prefill=True), "enable_chunked_prefill=False"),
    (dict(additional_config={"mixkv": {"method": "adakv", "budget": 64}}), "uniform"),
])
def test_engine_start_refused(model_dir, plugin, overrides, message):
    """The refusals fire while vLLM builds the engine's config, before a model is loaded."""
    overrides.setdefault("additional_config", {"mixkv": {"method": "mixkv", "budget": 64}})
    with pytest.raises(Exception, match=message):
        make_llm(model_dir, **overrides)


def test_version_check(monkeypatch):
    import vllm

    import mixkv.vllm.engine as engine

    monkeypatch.setattr(vllm, "__version__", "0.33.0")
    with pytest.raises(RuntimeError, match=r"supports vLLM 0\.32\.\* .*found vllm 0\.33\.0"):
        engine._check_version()


ENTRY_POINT_RUN = """
import json, sys
from vllm_engine import generate, make_llm
setting = {"method": "mixkv", "budget": 24, "window": 8}
llm = make_llm(sys.argv[1], additional_config={"mixkv": setting})
print("RESULT " + json.dumps(generate(llm, json.loads(sys.argv[2]))))
"""


def test_entry_point_in_separate_processes(model_dir, prompts, hf_model, tmp_path):
    """As installed: vLLM loads the plugin through its entry point in each of its processes
    (front end, engine core with the scheduler, worker); nothing calls register() here."""
    import json

    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1",
           "PYTHONPATH": entry_point_path(tmp_path)}
    run = subprocess.run([sys.executable, "-c", ENTRY_POINT_RUN, model_dir, json.dumps(prompts)],
                         env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stderr[-3000:]
    got = json.loads(lines[0][len("RESULT "):])
    want = hf_generate(hf_model, prompts, method="mixkv", budget=24, window=8)
    for n, (g_tokens, g_lp), (w_tokens, w_lp) in zip(PROMPT_LENGTHS, got, want):
        assert g_tokens == w_tokens, f"prompt {n}"
        assert max(abs(a - b) for a, b in zip(g_lp, w_lp)) < LOGPROB_TOL, f"prompt {n}"


TENSOR_PARALLEL_RUN = """
import json, sys
from vllm_engine import generate, make_llm, scheduler_manager
setting = {"method": sys.argv[3], "budget": 24, "window": 8}
llm = make_llm(sys.argv[1], additional_config={"mixkv": setting}, tensor_parallel_size=2,
               distributed_executor_backend="mp")
got = generate(llm, json.loads(sys.argv[2]))
print("RESULT " + json.dumps(dict(outputs=got, freed=scheduler_manager(llm).freed_blocks)))
"""


def entry_point_path(tmp_path):
    """A folder whose dist-info declares the plugin's entry point, as an installed mixkv does."""
    dist = tmp_path / "mixkv_entry-0.dist-info"
    dist.mkdir(exist_ok=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mixkv-entry\nVersion: 0\n")
    (dist / "entry_points.txt").write_text("[vllm.general_plugins]\nmixkv = mixkv.vllm:register\n")
    return os.pathsep.join([str(tmp_path), str(Path(__file__).parent), str(ROOT)])


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="two ranks need two CPUs to bind")
@pytest.mark.skipif("ATEN_CPU_CAPABILITY" in os.environ,
                    reason="the machine's own instruction set only: in CI's rerun of the whole "
                           "vLLM suite under ATEN_CPU_CAPABILITY=default a rank failed with "
                           "'index out of range in self' (it passes alone under that setting; "
                           "not yet explained, issue 27's note); the other reruns check the "
                           "selections, this test the process layout")
@pytest.mark.parametrize("method", ["mixkv", "knorm"])
def test_tensor_parallel_two_ranks(model_dir, prompts, hf_model, tmp_path, method):
    """tensor_parallel_size=2: each rank (a worker process loading the plugin through its entry
    point) holds one of the two KV heads and compresses it by the shared plan; the scheduler
    (in this process's engine core) frees the same blocks as with one rank, and the outputs are
    mixkv.patch's. vLLM's CPU build binds each rank's threads to cores: one core each here."""
    import json

    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_OMP_THREADS_BIND": "0|1",
           "PYTHONPATH": entry_point_path(tmp_path)}
    run = subprocess.run([sys.executable, "-c", TENSOR_PARALLEL_RUN, model_dir,
                          json.dumps(prompts), method],
                         env=env, capture_output=True, text=True, timeout=400)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stderr[-3000:]
    got = json.loads(lines[0][len("RESULT "):])
    assert got["freed"] == sum(plan(n, 24, BLOCK)[0] for n in PROMPT_LENGTHS if n > 24)
    want = hf_generate(hf_model, prompts, method=method, budget=24, window=8)
    for n, (g_tokens, g_lp), (w_tokens, w_lp) in zip(PROMPT_LENGTHS, got["outputs"], want):
        assert g_tokens == w_tokens, f"prompt {n}"
        assert max(abs(a - b) for a, b in zip(g_lp, w_lp)) < LOGPROB_TOL, f"prompt {n}"


def test_freed_blocks_admit_more_requests(model_dir, plugin, hf_model):
    """Four 150-token prompts, a pool of 7 usable 32-token blocks: each needs 5 blocks for its
    prefill, so vanilla vLLM runs them one at a time; compressed to 24 tokens a request keeps 2
    blocks, and the scheduler admits the next one beside it. Outputs stay mixkv.patch's."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    g = torch.Generator().manual_seed(2)
    long_prompts = [torch.randint(3, 256, (150,), generator=g).tolist() for _ in range(4)]

    def run(llm):
        engine, core = llm.llm_engine, llm.llm_engine.engine_core.engine_core
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=1,
                                ignore_eos=True, detokenize=False)
        for i, ids in enumerate(long_prompts):
            engine.add_request(str(i), TokensPrompt(prompt_token_ids=ids), params)
        most, outputs = 0, {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    c = out.outputs[0]
                    outputs[int(out.request_id)] = (
                        list(c.token_ids), [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)])
            most = max(most, len(core.scheduler.running))
        return most, [outputs[i] for i in range(len(long_prompts))]

    small = dict(num_gpu_blocks_override=8, max_model_len=160)
    setting = {"method": "mixkv", "budget": 24, "window": 8}
    most_vanilla, _ = with_engine(model_dir, run, **small)
    most, got = with_engine(model_dir, run, additional_config={"mixkv": setting}, **small)
    assert (most_vanilla, most) == (1, 2)
    want = hf_generate(hf_model, long_prompts, **setting)
    for (g_tokens, g_lp), (w_tokens, w_lp) in zip(got, want):
        assert g_tokens == w_tokens
        assert max(abs(a - b) for a, b in zip(g_lp, w_lp)) < LOGPROB_TOL


def test_preempted_requests_are_compressed_again(model_dir, plugin, hf_model):
    """A pool too small for four growing requests: vLLM preempts compressed ones, frees their
    blocks and later recomputes prompt + generated tokens in one step; the plugin compresses
    the prompt part again (the manager frees its leading blocks again) and moves the generated
    tokens after the kept ones. The run finishes without leaking blocks, and the request that is
    never preempted gives the tokens of an unpreempted run. (The others legitimately differ: the
    recomputed tokens attend the whole prompt, as in vLLM's own recompute.)"""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 256, (60,), generator=g).tolist() for _ in range(4)]

    def run(llm):
        engine, core = llm.llm_engine, llm.llm_engine.engine_core.engine_core
        params = SamplingParams(max_tokens=150, temperature=0.0, ignore_eos=True,
                                detokenize=False)
        for i, ids in enumerate(prompts):
            engine.add_request(str(i), TokensPrompt(prompt_token_ids=ids), params)
        outputs, preempted = {}, {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    outputs[int(out.request_id.split("-")[0])] = list(out.outputs[0].token_ids)
            for request in core.scheduler.running:
                preempted[request.request_id.split("-")[0]] = request.num_preemptions
        pool = scheduler_manager(llm).block_pool
        assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1, "blocks leaked"
        runner = core.model_executor.driver_worker.worker.model_runner
        resumed = {int(rid.split("-")[0]): k for rid, k in runner._mixkv_state.resumed}
        return [outputs[i] for i in range(4)], preempted, scheduler_manager(llm).freed_blocks, \
            resumed

    method = {"method": "mixkv", "budget": 24, "window": 8}
    setting = {"additional_config": {"mixkv": method}, "max_model_len": 224}
    roomy, none_preempted, freed_roomy, _ = with_engine(
        model_dir, run, num_gpu_blocks_override=64, **setting)
    tight, preempted, freed_tight, resumed = with_engine(
        model_dir, run, num_gpu_blocks_override=8, **setting)
    assert set(none_preempted.values()) == {0} and freed_roomy == 4
    assert max(preempted.values()) > 0 and freed_tight > freed_roomy and resumed
    assert all(len(tokens) == 150 for tokens in tight)
    for i, count in preempted.items():
        if count == 0:
            assert tight[int(i)] == roomy[int(i)]
    # Each resumed request from its last resume on: the tokens of that computation in HF.
    for i, k in resumed.items():
        want = hf_resumed(hf_model, prompts[i], tight[i][:k], 150 - k, **method)
        assert tight[i][k:] == want, f"request {i} resumed after {k} tokens"
