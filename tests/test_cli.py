"""longctx ppl: option checks (before any slow load), corpus options, and what --out records. No model runs:
load_model, load_corpus and perplexity are replaced where a test gets that far."""

import json
import shlex

import pytest
import torch

import longctx.data
import longctx.eval
import longctx.models
from longctx import cli
from longctx.data import Document


def _boom(*args, **kwargs):
    raise AssertionError("checked before loading")


@pytest.fixture
def calls(monkeypatch):
    """load_corpus returns two documents and records its keyword arguments; load_model, encode_documents and
    perplexity are stand-ins; perplexity records its keyword arguments."""
    calls = {"order": []}

    def load_corpus(name, **kwargs):
        calls["order"].append("corpus")
        calls["load_corpus"] = kwargs
        return [Document("Pride and Prejudice", "x"), Document("Emma", "y")]

    def load_model(*args, **kwargs):
        calls["order"].append("model")
        return None, None

    def perplexity(model, ids, lengths, **kwargs):
        calls["perplexity"] = kwargs
        return {L: {"ppl": 1.0} for L in lengths}

    monkeypatch.setattr(longctx.data, "load_corpus", load_corpus)
    monkeypatch.setattr(longctx.models, "load_model", load_model)
    monkeypatch.setattr(longctx.data, "encode_documents", lambda tok, docs, **k: [torch.zeros(4, dtype=torch.long)])
    monkeypatch.setattr(longctx.eval, "perplexity", perplexity)
    return calls


@pytest.mark.parametrize("argv, match", [
    (["--tail-fraction", "0.5"], "--tail-fraction only applies to --score tail"),
    (["--factor", "4"], "--factor fills in the factor of methods that take one (.*yarn.*); no --method here uses it"),
    (["--method", "yarn:factor=2", "--factor", "4"], "no --method here uses it"),
    (["--docs", ""], "--docs: expected comma-separated document names"),
    (["--docs", "Emma, "], "--docs: expected comma-separated document names"),
    (["--corpus", ""], "--corpus is empty"),
    (["--model", " "], "--model is empty"),
    (["--device", "gpu"], "--device: 'gpu' is not a device")])
def test_ppl_refuses_ignored_and_empty_options_before_loading(monkeypatch, argv, match):
    monkeypatch.setattr(longctx.data, "load_corpus", _boom)
    monkeypatch.setattr(longctx.models, "load_model", _boom)
    with pytest.raises(SystemExit, match=match):
        cli.main(["ppl", *argv])


def test_ppl_checks_the_corpus_and_docs_before_the_model(tmp_path, monkeypatch):
    monkeypatch.setattr(longctx.models, "load_model", _boom)
    (tmp_path / "story.txt").write_text("the cat sat")
    (tmp_path / "rows.jsonl").write_text(json.dumps({"content": "the cat"}) + "\n")
    for argv, match in [(["--corpus", str(tmp_path / "nosuch.txt")], "--corpus .*nosuch.txt.*: no such file"),
                        (["--corpus", str(tmp_path / "story.txt"), "--docs", "nosuch"], r"--docs: \['nosuch'\] not in"),
                        (["--corpus", str(tmp_path / "rows.jsonl")],
                         r"rows.jsonl:1: no field 'text' .*text_field=\.\.\. \(--text-field on the command line\)$"),
                        (["--corpus", str(tmp_path / "story.txt"), "--split", "test"], "split='test' .*applies only"),
                        (["--corpus", str(tmp_path / "story.txt"), "--text-field", "body"], "text_field='body'")]:
        with pytest.raises(SystemExit, match=match):
            cli.main(["ppl", "--device", "cpu", *argv])


def test_ppl_passes_text_field_and_split_and_records_what_it_used(tmp_path, calls):
    out = tmp_path / "o.json"
    base = ["ppl", "--corpus", "some/dataset", "--lengths", "4", "--device", "cpu", "--out", str(out)]
    cli.main(base + ["--text-field", "content", "--split", "validation", "--docs", "Emma"])
    assert calls["order"] == ["corpus", "model"]
    assert calls["load_corpus"] == {"text_field": "content", "split": "validation"}
    assert "tail_fraction" not in calls["perplexity"]
    settings = json.loads(out.read_text())["settings"]
    assert settings["text_field"] == "content" and settings["split"] == "validation" and settings["docs"] == ["Emma"]
    assert "tail_fraction" not in settings                      # --score all: no tail fraction was used
    cli.main(base + ["--score", "tail"])
    assert calls["load_corpus"] == {"text_field": None, "split": None}
    assert calls["perplexity"]["tail_fraction"] == 0.25
    settings = json.loads(out.read_text())["settings"]
    assert settings["tail_fraction"] == 0.25 and "text_field" not in settings and "split" not in settings


def test_ppl_records_the_command_it_ran(tmp_path, monkeypatch, calls):
    monkeypatch.setattr("sys.argv", ["pytest", "-q"])          # not the argv main() parsed
    out = tmp_path / "o.json"
    argv = ["ppl", "--docs", "Pride and Prejudice,Emma", "--lengths", "2", "--device", "cpu", "--out", str(out)]
    cli.main(argv)
    command = json.loads(out.read_text())["settings"]["command"]
    assert command == shlex.join(["longctx", *argv]) and shlex.split(command) == ["longctx", *argv]


def test_commands_load_through_the_defining_modules(tmp_path, monkeypatch, calls):
    # the commands imported the lazy package attributes (``from longctx import load_model``): once a test had
    # monkeypatched longctx.load_model, its undo left the real function set on the package, and a later test's
    # patch of longctx.models.load_model went unseen (passkey and ppl tried to download "tiny" / loaded smollm2)
    from longctx.eval import passkey

    for name in longctx._LAZY:  # the state such an undo leaves; setitem deletes the key again afterwards
        monkeypatch.setitem(vars(longctx), name, _boom)
    cli.main(["ppl", "--corpus", "some/dataset", "--lengths", "4", "--device", "cpu", "--out", str(tmp_path / "p.json")])
    assert calls["order"] == ["corpus", "model"]
    monkeypatch.setattr(passkey, "passkey_accuracy", lambda m, t, lengths, **k: {L: {"accuracy": 1.0} for L in lengths})
    monkeypatch.setattr(passkey, "check_prompts", lambda *a, **k: None)  # (no tokenizer here)
    cli.main(["passkey", "--lengths", "64", "--depths", "0.5", "--trials", "1", "--device", "cpu",
              "--out", str(tmp_path / "k.json")])
    assert calls["order"] == ["corpus", "model", "model"]


def test_passkey_records_the_command_it_ran(tmp_path, monkeypatch):
    from longctx.eval import passkey

    monkeypatch.setattr("sys.argv", ["pytest", "-q"])
    monkeypatch.setattr(longctx.models, "load_model", lambda *a, **k: (None, None))
    monkeypatch.setattr(passkey, "passkey_accuracy", lambda m, t, lengths, **k: {L: {"accuracy": 1.0} for L in lengths})
    monkeypatch.setattr(passkey, "check_prompts", lambda *a, **k: None)  # (no tokenizer here)
    out = tmp_path / "o.json"
    argv = ["passkey", "--lengths", "64", "--depths", "0.5", "--trials", "1", "--device", "cpu", "--out", str(out)]
    cli.main(argv)
    assert json.loads(out.read_text())["settings"]["command"] == shlex.join(["longctx", *argv])


@pytest.mark.parametrize("argv", [["passkey", "--task", "needle", "--corpus", "/no/such.txt", "--lengths", "64"],
                                  ["passkey", "--task", "needle", "--corpus", "", "--lengths", "64"],
                                  ["stream-ppl", "--corpus", "/no/such.txt"], ["stream-ppl", "--corpus", ""]])
def test_bad_corpus_is_refused_before_the_model_loads(monkeypatch, argv):
    monkeypatch.setattr(longctx.models, "load_model", _boom)
    with pytest.raises(SystemExit, match="such.txt|is empty"):
        cli.main([*argv, "--device", "cpu"])


def test_stream_ppl_doc_shared_by_two_documents_is_refused(monkeypatch):
    monkeypatch.setattr(longctx.models, "load_model", _boom)
    monkeypatch.setattr(longctx.data, "load_corpus", lambda name, **k: [Document("A", "x"), Document("A", "y")])
    with pytest.raises(SystemExit, match=r"--doc: \['A'\] name more than one document"):
        cli.main(["stream-ppl", "--corpus", "c.jsonl", "--doc", "A", "--device", "cpu"])


@pytest.mark.parametrize("argv, match", [
    # a misspelt factor= read as a missing factor: "needs a factor", the typo unnamed
    (["ppl", "--method", "yarn:factr=4"], r"--method 'yarn:factr=4': unknown option\(s\) 'factr' for method 'yarn'; "
                                          r"allowed options: .*factor"),
    (["passkey", "--method", "linear:factr=4"], r"unknown option\(s\) 'factr' for method 'linear'"),
    (["generate", "--prompt", "x", "--method", "yarn:factr=4"], r"unknown option\(s\) 'factr' for method 'yarn'"),
    # generate and chat have no --factor; the error offered it
    (["generate", "--prompt", "x", "--method", "yarn"], r"method yarn needs a factor: yarn:factor=F$"),
    (["chat", "--method", "linear"], r"method linear needs a factor: linear:factor=F$"),
    # generate and chat checked their methods' options only once the model had loaded (a traceback)
    (["generate", "--prompt", "x", "--method", "yarn:factor=4:foo=1"], r"unknown option\(s\) 'foo' for method 'yarn'"),
    (["generate", "--prompt", "x", "--method", "yarn:factor=0"], "option 'factor' must be a number > 0"),
    (["chat", "--method", "s2attn:backend=fast"], "option 'backend' must be one of"),
    (["chat", "--window-size", "0"], "option 'window_size' must be a positive integer, got 0")])
def test_method_options_are_checked_before_loading_with_errors_naming_them(monkeypatch, argv, match):
    monkeypatch.setattr(longctx.data, "load_corpus", _boom)
    monkeypatch.setattr(longctx.models, "load_model", _boom)
    with pytest.raises(SystemExit, match=match):
        cli.main([*argv, "--device", "cpu"])


@pytest.mark.parametrize("argv, match", [
    (["--policy", "sink"], "--policy: expected distinct comma-separated names from sinks, window, dense, recompute"),
    (["--policy", "sinks,sinks"], "--policy: expected distinct"),
    (["--window-size", "0"], "option 'window_size' must be a positive integer"),
    (["--sink-size", "-1"], "option 'sink_size' must be an integer >= 0"),
    (["--window-size", "20", "--chunk-size", "30"], "--chunk-size must be >= 1 and, for policies other than dense"),
    (["--chunk-size", "0"], "--chunk-size must be >= 1"),
    (["--curve-every", "0"], "--curve-every must be >= 1")])
def test_stream_ppl_checks_its_options_before_loading(monkeypatch, argv, match):
    # these failed only after the corpus and the model had loaded, with a traceback
    monkeypatch.setattr(longctx.data, "load_corpus", _boom)
    monkeypatch.setattr(longctx.models, "load_model", _boom)
    with pytest.raises(SystemExit, match=match):
        cli.main(["stream-ppl", *argv, "--device", "cpu"])


@pytest.mark.parametrize("option", ["--max-tokens", "--dense-max-tokens"])
@pytest.mark.parametrize("value", ["0", "-5"])
def test_stream_ppl_refuses_token_counts_below_one(monkeypatch, capsys, option, value):
    # --max-tokens -5 streamed all but the last 5 tokens (ids[:-5]); --dense-max-tokens 0 the whole stream
    monkeypatch.setattr(longctx.data, "load_corpus", _boom)
    monkeypatch.setattr(longctx.models, "load_model", _boom)
    with pytest.raises(SystemExit):
        cli.main(["stream-ppl", option, value, "--device", "cpu"])
    assert f"argument {option}: must be an integer >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("argv, match", [
    # two methods of one slot: registry.apply refused the second only once the model had loaded (a traceback)
    (["generate", "--prompt", "x", "--method", "yarn:factor=2", "--method", "ntk:factor=2"],
     r"--method 'ntk:factor=2': 'ntk' and 'yarn' \(--method 'yarn:factor=2'\) both change the model's rope"),
    (["chat", "--method", "pi:factor=2", "--method", "linear:factor=4"], r"'linear' and 'pi' .* both change"),
    (["generate", "--prompt", "x", "--method", "streaming", "--method", "streaming:window_size=10"],
     r"'streaming' and 'streaming' .* both change the model's cache"),
    # s2attn (train_only, the default) is inactive in eval mode: generation ran the plain model under its name
    (["generate", "--prompt", "x", "--method", "s2attn"], r"--method 's2attn': s2attn is active only in training"),
    (["chat", "--method", "s2attn:backend=sdpa"], r"s2attn is active only in training .*s2attn:train_only=false")])
def test_generate_and_chat_refuse_methods_that_clash_or_do_nothing_before_loading(monkeypatch, argv, match):
    monkeypatch.setattr(longctx.models, "load_model", _boom)
    with pytest.raises(SystemExit, match=match):
        cli.main([*argv, "--device", "cpu"])


@pytest.mark.parametrize("device, match", [("gpu", "is not a device"), ("meta", "holds no data")])
@pytest.mark.parametrize("argv", [
    ["merge", "some/artifact", "--out", "merged"],
    ["generate", "--prompt", "hi"],
    ["chat"],
    ["stream-ppl", "--corpus", "austen"],
    ["passkey", "--lengths", "64"],
    ["ppl", "--lengths", "64"]])
def test_every_command_refuses_a_bad_device_before_loading(monkeypatch, argv, device, match):
    # merge (and the others) loaded the base model, then failed inside torch with a traceback; with --device meta the
    # model moved to meta (its weights gone) and the command failed there ("Tensor.item() cannot be called on meta
    # tensors"); merge left a folder with config.json only
    import longctx.train

    monkeypatch.setattr(longctx.data, "load_corpus", _boom)
    monkeypatch.setattr(longctx.models, "load_model", _boom)
    monkeypatch.setattr(longctx.train, "merge_artifact", _boom)
    with pytest.raises(SystemExit, match=f"--device: '{device}' {match}"):
        cli.main([*argv, "--device", device])
    with pytest.raises(ValueError, match=match):
        longctx.models.check_device(device)


@pytest.mark.parametrize("argv", [
    ["ppl", "--lengths", "64"],
    ["passkey", "--lengths", "64"],
    ["generate", "--prompt", "hi"],
    ["chat"],
    ["stream-ppl", "--corpus", "austen"]])
def test_every_command_refuses_a_bad_dtype_before_loading(monkeypatch, argv):
    # --dtype went unchecked to load_model: a ValueError traceback, and in ppl / stream-ppl only after the corpus loaded
    monkeypatch.setattr(longctx.data, "load_corpus", _boom)
    monkeypatch.setattr(longctx.models, "load_model", _boom)
    with pytest.raises(SystemExit, match="--dtype must be one of bf16, .*got 'fp64'"):
        cli.main([*argv, "--dtype", "fp64", "--device", "cpu"])


def test_estimate_keeps_its_own_dtypes():
    assert cli.main(["estimate", "--length", "64", "--dtype", "half"]) == 0   # not one of load_model's names


@pytest.mark.parametrize("argv", [
    ["ppl", "--lengths", "64"],
    ["passkey", "--lengths", "64"],
    ["generate", "--prompt", "hi"],
    ["chat"],
    ["stream-ppl"]])
def test_a_model_that_does_not_load_is_a_message(tmp_path, monkeypatch, argv):
    # load_model's errors (here: no such folder) came out as a traceback
    monkeypatch.setattr(longctx.data, "load_corpus", lambda name, **k: [Document("Emma", "x")])
    with pytest.raises(SystemExit, match=f"--model '{tmp_path}/nosuch': .* is not a model folder"):
        cli.main([*argv, "--model", str(tmp_path / "nosuch"), "--device", "cpu"])


@pytest.mark.parametrize("argv", [
    ["ppl", "--lengths", "64", "--method", "none"],
    ["passkey", "--lengths", "64", "--method", "none"],
    ["generate", "--prompt", "hi"]])
def test_a_method_the_loaded_model_refuses_stops_the_command_with_a_message(monkeypatch, argv):
    # registry.apply's errors once the model had loaded came out as a traceback; ppl and passkey first evaluated the
    # methods before it (minutes on a real model), then lost those results
    from conftest import tiny_model

    from longctx.eval import passkey

    model = tiny_model("llama")
    monkeypatch.setattr(longctx.data, "load_corpus", lambda name, **k: [Document("Emma", "x")])
    monkeypatch.setattr(longctx.models, "load_model", lambda *a, **k: (model, None))
    monkeypatch.setattr(longctx.data, "encode_documents", lambda tok, docs, **k: [torch.zeros(4, dtype=torch.long)])
    monkeypatch.setattr(longctx.eval, "perplexity", _boom)
    monkeypatch.setattr(passkey, "passkey_accuracy", _boom)
    with pytest.raises(SystemExit, match=r"--method yarn.*: option 'layer_types' applies only to models with "
                                         r"per-layer-type RoPE"):
        cli.main([*argv, "--method", "yarn:factor=2:layer_types=full_attention", "--device", "cpu"])
    assert not longctx.active_patches(model)


@pytest.mark.parametrize("argv, match", [
    (["--depths", "1.5"], r"longctx passkey: depths must be a non-empty list of numbers in \[0, 1\]"),
    (["--trials", "0"], "longctx passkey: trials must be an integer >= 1, got 0"),
    (["--max-new-tokens", "0"], "longctx passkey: max_new_tokens must be an integer >= 1"),
    (["--method", "yarn:factor=-1"], "--method yarn: option 'factor' must be a number > 0, got -1"),
    (["--method", "yarn:factor=2:beta_fast=0.5"], "--method yarn: option 'beta_fast' .* must be > 'beta_slow'")])
def test_passkey_refuses_bad_settings_with_a_message_before_loading(monkeypatch, argv, match):
    # these were ValueError tracebacks (ppl, generate and chat gave messages for the same method options)
    monkeypatch.setattr(longctx.models, "load_model", _boom)
    with pytest.raises(SystemExit, match=match):
        cli.main(["passkey", "--lengths", "64", *argv, "--device", "cpu"])


@pytest.mark.parametrize("policy", ["sinks", "sinks,window"])
def test_stream_ppl_refuses_dense_max_tokens_without_a_dense_policy(monkeypatch, policy):
    # it was accepted and silently did nothing: only dense and recompute are cut to it
    monkeypatch.setattr(longctx.data, "load_corpus", _boom)
    monkeypatch.setattr(longctx.models, "load_model", _boom)
    with pytest.raises(SystemExit, match="--dense-max-tokens only applies to --policy dense or recompute"):
        cli.main(["stream-ppl", "--policy", policy, "--dense-max-tokens", "100", "--device", "cpu"])


def test_setup_cfg_requires_a_transformers_that_longctx_works_with():
    # it said transformers>=5.0: with 5.0-5.13 `import longctx` fails (no cache_utils.get_layer_types_and_kwargs), with
    # 5.14 RoPE methods on phi3 fail (compute_default_rope_parameters takes no layer_type); the suite passes on 5.17
    import configparser
    from pathlib import Path

    import transformers
    from packaging.requirements import Requirement

    cfg = configparser.ConfigParser()
    cfg.read(Path(__file__).resolve().parents[1] / "setup.cfg")
    lines = [x.strip() for x in cfg["options"]["install_requires"].splitlines()]
    spec = next(Requirement(x) for x in lines if x.startswith("transformers")).specifier
    assert "5.13.1" not in spec and "5.14.1" not in spec
    assert "5.17.0" in spec and "5.23.0" in spec and transformers.__version__ in spec


@pytest.mark.parametrize("argv, method, match", [
    (["ppl", "--lengths", "64"], "s2attn:train_only=false:backend=flash", "needs the flash_attn package"),
    (["passkey", "--lengths", "64"], "streaming:sink_size=2:window_size=8",
     r"layer types \['chunked_attention'\] are not supported")])
def test_a_method_the_loaded_model_refuses_with_other_errors_is_a_message(monkeypatch, argv, method, match):
    # apply_method turned only ValueError / TypeError into a message: s2attn's ImportError (flash backend without
    # flash_attn) and streaming's NotImplementedError (layer kinds it does not support) came out as tracebacks
    from conftest import tiny_model

    from longctx.eval import passkey
    from longctx.methods import s2attn

    model = tiny_model("llama", layer_types=["chunked_attention", "full_attention"], attention_chunk_size=8)
    monkeypatch.setattr(s2attn, "flash_available", lambda: False)
    monkeypatch.setattr(longctx.data, "load_corpus", lambda name, **k: [Document("Emma", "x")])
    monkeypatch.setattr(longctx.models, "load_model", lambda *a, **k: (model, None))
    monkeypatch.setattr(longctx.data, "encode_documents", lambda tok, docs, **k: [torch.zeros(4, dtype=torch.long)])
    monkeypatch.setattr(longctx.eval, "perplexity", _boom)
    monkeypatch.setattr(passkey, "passkey_accuracy", _boom)
    with pytest.raises(SystemExit, match=f"^--method {method.split(':')[0]}.*: .*{match}"):
        cli.main([*argv, "--method", method, "--device", "cpu"])
    assert not longctx.active_patches(model)


@pytest.mark.parametrize("command", [["ppl", "--lengths", "64"], ["passkey", "--lengths", "64"]])
@pytest.mark.parametrize("methods, match", [
    (["pi:factor=4", "linear:factor=4"], "'pi x4' and 'linear x4' are the same method"),
    (["yarn:factor=2", "yarn:factor=2.0:beta_fast=32"], r"'yarn x2' and 'yarn x2 \(beta_fast=32\)' are the same")])
def test_the_same_method_under_two_labels_is_refused_before_loading(monkeypatch, command, methods, match):
    # only equal labels were refused: an alias (pi = linear) or a default given computed the same method twice (the
    # sweep refuses it)
    monkeypatch.setattr(longctx.data, "load_corpus", _boom)
    monkeypatch.setattr(longctx.models, "load_model", _boom)
    with pytest.raises(SystemExit, match=match):
        cli.main([*command, *(x for m in methods for x in ("--method", m)), "--device", "cpu"])
    assert cli.parse_methods(["yarn:factor=2", "yarn:factor=2:beta_fast=16", "linear:factor=2"], None)  # distinct


def test_methods_differing_past_six_digits_get_distinct_labels():
    # labels wrote numbers with :g, so yarn x1.0000001 and yarn x1.0000002 both read "yarn x1" and were refused as
    # given twice; ordinary values keep their short labels (the committed tables' "yarn x4")
    labels = [label for label, _, _ in cli.parse_methods(
        ["yarn:factor=1.0000001", "yarn:factor=1.0000002", "yarn:factor=4:beta_fast=32.5", "abf:rope_theta=1e6"], None)]
    assert labels == ["yarn x1.0000001", "yarn x1.0000002", "yarn x4 (beta_fast=32.5)", "abf (rope_theta=1e+06)"]


@pytest.mark.parametrize("error", [ModuleNotFoundError("No module named 'flash_attn_2_cuda'", name="flash_attn_2_cuda"),
                                   ImportError("cannot import name 'x' from 'transformers'", name="transformers"),
                                   NotImplementedError()])
def test_apply_method_keeps_the_traceback_of_a_failed_import_or_a_bare_not_implemented(monkeypatch, error):
    # ImportError / NotImplementedError became messages for the errors the methods raise on purpose (s2attn's flash
    # backend without flash_attn, streaming on unsupported layer kinds); a failed import deep inside (a broken or
    # missing module, a moved name) or an unwritten hook was a one-line "--method ...: ..." without its traceback
    from longctx import registry

    def attach(*a, **k):
        raise error

    monkeypatch.setattr(registry, "apply", attach)
    with pytest.raises(type(error)):
        cli.apply_method(None, "yarn x2", "yarn", {"factor": 2})
    monkeypatch.setattr(registry, "apply", lambda *a, **k: (_ for _ in ()).throw(ImportError("needs flash_attn")))
    with pytest.raises(SystemExit, match="^--method yarn x2: needs flash_attn$"):  # one raised on purpose: a message
        cli.apply_method(None, "yarn x2", "yarn", {"factor": 2})
