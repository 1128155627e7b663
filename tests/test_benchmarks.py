"""The benchmark scripts' CPU smoke modes run (code paths only; speed targets are checked on the GPU)."""

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_longlora_step_cpu_smoke(tmp_path):
    out = tmp_path / "step.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/longlora_step.py"), "--cpu-smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = data["results"]
    assert [(r["T"], r["attention"]) for r in rows] == [(128, "full"), (128, "s2"), (256, "full"), (256, "s2")]
    assert all(r["tokens_per_s"] > 0 and "error" not in r for r in rows)
    # the S2 cases ran the s2attn attention (sdpa backend on CPU), the full ones transformers' SDPA
    assert all(r["attn_implementation"].startswith("longctx_s2attn") and r["s2_backend"] == "sdpa"
               for r in rows if r["attention"] == "s2")
    assert all(r["attn_implementation"] == "sdpa" for r in rows if r["attention"] == "full")
    assert all("speedup" in r for r in rows if r["attention"] == "s2")
    assert data["meta"]["versions"]["torch"] == __import__("torch").__version__
    assert "| model | T | compile | attention |" in proc.stdout and "Target (issue 4)" in proc.stdout


def _smoke(tmp_path, script, *extra):
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--cpu-smoke", *extra, "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_streaming_decode_cpu_smoke_with_generation_loop(tmp_path):
    data, stdout = _smoke(tmp_path, "streaming_decode.py", "--loop")
    rows = data["rows"]
    assert [r["cache"] for r in rows] == [32, 64]
    for r in rows:  # every step kind also timed inside the generation loop
        assert r["recompute_loop_ms"] > 0 and all(r[f"sink_loop_ms@{n}"] > 0 for n in (200, 1000))
        assert r["loop_recompute_over_sink"] == r["recompute_loop_ms"] / r["sink_loop_ms@1000"]
        assert r["recompute_logits"] == "last"  # the recompute baseline scores the last position only
    assert "Per token in the generation loop" in stdout


def test_s2attn_cpu_smoke_flex_variants(tmp_path):
    data, stdout = _smoke(tmp_path, "s2attn.py", "--flex-variants", "default;BLOCK_M=64,BLOCK_N=32")
    labels = {r["backend"] for r in data["results"] if r["method"] == "s2"}
    assert {"flex (fwd only)", "flex[BLOCK_M=64,BLOCK_N=32] (fwd only)"} <= labels
    assert all("error" not in r for r in data["results"])


def test_attn_kernels_cpu_smoke(tmp_path):
    data, stdout = _smoke(tmp_path, "attn_kernels.py")
    rows = {r["variant"]: r for r in data["rows"]}
    assert set(rows) == {"sdpa_default", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn_gqa", "cudnn_expanded"}
    assert rows["sdpa_default"]["ms"] > 0 and rows["sdpa_flash"]["ms"] > 0  # CPU: default and flash run
    assert rows["sdpa_flash"]["max_abs_diff"] < 1e-5                        # fp32, same causal attention
    assert "| variant | ms | TFLOP/s |" in stdout and "| sdpa_default |" in stdout


def _load_script(name):
    """A benchmark script as a module (its own sys.path set-up runs), for tests that patch or call its parts."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ppl_throughput_warms_up_the_attention_bound(tmp_path, monkeypatch):
    """The attention-alone bound is timed like the methods: one untimed warm-up run, then --repeats timed
    runs (the committed H100 runs had none: their first timed run was 10-18% slower than the other two), in
    every arrangement a loop could use, the fastest taken (the thirteenth session's bound timed only one)."""
    mod = _load_script("ppl_throughput")
    real, calls = mod.attention_alone, []

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)
    monkeypatch.setattr(mod, "attention_alone", counted)
    out = tmp_path / "ppl.json"
    monkeypatch.setattr(sys, "argv", ["ppl_throughput.py", "--model", "tiny", "--length", "64", "--windows", "2",
                                      "--dtype", "fp32", "--repeats", "2", "--variants", "batch1", "--out", str(out)])
    mod.main()
    res = json.loads(out.read_text())["results"]
    # each arrangement (1 or 2 windows per call x two layouts): warm-up + the timed repeats
    assert len(calls) == 4 * (1 + 2)
    by = res["attention_alone"]["seconds_by_arrangement"]
    assert set(by) == {"1xheads_first", "1xtokens_first", "2xheads_first", "2xtokens_first"}
    assert all(len(ts) == 2 for ts in by.values())
    # the bound takes the fastest arrangement
    best = min(statistics.median(ts) for ts in by.values())
    assert res["attention_alone"]["seconds_median"] == best
    assert res["attention_alone"]["seconds"] == by[res["attention_alone"]["arrangement"]]
    lin_by = res["linears_alone"]["seconds_by_arrangement"]
    assert set(lin_by) == {"1x", "2x"}
    assert res["linears_alone"]["seconds_median"] == min(statistics.median(ts) for ts in lin_by.values())
    rows = res["rows"]
    assert set(rows) == {"(a) naive", "(b) perplexity", "(b) batch1"}
    assert all(r["ppl_rel_diff_vs_a"] < 1e-5 for r in rows.values())  # fp32: same tokens scored, same NLL
    # the linear layers alone: tiny llama (see build_tiny), 2 windows of 64 tokens, every nn.Linear once per window
    cfg = mod.build_tiny(64, torch.float32, torch.device("cpu"))[0].config
    h, i, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    kv = cfg.num_key_value_heads * (cfg.head_dim or h // cfg.num_attention_heads)
    per_layer = h * h * 2 + h * kv * 2 + h * i * 3                  # q, o; k, v; gate, up, down
    assert res["linears_alone"]["flops"] == 2 * 2 * 64 * (cfg.num_hidden_layers * per_layer + h * v)
    both = res["attention_plus_linears"]
    assert both["seconds"] == res["attention_alone"]["seconds_median"] + res["linears_alone"]["seconds_median"]
    assert both["max_speedup_vs_a"] < res["attention_alone"]["max_speedup_vs_a"]


def test_streaming_decode_recompute_keeps_only_the_last_logits():
    """The recompute baseline does the work a new token needs: the output embedding on the last position only
    (transformers' default applies it to all C positions, work the sink and dense steps never do)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    mod = _load_script("streaming_decode")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                         num_key_value_heads=2, num_hidden_layers=2, vocab_size=97)).eval()
    ids = torch.randint(0, 97, (1, 24))
    rows_seen = []
    hook = model.lm_head.register_forward_hook(lambda m, inp, out: rows_seen.append(inp[0].shape[1]))
    with torch.inference_mode():
        logits = mod.recompute_step(model, ids)
        hook.remove()
        full = model(ids, use_cache=False).logits
    assert rows_seen == [1]
    assert logits.shape == (1, 1, 97)
    torch.testing.assert_close(logits[0, -1], full[0, -1])


def test_profile_step_reports_a_median_of_several_steps():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/profile_step.py"), "--cpu-smoke", "--steps", "3",
                           "--rows", "3"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(median of 3: " in proc.stdout


def test_matmul_peak_cpu_smoke(tmp_path):
    data, stdout = _smoke(tmp_path, "matmul_peak.py", "--repeats", "2", "--inner", "2")
    assert [r["n"] for r in data["rows"]] == [64, 128]
    for r in data["rows"]:  # TFLOP/s is the FLOPs of the timed matmuls over their median time
        assert len(r["runs_ms"]) == 2
        assert abs(r["tflops_per_s"] - 2 * r["n"] ** 3 * 2 / (r["ms_per_run"] / 1e3) / 1e12) < 1e-9
    assert "| n | TFLOP/s |" in stdout


def test_ppl_throughput_refuses_an_unknown_variant(tmp_path, monkeypatch, capsys):
    """A --variants name the script does not know was run as (b)'s default loop under that name (e.g. the
    compile_cudnn of the README's 495ff5b command, removed since): a plausible row that measured something else."""
    import pytest

    mod = _load_script("ppl_throughput")
    monkeypatch.setattr(sys, "argv", ["ppl_throughput.py", "--model", "tiny", "--length", "64", "--windows", "2",
                                      "--dtype", "fp32", "--repeats", "1", "--variants", "batch1,compile_cudnn",
                                      "--out", str(tmp_path / "ppl.json")])
    with pytest.raises(SystemExit) as exc:
        mod.main()
    assert exc.value.code == 2 and "unknown ['compile_cudnn']" in capsys.readouterr().err
    assert not (tmp_path / "ppl.json").exists()


def test_s2attn_refuses_unknown_backend_and_kernel_names(monkeypatch, capsys):
    """A --dense-kernels name this device lacks was dropped silently (none left: every speed-up NaN), and an
    unknown --backends name was reported as "not available", the run going on without it."""
    import pytest

    mod = _load_script("s2attn")
    for extra, message in ((["--dense-kernels", "cudnn"], "--dense-kernels: unknown ['cudnn']"),
                           (["--backends", "sdpa,flx"], "--backends: unknown ['flx']")):
        monkeypatch.setattr(sys, "argv", ["s2attn.py", "--cpu-smoke", "--lengths", "256", "--backends", "sdpa", *extra])
        with pytest.raises(SystemExit) as exc:
            mod.main()
        assert exc.value.code == 2 and message in capsys.readouterr().err


def test_decode_profile_refuses_unknown_variants():
    """A typo in a --sink-variants flag (VARIANT/eagerpos) ran the plain step under the typo's label."""
    import pytest

    mod = _load_script("decode_profile")
    for argv in (["--sink-variants", "eager/eagrpos"], ["--variants", "eager/eagerpos"], ["--variants", "auto"]):
        with pytest.raises(SystemExit) as exc:
            mod.main(["--cpu-smoke", "--variants", "eager", "--sink-variants", "", *argv])
        assert exc.value.code == 2


def test_decode_profile_skips_empty_variant_names(tmp_path):
    """The name check skipped empty names ("eager," or a trailing comma) but the runs did not: the dense steps, or
    the dense steps and the first SinkDecoder rows (minutes on a GPU), ran and then a KeyError on ''."""
    mod = _load_script("decode_profile")
    out = tmp_path / "dp.json"
    mod.main(["--cpu-smoke", "--variants", "eager,", "--sink-variants", "eager,", "--out", str(out)])
    res = json.loads(out.read_text())
    assert [r["variant"] for r in res["steps"]] == [r["variant"] for r in res["sink_steps"]] == ["eager"]
    mod.main(["--cpu-smoke", "--variants", "", "--sink-variants", "eager", "--sinks", "0,", "--out", str(out)])
    res = json.loads(out.read_text())  # --sinks "0," as the names: a ValueError once the dense steps had run
    assert res["steps"] == [] and [(r["variant"], r["sink"]) for r in res["sink_steps"]] == [("eager", 0)]


@pytest.mark.parametrize("sinks", ["x", ",", "64", "-1"])
def test_decode_profile_refuses_bad_sink_counts_before_any_step(monkeypatch, sinks):
    """--sinks was parsed after the dense steps (minutes on a GPU): a bad count was a ValueError then, and a count the
    cache cannot hold (window size 0) one inside the SinkDecoder rows."""
    mod = _load_script("decode_profile")

    def boom(*a, **k):
        raise AssertionError("a step ran")

    monkeypatch.setattr(mod, "dense_static_step", boom)
    with pytest.raises(SystemExit) as exc:
        mod.main(["--cpu-smoke", "--variants", "eager", "--sink-variants", "eager", "--sinks", sinks])
    assert exc.value.code == 2


def test_decode_profile_floor_reads_one_row_of_the_input_embedding(tmp_path):
    """The floor (bytes a step must read / read bandwidth) counted the whole input embedding table, of which a
    step reads the new token's row: 0.26 of 13.48 GB on the 7B shape, a floor 1.7% too high."""
    mod = _load_script("decode_profile")
    out = tmp_path / "dp.json"
    mod.main(["--cpu-smoke", "--variants", "eager", "--sink-variants", "", "--out", str(out)])
    res = json.loads(out.read_text())
    vocab, hidden = 256, 64  # the smoke model (untied, fp32)
    assert abs(res["step_weight_gb"] - (res["weight_gb"] - vocab * hidden * 4 / 1e9)) < 1e-12


def test_estimate_check_overhead_is_what_stays_allocated(monkeypatch, capsys):
    """The memory allocated before any model (reported, and subtracted in ratio_without_overhead) is read after
    the warm-up matmul's input is freed: it was read before, so it held that (256, 256) tensor too (the 128 KiB
    above 32 MiB in every committed est_*.json), which no measured peak holds. CUDA stood in for by CPU tensors."""
    import weakref

    mod = _load_script("estimate_check")
    live, real_ones = weakref.WeakSet(), torch.ones

    def ones(*size, device=None, dtype=None):
        t = real_ones(*size, dtype=dtype)
        live.add(t)
        return t
    monkeypatch.setattr(torch, "ones", ones)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "stand-in")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: sum(t.numel() * t.element_size() for t in live))
    assert mod.main(["--device", "cuda", "--skip", "infer,lora"]) == 0
    assert "allocated before any model (cuBLAS workspace, ...): 0 B;" in capsys.readouterr().out
