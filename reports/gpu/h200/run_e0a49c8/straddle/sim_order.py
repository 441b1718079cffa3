import sys, torch
from safetensors.torch import load_file
d = load_file(sys.argv[1])  # safetensors: tensors only
kept, rows, cols = d["kept"][0], d["rows"][0], d["cols"][0]
H, R, C = kept.shape
N = int(rows[0].sum())
def tiles_of(tok, bn):
    T = -(-N // bn); pad = torch.zeros(T * bn, dtype=torch.int64); pad[:N] = tok
    return pad.view(T, bn).sum(1) > 0
for h in range(1):
    labels = torch.repeat_interleave(torch.arange(C), cols[h])
    tok_keep = kept[h][:, labels]
    r = rows[h]
    E = float((tok_keep.sum(1) * r).sum())
    def straddle(order, bn=64, tm=128):
        rr = r[order]; blk = torch.repeat_interleave(order, rr); W = 0
        for t0 in range(0, N, tm):
            bs = blk[t0:t0 + tm].unique()
            W += tm * bn * int(tiles_of(tok_keep[bs].any(0), bn).sum())
        return W / E
    ident = torch.arange(R)
    # greedy chain by Jaccard of kept key clusters
    K = kept[h].float()
    inter = K @ K.T; sz = K.sum(1); jac = inter / (sz[:, None] + sz[None, :] - inter)
    seen = torch.zeros(R, dtype=torch.bool); cur = 0; order = [0]; seen[0] = True
    for _ in range(R - 1):
        s = jac[cur].clone(); s[seen] = -1; cur = int(s.argmax()); order.append(cur); seen[cur] = True
    greedy = torch.tensor(order)
    for tm in (64, 128):
        print(f"tile {tm}: identity {straddle(ident, 64, tm):.3f}  greedy-jaccard {straddle(greedy, 64, tm):.3f}")
