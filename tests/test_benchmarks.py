"""The benchmark scripts' CPU smoke modes run (code paths only; speed targets are checked on the GPU)."""

import json
import subprocess
import sys
from pathlib import Path

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
