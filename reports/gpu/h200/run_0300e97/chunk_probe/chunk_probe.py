"""Throwaway: the fused hedgehog forward at Wan shapes under SLOTS_PER_SM = argv[1] (graph replay, per kernel)."""
import json, sys, os
import torch, triton
from methods.kernels import linear_attention_triton as fused
from harness.benchmarks.linear_triton_gpu import model_shape, processor_inputs, feature_maps

slots = int(sys.argv[1])
fused.SLOTS_PER_SM = slots
fused._slots.cache_clear(); fused._chunking.cache_clear()
dev = torch.device("cuda")
out = {}
for model in ("wan1.3b", "wan14b"):
    shape = model_shape(model)
    q, k, v = (t.detach() for t in processor_inputs(shape, dev))
    qm, km = feature_maps("hedgehog", shape[1], shape[3], dev)
    wq, wk = qm.weight.detach(), km.weight.detach()
    ref = fused.float64_reference(q[:, :, :256], k, v, "hedgehog", wq, wk) if model == "wan1.3b" else None
    with torch.no_grad():
        o, _, _ = fused._forward(q, k, v, wq, wk, "hedgehog", 1e-6)
        if ref is not None:
            err = float((o[:, :, :256].double() - ref).norm() / ref.norm())
        fwd = triton.testing.do_bench_cudagraph(lambda: fused._forward(q, k, v, wq, wk, "hedgehog", 1e-6), rep=200)
        gram = triton.testing.do_bench_cudagraph(lambda: fused._gram(k, v, wk, 0, 2), rep=200)
        state = fused._gram(k, v, wk, 0, 2)
        outp = triton.testing.do_bench_cudagraph(lambda: fused._output_pass(q, wq, state, 0, 2, 1e-6), rep=200)
    grid_g = fused._grid(k, 2, fused.REDUCE_CONFIGS); grid_o = fused._grid(q, 1, fused.OUTPUT_CONFIGS)
    chosen = {n: [str(c) for c in getattr(fused, n).cache.values()] for n in ("_gram_partials", "_output")}
    out[model] = dict(slots=slots, forward_graph_ms=fwd, gram_with_sum_ms=gram, output_ms=outp, grid_gram=grid_g,
                      grid_output=grid_o, chosen=chosen, error_first256=err if ref is not None else None)
    print(model, json.dumps(out[model]), flush=True)
json.dump(out, open(os.path.join(os.environ["OUT"], f"chunk_probe_{slots}.json"), "w"), indent=1)
