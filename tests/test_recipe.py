"""recipes/longlora_finetune.py on a tiny random llama (CPU): loss falls, held-out evaluation (changes
nothing in training, full attention), exact resume, merge, reload."""

import argparse
import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import longctx
from longctx import train

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/tiny/longlora_cpu.yaml"
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def load_recipe():
    spec = importlib.util.spec_from_file_location("longlora_finetune", ROOT / "recipes/longlora_finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    train.make_tiny(root / "base", root / "corpus.jsonl")
    return root


def finetune(tiny, out, *overrides):
    args = ["--config", str(CONFIG), "--no-wandb", f"output_dir={out}", f"model={tiny / 'base'}",
            f"data.corpus={tiny / 'corpus.jsonl'}", "make_tiny=null", "s2attn.enabled=false", *overrides]
    return load_recipe().main(args)


@pytest.fixture(scope="module")
def full_run(tiny):
    return finetune(tiny, tiny / "full")


def train_rows(run):
    return [r for r in run["log"] if "loss" in r]


def eval_rows(run):
    return [r for r in run["log"] if "heldout_ppl" in r]


def test_first_line_is_the_command():
    for path in ROOT.glob("configs/*/*longlora*.yaml"):
        first = path.read_text().splitlines()[0]
        assert first.startswith("# ") and str(path.relative_to(ROOT)) in first, path


def test_config_overrides_and_unknown_keys():
    cfg = train.load_config(CONFIG, ["train.steps=3", "data.holdout=[a, b]", "wandb=false", "rope.factor=2"])
    assert cfg["train"]["steps"] == 3 and cfg["data"]["holdout"] == ["a", "b"] and cfg["wandb"] is False
    assert cfg["rope"] == {"method": "linear", "factor": 2} and cfg["train"]["seed"] == 0
    with pytest.raises(ValueError, match="unknown config key 'train.stpes'"):
        train.load_config(CONFIG, ["train.stpes=3"])


def test_numbers_yaml_reads_as_strings():
    # YAML 1.1 reads 5e-5 (no dot) as a string; the first GPU run of this config crashed in AdamW on it
    assert train.load_config(CONFIG, ["train.lr=5e-5"])["train"]["lr"] == 5e-5
    assert train.load_config(CONFIG, ["train.steps=12"])["train"]["steps"] == 12
    with pytest.raises(ValueError, match="'train.lr' must be a number, got 'fast'"):
        train.load_config(CONFIG, ["train.lr=fast"])
    assert train.load_config(CONFIG, ["rope.factor=1e1"])["rope"]["factor"] == 10.0  # open sections too
    assert train.load_config(CONFIG, ["lora.alpha=1.5e1"])["lora"]["alpha"] == 15.0


@pytest.mark.parametrize("override,match", [
    ("train.checkpoint_every=0", "'train.checkpoint_every' must be an integer >= 1, got 0"),
    ("train.log_every=0", "'train.log_every' must be an integer >= 1"),
    ("train.micro_batch_size=0", "'train.micro_batch_size' must be an integer >= 1"),
    ("train.gradient_accumulation_steps=0", "'train.gradient_accumulation_steps' must be an integer >= 1"),
    ("train.steps=2.5", "'train.steps' must be an integer >= 1, got 2.5"),
    ("train.steps=true", "'train.steps' must be an integer >= 1, got True"),
    ("train.steps=-1", "'train.steps' must be an integer >= 1"),
    ("train.keep_checkpoints=-1", r"'train.keep_checkpoints' must be an integer >= 0 \(0: keep all\)"),
    ("train.betas=0.9", r"'train.betas' must be two numbers in \[0, 1\)"),
    ("train.global_batch_size=4e0", "'train.global_batch_size' must be null or an integer >= 1, got '4e0'"),
    ("data.seq_len=-5", "'data.seq_len' must be null"),
    ("target_length=true", "'target_length' must be an integer >= 2"),
    ("s2attn.enabled=maybe", "'s2attn.enabled' must be true, false or auto"),
    ("resume=maybe", "'resume' must be true or false"),
    ("lora.dropout=1", r"'lora.dropout' must be a number in \[0, 1\)"),
    ("train.mixed_precision=bf8", "'train.mixed_precision' must be auto, no, bf16 or fp16, got 'bf8'"),
    ("train.lr_scheduler=cosin", "'train.lr_scheduler' must be constant or cosine or linear, got 'cosin'"),
    ("dtype=bf61", "'dtype' must be null or one of bf16"),
    ("s2attn=[1]", "'s2attn' must be a mapping of options, false or null"),
    ("rope.method=dynamic_ntk", "'rope.method' must be a method for training .*dynamic_ntk is for inference only"),
    # a method that is no RoPE method trained (streaming) or failed after loading (s2attn) instead
    ("rope.method=streaming", r"'rope.method' must be a RoPE method for training \(abf, linear, ntk, pi, yarn\) or "
                              r"none, got 'streaming'"),
    ("rope.method=s2attn", "'rope.method' must be a RoPE method for training"),
    ("rope.method=lineer", "'rope.method' must be a RoPE method for training"),
    ("rope={method: none, factor: 4}", r"'rope' options \['factor'\] do nothing without a rope.method \(it is 'none'\)"),
    # a section that is no mapping crashed in check_config (TypeError: 'NoneType' object is not subscriptable)
    ("lora=null", "config key 'lora' must be a mapping of its settings"),
    ("train=5", "config key 'train' must be a mapping of its settings"),
    ("eval=5", "config key 'eval' must be a mapping of its settings, false or null"),
    # S2 in eval mode too: the held-out evaluation would not be full attention, the merged model not the trained one
    ("s2attn.train_only=false", "'s2attn.train_only' must be true"),
    # the method's options were checked only by longctx.apply, once the model had loaded (a TypeError/ValueError)
    ("rope.factr=4", r"config key 'rope': unknown option\(s\) 'factr' for method 'linear'; allowed options: "
                     r"layer_types, factor"),
    ("rope.factor=-2", "config key 'rope': option 'factor' must be a number > 0, got -2"),
    ("rope={method: abf}", r"config key 'rope': method 'abf' needs option\(s\): rope_theta"),
    ("s2attn.group_size_ration=0.25", r"config key 's2attn': unknown option\(s\) 'group_size_ration' for method "
                                      r"'s2attn'; allowed options: group_size_ratio, "),
    ("s2attn.backend=fast", "config key 's2attn': option 'backend' must be one of"),
])
def test_config_values_checked_before_loading(override, match):
    with pytest.raises(ValueError, match=match):
        train.load_config(CONFIG, [override])


def test_false_still_turns_make_tiny_and_the_rope_method_off():
    # both loaded before the sections were checked (the recipe skips a falsy make_tiny; rope_options reads a falsy
    # method as none), then were refused: such a config, or a checkpoint's run_config resumed with it, no longer loaded
    cfg = train.load_config(CONFIG, ["make_tiny=false", "rope.method=false"])
    assert cfg["make_tiny"] is False and train.rope_options(cfg, 32) is None
    with pytest.raises(ValueError, match=r"'rope' options \['factor'\] do nothing without a rope.method \(it is False"):
        train.load_config(CONFIG, ["rope={method: false, factor: 4}"])
    # s2attn off: its options stay unchecked (the experiments turn it off with s2attn.enabled=false on a config
    # that sets them)
    assert train.load_config(CONFIG, ["s2attn.enabled=false", "s2attn.group_size_ratio=0.25"])


def test_single_strings_where_lists_are_expected():
    cfg = train.load_config(CONFIG, ["data.holdout=Alpha", "lora.target_modules=q_proj", "lora.trainable=embed"])
    assert (cfg["data"]["holdout"], cfg["lora"]["target_modules"], cfg["lora"]["trainable"]) == \
        (["Alpha"], ["q_proj"], ["embed"])


def test_packing_and_holdout(tiny):
    model, tok = longctx.load_model(tiny / "base")
    docs = longctx.load_corpus(str(tiny / "corpus.jsonl"))
    kept = train.select_documents(docs, ["Held Out"])
    assert [d.name for d in kept] == ["Alpha", "Beta", "Gamma"]
    with pytest.raises(ValueError, match="'Emma'.*Alpha"):
        train.select_documents(docs, ["Emma"])
    seqs = train.pack_documents(tok, kept, 128)
    stream = seqs.flatten().tolist()
    n_first = len(tok(kept[0].text, add_special_tokens=False, verbose=False)["input_ids"])
    assert stream[n_first] == tok.eos_token_id and stream.count(tok.eos_token_id) == 2  # third EOS cut off
    assert seqs.shape == (sum(len(d.text) + 1 for d in kept) // 128, 128)
    # sample order: each epoch a permutation; processes never overlap
    n = len(seqs)
    seen = [i for step in range(n // 6 + 1) for rank in range(2) for i in train.sample_indices(n, step, rank, 2, 3, 0)]
    assert sorted(seen[:n]) == list(range(n)) and seen[:n] != list(range(n))


def test_loss_falls_and_artifact(full_run):
    losses = [row["loss"] for row in train_rows(full_run)]
    assert len(losses) == 20
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses
    # held-out perplexity (tiny config: every 5 steps, from step 0) falls too; the best model is kept
    evals = eval_rows(full_run)
    assert [r["step"] for r in evals] == [0, 5, 10, 15, 20]
    ppl = [r["heldout_ppl"]["128"] for r in evals]
    assert ppl[-1] < ppl[0] / 2, ppl
    assert all(r["heldout_tokens"] == {"128": 8 * 32} for r in evals)  # 1024 tokens: 8 windows, tail 32 each
    best = json.loads((full_run["artifact"].parent / "best/longctx.json").read_text())
    assert best["steps"] == evals[ppl.index(min(ppl))]["step"] and best["heldout_ppl"]["128"] == min(ppl)
    art = full_run["artifact"]
    assert sorted(p.name for p in art.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                   "longctx.json", "longctx_lora.json", "trainable.safetensors"]
    settings = json.loads((art / "longctx.json").read_text())
    assert settings["rope"] == {"method": "linear", "options": {"factor": 4, "layer_types": None}}
    assert settings["s2attn"] is None and settings["steps"] == 20
    assert "model.embed_tokens.weight" in load_file(art / "trainable.safetensors")
    model = full_run["model"].get_base_model()
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied embeddings stayed tied


def test_yaml_no_and_false_settings():
    # YAML 1.1 reads an unquoted no as false: mixed_precision: no means "no"; s2attn: false turns it off
    assert train.load_config(CONFIG, ["dtype=BF16"])["dtype"] == "BF16"  # as load_model: any case
    cfg = train.load_config(CONFIG, ["train.mixed_precision=no", "s2attn=false"])
    assert cfg["train"]["mixed_precision"] == "no" and cfg["s2attn"] == {"enabled": False}
    # abf: the merged config's context limit is the target length
    cfg = train.load_config(CONFIG, ["rope={method: abf, rope_theta: 40000}"])
    assert train.rope_options(cfg, 32) == ("abf", {"rope_theta": 40000, "max_position_embeddings": 128})


def test_logged_lr_is_the_steps_own(full_run):
    # warmup 2: steps 1, 2 run at 1/3 and 2/3 of lr, then lr (the scheduler's value before its step())
    assert [r["lr"] for r in train_rows(full_run)[:4]] == pytest.approx([5e-3 / 3, 1e-2 / 3, 5e-3, 5e-3])


def test_resume_refusals(tiny, full_run, tmp_path):
    # a rollback into the same output_dir (later checkpoints there would be taken as the newest), a checkpoint
    # written by another number of processes, and train.steps changed under a decaying schedule
    run = tmp_path / "run"
    shutil.copytree(tiny / "full", run)
    with pytest.raises(FileExistsError, match="checkpoints after step 10 .*step_000020"):
        finetune(tiny, run, f"resume_from={run / 'checkpoints/step_000010'}")
    state_file = run / "checkpoints/step_000020/trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["processes"] == 1
    state_file.write_text(json.dumps({**state, "processes": 2}))
    with pytest.raises(ValueError, match="written by 2 processes, this run has 1"):
        finetune(tiny, run, "resume=true", "train.steps=22")
    saved = train.load_config(CONFIG, ["train.lr_scheduler=cosine", "train.steps=6"])
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / train.RUN_CONFIG).write_text(json.dumps(saved, default=str))
    train.check_resume(tmp_path / "ck", train.load_config(CONFIG, ["train.lr_scheduler=cosine", "train.steps=6"]))
    with pytest.raises(ValueError, match=r"train.steps: 6 -> 10 \(the cosine schedule decays over train.steps\)"):
        train.check_resume(tmp_path / "ck", train.load_config(CONFIG, ["train.lr_scheduler=cosine", "train.steps=10"]))
    # train.steps below the checkpoint's step (constant schedule): nothing was trained, the artifact was the 20-step model
    state_file.write_text(json.dumps(state))
    with pytest.raises(ValueError, match=r"train.steps=15 is below the checkpoint's step 20"):
        finetune(tiny, run, "resume=true", "train.steps=15")


def test_resume_at_the_last_step_keeps_the_heldout_perplexity(tiny, full_run, tmp_path):
    # a run stopped after its last checkpoint (before or while writing final/): resumed there, it trains and
    # evaluates nothing more, and final/longctx.json lost the held-out perplexity the uninterrupted run recorded
    run = tmp_path / "run"
    shutil.copytree(tiny / "full", run)
    shutil.rmtree(run / "final")
    again = finetune(tiny, run, "resume=true")
    assert again["state"].step == 20 and train_rows(again) == train_rows(full_run)
    want = json.loads((full_run["artifact"] / "longctx.json").read_text())
    got = json.loads((again["artifact"] / "longctx.json").read_text())
    assert got["heldout_ppl"] == want["heldout_ppl"] == eval_rows(full_run)[-1]["heldout_ppl"]


def checkpoint(run_dir, step):
    folder = Path(run_dir) / "checkpoints" / f"step_{step:06d}"
    return load_file(folder / "model.safetensors"), torch.load(folder / "optimizer.bin", weights_only=False)


def assert_same(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    else:
        assert a == b


def test_resume_is_exact(tiny, full_run):
    resumed = finetune(tiny, tiny / "resumed", f"resume_from={tiny / 'full/checkpoints/step_000010'}")
    assert [r["step"] for r in train_rows(resumed)] == list(range(11, 21))
    assert [r["loss"] for r in train_rows(resumed)] == [r["loss"] for r in train_rows(full_run)[10:]]
    # no step-0 evaluation on resume; the held-out perplexities after it are those of the full run
    assert [(r["step"], r["heldout_ppl"]) for r in eval_rows(resumed)] == \
        [(r["step"], r["heldout_ppl"]) for r in eval_rows(full_run) if r["step"] > 10]
    weights, optim = checkpoint(tiny / "full", 20)
    weights2, optim2 = checkpoint(tiny / "resumed", 20)
    assert len(weights) == 16 + 5 + 1  # LoRA A/B of 4 projections in 2 layers, 5 norms, the embedding
    assert_same(weights, weights2)
    assert_same(optim, optim2)
    assert json.loads((tiny / "resumed/checkpoints/step_000020/trainer_state.json").read_text()) == \
        json.loads((tiny / "full/checkpoints/step_000020/trainer_state.json").read_text())
    with pytest.raises(FileExistsError, match="resume=true"):  # a fresh start never mixes with old checkpoints
        finetune(tiny, tiny / "resumed")
    more = finetune(tiny, tiny / "resumed", "resume=true", "train.steps=22")  # resume=true: the latest one
    assert [r["step"] for r in train_rows(more)] == list(range(11, 23)) and more["state"].step == 22
    assert [r["step"] for r in eval_rows(more)] == [15, 20, 22]  # the log up to step 20 kept, then the end
    # settings the optimizer state or the data depend on cannot change on resume (steps, eval, ... can)
    with pytest.raises(ValueError, match=r"resume: settings differ .*lora: .*'r': 8.* -> .*'r': 4.*; "
                                         r"train\.lr: 0\.005 -> 1\.0\. Resume"):
        finetune(tiny, tiny / "resumed", "resume=true", "train.lr=1.0", "lora.r=4")


def test_merge_cli_reloads_without_longctx(tiny, full_run):
    parser = argparse.ArgumentParser()
    train.add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["merge", str(full_run["artifact"]), "--out", str(tiny / "merged")])
    assert args.func(args) == 0
    config = json.loads((tiny / "merged/config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "linear" and config["rope_parameters"]["factor"] == 4
    assert config["max_position_embeddings"] == 128
    # plain transformers from here on
    merged = AutoModelForCausalLM.from_pretrained(tiny / "merged").eval()
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    ids = torch.randint(3, merged.config.vocab_size, (2, 128), generator=torch.Generator().manual_seed(0))
    trained = full_run["model"].eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, trained(ids).logits, atol=1e-5, rtol=0)
    bad = parser.parse_args(["merge", str(full_run["artifact"]), "--out", str(tiny / "nomerge"), "--dtype", "bf61"])
    with pytest.raises(SystemExit, match="--dtype must be one of bf16"):
        bad.func(bad)  # before loading anything
    assert not (tiny / "nomerge").exists()


@pytest.mark.skipif(not train.s2attn_available(), reason="the s2attn method is not available")
def test_with_s2attn(tiny):
    run = finetune(tiny, tiny / "s2attn", "s2attn.enabled=true", "train.steps=8", "train.checkpoint_every=100")
    losses = [r["loss"] for r in train_rows(run)]
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    settings = json.loads((run["artifact"] / "longctx.json").read_text())
    assert settings["s2attn"]["group_size_ratio"] == 0.25
    out = train.merge_artifact(run["artifact"], tiny / "s2attn-merged")
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(3, merged.config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # eval mode: full attention in both
        torch.testing.assert_close(merged(ids).logits, run["model"].eval()(ids).logits, atol=1e-5, rtol=0)


@pytest.mark.skipif(not train.s2attn_available(), reason="the s2attn method is not available")
def test_heldout_eval_changes_nothing_and_uses_full_attention(tiny):
    """Evaluation on (step 0, every 3, the end; best model saved) vs off: the same losses, bit for bit,
    and the same trained tensors and optimizer state (LoRA dropout on, so training draws random
    numbers: any drawn by the evaluation would show). The logged perplexity is full attention's."""
    common = ("s2attn.enabled=true", "train.steps=8", "train.checkpoint_every=100", "lora.dropout=0.1")
    on = finetune(tiny, tiny / "eval-on", *common, "eval.every=3", "eval.keep_best=true")
    off = finetune(tiny, tiny / "eval-off", *common, "eval.every=0")
    assert [r["step"] for r in eval_rows(on)] == [0, 3, 6, 8] and eval_rows(off) == []
    keys = ("step", "loss", "lr", "tokens")
    assert [[r[k] for k in keys] for r in train_rows(on)] == [[r[k] for k in keys] for r in train_rows(off)]
    assert_same(checkpoint(tiny / "eval-on", 8), checkpoint(tiny / "eval-off", 8))
    assert (tiny / "eval-on/best/adapter_model.safetensors").is_file() and not (tiny / "eval-off/best").exists()

    # the last logged perplexity, recomputed on the final model: with the S2 patch removed (full
    # attention) it is the same; with S2 forced on at inference (train_only=False) it is not
    from longctx.eval.perplexity import perplexity
    from longctx.registry import active_patches

    cfg = train.load_config(CONFIG, [f"data.corpus={tiny / 'corpus.jsonl'}"])
    ids = train.load_heldout(cfg, on["tokenizer"], train.eval_settings(cfg))
    model = on["model"].get_base_model().eval()
    logged = eval_rows(on)[-1]["heldout_ppl"]["128"]
    [s2] = [p for p in active_patches(model) if p.method == "s2attn"]
    s2.remove()
    full = perplexity(model, ids, [128], score="tail", progress=False)[128]["ppl"]
    assert full == pytest.approx(logged, rel=1e-6)
    with longctx.applied(model, "s2attn", group_size_ratio=0.25, train_only=False):
        sparse = perplexity(model, ids, [128], score="tail", progress=False)[128]["ppl"]
    assert abs(sparse - logged) > 1e-3 * logged


def test_eval_config_errors(tiny):
    def settings(*overrides):
        return train.eval_settings(train.load_config(CONFIG, list(overrides)))

    assert settings("eval.every=0") is None and settings("eval=false") is None
    s = settings("eval.lengths=null")
    assert s["lengths"] == [128] and s["every"] == 5  # null lengths: the target length
    for override, message in [("eval.every=-1", "eval.every must be an integer >= 0"),
                              ("eval.dtype=int8", "eval.dtype must be one of auto, bf16, fp16, fp32"),
                              ("eval.score=head", "eval.score must be one of tail, all"),
                              ("eval.max_tokens=64", "eval.max_tokens must be null or an integer >= .* \\(128\\)"),
                              ("eval.lengths=[1]", "eval.lengths must be a list of integers >= 2"),
                              ("data.holdout=[]", "data.holdout is empty")]:
        with pytest.raises(ValueError, match=message):
            settings(override)
    with pytest.raises(ValueError, match="unknown config key 'eval.evry'"):
        settings("eval.evry=3")
    cfg = train.load_config(CONFIG, [f"data.corpus={tiny / 'corpus.jsonl'}", "data.holdout=[Emma]"])
    with pytest.raises(ValueError, match="'Emma'.*Alpha"):
        train.load_heldout(cfg, None, train.eval_settings(cfg))


def test_compile_layers_trains_like_eager(tiny):
    """train.compile: the decoder layers' parts compiled (CPU inductor), S2 attention outside the graphs:
    the same losses as eager, within float tolerance, and the compiled graphs were really used."""
    import torch._dynamo.utils

    steps = ("train.steps=3", "train.checkpoint_every=100", "s2attn.enabled=true")
    eager = [r["loss"] for r in train_rows(finetune(tiny, tiny / "eager", *steps))]
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    run = None
    try:
        run = finetune(tiny, tiny / "compiled", *steps, "train.compile={}")  # {}: on, default arguments
        compiled = [r["loss"] for r in train_rows(run)]
        assert counters["stats"]["unique_graphs"] >= 3  # attention (split at S2), MLP, norm
        assert counters["frames"]["total"] == counters["frames"]["ok"]  # no frame fell back to eager
        # S2's attention runs outside the graphs, by design: the graph breaks there
        assert any("disable" in str(reason) for reason in counters["graph_break"]), dict(counters["graph_break"])
        assert compiled == pytest.approx(eager, rel=1e-4, abs=1e-5)
        parts = [p for layer in run["model"].get_base_model().model.layers for p in layer.children()]
        assert parts and all(p._compiled_call_impl is None for p in parts)  # returned uncompiled
    finally:
        if run is not None:
            train.uncompile_layers(run["model"])
        torch._dynamo.reset()


def test_compile_scope_layer(tiny):
    """train.compile_scope=layer: each decoder layer one graph (no graph break with full attention), the same
    losses as eager; with S2's general path (sdpa on CPU) the graph breaks inside the layer, and where
    transformers checkpoints inside the layer's forward (the layer then runs eagerly) the recipe warns."""
    import warnings

    import torch._dynamo.utils

    from longctx.utils import _decoder_layers

    steps = ("train.steps=2", "train.checkpoint_every=100", "eval.every=0")
    eager = [r["loss"] for r in train_rows(finetune(tiny, tiny / "eager_layer", *steps))]
    counters = torch._dynamo.utils.counters
    runs = []
    try:
        torch._dynamo.reset()
        counters.clear()
        runs.append(finetune(tiny, tiny / "compiled_layer", *steps, "train.compile={}", "train.compile_scope=layer"))
        assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]
        assert counters["frames"]["total"] == counters["frames"]["ok"] > 0
        assert [r["loss"] for r in train_rows(runs[-1])] == pytest.approx(eager, rel=1e-4, abs=1e-5)
        torch._dynamo.reset()
        counters.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            runs.append(finetune(tiny, tiny / "compiled_layer_s2", *steps, "s2attn.enabled=true", "train.compile={}",
                                 "train.compile_scope=layer"))
        inside = train.checkpoints_inside_forward(_decoder_layers(runs[-1]["model"])[0])
        warned = [w for w in caught if "train.compile_scope 'layer'" in str(w.message)]
        # where the checkpoint is traced into the layer's graph, the break leaves no graph at all (dynamo runs the
        # layers eagerly), and only there the recipe warns
        assert counters["graph_break"] and inside == (counters["stats"]["unique_graphs"] == 0)
        assert len(warned) == int(inside)
    finally:
        for run in runs:
            train.uncompile_layers(run["model"])
        torch._dynamo.reset()


def test_compile_setting_checked_before_loading():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    def cfg(value):
        return {"train": {"compile": value}}

    assert train.compile_setting(cfg(False)) is None and train.compile_setting(cfg(None)) is None
    assert train.compile_setting(cfg(True)) == {} and train.compile_setting(cfg({})) == {}
    assert train.compile_setting(cfg({"mode": "max-autotune-no-cudagraphs"})) == {"mode": "max-autotune-no-cudagraphs"}
    with pytest.raises(TypeError, match=r"compile \(train.compile\) must be true, false or a dict"):
        train.compile_setting(cfg("yes"))
    with pytest.raises(ValueError, match="mode 'reduce-overhead' captures CUDA graphs"):
        train.compile_setting(cfg({"mode": "reduce-overhead"}))
    with pytest.raises(ValueError, match=r"unknown torch.compile arguments \['bogus'\]; allowed: fullgraph, dynamic"):
        train.compile_setting(cfg({"bogus": 1}))
    with pytest.raises(ValueError, match="unknown mode 'bogus'; allowed modes: 'default'"):
        train.compile_setting(cfg({"mode": "bogus"}))
    with pytest.raises(ValueError, match="train.compile_scope must be one of 'parts', 'layer', got 'whole'"):
        train.compile_setting({"train": {"compile": True, "compile_scope": "whole"}})
    with pytest.raises(ValueError, match="train.compile is supported on one GPU and with DDP"):
        train.compile_setting(cfg(True), SimpleNamespace(distributed_type=DistributedType.FSDP))
    assert train.compile_setting(cfg(True), SimpleNamespace(distributed_type=DistributedType.MULTI_GPU)) == {}
    plain = torch.nn.Linear(2, 2)
    plain.config = None  # a "model" without transformers decoder layers: nothing to compile is an error
    with pytest.raises(ValueError, match="has no decoder layers to compile"):
        train.compile_layers(plain)
    with pytest.raises(TypeError, match=r"compile \(train.compile\) must be true, false or a dict"):
        load_recipe().main(["--config", str(CONFIG), "--no-wandb", "train.compile=fast"])


def test_manual_gc():
    """train.gc_every: automatic collection off inside the block, a full one every N steps, the previous
    state restored afterwards; 0 leaves Python's automatic GC alone."""
    import gc

    full, young = [], []

    def count(phase, info):
        if phase == "stop":
            (full if info["generation"] == 2 else young).append(1)

    gc.callbacks.append(count)
    try:
        assert gc.isenabled()
        with train.ManualGC(3) as collector:
            assert not gc.isenabled()
            full.clear()
            young.clear()
            for step in range(1, 10):
                collector.step(step)
            assert len(full) == 3 and len(young) == 6  # all at steps 3, 6, 9; the young ones at the others
        assert gc.isenabled()
        with train.ManualGC(0) as collector:
            assert gc.isenabled()
            collector.step(1)
        with pytest.raises(KeyError), train.ManualGC(5):  # an error inside: the collector comes back on
            raise KeyError("x")
        assert gc.isenabled()
        gc.disable()  # the caller had it off: it stays off, the manual collections still run
        full.clear()
        with train.ManualGC(2) as collector:
            collector.step(2)
        assert not gc.isenabled() and len(full) == 2  # on entry and at step 2
        gc.enable()
        once = train.ManualGC(3)
        with once, pytest.raises(RuntimeError, match="not reentrant"):
            with once:
                pass
        assert gc.isenabled()
    finally:
        gc.callbacks.remove(count)
        gc.enable()
    for bad in (-1, 1.5, True, "50"):
        with pytest.raises(ValueError, match="train.gc_every must be an integer >= 0"):
            train.ManualGC(bad)


def test_model_device_and_trainable_dtype_per_distributed_type():
    # run on 2 GPUs in experiments/multigpu_tiny: ZeRO-3 partitions the weights while loading, on the GPU (moving
    # them to the CPU made DeepSpeed gather them there); ZeRO-3 with bf16 needs the trained tensors in bf16
    from types import SimpleNamespace

    from accelerate.utils import DistributedType as D

    def acc(kind, precision="bf16", stage=2):
        return SimpleNamespace(distributed_type=kind, mixed_precision=precision, device=torch.device("cuda", 1),
                               state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=stage)))
    assert train.model_device(acc(D.DEEPSPEED, stage=3)) == torch.device("cuda", 1)
    assert train.model_device(acc(D.DEEPSPEED, stage=2)) == train.model_device(acc(D.FSDP)) == "cpu"
    assert train.model_device(acc(D.MULTI_GPU)) == torch.device("cuda", 1)
    assert train.trainable_dtype(acc(D.MULTI_GPU)) is torch.float32
    assert train.trainable_dtype(acc(D.MULTI_GPU, "no")) is None and train.trainable_dtype(acc(D.DEEPSPEED, "no")) is None
    assert train.trainable_dtype(acc(D.DEEPSPEED, "bf16", 3)) is torch.bfloat16
    assert train.trainable_dtype(acc(D.DEEPSPEED, "fp16")) is torch.float16


def test_holdout_name_shared_by_documents_of_two_corpora_is_refused(tmp_path):
    # each corpus names its documents distinctly, but the recipe joins the list of corpora
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        for name in ("ch1", "ch2"):
            (tmp_path / sub / f"{name}.txt").write_text(sub + name)
    docs = [d for c in (tmp_path / "a", tmp_path / "b") for d in longctx.load_corpus(c)]
    with pytest.raises(ValueError, match=r"data.holdout: \['ch1'\] name more than one document \('ch1' x2\)"):
        train.select_documents(docs, ["ch1"])
    with pytest.raises(ValueError, match=r"data.holdout: \['ch3'\] not in the corpus"):
        train.select_documents(docs, ["ch3"])


def test_wandb_settings_reach_this_runs_init(monkeypatch, tmp_path):
    # the mode went to os.environ with setdefault: a second run in the process (or a shell's WANDB_MODE) kept
    # the first one's (wandb.mode=online ran offline), and a string (wandb=disabled, wandb=online) meant "on, offline"
    import sys
    import types

    calls = []

    def init(**kwargs):
        calls.append((kwargs.get("mode"), kwargs.get("project"), os.environ.get("WANDB_MODE")))
        return types.SimpleNamespace(log=lambda *a, **k: None, finish=lambda: None)
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    accelerator = types.SimpleNamespace(is_main_process=True)
    for i, override in enumerate(["wandb={mode: offline}", "wandb.mode=online", "wandb=true"]):
        cfg = train.load_config(CONFIG, [f"output_dir={tmp_path / str(i)}", override])
        train.Tracker(accelerator, cfg).close()
    assert calls == [("offline", "longctx", None), ("online", "longctx", None), ("offline", "longctx", None)]
    train.Tracker(accelerator, train.load_config(CONFIG, [f"output_dir={tmp_path}", "wandb.mode=online"]), False)
    assert len(calls) == 3  # --no-wandb
    monkeypatch.setenv("WANDB_MODE", "online")  # a shell's choice holds where the config names no mode
    for i, override in enumerate(["wandb=true", "wandb.mode=offline"]):
        cfg = train.load_config(CONFIG, [f"output_dir={tmp_path / ('env' + str(i))}", override])
        train.Tracker(accelerator, cfg).close()
    assert calls[3:] == [("online", "longctx", "online"), ("offline", "longctx", "online")]
    for override, match in [("wandb=disabled", "'wandb' must be a mapping of wandb.init settings"),
                            ("wandb=online", "'wandb' must be a mapping"),
                            ("wandb.mode=onlin", "'wandb.mode' must be offline or online or disabled or shared")]:
        with pytest.raises(ValueError, match=match):
            train.load_config(CONFIG, [override])
    # any wandb.init setting, those the recipe sets too (dir, resume, config): a TypeError (multiple values for 'dir')
    calls.clear()
    seen = []
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(
        init=lambda **kw: seen.append(kw) or types.SimpleNamespace(log=lambda *a, **k: None, finish=lambda: None)))
    cfg = train.load_config(CONFIG, [f"output_dir={tmp_path / 'dir'}", f"wandb.dir={tmp_path / 'wandb'}",
                                     "wandb.resume=never"])
    train.Tracker(accelerator, cfg).close()
    assert seen[0]["dir"] == str(tmp_path / "wandb") and seen[0]["resume"] == "never" and seen[0]["mode"] == "online"
    assert train.load_config(CONFIG, ["wandb=off"])["wandb"] is False
    assert train.load_config(CONFIG, ["wandb=null"])["wandb"] is None


def test_fresh_run_log_keeps_no_rows_of_an_abandoned_run(tmp_path):
    # a run stopped before its first checkpoint, started again in the same output_dir: the log kept the old
    # run's step-0 evaluation (two step-0 rows; HeldoutEval.resume took the old perplexity as the best so far)
    from types import SimpleNamespace

    cfg = train.load_config(CONFIG, [f"output_dir={tmp_path}"])
    old = [{"step": 0, "heldout_ppl": {"128": 1.5}}, {"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))
    accelerator = SimpleNamespace(is_main_process=True)
    train.Tracker(accelerator, cfg, False, start_step=1)  # resuming at step 1: the rows up to it
    assert train.read_log(tmp_path) == old[:2]
    train.Tracker(accelerator, cfg, False, start_step=0)  # a fresh run: none
    assert train.read_log(tmp_path) == []


def test_log_and_run_config_are_strict_json_with_non_finite_values(tmp_path):
    # a NaN loss, a held-out perplexity that overflowed, train.max_grad_norm=inf: log.jsonl, run_config.json and
    # longctx.json stay strict JSON (json's bare Infinity/NaN tokens are refused by JSON.parse, jq), and what the
    # recipe reads back (read_log: the best perplexity when resuming; check_resume) is as before
    import math
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from conftest import strict_loads

    cfg = train.load_config(CONFIG, [f"output_dir={tmp_path}"])
    cfg["train"]["max_grad_norm"] = math.inf
    accelerator = SimpleNamespace(is_main_process=True, distributed_type=DistributedType.NO, _longctx_hook=True,
                                  save_state=lambda folder, **kw: Path(folder).mkdir(parents=True),
                                  wait_for_everyone=lambda: None)
    tracker = train.Tracker(accelerator, cfg, False)
    tracker.log({"heldout_ppl": {"128": math.inf}, "eval_seconds": 1.0}, 0)
    tracker.log({"loss": math.nan, "lr": 1e-4}, 1)
    tracker.log({"heldout_ppl": {"128": 1.5}, "eval_seconds": 1.0}, 2)
    text = (tmp_path / "log.jsonl").read_text()
    assert [strict_loads(line) for line in text.splitlines()][:2] == [
        {"step": 0, "heldout_ppl": {"128": "Infinity"}, "eval_seconds": 1.0}, {"step": 1, "loss": "NaN", "lr": 1e-4}]
    rows = train.read_log(tmp_path)
    assert rows[0]["heldout_ppl"]["128"] == math.inf and math.isnan(rows[1]["loss"])
    evaluator = SimpleNamespace(key_length=128, best=None)
    train.HeldoutEval.resume(evaluator, rows)
    assert evaluator.best == 1.5
    train.Tracker(accelerator, cfg, False, start_step=1)  # resumed at step 1: rewrites the rows up to it
    assert (tmp_path / "log.jsonl").read_text() == "".join(text.splitlines(keepends=True)[:2])
    folder = train.save_checkpoint(accelerator, tmp_path, train.TrainState(step=1), config=cfg)
    assert strict_loads((folder / train.RUN_CONFIG).read_text())["train"]["max_grad_norm"] == "Infinity"
    train.check_resume(folder, cfg)
    (folder / train.RUN_CONFIG).write_text(json.dumps(cfg, default=str))  # written before: a bare Infinity
    train.check_resume(folder, cfg)
    with pytest.raises(ValueError, match=r"train.max_grad_norm: 'Infinity' -> 1.0"):
        train.check_resume(folder, {**cfg, "train": {**cfg["train"], "max_grad_norm": 1.0}})


@pytest.mark.parametrize("script, variants", [
    ("longlora_compile", ["eager", "compile"]), ("longlora_gc", ["gc0", "gc10"]),
    ("longlora_compile_layer", ["s2_parts", "s2_layer", "full_parts", "full_layer"])])
def test_experiment_log_reports_read_a_nan_loss(tmp_path, script, variants):
    # the experiments' run.sh reports (their python heredoc) format each step's loss from log.jsonl: a NaN loss is the
    # string "NaN" there since strict JSON, which `{loss:.4f}` refused (ValueError); read_log gives the float back
    import math
    import subprocess
    import sys

    from longctx.utils import strict_dumps

    text = (ROOT / "experiments" / script / "run.sh").read_text()
    code = text.split("<<'PY'\n", 1)[1].split("\nPY\n", 1)[0]
    for v in variants:
        (tmp_path / v).mkdir()
        (tmp_path / v / "log.jsonl").write_text("".join(
            strict_dumps({"step": s, "loss": math.nan if s == 4 else 1.0 / s, "lr": 1e-4, "step_seconds": 0.5 + s / 100,
                          "max_memory_gib": 1.0}) + "\n" for s in range(1, 9)))
    proc = subprocess.run([sys.executable, "-", str(tmp_path), *variants], input=code, capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| 4 | 0.540 | nan |" in proc.stdout and "| 3 | 0.530 | 0.3333 |" in proc.stdout


def test_heldout_eval_scores_every_token_with_eval_score_all(tiny):
    """eval.score=all: perplexity refuses tail_fraction without score='tail', so the held-out evaluation must not
    pass it (it passed tail_fraction=0.25 whatever eval.score said): every token but each window's first is scored."""
    run = finetune(tiny, tiny / "eval-all", "train.steps=1", "train.checkpoint_every=100", "eval.every=1",
                   "eval.score=all")
    evals = eval_rows(run)
    assert [r["step"] for r in evals] == [0, 1]
    assert all(r["heldout_tokens"] == {"128": 8 * 127} for r in evals)  # 1024 tokens: 8 windows, 127 each


def test_merge_refuses_the_artifact_folder_as_its_output(tmp_path, monkeypatch):
    # `longctx merge ART --out ART` wrote the merged model beside the adapter: that folder then loaded with LoRA twice
    import longctx.models

    (tmp_path / "art").mkdir()
    (tmp_path / "art" / train.SETTINGS_FILE).write_text("{}")
    monkeypatch.setattr(longctx.models, "load_model", lambda *a, **k: pytest.fail("checked before loading"))
    for out in (tmp_path / "art", tmp_path / "art" / "." ):
        with pytest.raises(ValueError, match="is the artifact folder itself"):
            train.merge_artifact(tmp_path / "art", out)


def test_merge_refuses_another_artifacts_folder_as_its_output(tmp_path, monkeypatch):
    # only --out == the artifact was refused: merging final/ into best/ (or another run's artifact, or a folder
    # holding a peft adapter) put the merged model beside that adapter, which plain transformers then loads on top
    import longctx.models

    for name in ("final", "best", "adapter"):
        (tmp_path / name).mkdir()
    (tmp_path / "final" / train.SETTINGS_FILE).write_text("{}")
    (tmp_path / "best" / train.SETTINGS_FILE).write_text("{}")
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    monkeypatch.setattr(longctx.models, "load_model", lambda *a, **k: pytest.fail("checked before loading"))
    for out in ("best", "adapter"):
        with pytest.raises(ValueError, match="holds a LoRA artifact or adapter"):
            train.merge_artifact(tmp_path / "final", tmp_path / out)


def test_a_section_turned_off_then_given_settings_is_checked_against_its_defaults():
    # eval: false in a config, then eval.every=5 eval.keep_best=true: the section became {every: 5} and its
    # second valid key was refused ("known keys here: every"); a typo there (eval.evry=5) was taken silently
    # (evaluation off: eval_settings fills in every: 0)
    cfg = train.load_config(CONFIG, ["eval=false", "eval.every=5", "eval.keep_best=true"])
    assert cfg["eval"] == {**train.DEFAULTS["eval"], "every": 5, "keep_best": True}
    assert train.eval_settings(cfg)["every"] == 5
    with pytest.raises(ValueError, match="unknown config key 'eval.evry'"):
        train.load_config(CONFIG, ["eval=false", "eval.evry=5"])
    with pytest.raises(ValueError, match="unknown config key 'eval.lenghts'"):
        train.load_config(CONFIG, ["eval=null", "eval={every: 5, lenghts: [64]}"])
    assert train.load_config(CONFIG, ["lora=null", "lora.r=4"])["lora"] == {**train.DEFAULTS["lora"], "r": 4}
    assert train.load_config(CONFIG, ["rope=null", "rope.method=ntk"])["rope"] == {"method": "ntk"}  # open: as given


def test_heldout_documents_shorter_than_the_eval_length_are_refused(tiny, tmp_path):
    # a held-out document shorter than eval.lengths has no window: every evaluation logged heldout_ppl null
    # (a warning each time), keep_best never saved, the artifact recorded null; and a corpus whose only
    # document is held out failed as "the training documents have 0 tokens"
    from transformers import AutoTokenizer

    docs = [json.loads(line) for line in (tiny / "corpus.jsonl").read_text().splitlines()]
    docs[-1]["text"] = docs[-1]["text"][:100]  # "Held Out": 100 tokens
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    cfg = train.load_config(CONFIG, [f"data.corpus={tmp_path / 'corpus.jsonl'}", "train.mixed_precision=no"])
    tokenizer = AutoTokenizer.from_pretrained(tiny / "base")
    with pytest.raises(ValueError, match=r"no held-out document \(data.holdout\) has 128 tokens.*\[100\] tokens"):
        train.HeldoutEval(cfg, train.make_accelerator(cfg), tokenizer)
    cfg = train.load_config(CONFIG, [f"data.corpus={tmp_path / 'corpus.jsonl'}", "eval.lengths=[64]",
                                     "eval.max_tokens=64"])
    assert [len(ids) for ids in train.HeldoutEval(cfg, train.make_accelerator(cfg), tokenizer).ids] == [64]
    corpus = longctx.load_corpus(str(tmp_path / "corpus.jsonl"))
    with pytest.raises(ValueError, match="holds out every document of the corpus"):
        train.select_documents(corpus[-1:], ["Held Out"])


def test_checkpoint_interrupted_while_writing_its_state_file_is_not_listed(tmp_path, monkeypatch):
    # trainer_state.json (what makes a checkpoint complete) was written in place: an interrupt (SIGINT, a kill)
    # between opening and writing it left an empty or truncated file, listed as complete: resume=true took it and
    # failed (JSONDecodeError) instead of continuing from the one before. Pruning, stopped half way, likewise.
    accelerator = train.make_accelerator(train.load_config(CONFIG, ["train.mixed_precision=no"]))
    train.save_checkpoint(accelerator, tmp_path, train.TrainState(step=10, micro_step=20), keep=2)
    write_text = Path.write_text

    def interrupted(self, data, *args, **kwargs):
        if self.name.startswith(train.STATE_FILE):
            write_text(self, data[: len(data) // 2])
            raise KeyboardInterrupt
        return write_text(self, data, *args, **kwargs)
    monkeypatch.setattr(Path, "write_text", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train.save_checkpoint(accelerator, tmp_path, train.TrainState(step=20, micro_step=40), keep=2)
    monkeypatch.setattr(Path, "write_text", write_text)
    [latest] = train.list_checkpoints(tmp_path)
    assert train.resume_folder({"output_dir": tmp_path, "resume": True}) == latest
    assert train.load_checkpoint(accelerator, latest).step == 10
    train.save_checkpoint(accelerator, tmp_path, train.TrainState(step=20, micro_step=40), keep=2)

    def rmtree(path, ignore_errors=False):  # stopped after deleting the model file
        (Path(path) / "model.safetensors").unlink(missing_ok=True)
        raise KeyboardInterrupt
    monkeypatch.setattr(train.shutil, "rmtree", rmtree)
    (tmp_path / "checkpoints/step_000010/model.safetensors").write_bytes(b"")
    with pytest.raises(KeyboardInterrupt):
        train.save_checkpoint(accelerator, tmp_path, train.TrainState(step=30, micro_step=60), keep=2)
    assert [p.name for p in train.list_checkpoints(tmp_path)] == ["step_000020", "step_000030"]


def test_gradient_checkpointing_may_change_on_resume(tmp_path):
    # activation checkpointing trades memory for time; the training is the same (bit for bit on the tiny
    # model, dropout on): resuming with it turned on (a smaller GPU) or off was refused as a changed setting
    saved = train.load_config(CONFIG, ["train.gradient_checkpointing=true"])
    (tmp_path / train.RUN_CONFIG).write_text(json.dumps(saved, default=str))
    train.check_resume(tmp_path, train.load_config(CONFIG, ["train.gradient_checkpointing=false"]))
    with pytest.raises(ValueError, match="train.seed: 0 -> 1"):
        train.check_resume(tmp_path, train.load_config(CONFIG, ["train.seed=1"]))


def test_state_file_is_written_after_every_process_saved_its_part(tmp_path, monkeypatch):
    # trainer_state.json marks a checkpoint complete, but the main process wrote it right after its own save_state,
    # while another process could still be writing its random_states_N.pkl (shards under FSDP/DeepSpeed): killed
    # then, the checkpoint was listed complete without that file, and accelerate's load_state resumes without it
    # silently (logs "Could not load random states" at info level): a resume that is not exact. Seen with 2 processes
    # (torchrun, gloo): the state file was in place before random_states_1.pkl.
    accelerator = train.make_accelerator(train.load_config(CONFIG, ["train.mixed_precision=no"]))
    events = []
    monkeypatch.setattr(accelerator, "save_state",
                        lambda folder, **kw: (events.append("save_state"), Path(folder).mkdir(parents=True)))
    monkeypatch.setattr(accelerator, "wait_for_everyone", lambda: events.append("wait"))
    replace = os.replace
    monkeypatch.setattr(train.os, "replace", lambda src, dst: (events.append(f"replace {Path(dst).name}"),
                                                                replace(src, dst)))
    train.save_checkpoint(accelerator, tmp_path, train.TrainState(step=1, micro_step=2))
    assert events.index("save_state") < events.index("wait") < events.index(f"replace {train.STATE_FILE}")
    assert [p.name for p in train.list_checkpoints(tmp_path)] == ["step_000001"]


def test_train_compile_takes_several_dotted_arguments():
    # train.compile is true or a mapping of torch.compile arguments; given key by key (train.compile.mode=...,
    # then train.compile.fullgraph=...) the second was refused: "unknown config key 'train.compile.fullgraph';
    # known keys here: mode". Unknown names are still refused by compile_setting, before loading.
    cfg = train.load_config(CONFIG, ["train.compile.mode=default", "train.compile.fullgraph=true"])
    assert cfg["train"]["compile"] == {"mode": "default", "fullgraph": True}
    assert train.compile_setting(cfg) == {"mode": "default", "fullgraph": True}
    cfg = train.load_config(CONFIG, ["train.compile={dynamic: false}", "train.compile.fullgraph=true"])
    assert cfg["train"]["compile"] == {"dynamic": False, "fullgraph": True}
    with pytest.raises(ValueError, match=r"unknown torch.compile arguments \['fullgrap'\]"):
        train.compile_setting(train.load_config(CONFIG, ["train.compile.mode=default", "train.compile.fullgrap=1"]))
    with pytest.raises(ValueError, match="unknown config key 'train.compil'"):
        train.load_config(CONFIG, ["train.compil.mode=default"])


def test_eval_lengths_too_short_for_tail_scoring_are_refused_before_loading():
    # eval.score tail scores the last int(L / 4) tokens of each window: none for L = 2 or 3. eval_settings took
    # eval.lengths=[3, 128] (>= 2), and the run failed at its first evaluation (after the model loaded; on resume,
    # eval.every training steps later) in perplexity: "tail_fraction must be in (0, 1] with int(L * tail_fraction) >= 1"
    with pytest.raises(ValueError, match="eval.lengths with eval.score tail .* must be >= 4, got 3"):
        train.eval_settings(train.load_config(CONFIG, ["eval.lengths=[3, 128]"]))
    assert train.eval_settings(train.load_config(CONFIG, ["eval.lengths=[4]", "eval.max_tokens=4"]))["lengths"] == [4]
    assert train.eval_settings(train.load_config(CONFIG, ["eval.lengths=[2]", "eval.score=all"]))["lengths"] == [2]


def _heldout_on_two_processes(cfg, tokenizer, monkeypatch, expected):
    """HeldoutEval built as the main process and then as the other one of two (a fake accelerator; the broadcast
    hands the other process what the main one sent); ``expected``: (main, other) exception types. What was sent."""
    import types

    import accelerate.utils

    real = train.make_accelerator(cfg)
    said = []

    def broadcast(objects, from_process=0):
        if said:
            objects[0] = said[0]
        else:
            said.append(objects[0])
        return objects

    monkeypatch.setattr(accelerate.utils, "broadcast_object_list", broadcast)
    for main, (error, match) in zip((True, False), expected):
        fake = types.SimpleNamespace(distributed_type=real.distributed_type, state=real.state, num_processes=2,
                                     is_main_process=main)
        with pytest.raises(error, match=match):
            train.HeldoutEval(cfg, fake, tokenizer)
    return said[0]


def test_every_process_stops_when_the_main_one_cannot_load_the_heldout_documents(tiny, tmp_path, monkeypatch):
    # only the main process loads and checks the held-out documents: when it failed, the other processes went on
    # into evaluate() and waited for its broadcast for ever (a hang unless the launcher killed the group)
    from transformers import AutoTokenizer

    docs = [json.loads(line) for line in (tiny / "corpus.jsonl").read_text().splitlines()]
    docs[-1]["text"] = docs[-1]["text"][:100]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    cfg = train.load_config(CONFIG, [f"data.corpus={tmp_path / 'corpus.jsonl'}", "train.mixed_precision=no"])
    tokenizer = AutoTokenizer.from_pretrained(tiny / "base")
    said = _heldout_on_two_processes(cfg, tokenizer, monkeypatch, [
        (ValueError, "no held-out document"), (ValueError, "the main process could not load the held-out documents")])
    assert "no held-out document" in said


def test_merge_command_refuses_bad_paths_with_a_message(tmp_path, monkeypatch):
    # the refusals of merge_artifact came out of `longctx merge` as tracebacks (after nothing slow: checked first)
    import longctx.models

    monkeypatch.setattr(longctx.models, "load_model", lambda *a, **k: pytest.fail("checked before loading"))
    parser = argparse.ArgumentParser()
    train.add_commands(parser.add_subparsers(dest="command"))
    (tmp_path / "art").mkdir()
    (tmp_path / "art" / train.SETTINGS_FILE).write_text("{}")
    for argv, match in [([str(tmp_path / "art"), "--out", str(tmp_path / "art")], "is the artifact folder itself"),
                        ([str(tmp_path / "nothing"), "--out", str(tmp_path / "m")], "is not a longctx artifact")]:
        args = parser.parse_args(["merge", *argv])
        with pytest.raises(SystemExit, match=f"longctx merge: .*{match}"):
            args.func(args)


def test_every_process_stops_whatever_the_main_process_raised_loading_the_heldout_documents(tiny, monkeypatch):
    # only some exception types were caught and broadcast: another one (a TypeError for eval.corpus=[5], from
    # load_corpus) left the main process without broadcasting, the others waiting in broadcast_object_list
    from transformers import AutoTokenizer

    cfg = train.load_config(CONFIG, [f"data.corpus={tiny / 'corpus.jsonl'}", "eval.corpus=[5]",
                                     "train.mixed_precision=no"])
    tokenizer = AutoTokenizer.from_pretrained(tiny / "base")
    said = _heldout_on_two_processes(cfg, tokenizer, monkeypatch, [
        (TypeError, "must be a str or path"), (ValueError, "must be a str or path")])
    assert said.startswith("TypeError: load_corpus")
