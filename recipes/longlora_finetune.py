#!/usr/bin/env python
"""LongLoRA fine-tuning (Chen et al. 2023, arXiv:2309.12307): extend a model's context window with
a RoPE method (position interpolation by default), shifted sparse attention (S2-Attn) in training,
and LoRA+ (LoRA on the attention projections plus trainable embedding and norms).

    python recipes/longlora_finetune.py --config configs/tiny/longlora_cpu.yaml
    accelerate launch --config_file configs/accelerate/ddp.yaml recipes/longlora_finetune.py \\
        --config configs/smollm2/135m_longlora_32k.yaml train.steps=100 --no-wandb
    longctx merge runs/smollm2-135m-longlora-32k/final --out runs/smollm2-135m-longlora-32k/merged

Overrides are ``key=value`` (dotted keys into sections, values parsed as YAML). ``resume=true``
continues from the latest checkpoint, exactly, on the same number of processes (``resume_from=FOLDER``: from
that one; rolling back inside one output_dir needs the later checkpoints deleted first). Steps: config -> model + RoPE + S2-Attn -> LoRA+ ->
packed data -> AdamW + warmup schedule -> train with checkpoints -> artifact (OUTPUT_DIR/final).
With ``eval.every: N`` the held-out perplexity (``data.holdout`` documents, full attention) is logged
at step 0, every N steps and at the end (rows with ``heldout_ppl`` in OUTPUT_DIR/log.jsonl); it does
not change the training. ``eval.keep_best: true`` also saves the best of those models to OUTPUT_DIR/best.
``train.compile: true`` compiles each decoder layer's parts (one GPU or DDP; 1.37x faster steps for
SmolLM2 on an H100, experiments/longlora_compile); with ``train.compile_scope: layer`` each whole layer
(S2's flex fast path traced inside: another 1.07x, experiments/longlora_compile_layer). ``train.gc_every: N`` (default 0: off) keeps Python's
automatic garbage collection out of the steps: young generations after each step, all every N steps
(no measurable throughput change in the SmolLM2 recipe, experiments/longlora_gc).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm

import longctx
from longctx import lora, train


def run(cfg: dict, use_wandb: bool = True) -> dict:
    t = cfg["train"]
    train.eval_settings(cfg)  # a wrong eval section fails here, before the slow loads
    accelerator = train.make_accelerator(cfg)
    compile_kw = train.compile_setting(cfg, accelerator)  # a wrong train.compile fails here, before the loads
    collector = train.ManualGC(t["gc_every"])  # and a wrong train.gc_every
    main_process = accelerator.is_main_process
    set_seed(t["seed"])
    if cfg["make_tiny"]:  # the tiny CPU config builds its random model and corpus
        with accelerator.main_process_first():
            train.make_tiny(**cfg["make_tiny"])
    out = Path(cfg["output_dir"])
    out.mkdir(parents=True, exist_ok=True)

    # 1. The model, with its context extended: RoPE method, then S2-Attn (active in training only).
    model, tokenizer = longctx.load_model(cfg["model"], dtype=cfg["dtype"], device=train.model_device(accelerator),
                                          attn_implementation=cfg["attn_implementation"])
    trained_length = model.config.max_position_embeddings
    base_dtype = str(model.dtype).removeprefix("torch.")
    rope = train.rope_options(cfg, trained_length)
    rope_patch = longctx.apply(model, rope[0], **rope[1]) if rope else None
    s2attn = train.s2attn_options(cfg)
    s2attn_patch = longctx.apply(model, "s2attn", **s2attn) if s2attn is not None else None

    # 2. LoRA+: LoRA on attention, embedding and norms fully trainable.
    model = lora.prepare(model, **cfg["lora"], verbose=main_process)
    if train.trainable_dtype(accelerator) is not None:  # fp32 master copies (DeepSpeed: its precision)
        lora.upcast_trainable(model, train.trainable_dtype(accelerator))
    if t["gradient_checkpointing"]:
        train.enable_activation_checkpointing(model)
    model.config.use_cache = False

    # 3. Data: long documents packed into fixed-length sequences (held-out documents left out).
    seq_len = cfg["data"]["seq_len"] or cfg["target_length"]
    corpora = cfg["data"]["corpus"]
    docs = [d for c in ([corpora] if isinstance(corpora, str) else corpora) for d in longctx.load_corpus(c)]
    docs = train.select_documents(docs, cfg["data"]["holdout"])
    sequences = train.pack_documents(tokenizer, docs, seq_len)
    if main_process:
        print(f"{len(docs)} documents -> {len(sequences)} sequences of {seq_len:,} tokens", file=sys.stderr)

    # 4. Optimizer and schedule; accelerate wraps them (DDP/FSDP/DeepSpeed, mixed precision).
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t["lr"], betas=tuple(t["betas"]), eps=t["eps"],
                                  weight_decay=t["weight_decay"])
    scheduler = train.make_scheduler(optimizer, t["lr_scheduler"], t["warmup_steps"], t["steps"])
    if compile_kw is not None:  # fused kernels for each decoder layer, or for its parts (train.compile_scope)
        train.compile_layers(model, compile_kw, t["compile_scope"])
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    params = [p for p in model.parameters() if p.requires_grad]  # FSDP replaces them with sharded ones
    state = train.TrainState()
    checkpoint = train.resume_folder(cfg)
    if checkpoint is not None:
        train.check_resume(checkpoint, cfg)
        state = train.load_checkpoint(accelerator, checkpoint)
        train.check_resumed_state(out, state, accelerator.num_processes, t["steps"])
        if main_process:
            print(f"resumed from {checkpoint} at step {state.step}", file=sys.stderr)
    state.processes = accelerator.num_processes

    # 5. Train, with held-out perplexity every eval.every steps (eval mode: full attention).
    tracker = train.Tracker(accelerator, cfg, use_wandb, start_step=state.step)
    evaluator = train.HeldoutEval(cfg, accelerator, tokenizer) if train.eval_settings(cfg) else None
    artifact_info = dict(cfg=cfg, rope_patch=rope_patch, s2attn_patch=s2attn_patch, base_dtype=base_dtype,
                         trained_length=trained_length, seq_len=seq_len)
    last_eval = None

    def evaluate():
        nonlocal last_eval
        last_eval, improved = evaluator(model)
        tracker.log(last_eval, state.step)
        if main_process:
            ppl = ", ".join(f"{L}: {v:.4g}" for L, v in last_eval["heldout_ppl"].items() if v is not None)
            print(f"step {state.step}: held-out perplexity {ppl} ({last_eval['eval_seconds']:.1f} s)",
                  file=sys.stderr)
        if improved and evaluator.settings["keep_best"]:
            settings = artifact_settings(accelerator, model, state, **artifact_info, heldout=last_eval)
            train.save_artifact(accelerator, model, out / "best", settings)

    if evaluator is not None:
        rows = train.read_log(out) if main_process else []
        evaluator.resume(rows)
        # resumed: the latest held-out perplexity so far (at the last step nothing more is evaluated; the artifact
        # records it as the uninterrupted run's does)
        last_eval = next((r for r in reversed(rows) if "heldout_ppl" in r), None)
        if state.step == 0:
            evaluate()  # the starting point
    accumulation = accelerator.gradient_accumulation_steps
    start_step, breaks_before = state.step, train.graph_break_count()
    bar = tqdm(total=t["steps"], initial=state.step, disable=not main_process, desc="train", dynamic_ncols=True)
    model.train()
    with collector:  # no automatic GC pauses inside the steps
        while state.step < t["steps"]:
            started, losses = time.time(), []
            for _ in range(accumulation):
                index = train.sample_indices(len(sequences), state.micro_step, accelerator.process_index,
                                             accelerator.num_processes, t["micro_batch_size"], t["seed"])
                batch = sequences[index].to(accelerator.device)
                with accelerator.accumulate(model):
                    loss = model(input_ids=batch, labels=batch).loss
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and t["max_grad_norm"]:
                        accelerator.clip_grad_norm_(params, t["max_grad_norm"])
                    optimizer.step()
                    optimizer.zero_grad()
                state.micro_step += 1
                state.tokens += batch.numel() * accelerator.num_processes
                losses.append(loss.detach().float())
            lr = scheduler.get_last_lr()[0]  # this step's; scheduler.step() sets the next one's
            scheduler.step()
            if compile_kw is not None and state.step == start_step:
                train.check_layer_graphs(accelerator.unwrap_model(model), t["compile_scope"], breaks_before)
            state.step += 1
            collector.step(state.step)  # inside the step's time (its logged seconds include the collection)
            loss = accelerator.reduce(torch.stack(losses).mean(), reduction="mean").item()
            seconds = time.time() - started
            tokens_per_s = accumulation * t["micro_batch_size"] * seq_len * accelerator.num_processes / seconds
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}")
            if state.step % t["log_every"] == 0 or state.step == t["steps"]:
                metrics = {"loss": loss, "lr": lr, "tokens": state.tokens,
                           "step_seconds": seconds, "tokens_per_s": tokens_per_s}
                if torch.cuda.is_available():
                    metrics["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
                tracker.log(metrics, state.step)
            if evaluator is not None and evaluator.due(state.step):
                evaluate()
            if state.step % t["checkpoint_every"] == 0 or state.step == t["steps"]:
                train.save_checkpoint(accelerator, out, state, keep=t["keep_checkpoints"], config=cfg)
    bar.close()
    tracker.close()

    # 6. The artifact: adapter + trained embedding/norms + the settings merge needs.
    model.eval()
    if compile_kw is not None:
        train.uncompile_layers(accelerator.unwrap_model(model))  # the returned model runs eagerly
    settings = artifact_settings(accelerator, model, state, **artifact_info, heldout=last_eval)
    artifact = train.save_artifact(accelerator, model, out / "final", settings)
    if main_process:
        print(f"artifact: {artifact}  (merge: longctx merge {artifact} --out {out / 'merged'})", file=sys.stderr)
    return {"model": accelerator.unwrap_model(model), "tokenizer": tokenizer, "artifact": artifact,
            "state": state, "log": train.read_log(out)}


def artifact_settings(accelerator, model, state, *, cfg, rope_patch, s2attn_patch, base_dtype, trained_length,
                      seq_len, heldout=None) -> dict:
    """What ``longctx.json`` records: base model, RoPE method, S2-Attn and LoRA settings (merge needs
    them), training progress, and the latest held-out perplexity if any."""
    local = Path(str(cfg["model"])).expanduser()
    settings = {
        "base_model": str(local.resolve()) if local.exists() else cfg["model"],
        "base_dtype": base_dtype, "trained_length": trained_length, "target_length": cfg["target_length"],
        "rope": {"method": rope_patch.method, "options": rope_patch.options.to_dict()} if rope_patch else None,
        "s2attn": s2attn_patch.options.to_dict() if s2attn_patch else None,
        "lora": {k: v for k, v in accelerator.unwrap_model(model).longctx_lora.items() if k != "counts"},
        "seq_len": seq_len, "steps": state.step, "tokens": state.tokens, "config": cfg,
    }
    if heldout is not None:
        settings["heldout_ppl"] = heldout["heldout_ppl"]
    return settings


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (configs/...)")
    parser.add_argument("--no-wandb", action="store_true", help="no wandb logging (log.jsonl only)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.steps=50")
    args = parser.parse_args(argv)
    cfg = train.load_config(args.config, args.overrides)
    return run(cfg, use_wandb=not args.no_wandb)


if __name__ == "__main__":
    main()
