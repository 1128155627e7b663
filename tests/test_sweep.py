"""longctx sweep on a tiny random llama saved to a folder, with a local text corpus (CPU)."""

import argparse
import json
import math

import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

import longctx
from longctx import sweep
from longctx.data import encode_documents, load_corpus
from longctx.eval.perplexity import perplexity
from conftest import strict_loads
from test_passkey import TEXT, char_tokenizer


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny llama + character tokenizer saved like a checkpoint, and a .txt corpus."""
    root = tmp_path_factory.mktemp("sweep")
    tok = char_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=1, eos_token_id=2, bos_token_id=0, initializer_range=0.2)
    LlamaForCausalLM(cfg).save_pretrained(root / "tiny")
    tok.save_pretrained(root / "tiny")
    (root / "corpus.txt").write_text(TEXT * 6)  # ~5000 characters = tokens
    return root


def write_yaml(path, tiny_dir, **over):
    grid = {"models": [str(tiny_dir / "tiny")], "methods": ["none", "yarn:factor=2"], "lengths": [300, 400],
            "metrics": {"ppl": {"corpus": str(tiny_dir / "corpus.txt"), "score": "tail"}}, "dtype": "fp32",
            "device": "cpu", **over}
    path.write_text("# longctx sweep " + str(path) + "\n" + yaml.safe_dump(grid))
    return path


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


class Counter:
    """Wraps a metric function: counts calls, raises on call number `fail_at`."""

    def __init__(self, fn, fail_at=None):
        self.fn, self.fail_at, self.calls = fn, fail_at, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.fail_at is not None and self.calls >= self.fail_at:
            raise RuntimeError("simulated interruption")
        return self.fn(*args, **kwargs)


def test_grid_runs_and_writes_results_table_and_plot(tiny_dir, tmp_path, monkeypatch):
    count = Counter(sweep.perplexity)
    monkeypatch.setattr(sweep, "perplexity", count)
    cfg = write_yaml(tmp_path / "grid.yaml", tiny_dir)
    res = sweep.run(cfg)
    out = tmp_path / "grid"                                     # default: next to the yaml
    rows = lines(out / "results.jsonl")
    assert res["computed"] == 4 == count.calls and len(rows) == 4
    assert {(r["method"], r["length"]) for r in rows} == {("none", 300), ("none", 400), ("yarn x2", 300),
                                                          ("yarn x2", 400)}
    for r in rows:
        assert r["metric"] == "ppl" and r["settings"]["score"] == "tail" and r["settings"]["mode"] == "chunks"
        assert r["value"] == r["result"]["ppl"] > 1
        assert set(r["versions"]) >= {"torch", "transformers", "longctx"} and r["hardware"].startswith("cpu")
        assert "git_commit" in r and r["dtype"] == "fp32"
    assert rows[2]["method_spec"] == {"method": "yarn", "factor": 2}
    # a cell equals the plain evaluation
    model, tok = longctx.load_model(str(tiny_dir / "tiny"))
    ids = encode_documents(tok, load_corpus(str(tiny_dir / "corpus.txt")))
    with longctx.applied(model, "yarn", factor=2):
        ref = perplexity(model, ids, [400], score="tail", progress=False)[400]["ppl"]
    assert rows[3]["value"] == pytest.approx(ref, rel=1e-6)
    table = (out / "table.md").read_text()
    assert "| method | 300 | 400 |" in table and "| none |" in table and "| yarn x2 |" in table
    assert (out / "tiny_ppl.png").stat().st_size > 1000


def test_resume_computes_only_missing_cells(tiny_dir, tmp_path, monkeypatch):
    cfg = write_yaml(tmp_path / "r.yaml", tiny_dir)
    results = tmp_path / "r" / "results.jsonl"
    monkeypatch.setattr(sweep, "perplexity", Counter(sweep.perplexity, fail_at=4))
    with pytest.raises(RuntimeError, match="simulated"):
        sweep.run(cfg)
    assert len(lines(results)) == 3                             # the 4th cell was interrupted
    # lose the last line too, and leave half a line behind as a crash mid-write would
    text = results.read_text().splitlines(keepends=True)
    results.write_text("".join(text[:2]) + text[2][:40])
    count = Counter(sweep.perplexity.fn)
    monkeypatch.setattr(sweep, "perplexity", count)
    res = sweep.run(cfg)
    assert count.calls == 2 and res["computed"] == 2 and res["skipped"] == 2
    rows = lines(results)
    assert len(rows) == 4 and len({r["key"] for r in rows}) == 4
    count.calls = 0
    assert sweep.run(cfg)["computed"] == 0 and count.calls == 0  # all done: nothing recomputed
    # a changed setting is a new cell
    write_yaml(cfg, tiny_dir, metrics={"ppl": {"corpus": str(tiny_dir / "corpus.txt"), "score": "all"}})
    assert sweep.run(cfg)["computed"] == 4 and count.calls == 4


def test_dry_run_computes_nothing(tiny_dir, tmp_path, monkeypatch, capsys):
    import longctx.models

    def boom(*a, **k):
        raise AssertionError("dry run must not load or evaluate")

    cfg = write_yaml(tmp_path / "d.yaml", tiny_dir)
    monkeypatch.setattr(longctx.models, "load_model", boom)
    monkeypatch.setattr(sweep, "perplexity", boom)
    res = sweep.run(cfg, dry_run=True)
    out = capsys.readouterr().out
    assert res["computed"] == 0 and out.count("[todo]") == 4 and "4 cells, 0 done" in out
    assert not (tmp_path / "d").exists()
    monkeypatch.undo()
    sweep.run(cfg, out=tmp_path / "elsewhere")                  # --out
    assert len(lines(tmp_path / "elsewhere" / "results.jsonl")) == 4
    capsys.readouterr()
    sweep.run(cfg, out=tmp_path / "elsewhere", dry_run=True)
    assert capsys.readouterr().out.count("[done]") == 4


def test_passkey_and_needle_metrics(tiny_dir, tmp_path, capsys):
    cfg = write_yaml(tmp_path / "pk.yaml", tiny_dir, methods=["none", {"name": "dynamic_ntk", "factor": 2}],
                     lengths=[300],
                     metrics={"passkey": {"depths": [0, 1], "trials": 1},
                              "needle": {"corpus": str(tiny_dir / "corpus.txt"), "depths": [0.5], "trials": 2}},
                     wandb={"project": "test", "mode": "offline"})
    try:
        import wandb  # noqa: F401
        pytest.skip("wandb installed: this test checks the note when it is not")
    except ImportError:
        pass
    res = sweep.run(cfg)
    assert "wandb is not installed" in capsys.readouterr().err
    rows = lines(tmp_path / "pk" / "results.jsonl")
    assert res["computed"] == 4 and {r["metric"] for r in rows} == {"passkey", "needle"}
    for r in rows:
        assert 0 <= r["value"] <= 1 and r["value"] == r["result"]["accuracy"]
        assert r["result"]["total"] == (2 if r["metric"] == "passkey" else 2)
    assert {r["method"] for r in rows} == {"none", "dynamic_ntk x2"}
    table = (tmp_path / "pk" / "table.md").read_text()
    assert "passkey retrieval accuracy" in table and "needle-in-a-haystack accuracy" in table
    assert (tmp_path / "pk" / "tiny_passkey.png").exists() and (tmp_path / "pk" / "tiny_needle.png").exists()


def test_config_errors(tiny_dir, tmp_path):
    for bad, match in [({"metrics": ["bleu"]}, "unknown metric"),
                       ({"metrics": {"ppl": {"corpse": "x"}}}, "unknown ppl setting"),
                       ({"methods": ["nope:factor=2"]}, "unknown method"),
                       ({"methods": ["yarn"]}, "needs a factor"),
                       ({"methods": ["none", "none"]}, "duplicate"),
                       ({"lengths": []}, "lengths"),
                       ({"extra_key": 1}, "unknown key")]:
        with pytest.raises((ValueError, TypeError), match=match):
            sweep.load_config(write_yaml(tmp_path / "bad.yaml", tiny_dir, **bad))
    # a method as a dict is the same cell as its string form
    a = sweep.load_config(write_yaml(tmp_path / "a.yaml", tiny_dir, methods=[{"name": "yarn", "factor": 2}]))
    b = sweep.load_config(write_yaml(tmp_path / "b.yaml", tiny_dir, methods=["yarn:factor=2"]))
    assert [c["key"] for c in sweep.cells(a)] == [c["key"] for c in sweep.cells(b)]
    # metrics as a list, settings at the top level
    c = sweep.load_config(write_yaml(tmp_path / "c.yaml", tiny_dir, metrics=["passkey"], passkey={"trials": 2}))
    assert c["metrics"]["passkey"]["trials"] == 2 and c["metrics"]["passkey"]["seed"] == 0


def test_sweep_cell_does_not_depend_on_earlier_cells(tiny_dir, tmp_path):
    # dynamic RoPE keeps the frequencies of a longer cell: ppl@300 was 78.148 after 400, 77.105 alone
    ppl = {"ppl": {"corpus": str(tiny_dir / "corpus.txt")}}
    for name, lengths in (("a", [400, 300]), ("b", [300])):
        sweep.run(write_yaml(tmp_path / f"{name}.yaml", tiny_dir, methods=["dynamic_ntk:factor=2"], lengths=lengths,
                             metrics=ppl), plots=False)
    a, b = ({r["length"]: (r["key"], r["value"]) for r in lines(tmp_path / n / "results.jsonl")} for n in "ab")
    assert a[300] == b[300]


def test_sweep_key_is_canonical(tiny_dir, tmp_path):
    # equivalent specs are one cell: they re-ran before
    def keys(**over):
        return [c["key"] for c in sweep.cells(sweep.load_config(write_yaml(tmp_path / "k.yaml", tiny_dir, **over)))]

    corpus = str(tiny_dir / "corpus.txt")
    docs = ["Pride and Prejudice", "Emma"]
    assert keys(methods=["yarn:factor=2"]) == keys(methods=[{"name": "yarn", "factor": 2.0}]) == \
        keys(methods=["yarn:factor=2:beta_fast=32:attention_factor=none"])
    assert keys(methods=["pi:factor=2"]) == keys(methods=["linear:factor=2.0"])
    assert keys(methods=[{"name": "yarn", "factor": 2, "layer_types": "full_attention"}]) == \
        keys(methods=[{"name": "yarn", "factor": 2, "layer_types": ["full_attention"]}])
    assert keys(dtype="fp32") == keys(dtype="FP32") == keys(dtype="float32") != keys(dtype="bf16")
    with pytest.raises(ValueError, match="'tail_fraction' only applies to score: tail"):  # (was the same cell: ignored)
        keys(metrics={"ppl": {"corpus": corpus, "score": "all", "tail_fraction": 0.5}})
    assert keys(metrics={"ppl": {"corpus": corpus, "score": "tail", "tail_fraction": 1}}) == \
        keys(metrics={"ppl": {"corpus": corpus, "score": "tail", "tail_fraction": 1.0}})
    assert keys(metrics={"ppl": {"corpus": corpus, "docs": docs}}) == \
        keys(metrics={"ppl": {"corpus": corpus, "docs": docs[::-1]}})
    assert keys(metrics={"ppl": {"corpus": corpus, "score": "tail"}}) != keys(metrics={"ppl": {"corpus": corpus}})
    with pytest.raises(ValueError, match="'dtype' must be null .* or one of bf16"):
        sweep.load_config(write_yaml(tmp_path / "k.yaml", tiny_dir, dtype="fp8"))
    # the committed sweeps keep their keys: nothing there re-runs
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "experiments"
    for name in ("passkey", "passkey_longlora"):
        rows = sweep.read_results(root / name / "results.jsonl")
        assert [sweep.row_key(r) for r in rows] == [r["key"] for r in rows]
        assert {c["key"] for c in sweep.cells(sweep.load_config(root / f"{name}.yaml"))} <= {r["key"] for r in rows}


def test_rows_written_with_older_keys_still_resume(tiny_dir, tmp_path, monkeypatch):
    # a results.jsonl written before the canonical key (dtype as written, tail_fraction under score: all, the
    # method's alias): its rows' keys are recomputed when read, so the cells are not run again
    cfg = write_yaml(tmp_path / "o.yaml", tiny_dir, methods=["pi:factor=2"], dtype="FP32", lengths=[300],
                     metrics={"ppl": {"corpus": str(tiny_dir / "corpus.txt")}})
    sweep.run(cfg, plots=False)
    results = tmp_path / "o" / "results.jsonl"
    row = lines(results)[0]
    old = {**row, "dtype": "FP32", "method_spec": {"method": "pi", "factor": 2.0}}
    old["key"] = sweep._canonical({"model": row["model"], "method": old["method_spec"], "metric": "ppl",
                                   "length": 300, "settings": row["settings"], "dtype": "FP32"})
    results.write_text(json.dumps(old) + "\n")
    count = Counter(sweep.perplexity)
    monkeypatch.setattr(sweep, "perplexity", count)
    assert sweep.run(cfg, plots=False)["computed"] == 0 and count.calls == 0
    assert "| pi x2 | " + sweep._fmt(row["value"]) + " |" in (tmp_path / "o" / "table.md").read_text()


def test_non_finite_values_are_strict_json_and_resume(tiny_dir, tmp_path, monkeypatch):
    # a perplexity that overflowed to inf, NaN from a diverged model: results.jsonl stays strict JSON (json's bare
    # Infinity/NaN tokens are refused by JSON.parse, jq), and the sweep resumes from it and tabulates as before
    def diverged(model, ids, lengths, **kwargs):
        return {L: {"ppl": math.inf if L == 300 else math.nan, "nll": math.inf if L == 300 else math.nan,
                    "tokens": 3} for L in lengths}
    monkeypatch.setattr(sweep, "perplexity", diverged)
    cfg = write_yaml(tmp_path / "n.yaml", tiny_dir, methods=["none"])
    sweep.run(cfg)
    out = tmp_path / "n"
    rows = [strict_loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["value"], r["result"]["ppl"]) for r in rows] == [("Infinity", "Infinity"), ("NaN", "NaN")]
    table = (out / "table.md").read_text()
    assert "| none | inf | nan |" in table
    back = sweep.read_results(out / "results.jsonl")
    assert back[0]["value"] == back[0]["result"]["nll"] == math.inf and math.isnan(back[1]["value"])
    monkeypatch.setattr(sweep, "perplexity", Counter(diverged, fail_at=1))   # resumed: nothing is run again
    assert sweep.run(cfg)["computed"] == 0 and (out / "table.md").read_text() == table
    # a file written before (json's bare tokens) reads the same
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in back))
    assert "Infinity," in (out / "results.jsonl").read_text()
    assert sweep.run(cfg)["computed"] == 0 and (out / "table.md").read_text() == table


@pytest.mark.parametrize("over, match", [
    (dict(metrics={"passkey": []}), r"passkey settings must be a mapping"),
    (dict(metrics=["passkey"], passkey=False), r"passkey settings must be a mapping"),
    (dict(metrics=["passkey"], passkey=0), r"passkey settings must be a mapping"),
    (dict(metrics={"passkey": {"trials": 1}}, passkey=[]), "passkey settings are given twice"),
    (dict(wandb=True), r"'wandb' must be a mapping of wandb.init settings .*, false or null, got True"),
    (dict(wandb="offline"), r"'wandb' must be a mapping"),
    (dict(methods=["linear:factor=2", "pi:factor=2"]), r"methods 'linear x2' and 'pi x2' are the same method"),
    (dict(methods=["yarn:factor=2", {"name": "yarn", "factor": 2.0, "beta_slow": 1}]), "are the same method")])
def test_sweep_refuses_bad_blocks(tiny_dir, tmp_path, over, match):
    with pytest.raises(ValueError, match=match):
        sweep.load_config(write_yaml(tmp_path / "x.yaml", tiny_dir, **over))


def test_sweep_metric_settings_null_and_empty(tiny_dir, tmp_path):
    # null (or an empty mapping) is "no settings": the defaults, or the top-level block
    for over, trials in [(dict(metrics={"passkey": None}), 5), (dict(metrics={"passkey": {}}), 5),
                         (dict(metrics=["passkey"], passkey=None), 5),
                         (dict(metrics={"passkey": {}}, passkey={"trials": 2}), 2)]:
        grid = sweep.load_config(write_yaml(tmp_path / "n.yaml", tiny_dir, **over))
        assert grid["metrics"]["passkey"]["trials"] == trials
    for wandb in (False, None, {}):
        assert sweep.load_config(write_yaml(tmp_path / "n.yaml", tiny_dir, wandb=wandb))["wandb"] == wandb


def test_method_options_keep_their_types(tiny_dir, tmp_path):
    from longctx import registry
    from longctx.cli import parse_method

    for entry, label, options in [
            ({"name": "s2attn", "train_only": False}, "s2attn (train_only=False)", {"train_only": False}),
            ("s2attn:train_only=false", "s2attn (train_only=False)", {"train_only": False}),
            ("s2attn:train_only=TRUE", "s2attn (train_only=True)", {"train_only": True}),
            ({"name": "yarn", "factor": 4, "attention_factor": None}, "yarn x4 (attention_factor=None)",
             {"factor": 4, "attention_factor": None}),
            ("yarn:factor=4:attention_factor=None", "yarn x4 (attention_factor=None)",
             {"factor": 4, "attention_factor": None}),
            ({"name": "yarn", "factor": 4, "layer_types": ["full_attention"]},
             "yarn x4 (layer_types=['full_attention'])", {"factor": 4, "layer_types": ["full_attention"]})]:
        got = sweep.method_spec(entry)
        assert got == (label, got[1], options) and type(got[2].get("train_only", False)) is bool
        registry.make_options(registry.get_method(got[1]), **got[2])
    # the YAML form and the CLI form are the same cell
    a = sweep.load_config(write_yaml(tmp_path / "a.yaml", tiny_dir, methods=[{"name": "s2attn", "train_only": False}]))
    b = sweep.load_config(write_yaml(tmp_path / "b.yaml", tiny_dir, methods=["s2attn:train_only=false"]))
    assert [c["key"] for c in sweep.cells(a)] == [c["key"] for c in sweep.cells(b)]
    for spec, match in [("yarn:factor=abc", "option 'factor' must be a number, got 'abc'"),
                        ("yarn:factor=true", "option 'factor' must be a number, got True"),
                        ("yarn:factor=4:factor=8", "option 'factor' is given twice"),
                        ("yarn:factor=4:beta_fast=8:beta_fast=8", "option 'beta_fast' is given twice")]:
        with pytest.raises(SystemExit, match=match):
            parse_method(spec, None)
        with pytest.raises(ValueError, match=match):
            sweep.method_spec(spec)
    with pytest.raises(ValueError, match="option 'factor' must be a number, got '4'"):
        sweep.method_spec({"name": "yarn", "factor": "4"})      # a YAML string stays a string


def test_ppl_cli_refuses_duplicate_methods_and_bad_max_tokens(monkeypatch, capsys):
    import longctx.models
    from longctx import cli

    def boom(*a, **k):
        raise AssertionError("checked before loading")

    monkeypatch.setattr(longctx.models, "load_model", boom)
    with pytest.raises(SystemExit, match="'yarn x2 \\(beta_fast=8\\)' given more than once"):
        cli.main(["ppl", "--method", "yarn:factor=2:beta_fast=8", "--method", "yarn:beta_fast=8", "--factor", "2"])
    with pytest.raises(SystemExit, match="'none' given more than once"):
        cli.main(["ppl", "--method", "none", "--method", "none"])
    for bad in ("-5", "0"):
        with pytest.raises(SystemExit):
            cli.main(["ppl", "--max-tokens", bad])
        assert "--max-tokens: must be an integer >= 1" in capsys.readouterr().err


def test_ppl_cli_checks_before_loading(monkeypatch, capsys):
    # methods that would change nothing in perplexity (streaming without a cache; s2attn in eval mode), unknown
    # methods and options, and bad lengths / stride / tail settings are refused before the model loads
    import longctx.models
    from longctx import cli

    def boom(*a, **k):
        raise AssertionError("checked before loading")

    monkeypatch.setattr(longctx.models, "load_model", boom)
    for argv, match in [(["--method", "streaming:window_size=10"], "--method streaming: .*without a cache"),
                        (["--method", "s2attn"], "--method s2attn: s2attn is active only in training"),
                        (["--method", "nosuch"], "nosuch"),
                        (["--method", "yarn:factor=4:nosuch=1"], "--method 'yarn:factor=4:nosuch=1': .*nosuch"),
                        (["--stride", "8"], "--stride only applies to --mode sliding"),
                        (["--mode", "sliding", "--score", "tail"], "--score tail only applies to --mode chunks"),
                        (["--mode", "sliding", "--stride", "9", "--lengths", "8,16"], "--stride must be in 1..8"),
                        (["--score", "tail", "--tail-fraction", "0.01", "--lengths", "16"], "--tail-fraction")]:
        with pytest.raises(SystemExit, match=match):
            cli.main(["ppl", *argv])
    for bad in (",", "1", "x"):
        with pytest.raises(SystemExit):
            cli.main(["ppl", "--lengths", bad])
        assert "--lengths" in capsys.readouterr().err


def test_sweep_refuses_methods_inactive_for_a_metric(tiny_dir, tmp_path):
    for methods, metrics, match in [(["streaming:window_size=64"], ["ppl"], "'streaming.*' with metric 'ppl'"),
                                    (["s2attn"], ["ppl"], "'s2attn' with metric 'ppl': s2attn is active only"),
                                    (["s2attn"], ["passkey"], "'s2attn' with metric 'passkey'")]:
        with pytest.raises(ValueError, match=match):
            sweep.load_config(write_yaml(tmp_path / "m.yaml", tiny_dir, methods=methods, metrics=metrics))
    # streaming generates with a cache in passkey: allowed; s2attn with train_only=false: allowed
    sweep.load_config(write_yaml(tmp_path / "ok.yaml", tiny_dir, methods=["streaming:window_size=64"],
                                 metrics=["passkey"]))
    sweep.load_config(write_yaml(tmp_path / "ok2.yaml", tiny_dir, methods=["s2attn:train_only=false"],
                                 metrics=["ppl"]))


def test_repeated_models_and_lengths_are_errors(tiny_dir, tmp_path):
    model = str(tiny_dir / "tiny")
    for over, match in [({"models": [model, model]}, "models .*tiny listed more than once"),
                        ({"lengths": [300, 400, 300]}, "lengths 300 listed more than once"),
                        ({"lengths": [300, 0]}, "'lengths' must be integers >= 1"),
                        ({"lengths": [300, "x"]}, "'lengths' must be integers >= 1")]:
        with pytest.raises(ValueError, match=match):
            sweep.load_config(write_yaml(tmp_path / "dup.yaml", tiny_dir, **over))


def test_single_values_are_one_item_lists(tiny_dir, tmp_path):
    grid = sweep.load_config(write_yaml(tmp_path / "one.yaml", tiny_dir, methods="yarn:factor=4", lengths=2048,
                                        models=str(tiny_dir / "tiny"), metrics="passkey"))
    assert grid["methods"] == [("yarn x4", "yarn", {"factor": 4})] and grid["lengths"] == [2048]
    assert list(grid["metrics"]) == ["passkey"]
    grid = sweep.load_config(write_yaml(tmp_path / "one.yaml", tiny_dir, methods={"name": "yarn", "factor": 2}))
    assert [m[0] for m in grid["methods"]] == ["yarn x2"]
    assert sweep.load_config(write_yaml(tmp_path / "one.yaml", tiny_dir, methods="none"))["methods"] == [
        ("none", "none", {})]


def test_top_level_metric_settings(tiny_dir, tmp_path):
    c = sweep.load_config(write_yaml(tmp_path / "t.yaml", tiny_dir, metrics={"ppl": {"score": "tail"}, "passkey": None},
                                     passkey={"trials": 1, "depths": [0.5]}))
    assert c["metrics"]["passkey"] == {"depths": [0.5], "trials": 1, "seed": 0, "max_new_tokens": 12}
    assert c["metrics"]["ppl"]["score"] == "tail"
    with pytest.raises(ValueError, match="passkey settings are given twice"):
        sweep.load_config(write_yaml(tmp_path / "t.yaml", tiny_dir, metrics={"passkey": {"trials": 2}},
                                     passkey={"trials": 1}))
    with pytest.raises(ValueError, match=r"top-level settings \['needle'\] are for metric\(s\) the sweep does not run"):
        sweep.load_config(write_yaml(tmp_path / "t.yaml", tiny_dir, metrics=["ppl"], needle={"trials": 1}))


def test_metric_settings_checked_at_load(tiny_dir, tmp_path):
    corpus = str(tiny_dir / "corpus.txt")
    for metrics, match in [({"ppl": {"corpus": corpus, "stride": 64}}, "'stride' only applies to mode: sliding"),
                           ({"ppl": {"corpus": corpus, "score": "bogus"}}, "'score' must be all or tail"),
                           ({"ppl": {"corpus": corpus, "mode": "windows"}}, "'mode' must be chunks or sliding"),
                           ({"ppl": {"corpus": corpus, "mode": "sliding", "score": "tail"}}, "only defined for mode"),
                           ({"ppl": {"corpus": corpus, "mode": "sliding", "stride": 500}}, "'stride' must be at most"),
                           ({"ppl": {"corpus": corpus, "max_tokens": -5}}, "'max_tokens' must be an integer >= 1"),
                           ({"ppl": {"corpus": corpus, "tail_fraction": 0}}, r"'tail_fraction' must be a number in"),
                           ({"ppl": {"corpus": corpus, "docs": [1]}}, "'docs' must be a list of document names"),
                           ({"passkey": {"depths": [2]}}, r"passkey setting depths must be .* in \[0, 1\]"),
                           ({"passkey": {"depths": [0.5, 0.5]}}, "distinct"),
                           ({"passkey": {"trials": 0}}, "passkey setting trials must be an integer >= 1"),
                           ({"needle": {"max_new_tokens": 0}}, "needle setting max_new_tokens must be"),
                           ({"needle": {"seed": "x"}}, "'seed' must be an integer"),
                           ({"needle": {"corpus": None}}, "'corpus' must be a corpus name or path")]:
        cfg = write_yaml(tmp_path / "s.yaml", tiny_dir, metrics=metrics)
        with pytest.raises(ValueError, match=match):
            sweep.run(cfg, dry_run=True)                         # --dry-run reports them
    grid = sweep.load_config(write_yaml(tmp_path / "s.yaml", tiny_dir, metrics={"passkey": {"depths": 0.5}}))
    assert grid["metrics"]["passkey"]["depths"] == [0.5]


def test_plots_of_models_with_the_same_folder_name(tiny_dir, tmp_path):
    import shutil

    for run in ("run1", "run2"):
        shutil.copytree(tiny_dir / "tiny", tmp_path / run / "final")
    models = [str(tmp_path / "run1" / "final"), str(tmp_path / "run2" / "final")]
    cfg = write_yaml(tmp_path / "g.yaml", tiny_dir, models=models, methods=["none"], lengths=[300])
    sweep.run(cfg)
    assert sorted(p.name for p in (tmp_path / "g").glob("*.png")) == ["run1_final_ppl.png", "run2_final_ppl.png"]
    assert sweep._slugs(["org/model", "other/model", "x"]) == {"org/model": "org_model", "other/model": "other_model",
                                                               "x": "x"}
    assert sweep._slugs(["a b", "a_b", "/m/a b"]) == {"a b": "a_b", "a_b": "a_b-2", "/m/a b": "m_a_b"}


def test_cli_and_shipped_configs(tiny_dir, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    sweep.add_commands(parser.add_subparsers(dest="command"))
    cfg = write_yaml(tmp_path / "cli.yaml", tiny_dir)
    args = parser.parse_args(["sweep", str(cfg), "--dry-run"])
    assert args.func(args) == 0 and "[todo]" in capsys.readouterr().out
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "experiments"
    for name, n in (("rope_sweep", 7 * 4), ("passkey", 3 * 4)):
        path = root / f"{name}.yaml"
        assert path.read_text().startswith(f"# longctx sweep experiments/{name}.yaml")
        grid = sweep.load_config(path)
        assert grid["models"] == ["smollm2-135m"] and len(sweep.cells(grid)) == n
    rope = sweep.load_config(root / "rope_sweep.yaml")
    assert rope["lengths"] == [2048, 8192, 16384, 32768]
    assert rope["metrics"]["ppl"] | {} == {"corpus": "austen-lines", "docs": ["Pride and Prejudice", "Emma"],
                                          "max_tokens": 65536, "mode": "chunks", "stride": None, "score": "tail",
                                          "tail_fraction": 0.25}
    assert [m[0] for m in rope["methods"]] == ["none", "linear x4", "dynamic_ntk x4", "yarn x4", "yarn x8", "ntk x4",
                                               "abf (rope_theta=1000000)"]


def test_method_entry_errors_name_the_yaml_not_the_command_line():
    # a method without its factor was refused with "--method 'yarn': ... --factor F or yarn:factor=F": neither
    # --method nor --factor exists in a sweep YAML
    with pytest.raises(ValueError, match=r"^method entry 'yarn': method yarn needs a factor: yarn:factor=F$"):
        sweep.method_spec("yarn")
    with pytest.raises(ValueError, match=r"method linear needs a factor: \{name: linear, factor: F\}$"):
        sweep.method_spec({"name": "linear"})
    with pytest.raises(ValueError, match=r"unknown option\(s\) 'factr' for method 'yarn'"):
        sweep.method_spec("yarn:factr=4")


def test_wandb_settings_may_replace_the_sweeps_own(tiny_dir, tmp_path, monkeypatch):
    # wandb: {name: ...} (or dir, config: any wandb.init setting) was a TypeError: wandb.init() got multiple values
    # for keyword argument 'name'
    import sys
    import types

    seen = []
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kw: seen.append(kw) or "run"))
    grid = sweep.load_config(write_yaml(tmp_path / "w.yaml", tiny_dir, wandb={"name": "mine", "dir": str(tmp_path)}))
    assert sweep._wandb_start(grid["wandb"], grid, tmp_path / "out") == "run"
    assert seen[0]["name"] == "mine" and seen[0]["dir"] == str(tmp_path) and seen[0]["mode"] == "offline"
    grid = sweep.load_config(write_yaml(tmp_path / "v.yaml", tiny_dir, wandb={"project": "p"}))
    sweep._wandb_start(grid["wandb"], grid, tmp_path / "out")
    assert seen[1]["name"] == grid["name"] and seen[1]["dir"] == str(tmp_path / "out") and seen[1]["project"] == "p"


@pytest.mark.parametrize("metrics, match", [
    ({"passkey": {"trials": 1}, "ppl": {"corpus": "CORPUS", "docs": ["no such doc"]}},
     r"ppl setting 'docs' \(corpus .*corpus.txt'\): \['no such doc'\] not in the corpus"),
    ({"needle": {"corpus": "NOFILE"}}, r"needle setting 'corpus' '.*missing.txt': no such file")])
def test_corpus_and_docs_are_checked_before_any_model_loads(tiny_dir, tmp_path, monkeypatch, metrics, match):
    # a misspelt doc or corpus failed only in its first cell: after the model loaded and the cells before it ran
    import longctx.models

    monkeypatch.setattr(longctx.models, "load_model", lambda *a, **k: pytest.fail("corpora are checked first"))
    text = json.dumps(metrics).replace("CORPUS", str(tiny_dir / "corpus.txt"))
    text = text.replace("NOFILE", str(tmp_path / "missing.txt"))
    cfg = write_yaml(tmp_path / "c.yaml", tiny_dir, lengths=[300], metrics=json.loads(text))
    with pytest.raises(ValueError, match=match):
        sweep.run(cfg)
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("over, match", [
    ({"metrics": {"ppl": {"corpus": "austen", "tail_fraction": 0.5}}},
     r"ppl setting 'tail_fraction' only applies to score: tail \(score: all"),
    ({"metrics": {"ppl": {"corpus": "austen", "mode": "sliding", "tail_fraction": 0.5}}},
     r"ppl setting 'tail_fraction' only applies to score: tail"),
    ({"device": 5}, r"'device' must be null \(cuda when available\) or a device name"),
    ({"device": ""}, r"'device' must be null")])
def test_settings_that_would_be_ignored_or_fail_late_are_refused_at_load(tiny_dir, tmp_path, over, match):
    # tail_fraction with score: all was dropped from the cell (the same cells as without it): silently ignored;
    # device: 5 failed only once the model loaded
    cfg = write_yaml(tmp_path / "t.yaml", tiny_dir, **over)
    with pytest.raises(ValueError, match=match):
        sweep.load_config(cfg)


@pytest.mark.parametrize("device", ["gpu", "cuda:x"])
def test_a_device_torch_does_not_parse_is_refused_before_the_corpora(tiny_dir, tmp_path, monkeypatch, device):
    # only a non-string device was refused at load: "gpu" loaded the corpora, made the output folder (and a wandb
    # run) and failed in load_model
    import longctx.data
    import longctx.models

    monkeypatch.setattr(longctx.data, "load_corpus", lambda *a, **k: pytest.fail("the device is checked first"))
    monkeypatch.setattr(longctx.models, "load_model", lambda *a, **k: pytest.fail("the device is checked first"))
    cfg = write_yaml(tmp_path / "d.yaml", tiny_dir, device=device)
    with pytest.raises(ValueError, match=rf"device: '{device}' is not a device"):
        sweep.run(cfg)
    assert not (tmp_path / "d").exists()


def test_environment_names_an_mps_or_xpu_device_by_its_type():
    # every device but CUDA was recorded as hardware "cpu (...)": a sweep on device mps said cpu (save_json, the
    # ppl/passkey JSON, says "mps (...)")
    assert sweep.environment("mps")["hardware"].startswith("mps (")
    assert sweep.environment("xpu:0")["hardware"].startswith("xpu (")
    assert sweep.environment("cpu")["hardware"].startswith("cpu (")


@pytest.mark.parametrize("over, argv, match", [
    ({"methods": ["yarn:factor=-4"]}, ["--dry-run"], r"^longctx sweep .*bad\.yaml: option 'factor' must be a number > 0"),
    ({"foo": 1}, [], r"^longctx sweep: .*bad\.yaml: unknown key\(s\) \['foo'\]$"),
    ({}, ["--device", "gpu"], r"^longctx sweep --device: 'gpu' is not a device")])
def test_cli_refuses_a_bad_yaml_or_device_with_a_message(tiny_dir, tmp_path, monkeypatch, over, argv, match):
    # these were ValueError tracebacks (a --device the machine lacks only after the YAML was read)
    from longctx import cli

    monkeypatch.setattr(sweep, "run", lambda *a, **k: pytest.fail("checked before running"))
    with pytest.raises(SystemExit, match=match):
        cli.main(["sweep", str(write_yaml(tmp_path / "bad.yaml", tiny_dir, **over)), *argv])
    with pytest.raises(SystemExit, match=r"^longctx sweep: .*No such file or directory: .*nosuch\.yaml"):
        cli.main(["sweep", str(tmp_path / "nosuch.yaml")])
