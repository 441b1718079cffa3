import sys, torch
from safetensors.torch import load_file
d = load_file(sys.argv[1])  # safetensors: tensors only
kept, rows, cols = d["kept"][0], d["rows"][0], d["cols"][0]
H, R, C = kept.shape
N = int(rows[0].sum())
def key_tiles(keep_tok, bn):  # keep_tok (N,) bool -> per tile kept counts
    T = -(-N // bn)
    pad = torch.zeros(T * bn, dtype=torch.int64); pad[:N] = keep_tok
    return pad.view(T, bn).sum(1)
for h in range(H):
    labels = torch.repeat_interleave(torch.arange(C), cols[h])
    E = 0; A = 0; B = 0; B128 = 0; G = 0
    tok_keep = kept[h][:, labels]  # (R, N)
    r = rows[h]
    starts = torch.cumsum(r, 0) - r
    for i in range(R):
        kk = int(tok_keep[i].sum()); E += int(r[i]) * kk
        t64 = key_tiles(tok_keep[i], 64)
        whole = int(((t64 >= 40)).sum()); sparse = int(t64[(t64 > 0) & (t64 < 40)].sum())
        tiles64 = -(-int(r[i]) // 64)
        A += tiles64 * 64 * (whole * 64 + -(-sparse // 64) * 64)
        B += -(-int(r[i]) // 128) * 128 * 64 * int((t64 > 0).sum())
        t128 = key_tiles(tok_keep[i], 128)
        B128 += -(-int(r[i]) // 128) * 128 * 128 * int((t128 > 0).sum())
    # straddling 128-row tiles
    blk = torch.repeat_interleave(torch.arange(R), r)
    S64 = 0; S128 = 0; nb = []
    for t0 in range(0, N, 128):
        bs = blk[t0:t0 + 128].unique()
        nb.append(len(bs))
        u = tok_keep[bs].any(0)
        S64 += 128 * 64 * int((key_tiles(u, 64) > 0).sum())
        S128 += 128 * 128 * int((key_tiles(u, 128) > 0).sum())
    print(f"head {h}: rows mean {r.float().mean():.0f} min {int(r.min())} max {int(r.max())}; density {E/N/N:.3f}")
    print(f"  work/kept: current 64r+gather {A/E:.2f}; 128r nonstraddle k64 {B/E:.2f} k128 {B128/E:.2f}; "
          f"128r straddle k64 {S64/E:.2f} k128 {S128/E:.2f}; blocks per 128 tile mean {sum(nb)/len(nb):.2f} max {max(nb)}")
    # row utilisation only
    print(f"  row util 64: {r.sum()/ (torch.ceil(r/64)*64).sum():.3f}  128: {r.sum()/(torch.ceil(r/128)*128).sum():.3f}")
# cost model: whole-tile entries x 1.43, gathered x 2.12 (per-entry rates measured in run_c8cd359/run_ec88077)
for h in range(H):
    labels = torch.repeat_interleave(torch.arange(C), cols[h]); tok_keep = kept[h][:, labels]; r = rows[h]
    E = 0; Wt = 0; Wg = 0
    for i in range(R):
        E += int(r[i]) * int(tok_keep[i].sum()); t64 = key_tiles(tok_keep[i], 64)
        whole = int((t64 >= 40).sum()); sparse = int(t64[(t64 > 0) & (t64 < 40)].sum()); tiles64 = -(-int(r[i]) // 64)
        Wt += tiles64 * 64 * whole * 64; Wg += tiles64 * 64 * (-(-sparse // 64) * 64)
    print(f"head {h}: whole {Wt/E:.2f} gathered {Wg/E:.2f} -> model {(1.43*Wt+2.12*Wg)/E:.2f}x")
