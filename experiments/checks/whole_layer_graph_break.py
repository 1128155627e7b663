"""python experiments/checks/whole_layer_graph_break.py > experiments/checks/whole_layer_graph_break.txt 2>&1

CPU check: compile_layers(scope="layer") with gradient checkpointing, on a transformers version that checkpoints
inside the decoder layer's forward (5.23: the checkpoint is traced into the layer's graph). Full attention: one graph
per layer class. S2's general path (backend sdpa) breaks the graph inside the checkpoint: dynamo then compiles no
graph at all and the layers run eagerly (the recipe warns: train.check_layer_graphs)."""
import torch
import torch._dynamo.utils
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

import longctx
from longctx import train


def run(s2: bool):
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=4, vocab_size=128, max_position_embeddings=512)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    patch = longctx.apply(model, "s2attn", group_size=16, backend="sdpa") if s2 else None
    x = torch.randint(0, 128, (1, 64))

    def step():
        model.zero_grad(set_to_none=True)
        loss = model(x, labels=x, use_cache=False).loss
        loss.backward()
        return loss.detach(), model.model.layers[2].self_attn.q_proj.weight.grad.clone()

    eager = step()
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    train.compile_layers(model, scope="layer")
    step()
    compiled = step()
    train.uncompile_layers(model)
    if patch is not None:
        patch.remove()
    wrapped = train.checkpoints_inside_forward(model.model.layers[0])
    print(f"{'S2 sdpa (general path)' if s2 else 'full attention'}: checkpoint inside forward: {wrapped}; "
          f"graphs compiled: {counters['stats']['unique_graphs']}; graph breaks: {sum(counters['graph_break'].values())}; "
          f"loss difference to eager: {(compiled[0] - eager[0]).abs().item():.3g}; "
          f"largest gradient difference: {(compiled[1] - eager[1]).abs().max().item():.3g}")


print(f"torch {torch.__version__}, transformers {transformers.__version__}")
run(False)
run(True)
