"""Debug: which part of the split path breaks the warp-specialised triton-blocks loop (1x4x2tw, N = 8190)."""
import importlib.util
from pathlib import Path

import torch
import triton

import methods.kernels.block_list_triton as bl
from methods.kernels import use_descriptor_scratch
from methods.kernels.block_sparse import BlockSparsePattern, masked_dense_attention, num_blocks

src = Path(bl.__file__).read_text()
SPLIT_LINE = "            whole -= ((count > 0) & (tl.load(listed + tl.maximum(count - 1, 0)) * BLOCK + BLOCK > N)).to(tl.int32)\n"
LSE_LINE = "            tl.store(lse_ptr + g.to(tl.int64) * N + rows, m_i + tl.log2(l_i), mask=rows < N)  # -inf: no key\n"
assert SPLIT_LINE in src and LSE_LINE in src


def module(name, text):
    path = Path(f"/tmp/{name}.py")
    path.write_text(text)
    spec = importlib.util.spec_from_file_location(name, path)
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m


variants = {
    "as_is": (module("v_as_is", src), False),
    "host_whole": (module("v_host", src.replace(SPLIT_LINE, "            pass\n")), True),
    "no_lse_store": (module("v_nolse", src.replace(LSE_LINE, "            pass\n")), False),
    "host_whole_no_lse": (module("v_host_nolse", src.replace(SPLIT_LINE, "            pass\n").replace(LSE_LINE, "            pass\n")), True),
}
use_descriptor_scratch()
torch.manual_seed(0)
tokens, block = 8190, 128
q, k, v = (torch.randn(1, 12, tokens, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
n = num_blocks(tokens, block)
kept = torch.rand(1, 12, n, n, device="cuda") < 0.3
kept[..., 0] = True
pattern = BlockSparsePattern(kept, tokens, block)
ref = masked_dense_attention(q.float(), k.float(), v.float(), pattern)
lists, counts = bl.block_lists(kept)
last = lists.gather(-1, (counts - 1).clamp(min=0).long()[..., None])[..., 0]
ragged = (counts > 0) & ((last + 1) * block > tokens)
whole = counts - ragged.int()
for name, (m, host) in variants.items():
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:-1], device="cuda", dtype=torch.float32)
    args = lambda c: (q, k, v, out, lse, lists, c, 1.4426950408889634 / 128**0.5, 12, tokens, lists.shape[-1],
                      *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *lists.stride()[:3], *counts.stride()[:2])
    if True:
        m._attention[(n, 12)](*args(whole if host else counts), D=128, BLOCK_D=128, BLOCK=128, PAIRS=1, TMA=True,
                              WS=True, SPLIT=True, num_warps=4, num_stages=2)
    main_only = out.clone()
    m._ragged_block[(n, 12)](*args(counts), D=128, BLOCK_D=128, BLOCK=128, num_warps=4, num_stages=1)
    torch.cuda.synchronize()
    rows_ragged = ragged[0].repeat_interleave(block, dim=-1)[:, :tokens]  # (H, N) rows whose block lists it
    err = ((out.float() - ref).norm(dim=-1) / ref.norm(dim=-1))[0]
    print(f"{name:18} all {((out.float() - ref).norm() / ref.norm()).item():.2e} bad {int((err > 2e-2).sum())}"
          f" | rows w/o ragged bad {int(((err > 2e-2) & ~rows_ragged).sum())} of {int((~rows_ragged).sum())}", flush=True)
