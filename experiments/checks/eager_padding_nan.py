# python experiments/checks/eager_padding_nan.py   (CPU): last-token logits of a left-padded row against the row alone,
# plain transformers and under the streaming patch, eager and SDPA attention, tiny llama in fp64. Output: eager_padding_nan.txt
import sys, torch, warnings
from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests")); warnings.simplefilter("ignore")
import longctx
from conftest import tiny_model
for impl in ["eager", "sdpa"]:
    m = tiny_model("llama").double(); m.set_attn_implementation(impl)
    g = torch.Generator().manual_seed(0)
    b = torch.randint(3, 128, (1, 5), generator=g)
    x = torch.cat([torch.zeros(1, 2, dtype=torch.long), b], 1)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        plain_alone = m(b).logits[0, -1]
        plain_pad = m(x, attention_mask=mask).logits[0, -1]
        with longctx.applied(m, "streaming", sink_size=2, window_size=10) as p:
            c = p.new_cache(); s_alone = m(b, past_key_values=c, use_cache=True).logits[0, -1]
            c = p.new_cache(); s_pad = m(x, attention_mask=mask, past_key_values=c, use_cache=True).logits[0, -1]
    print(impl, "plain pad vs alone", float((plain_pad - plain_alone).abs().max()), "| streaming pad vs alone", float((s_pad - s_alone).abs().max()))
