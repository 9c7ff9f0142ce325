"""The plugin's CUDA path (FlashAttention through vLLM's V1 model runner), as far as a CPU can
check it: vLLM's CPU build has no CUDA kernels, so the FlashAttention impl's compression runs
here with a stand-in for ``reshape_and_cache_flash`` that writes as the CUDA op does (token i of
the rows to ``slot_mapping[i]`` of the ``[blocks, block size, heads, D]`` cache views), and the
builder and the refusals are checked on their own. Unverified on a GPU (no GPU machine with
vLLM here): docs/vllm-plugin.md section 14."""

# First: it sets the environment vLLM and torch.compile read when they load.
import vllm_engine  # noqa: F401  # isort: skip
from vllm_engine import model_dir, prompts, vanilla  # noqa: F401,E402 (fixtures)

import dataclasses  # noqa: E402
import types  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from mixkv.vllm import compress  # noqa: E402
from mixkv.vllm.config import MixKVConfig, plan, refusal  # noqa: E402

BS, HQ, HKV, D = 32, 4, 2, 32


@pytest.fixture(scope="module")
def engine(vanilla):
    """The plugin's module; installing it registers the backends process-wide, so the vanilla
    reference run of the other test modules comes first."""
    import mixkv.vllm.engine as engine

    return engine


def flash_write(keys, values, key_cache, value_cache, slots, kv_cache_dtype, k_scale, v_scale):
    """What vLLM's CUDA reshape_and_cache_flash does for an unquantised cache."""
    assert kv_cache_dtype == "auto"
    for i, slot in enumerate(slots.tolist()):
        key_cache[slot // key_cache.shape[1], slot % key_cache.shape[1]] = keys[i]
        value_cache[slot // value_cache.shape[1], slot % value_cache.shape[1]] = values[i]


def flash_impl(engine):
    impl = object.__new__(engine.MixKVFlashImpl)   # FlashAttentionImpl.__init__ probes CUDA
    impl.sliding_window, impl.kv_sharing_target_layer_name = (-1, -1), None
    impl.scale, impl.head_size, impl.kv_cache_dtype = D ** -0.5, D, "auto"
    return impl


def test_flash_impl_writes_the_kept_rows_where_the_plan_puts_them(engine, monkeypatch):
    monkeypatch.setattr(engine.ops, "reshape_and_cache_flash", flash_write)
    config = MixKVConfig.from_additional({"mixkv": {"method": "mixkv", "budget": 24, "window": 8}})
    g = torch.Generator().manual_seed(0)
    # One step: a 150-token prompt (compressed), a decode row, a 20-token prompt (kept whole).
    lengths, rows = [150, 1, 20], [engine._Row("a", 150, 0, 150), engine._Row("b", 40, 40, 1),
                                   engine._Row("c", 20, 0, 20)]
    state = engine.WorkerState(config=config, num_layers=2, rows=rows)
    tokens = sum(lengths)
    query = torch.randn(tokens, HQ, D, generator=g)
    key, value = torch.randn(tokens, HKV, D, generator=g), torch.randn(tokens, HKV, D, generator=g)
    kv_cache = torch.zeros(16, HKV, BS, 2 * D)
    table = torch.tensor([[2, 5, 7, 9, 11], [3, 4, 0, 0, 0], [6, 0, 0, 0, 0]], dtype=torch.int32)
    meta = types.SimpleNamespace(query_start_loc=torch.tensor([0, 150, 151, 171]),
                                 block_table=table)
    layer = types.SimpleNamespace(layer_name="model.layers.1.self_attn.attn",
                                  _k_scale=torch.ones(()), _v_scale=torch.ones(()))
    flash_impl(engine)._compress(state, layer, query, key, value, kv_cache, meta)

    kept = config.kept(150)
    s, gap = plan(150, kept, BS)
    assert state.layouts == {"a": (s, gap, 150 - kept)}
    want_k, want_v, positions = compress.select(config.method, query[:150], key[:150],
                                                value[:150], kept, layer=1, num_layers=2,
                                                scale=D ** -0.5)
    assert len({tuple(p) for p in positions.tolist()}) > 1     # heads keep different tokens
    key_cache, value_cache = kv_cache.transpose(1, 2).split(D, dim=-1)
    block = int(table[0, s])           # s*BS + kept <= (s + 1)*BS here: one block holds them
    assert torch.equal(key_cache[block, :kept], want_k)
    assert torch.equal(value_cache[block, :kept], want_v)
    written = torch.zeros(16, dtype=torch.bool)
    written[block] = True
    assert not kv_cache[~written].any() and not key_cache[block, kept:].any()


def test_flash_builder_sees_the_shifted_rows(engine, monkeypatch):
    """MixKVFlashBuilder hands FlashAttention's builder the request's block-table row from
    block s and seq_len - (N - kept); rows of other requests are left as they are."""
    seen = {}
    monkeypatch.setattr(engine.FlashAttentionMetadataBuilder, "build",
                        lambda self, prefix, cm, fast_build=False: seen.setdefault("cm", cm))
    config = MixKVConfig.from_additional({"mixkv": {"method": "snapkv", "budget": 24,
                                                    "window": 8}})
    state = engine.WorkerState(config=config, num_layers=2,
                               rows=[engine._Row("b", 7, 7, 1), engine._Row("a", 150, 160, 1)],
                               layouts={"a": (3, 30, 126)})
    monkeypatch.setattr(engine, "_STEP", state)

    @dataclasses.dataclass
    class Common:
        seq_lens: torch.Tensor
        block_table_tensor: torch.Tensor

    cm = Common(torch.tensor([8, 161]), torch.tensor([[1, 0, 0, 0, 0, 0], [2, 5, 7, 9, 11, 12]]))
    builder = object.__new__(engine.MixKVFlashBuilder)
    builder.kv_cache_spec = object.__new__(engine.MixKVAttentionSpec)
    builder.build(0, cm)
    got = seen["cm"]
    assert got.seq_lens.tolist() == [8, 161 - 126]
    assert got.block_table_tensor[1, :3].tolist() == [9, 11, 12]
    assert got.block_table_tensor[0].tolist() == [1, 0, 0, 0, 0, 0]
    assert cm.seq_lens.tolist() == [8, 161]      # the runner's buffers are not touched
    assert engine.MixKVFlashBackend.get_builder_cls() is engine.MixKVFlashBuilder
    assert engine.MixKVFlashBackend.get_impl_cls() is engine.MixKVFlashImpl


def test_flash_attn_is_overridden_by_registration(engine):
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    engine.install()
    assert AttentionBackendEnum.FLASH_ATTN.get_path().endswith("engine.MixKVFlashBackend")


@pytest.mark.parametrize("v2,graphs,message", [
    (True, "NONE", "VLLM_USE_V2_MODEL_RUNNER=0"),
    (False, "FULL_AND_PIECEWISE", "enforce_eager=True"),
    (False, "FULL", "full CUDA graphs"),
])
def test_cuda_refusals(v2, graphs, message):
    from vllm.config.compilation import CUDAGraphMode

    ns = types.SimpleNamespace
    cfg = ns(cache_config=ns(enable_prefix_caching=False, cache_dtype="auto"),
             scheduler_config=ns(enable_chunked_prefill=False, long_prefill_token_threshold=0),
             parallel_config=ns(tensor_parallel_size=2, pipeline_parallel_size=1,
                                decode_context_parallel_size=1),
             model_config=ns(get_sliding_window=lambda: None), speculative_config=None,
             kv_transfer_config=None, use_v2_model_runner=v2,
             compilation_config=ns(cudagraph_mode=CUDAGraphMode[graphs]))
    assert refusal(cfg) is None                      # the CPU platform reads neither
    why = refusal(cfg, cuda=True)
    assert why is not None and message in why
    cfg.use_v2_model_runner, cfg.compilation_config.cudagraph_mode = False, CUDAGraphMode.PIECEWISE
    assert refusal(cfg, cuda=True) is None
