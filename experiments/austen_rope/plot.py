"""python experiments/austen_rope/plot.py  ->  experiments/austen_rope/austen_rope.png (from results_austen-lines.json)"""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

here = Path(__file__).parent
results = json.loads((here / "results_austen-lines.json").read_text())["results"]
fig, ax = plt.subplots(figsize=(6.4, 4.2))
for label, by_length in results.items():
    lengths = sorted(int(L) for L in by_length)
    ppl = [by_length[str(L)]["ppl"] for L in lengths]  # an overflowed one is the string "Infinity" (strict JSON)
    ax.plot(lengths, [float(v) if isinstance(v, str) else v for v in ppl], marker="o", label=label)
ax.axvline(8192, color="grey", ls=":", lw=1)
ax.text(8192, 22, " trained 8k", color="grey", fontsize=8)
ax.set(xscale="log", yscale="log", xlabel="context length (tokens)", ylabel="perplexity (last quarter of window)",
       title="SmolLM2-135M + RoPE scaling, no fine-tuning (Austen, H100 bf16)")
ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
ax.set_xticks(lengths, [f"{L // 1024}k" for L in lengths])
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(here / "austen_rope.png", dpi=120)
print("wrote", here / "austen_rope.png")
