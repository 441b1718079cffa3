import torch, sys
sys.path.insert(0, ".ref/straddle")
from straddle import straddle_attention
torch.manual_seed(0)
B, H, N, D = 1, 2, 300, 64
def sizes(n, parts):
    cuts = torch.sort(torch.randperm(n - 1)[: parts - 1] + 1).values
    return torch.diff(torch.cat([torch.tensor([0]), cuts, torch.tensor([n])]))
for R, C, span in ((7, 11, 8), (40, 23, 2), (40, 23, 4)):
    rows = torch.stack([sizes(N, R) for _ in range(H)])[None]
    cols = torch.stack([sizes(N, C) for _ in range(H)])[None]
    kept = torch.rand(1, H, R, C) < 0.4
    kept[..., 0, :] = False  # a block that keeps nothing
    q, k, v = (torch.randn(B, H, N, D, dtype=torch.float16) for _ in range(3))
    out = straddle_attention(q, k, v, kept, rows, cols, block_m=32, block_n=16, ws=False, span=span)
    rb = torch.stack([torch.repeat_interleave(torch.arange(R), rows[0, h]) for h in range(H)])
    cb = torch.stack([torch.repeat_interleave(torch.arange(C), cols[0, h]) for h in range(H)])
    mask = torch.stack([kept[0, h][rb[h]][:, cb[h]] for h in range(H)])[None]
    s = (q.double() @ k.double().transpose(-1, -2)) / D**0.5
    ref = torch.softmax(s.masked_fill(~mask, float("-inf")), -1).nan_to_num(0.0) @ v.double()
    print(R, C, span, "rel err", ((out.double() - ref).norm() / ref.norm()).item())
