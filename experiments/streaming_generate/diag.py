import time, statistics, torch, longctx
from longctx.chat import stream_generate
model, tok = longctx.load_model("smollm2-135m", dtype="bf16", device="cuda")
ids = tok("It is a truth universally acknowledged, that a single man", add_special_tokens=False, return_tensors="pt")["input_ids"]
with longctx.applied(model, "streaming", sink_size=4, window_size=1020):
    for dec in (False, True):
        t = [time.perf_counter()]
        for x in stream_generate(model, ids, 1600, decoder=dec):
            t.append(time.perf_counter())
        d = [1e3 * (b - a) for a, b in zip(t, t[1:])]
        print(f"decoder={dec}: median ms/token tokens 100-900: {statistics.median(d[100:900]):.2f}, "
              f"tokens 1100-1600: {statistics.median(d[1100:]):.2f}, p90 {sorted(d[1100:])[int(0.9*len(d[1100:]))]:.2f}", flush=True)
    from longctx.methods.sink_decoder import SinkDecoder
    from longctx.methods.streaming import prefill
    import longctx.registry as R
    patch = [p for p in R.active_patches(model) if p.method == "streaming"][0]
    cache = patch.new_cache(); prefill(model, torch.randint(0, 1000, (1, 1100), device="cuda"), cache)
    x = torch.tensor([[5]], device="cuda")
    with SinkDecoder(model, cache) as d:
        for _ in range(5): d.step(x)
        for label, fn in (("step+sync", lambda: (d.step(x), torch.cuda.synchronize())),
                          ("step+argmax+tensor", lambda: torch.tensor([[int(d.step(x)[0, -1].argmax())]], device="cuda")),
                          ("replay+sync", lambda: (d.graph.replay(), torch.cuda.synchronize()))):
            ts = []
            for _ in range(200):
                a = time.perf_counter(); fn(); ts.append(1e3 * (time.perf_counter() - a))
            print(label, f"{statistics.median(ts):.3f} ms", flush=True)
