"""KVzap, the learned surrogate of KVzip (mixkv/methods/kvzap.py, mixkv/eval/kvzap_train.py): the
ridge fit recovers a known linear map, training fits what the teacher pass scored, scores are
exp(h W + b) and always finite, files round-trip and the shipped ones are found by fingerprint
and match the packaged models, errors name the option, every policy and mixer runs in the shim,
compress_cache and the evaluation, and at decode time the stored per-token scores follow the
cache through every compression (dense, head-wise, global) against a reference that keeps all
hidden states."""

import json
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
from transformers import DynamicCache  # noqa: E402

import mixkv  # noqa: E402
import mixkv.hf  # noqa: E402,F401
from mixkv import methods as M  # noqa: E402
from mixkv.eval import calibrate, kvzap_train  # noqa: E402
from mixkv.eval.models import EvalModel  # noqa: E402
from mixkv.hf import reconstruct  # noqa: E402
from mixkv.hf.model import compressed_layers  # noqa: E402
from mixkv.methods import kvzap  # noqa: E402

import hf_models  # noqa: E402
from helpers import exactly, torch_threads  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

W = 8
BUDGET = 24
CORPUS = Path(mixkv.__file__).parent / "eval" / "corpus"


def _exp_scores(weights, layer, hidden):
    """The scorer's definition, by hand: exp(clamp(h W + b, -69, 0)) as [B, Hkv, n]."""
    log = hidden.double() @ weights["weights"][layer].double() + weights["bias"][layer].double()
    return log.clamp(-69.0, 0.0).exp().transpose(1, 2).float()


def _tiny_em(model):
    return EvalModel(model=model, tokenizer=hf_models.CharTokenizer(), name="tiny",
                     source="config", load_seconds=0.0, fixes=[], stop_ids=[], adds_bos=False)


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    """Two short documents cut from the packaged corpus (character tokens: ~400 each)."""
    folder = tmp_path_factory.mktemp("texts")
    for name in ("caches.txt", "river_walk.txt"):
        (folder / name).write_text((CORPUS / name).read_text()[:420])
    return str(folder)


@pytest.fixture(scope="module")
def trained(texts):
    """A surrogate of the tiny Llama trained by the command's function (2 documents, the
    second held out), with its passages and the teacher's plan; one thread, as the tests
    that retrain it (a module fixture starts before the function's one_thread)."""
    model, _ = hf_models.llama()
    em = _tiny_em(model)
    passages = kvzap_train.corpus_passages(em, length=140, text_dir=texts)
    plan = kvzap_train.teacher_plan(em)
    with torch_threads(1):
        return model, passages, plan, kvzap_train.train(model, passages, plan, progress=False)


# -- the fit -----------------------------------------------------------------------------------

def test_ridge_recovers_a_known_linear_map_from_accumulated_equations():
    g = torch.Generator().manual_seed(0)
    n, d, k = 600, 12, 3
    scales = torch.logspace(-2, 3, d, dtype=torch.float64)     # features of very unlike scales
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * scales + 5.0
    w = torch.randn(d, k, generator=g, dtype=torch.float64) / scales[:, None]
    b = torch.tensor([-3.0, 0.5, 2.0], dtype=torch.float64)
    y = x @ w + b
    equations = kvzap_train.NormalEquations()
    for part in range(3):                                       # accumulated in pieces
        rows = slice(part * 200, (part + 1) * 200)
        equations.add(x[rows], y[rows])
    assert equations.count == n
    fit_w, fit_b = kvzap_train.ridge(equations.xtx, equations.xty, 1e-9)
    torch.testing.assert_close(fit_w, w, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(fit_b, b, rtol=1e-3, atol=1e-3)
    # the penalty shrinks every standardised weight, never the bias towards 0 alone
    shrunk_w, _ = kvzap_train.ridge(equations.xtx, equations.xty, 10.0)
    assert float((shrunk_w * scales[:, None]).norm()) < 0.5 * float((w * scales[:, None]).norm())
    with pytest.raises(ValueError, match="--kvzap-lambda must be >= 0, got -1"):
        kvzap_train.ridge(equations.xtx, equations.xty, -1.0)


def test_spearman_with_ties_and_reversals():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert kvzap_train.spearman(a, a * 10) == pytest.approx(1.0)
    assert kvzap_train.spearman(a, -a) == pytest.approx(-1.0)
    # ties take their average rank: ranks (0, 1.5, 1.5, 3) against (0, 1, 2, 3)
    tied = torch.tensor([0.0, 1.0, 1.0, 5.0])
    ra = torch.tensor([0.0, 1.5, 1.5, 3.0]) - 1.5
    rb = torch.tensor([0.0, 1.0, 2.0, 3.0]) - 1.5
    want = float((ra * rb).sum() / (ra.square().sum() * rb.square().sum()).sqrt())
    assert kvzap_train.spearman(tied, a) == pytest.approx(want)
    assert kvzap_train.spearman(torch.ones(4), a) != kvzap_train.spearman(torch.ones(4), a)


def test_training_fits_the_teachers_log_scores_from_the_captured_hidden_states(trained):
    model, passages, plan, result = trained
    documents = [d for d, _ in passages]
    assert documents[0] == "caches.txt" and documents[-1] == "river_walk.txt"
    assert all(len(ids) <= 140 for _, ids in passages) and len(passages) >= 4
    layers = compressed_layers(model)[2]
    # collect(): the teacher's pass over the prefill, +inf (kept) tokens left out
    doc, ids = passages[0]
    data = kvzap_train.collect(model, ids, plan, layers)
    batch = torch.tensor([ids])
    cache = DynamicCache(config=model.config)
    with mixkv.hf.capture_prefill(model, 1, hidden_states=True) as captured, torch.no_grad():
        model(input_ids=batch, use_cache=True, **{hf_models.cache_kwarg(): cache})
    teacher = reconstruct.reconstruction_scores(model, cache, input_ids=batch, layers=layers,
                                                **plan)
    for layer in layers:
        scored = torch.isfinite(teacher[layer][0]).all(0)
        x, y = data[layer]
        assert torch.equal(x, captured.hidden_states[layer][0][scored])
        torch.testing.assert_close(y, teacher[layer][0][:, scored].log().T)
    # train(): ridge on the training documents' rows, Spearman on the held-out one's
    train_rows = [kvzap_train.collect(model, i, plan, layers) for d, i in passages
                  if d != "river_walk.txt"]
    held = [kvzap_train.collect(model, i, plan, layers) for d, i in passages
            if d == "river_walk.txt"]
    assert result["holdout"] == "river_walk.txt" and result["layers"] == layers
    assert result["samples"] == sum(rows[layers[0]][0].shape[0] for rows in train_rows)
    for layer in layers:
        equations = kvzap_train.NormalEquations()
        for rows in train_rows:
            equations.add(*rows[layer])
        w, b = kvzap_train.ridge(equations.xtx, equations.xty, result["lam"])
        torch.testing.assert_close(result["weights"][layer], w.float())
        torch.testing.assert_close(result["bias"][layer], b.float())
        x = torch.cat([rows[layer][0] for rows in held])
        y = torch.cat([rows[layer][1] for rows in held])
        predicted = x.double() @ w + b
        for h in range(y.shape[1]):
            assert result["spearman"][layer, h] == pytest.approx(
                kvzap_train.spearman(predicted[:, h], y[:, h].double()))
    assert -1 <= result["spearman_mean"] <= 1
    # the same command (and thread count) gives the same weights
    again = kvzap_train.train(model, passages, plan, progress=False)
    assert torch.equal(again["weights"], result["weights"])
    assert torch.equal(again["bias"], result["bias"])


def test_training_refuses_a_holdout_that_is_not_a_document_or_leaves_nothing(trained):
    model, passages, plan, _ = trained
    with pytest.raises(ValueError, match="--kvzap-holdout 'nope' is not one of the documents"):
        kvzap_train.train(model, passages, plan, holdout="nope", progress=False)
    only = [p for p in passages if p[0] == "caches.txt"]
    with pytest.raises(ValueError, match="at least one passage outside the held-out"):
        kvzap_train.train(model, only, plan, holdout="caches.txt", progress=False)


# -- scores ------------------------------------------------------------------------------------

def _model_prefill(model, ids, layer=0, key_mask=None):
    cache = DynamicCache(config=model.config)
    with mixkv.hf.capture_prefill(model, W, hidden_states=True) as captured, torch.no_grad():
        model(input_ids=ids, attention_mask=None if key_mask is None else key_mask.long(),
              use_cache=True, **{hf_models.cache_kwarg(): cache})
    decoder, modules = mixkv.hf.find_attention_modules(model)
    return M.Prefill(queries=captured.queries[layer], keys=cache.layers[layer].keys,
                     values=cache.layers[layer].values, key_mask=key_mask, window=W,
                     layer=layer, num_layers=len(modules), scaling=modules[layer].scaling,
                     module=modules[layer], decoder=decoder,
                     hidden_states=captured.hidden_states[layer])


@pytest.mark.parametrize("layer", [0, 1])
def test_scores_are_exp_of_the_linear_map_and_zero_at_padding(layer):
    model, _ = hf_models.llama()
    weights = hf_models.kvzap_weights(model, seed=1)
    ids = torch.randint(2, hf_models.TEXT_VOCAB, (2, 40), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, :9] = False
    p = _model_prefill(model, ids, layer, mask)
    got = kvzap.KVzap(weights=weights).score(p)
    want = _exp_scores(weights, layer, p.hidden_states)[..., :p.candidates]
    want = torch.where(mask[:, None, :p.candidates], want, 0.0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)
    assert bool((got[1, :, :9] == 0).all()) and bool((got[0] > 0).all())
    assert len(set(got[0, 0].tolist())) > 20          # not a constant


def test_scores_are_always_finite_and_on_the_probability_scale():
    model, _ = hf_models.llama()
    p = _model_prefill(model, torch.randint(2, hf_models.TEXT_VOCAB, (1, 30)))
    for bias in (1e6, -1e6):
        weights = dict(hf_models.kvzap_weights(model), bias=torch.full((2, 2), bias))
        scores = kvzap.KVzap(weights=weights).score(p)
        assert bool(torch.isfinite(scores).all()) and bool((scores > 0).all())
        assert bool((scores <= 1).all())
    hidden = p.hidden_states.clone()
    hidden[0, 3] = float("nan")
    scores = kvzap.KVzap(weights=hf_models.kvzap_weights(model)).token_scores(hidden, 0,
                                                                               p.decoder)
    assert bool(torch.isfinite(scores).all())


# -- files, the shipped surrogates, errors -----------------------------------------------------

def test_file_round_trip_and_lookup_by_fingerprint(trained, tmp_path, monkeypatch):
    model, _, _, result = trained
    path = tmp_path / "tiny.kvzap.pt"
    torch.save(result, path)
    p = _model_prefill(model, torch.randint(2, hf_models.TEXT_VOCAB, (1, 30)), layer=1)
    by_dict = kvzap.KVzap(weights=result).score(p)
    assert torch.equal(kvzap.KVzap(weights=str(path)).score(p), by_dict)
    fingerprint = kvzap.fingerprint(model.config)
    assert fingerprint == result["fingerprint"] == "llama-h64-l2-kv2x16"
    monkeypatch.setattr(kvzap, "WEIGHTS_DIR", tmp_path)   # no file named by the fingerprint
    with pytest.raises(ValueError, match=exactly(
            "mixkv: kvzap has no shipped weights for this model (fingerprint "
            "llama-h64-l2-kv2x16; shipped: tiny.kvzap): train a surrogate with "
            "`mixkv-calibrate --kvzap --model PATH --out FILE` and pass weights=FILE")):
        kvzap.KVzap().score(p)
    path.rename(tmp_path / f"{fingerprint}.pt")           # now shipped for it
    assert torch.equal(kvzap.KVzap().score(p), by_dict)


def test_shipped_files_match_the_packaged_models_configs():
    """Without loading the models: the fingerprint of each packaged model's architecture (as
    its GGUF config converts) names a shipped file whose shapes and fitted layers fit it."""
    files = kvzap.shipped()
    smollm2 = dict(model_type="llama", hidden_size=576, num_hidden_layers=30,
                   num_attention_heads=9, num_key_value_heads=3, head_dim=64, layers=range(30))
    gemma3 = dict(model_type="gemma3_text", hidden_size=640, num_hidden_layers=18,
                  num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                  layers=[5, 11, 17])
    for spec in (smollm2, gemma3):
        config = type("Config", (), spec)
        name = kvzap.fingerprint(config)
        assert name in files, f"no shipped kvzap weights for {name}: {sorted(files)}"
        loaded = kvzap.load_weights(files[name])
        assert loaded["fingerprint"] == name
        assert tuple(loaded["weights"].shape) == (spec["num_hidden_layers"],
                                                 spec["hidden_size"],
                                                 spec["num_key_value_heads"])
        assert loaded["layers"] == list(spec["layers"])
        assert loaded["spearman_mean"] > 0.3 and files[name].stat().st_size < 400_000
        plan = loaded["teacher"]["plan"]   # KVzip's default setup taught it
        assert (plan["sinks"], plan["softmax"], plan["reread"], plan["chunk_size"]) == \
            ("prefix", "span", "context", 2000)


@pytest.mark.parametrize("weights,error,message", [
    ("/nonexistent/kvzap.pt", FileNotFoundError,
     "mixkv: kvzap weights file '/nonexistent/kvzap.pt' does not exist"),
    ({"weights": torch.zeros(2, 64, 2)}, ValueError,
     "mixkv: kvzap weights must be a file written by mixkv-calibrate --kvzap (or its dict, "
     "format 'mixkv-kvzap-linear'), got dict"),
    ("shape", ValueError, "mixkv: kvzap weights need 'weights' [layers, hidden, kv_heads] and "
     "'bias' [layers, kv_heads], got shapes (2, 64, 2) and (2, 3)"),
    ("layers", ValueError, "mixkv: kvzap weights' fitted 'layers' [0, 5] must be a non-empty "
     "list of layer indices below 2"),
    ("nan", ValueError, "mixkv: kvzap weights hold non-finite values")])
def test_bad_weights_are_refused_by_name(weights, error, message):
    good = hf_models.kvzap_weights(hf_models.llama()[0])
    weights = {"shape": dict(good, bias=torch.zeros(2, 3)), "layers": dict(good, layers=[0, 5]),
               "nan": dict(good, bias=torch.full((2, 2), float("nan")))}.get(
                   weights if isinstance(weights, str) else None, weights)
    with pytest.raises(error, match=exactly(message)):
        kvzap.KVzap(weights=weights)
    with pytest.raises(error, match=exactly(message)):
        mixkv.patch(hf_models.llama()[0], "mixkv(kvzap)+adakv", budget=BUDGET, weights=weights)


@pytest.mark.parametrize("sinks", [-1, True, 1.5, "prefix"])
def test_bad_sinks_are_refused_by_name(sinks):
    with pytest.raises(ValueError, match=exactly(
            f"mixkv: kvzap sinks must be an integer >= 0, got {sinks!r}")):
        M.resolve("kvzap", budget=BUDGET, sinks=sinks)


def test_weights_of_another_model_or_layer_are_refused():
    llama, _ = hf_models.llama()
    qwen, _ = hf_models.qwen2()   # the same sizes, another architecture
    ids = torch.randint(2, hf_models.TEXT_VOCAB, (1, 40))
    with pytest.raises(ValueError, match=exactly(
            "mixkv: kvzap weights were fitted for llama-h64-l2-kv2x16, but this model is "
            "qwen2-h64-l2-kv2x16; train a surrogate for it with `mixkv-calibrate --kvzap "
            "--model PATH --out FILE` and pass weights=FILE")):
        with mixkv.patch(qwen, "kvzap", budget=BUDGET, window=W,
                         weights=hf_models.kvzap_weights(llama)), torch.no_grad():
            qwen(input_ids=ids)
    gemma, _ = hf_models.gemma3()
    weights = hf_models.kvzap_weights(gemma)
    assert weights["layers"] == [1, 3]         # its full-attention layers
    p = _model_prefill(gemma, ids, layer=0)    # a sliding layer: the shim never asks
    with pytest.raises(ValueError, match=exactly(
            "mixkv: kvzap weights have no map for layer 0 (fitted layers: [1, 3])")):
        kvzap.KVzap(weights=weights).score(p)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with mixkv.patch(gemma, "kvzap+adakv", budget=BUDGET, window=W,
                         weights=weights) as handle, torch.no_grad():
            gemma.generate(ids, max_new_tokens=3, do_sample=False)
    assert sorted(handle.stats()["layers"]) == [1, 3]


# -- the shim, compress_cache, the evaluation --------------------------------------------------

LABELS = ["kvzap", "kvzap+adakv", "kvzap+pyramidkv", "kvzap+global", "mixkv(kvzap)",
          "mixkv(kvzap)+adakv", "mixkv(kvzap)+global"]


@pytest.mark.parametrize("label", LABELS)
def test_every_policy_and_mixer_in_patch_and_compress_cache(trained, label):
    model, _, _, weights = trained
    ids = torch.randint(2, hf_models.TEXT_VOCAB, (2, 60), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :15] = 0
    kw = hf_models.cache_kwarg()
    full = DynamicCache(config=model.config)
    with mixkv.hf.capture_prefill(model, W, hidden_states=True) as captured, torch.no_grad():
        model(input_ids=ids, attention_mask=mask, use_cache=True, **{kw: full})
    patched = DynamicCache(config=model.config)
    with mixkv.patch(model, label, budget=BUDGET, window=W, weights=weights) as handle:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, use_cache=True, **{kw: patched})
        out = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
        assert out.shape == (2, 63)
        handle.compress_cache(full, captured.queries, key_mask=mask.bool(),
                              hidden_states=captured.hidden_states)
    assert handle.method.label == label
    for got, want in zip(full.layers, patched.layers):
        assert [s.tolist() for s in hf_models.kept_keys(got)] == \
            [s.tolist() for s in hf_models.kept_keys(want)]
    total = sum(int(s["kept"].sum()) for s in handle.stats()["layers"].values())
    if "pyramidkv" not in label:
        assert total == 2 * 2 * 2 * BUDGET     # layers x rows x KV heads x budget
    if label == "kvzap":   # uniform: the sinks, the window and the top predicted scores
        original = _prefill_keys(model, ids, mask)
        C = 60 - W
        for layer in (0, 1):
            scores = _exp_scores(weights, layer, captured.hidden_states[layer])
            for b, first in ((0, 0), (1, 15)):
                for h in range(2):
                    row = scores[b, h, first:C].clone()
                    row[:4] = float("inf")                    # the 4 sinks
                    top = sorted((row.topk(BUDGET - W).indices + first).tolist())
                    want = original[layer][b, h][top + list(range(C, 60))]
                    assert torch.equal(patched.layers[layer].keys[b, h], want), (layer, b, h)


def _prefill_keys(model, ids, mask):
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, use_cache=True,
              **{hf_models.cache_kwarg(): cache})
    return [layer.keys for layer in cache.layers]


@pytest.mark.usefixtures("no_plots")
def test_evaluation_runs_kvzap_with_its_weights_and_records_them(tmp_path):
    from mixkv.eval.runner import RunConfig, load_records, run
    from hf_models import tiny_eval_model

    em = tiny_eval_model()
    path = tmp_path / "tiny.kvzap.pt"
    torch.save(hf_models.kvzap_weights(em.model), path)
    methods = ["snapkv", "kvzap", "mixkv(kvzap)+global", "kvzap+adakv"]
    config = RunConfig(tasks=["passkey"], lengths=[160], samples=1, methods=methods,
                       budgets=[24], window=W, out=str(tmp_path / "run"), progress=False,
                       quiet=True, kvzap_weights=str(path))
    summary = run(config, em=em)
    records = load_records(tmp_path / "run" / "results.jsonl")
    assert sorted({r["method"] for r in records}) == sorted(methods + ["full"])
    assert all(r["kv_ratio"] < 1 for r in records if r["method"] != "full")
    digests = {r["method"]: r["settings"].get("kvzap") for r in records}
    assert digests["snapkv"] is None and digests["full"] is None
    assert len({digests[m] for m in methods[1:]}) == 1 and digests["kvzap"]
    assert {(p["method"], p["base"]) for p in summary["paired"]} == set()
    # without weights and with none shipped for the tiny model: the scorer's own error
    bare = RunConfig(**{**config.__dict__, "out": str(tmp_path / "bare"), "kvzap_weights": None})
    with pytest.raises(ValueError, match="kvzap has no shipped weights for this model"):
        run(bare, em=em)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["config"][
        "kvzap_weights"] == str(path)


@pytest.mark.usefixtures("no_plots")
def test_evaluation_compresses_during_generation_with_kvzap(tmp_path):
    """mixkv-eval --corpus --decode-budget: kvzap and its global mix compress the teacher-forced
    continuation too (the engine prefills unpatched, compress_cache keeps the scores)."""
    from mixkv.eval.runner import RunConfig, load_records, run
    from helpers import document
    from hf_models import tiny_eval_model

    em = tiny_eval_model()
    path = tmp_path / "tiny.kvzap.pt"
    torch.save(hf_models.kvzap_weights(em.model), path)
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "d.txt").write_text(document(150))
    config = RunConfig(tasks=[], lengths=[200], samples=1, methods=["kvzap", "kvzap+global"],
                       budgets=[32], corpus=str(docs), continuation=60, window=W,
                       decode_budget=40, interval=10, out=str(tmp_path / "out"), progress=False,
                       quiet=True, kvzap_weights=str(path))
    run(config, em=em)
    rows = [r for r in load_records(tmp_path / "out" / "results.jsonl") if r["method"] != "full"]
    assert {r["method"] for r in rows} == {"kvzap", "kvzap+global"}
    assert all(r["decode_compressions"] > 0 and r["kl"] >= 0 for r in rows)


def test_calibrate_command_line_trains_and_saves(texts, tmp_path, capsys):
    model, _ = hf_models.llama()
    out = tmp_path / "w.pt"
    args = calibrate.parser().parse_args(["--kvzap", "--length", "140", "--text-dir", texts,
                                          "--out", str(out), "--no-progress", "--threads", "1",
                                          "--kvzap-lambda", "0.1"])
    result = calibrate.run(args, em=_tiny_em(model))
    assert result["weights"] == out and capsys.readouterr().out == f"kvzap weights: {out}\n"
    saved = kvzap.load_weights(out)
    assert saved["lam"] == 0.1 and saved["holdout"] == "river_walk.txt"
    assert saved["model"] == "tiny" and saved["length"] == 140 and saved["text"].startswith("dir:")
    assert set(saved["seconds"]) == {"teacher", "fit"}
    defaults = calibrate.parser().parse_args([])
    assert not defaults.kvzap and defaults.kvzap_lambda == kvzap_train.DEFAULT_LAMBDA


# -- decode time -------------------------------------------------------------------------------

class Reference:
    """Every hidden state and value vector each layer ever received (no compression), to
    recompute the score of any cached token: its value vector names its position."""

    def __init__(self, model):
        self.hidden, self.values, self.hooks = {}, {}, []
        decoder, modules = mixkv.hf.find_attention_modules(model)
        for m in modules:
            self.hooks.append(m.register_forward_pre_hook(self._hidden, with_kwargs=True))
            self.hooks.append(m.v_proj.register_forward_hook(self._value))
        self.modules = {m: m.layer_idx for m in modules}
        self.projections = {m.v_proj: m.layer_idx for m in modules}

    def _hidden(self, module, args, kwargs):
        hidden = mixkv.hf.capture.hidden_states_of(args, kwargs)
        self.hidden.setdefault(self.modules[module], []).append(hidden.detach().clone())

    def _value(self, module, args, output):
        self.values.setdefault(self.projections[module], []).append(output.detach().clone())

    def scores_of(self, weights, layer, values, Hkv):
        """[S, n] reference scores of a Prefill's value vectors [B', H', n, D] (S = B' H'
        segments; a segment row is (row, KV head) of the batch), nan where no recorded
        token has that value vector."""
        hidden = torch.cat(self.hidden[layer], 1)                       # [B, T, hidden]
        B, T = hidden.shape[:2]
        recorded = torch.cat(self.values[layer], 1).view(B, T, Hkv, -1)  # [B, T, Hkv, D]
        scores = _exp_scores(weights, layer, hidden)                    # [B, Hkv, T]
        flat = values.reshape(-1, values.shape[-2], values.shape[-1])   # [S, n, D]
        out = torch.full(flat.shape[:2], float("nan"))
        for s in range(flat.shape[0]):
            b, h = divmod(s, Hkv)
            match = (flat[s][:, None, :] == recorded[b, :, h][None]).all(-1)  # [n, T]
            found = match.any(-1)
            out[s, found] = scores[b, h][match.float().argmax(-1)][found]
        return out


@pytest.mark.parametrize("label", ["kvzap", "kvzap+adakv", "kvzap+global", "mixkv(kvzap)",
                                   "mixkv(kvzap)+pyramidkv"])
def test_decode_time_scores_follow_the_cache_through_every_compression(trained, label,
                                                                        monkeypatch):
    model, _, _, weights = trained
    seen = []
    original = kvzap.KVzap.score

    def spy(self, p):
        if p.token_scores is not None and p.hidden_states is None:    # a decode compression
            seen.append((p.layer, p.values.clone(), p.token_scores.clone(),
                         p.real_candidates().clone()))
        return original(self, p)

    monkeypatch.setattr(kvzap.KVzap, "score", spy)
    ids = torch.randint(2, hf_models.TEXT_VOCAB, (2, 40), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[1, :10] = 0
    reference = Reference(model)
    try:
        with mixkv.patch(model, label, budget=20, window=W, weights=weights, decode_budget=24,
                         interval=5) as handle:
            out = model.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False,
                                 return_dict_in_generate=True)
    finally:
        for hook in reference.hooks:
            hook.remove()
    assert out.sequences.shape == (2, 80) and handle.decoding.compressions >= 8
    assert len(seen) >= 8
    for layer, values, stored, real in seen:
        want = reference.scores_of(weights, layer, values, 2)
        stored = stored.reshape(want.shape)
        real = real.repeat_interleave(want.shape[0] // real.shape[0], 0)  # dense: per head
        C = real.shape[1]
        assert not bool(want[:, :C][real].isnan().any())      # every real token is one we fed
        torch.testing.assert_close(stored[:, :C][real], want[:, :C][real], rtol=1e-5, atol=1e-9)
    # after the last step the stored scores still have the cache's layout
    for idx, layer in enumerate(out.past_key_values.layers):
        tokens = int(layer.lengths.max()) if isinstance(layer, mixkv.hf.HeadwiseLayer) else \
            layer.keys.shape[-2]
        assert tuple(handle.decoding._scores[idx].shape) == (4, tokens)


def test_decode_time_still_refuses_other_hidden_state_scorers():
    model, _ = hf_models.llama()
    with pytest.raises(NotImplementedError, match=exactly(
            "mixkv: decode_budget does not support method 'mixkv(expected_attention)': its "
            "scorer reads the layers' hidden states, which decoding does not keep")):
        mixkv.patch(model, "mixkv(expected_attention)", budget=64, decode_budget=64)
    assert mixkv.patch(model, "mixkv(kvzap)", budget=64, decode_budget=64,
                       weights=hf_models.kvzap_weights(model)).decoding is not None
    mixkv.unpatch(model)


def test_a_cache_this_patch_did_not_prefill_is_refused_at_the_first_compression(trained):
    model, _, _, weights = trained
    ids = torch.randint(2, hf_models.TEXT_VOCAB, (1, 40))
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, use_cache=True, **{hf_models.cache_kwarg(): cache})
    with mixkv.patch(model, "kvzap", budget=20, window=W, weights=weights, decode_budget=24,
                     interval=2), torch.no_grad():
        with pytest.raises(RuntimeError, match="keeps a score per cached token, but layer 0 "
                                               r"has none for its \[2, \d+\] tokens"):
            for step in range(30):   # decode steps on a cache prefilled unpatched
                model(input_ids=ids[:, step:step + 1], position_ids=torch.tensor([[40 + step]]),
                      use_cache=True, **{hf_models.cache_kwarg(): cache})
