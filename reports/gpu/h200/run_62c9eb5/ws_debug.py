"""Debug: the warp-specialised triton-blocks configuration (1x4x2tw) against the unspecialised one and fp32."""
import torch
from methods.kernels import block_list_triton as bl
from methods.kernels.block_sparse import BlockSparsePattern, masked_dense_attention, num_blocks

torch.manual_seed(0)
dev = "cuda"
WS, PLAIN = bl.Config(1, 4, 2, True, True), bl.Config(1, 8, 3, True)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


for tokens in (8190, 8192):
    for kind in ("random", "dense", "first_only"):
        q, k, v = (torch.randn(1, 12, tokens, 128, device=dev, dtype=torch.bfloat16) for _ in range(3))
        n = num_blocks(tokens, 128)
        if kind == "random":
            kept = torch.rand(1, 12, n, n, device=dev) < 0.3
            kept[..., 0] = True
        elif kind == "dense":
            kept = torch.ones(1, 12, n, n, device=dev, dtype=torch.bool)
        else:
            kept = torch.zeros(1, 12, n, n, device=dev, dtype=torch.bool)
            kept[..., 0] = True
        pattern = BlockSparsePattern(kept, tokens, 128)
        ref = masked_dense_attention(q.float(), k.float(), v.float(), pattern)
        lists, counts = bl.block_lists(kept)
        outs = {name: bl.block_list_attention(q, k, v, lists, counts, 128, c) for name, c in (("ws", WS), ("ws2", WS), ("plain", PLAIN), ("t4", bl.Config(1, 4, 2, True)))}
        torch.cuda.synchronize()
        line = f"{tokens} {kind:10}"
        for name, out in outs.items():
            err_rows = ((out.float() - ref).norm(dim=-1) / ref.norm(dim=-1))[0]  # (H, N)
            bad = (err_rows > 2e-2)
            line += f" | {name}: {rel(out, ref):.2e} bad rows {int(bad.sum())}"
            if bad.any() and name == "ws":
                h, r = bad.nonzero()[0].tolist()
                blocks_bad = torch.unique(bad.nonzero()[:, 1] // 128).tolist()
                rows_in_block = torch.unique(bad.nonzero()[:, 1] % 128).tolist()
                line += f" first (h{h}, row {r}) blocks {blocks_bad[:10]} rows-in-block {rows_in_block[:12]}..{len(rows_in_block)}"
        line += f" | ws vs ws2 equal {torch.equal(outs['ws'], outs['ws2'])}"
        print(line, flush=True)
