"""Engines, reference runs and fixtures of the vLLM plugin's tests (scripts/vllm_test.sh runs
them in .venv-vllm). Not a conftest.py: every folder may have a conftest.py of its own.
Imported before vLLM, since the environment it sets is read when vLLM loads.

One process holds every engine (VLLM_ENABLE_V1_MULTIPROCESSING=0): a tiny random GQA Llama
(head_dim 32, 2 layers, vocab 256) saved without a tokenizer, token-id prompts, a 16-block pool
of 32-token blocks, float32, eager. The plugin is registered by the ``plugin`` fixture, after
the vanilla reference run (``vanilla``): vLLM's backend override is process-wide.
"""

import mixkv.vllm

mixkv.vllm.offline_environment()        # before vLLM loads; the tests' pools are overridden

import functools  # noqa: E402
import gc  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

PROMPT_LENGTHS = (7, 40, 75, 150)   # 1, 2, 3 and 5 blocks of 32 tokens
MAX_TOKENS = 8
BLOCK = 32
NUM_BLOCKS = 16


_ONCE = {}


def once(fixture):
    """One value per process: each test module that imports these fixtures gets its own
    session-scoped definition from pytest, and ``vanilla`` must run only once, before the
    plugin is registered."""
    @functools.wraps(fixture)
    def wrapper(*args, **kwargs):
        if fixture.__name__ not in _ONCE:
            _ONCE[fixture.__name__] = fixture(*args, **kwargs)
        return _ONCE[fixture.__name__]
    return wrapper


@pytest.fixture(scope="session")
@once
def model_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, num_hidden_layers=2, vocab_size=256, max_position_embeddings=512,
        rms_norm_eps=1e-6, initializer_range=0.1,        # peaked logits: no greedy near-ties
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
@once
def prompts():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, 256, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


ENGINE_ARGS = dict(skip_tokenizer_init=True, enforce_eager=True, dtype="float32",
                   block_size=BLOCK, num_gpu_blocks_override=NUM_BLOCKS, max_model_len=256,
                   max_num_seqs=4, max_num_batched_tokens=256, enable_prefix_caching=False,
                   enable_chunked_prefill=False, seed=0, disable_log_stats=True)


def make_llm(folder, **overrides):
    from vllm import LLM

    return LLM(model=folder, **{**ENGINE_ARGS, **overrides})


def scheduler_manager(llm):
    core = llm.llm_engine.engine_core.engine_core          # InprocClient -> EngineCore
    (manager,) = core.scheduler.kv_cache_manager.coordinator.single_type_managers
    return manager


def generate(llm, prompts):
    """Greedy tokens and their logprobs per prompt, all prompts in one batch."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=1, ignore_eos=True,
                            detokenize=False)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                        use_tqdm=False)
    results = []
    for out in outs:
        c = out.outputs[0]
        results.append((list(c.token_ids),
                        [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)]))
    return results


def with_engine(folder, use, **overrides):
    """``use(llm)`` on a fresh engine, which is gone when this returns: an engine collected
    later would tear down vLLM's process-wide state under the next one."""
    llm = make_llm(folder, **overrides)
    try:
        return use(llm)
    finally:
        del llm
        gc.collect()


@pytest.fixture(scope="session")
@once
def vanilla(model_dir, prompts):
    """vLLM without the plugin: must run before ``plugin`` registers it in this process."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    assert "mixkv" not in AttentionBackendEnum.CPU_ATTN.get_path(), \
        "the plugin was registered before the vanilla reference run"
    return with_engine(model_dir, lambda llm: generate(llm, prompts))


@pytest.fixture(scope="session")
@once
def plugin(vanilla):
    import mixkv.vllm

    mixkv.vllm.register()
    return mixkv.vllm


def load_hf(folder):
    """The saved model in HF (float32, sdpa), generating as vLLM does with ignore_eos."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    model.generation_config.eos_token_id = None
    return model


@pytest.fixture(scope="session")
@once
def hf_model(model_dir):
    return load_hf(model_dir)


def hf_generate(model, prompts, **method):
    """mixkv.patch + generate, one prompt at a time: greedy tokens and their logprobs."""
    import mixkv

    results = []
    with torch.no_grad(), mixkv.patch(model, **method):
        for ids in prompts:
            out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True,
                                 pad_token_id=0)
            tokens = out.sequences[0, len(ids):].tolist()
            results.append((tokens, [torch.log_softmax(step[0].float(), -1)[t].item()
                                     for step, t in zip(out.logits, tokens)]))
    return results


def hf_resumed(model, prompt, generated, steps, **method):
    """What the plugin computes for a request preempted after the tokens ``generated`` and
    resumed: one full-attention forward over prompt + generated (its last logits give the next
    token); the prompt's part of that cache compressed from the prompt's own last window
    queries (mixkv.patch's compress_cache), the generated tokens' K/V kept after it; then greedy
    decoding at true positions. Returns the ``steps`` greedy tokens after ``generated``."""
    import mixkv
    from mixkv.hf.capture import capture_prefill
    from transformers import DynamicCache

    n, k = len(prompt), len(generated)
    with torch.no_grad(), mixkv.patch(model, **method) as patched:
        window = patched.method.window
    with torch.no_grad():
        with capture_prefill(model, window + k) as captured:     # unpatched: full attention
            out = model(torch.tensor([prompt + generated]), use_cache=True,
                        past_key_values=DynamicCache(config=model.config))
        cache = out.past_key_values
        tails = [(layer.keys[:, :, n:].clone(), layer.values[:, :, n:].clone())
                 for layer in cache.layers]
        cache.crop(n)
        with mixkv.patch(model, **method) as patched:
            patched.compress_cache(cache, {i: q[..., :window, :]
                                           for i, q in captured.queries.items()})
            for layer, (keys, values) in zip(cache.layers, tails):
                layer.keys = torch.cat([layer.keys, keys], -2)
                layer.values = torch.cat([layer.values, values], -2)
            tokens = [int(out.logits[0, -1].argmax())]
            for i in range(steps - 1):
                p = n + k + i
                logits = model(torch.tensor([[tokens[-1]]]), position_ids=torch.tensor([[p]]),
                               cache_position=torch.tensor([p]), past_key_values=cache,
                               use_cache=True).logits
                tokens.append(int(logits[0, -1].argmax()))
    return tokens
