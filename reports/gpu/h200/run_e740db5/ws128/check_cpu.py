import torch, sys
sys.path.insert(0, ".ref/ws128")
import ws128 as wp
torch.manual_seed(0)
B, H, N, D = 1, 2, 300, 64
def sizes(n, parts):
    cuts = torch.sort(torch.randperm(n - 1)[: parts - 1] + 1).values
    return torch.diff(torch.cat([torch.tensor([0]), cuts, torch.tensor([n])]))
R, C = 7, 11
rows = torch.stack([sizes(N, R) for _ in range(H)])[None]
cols = torch.stack([sizes(N, C) for _ in range(H)])[None]
kept = torch.rand(1, H, R, C) < 0.4
kept[..., 0] = True
q, k, v = (torch.randn(B, H, N, D, dtype=torch.float16) for _ in range(3))
tables = wp.plan(kept, rows, cols, B, H, N, 32, 16)
out = wp.ws_attention(q, k, v, tables, 32, 16, ws=False)
rb = torch.stack([torch.repeat_interleave(torch.arange(R), rows[0, h]) for h in range(H)])
cb = torch.stack([torch.repeat_interleave(torch.arange(C), cols[0, h]) for h in range(H)])
mask = torch.stack([kept[0, h][rb[h]][:, cb[h]] for h in range(H)])[None]
s = (q.double() @ k.double().transpose(-1, -2)) / D**0.5
ref = torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ v.double()
print("rel err", ((out.double() - ref).norm() / ref.norm()).item())
