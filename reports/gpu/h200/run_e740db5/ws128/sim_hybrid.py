"""Cost model: 128-row tiles (warp-specialised, every listed key tile whole, rate R128 per entry) for each query
block's whole 128-row chunks, the shipped 64-row kernel (whole tiles 1.43, gathered 2.12 per entry) for the rest."""
import sys, torch
from safetensors.torch import load_file
d = load_file(sys.argv[1])  # safetensors: tensors only
kept, rows, cols = d["kept"][0], d["rows"][0], d["cols"][0]
H, R, C = kept.shape; N = int(rows[0].sum())
def key_tiles(tok, bn):
    T = -(-N // bn); pad = torch.zeros(T * bn, dtype=torch.int64); pad[:N] = tok
    return pad.view(T, bn).sum(1)
for r128 in (1.05, 1.15, 1.25):
    for h in range(H):
        labels = torch.repeat_interleave(torch.arange(C), cols[h]); tok_keep = kept[h][:, labels]; r = rows[h]
        E = 0; ship = 0; hyb = 0
        for i in range(R):
            ri = int(r[i]); kk = int(tok_keep[i].sum()); E += ri * kk
            t64 = key_tiles(tok_keep[i], 64)
            whole = int((t64 >= 40).sum()); sparse = int(t64[(t64 > 0) & (t64 < 40)].sum()); listed = int((t64 > 0).sum())
            per64 = 64 * (1.43 * whole * 64 + 2.12 * (-(-sparse // 64)) * 64)
            ship += -(-ri // 64) * per64
            full = ri // 128; rest = ri - 128 * full
            hyb += full * 128 * listed * 64 * r128 + -(-rest // 64) * per64
        print(f"R128 {r128}: head {h}: shipped model {ship/E:.2f}x, hybrid {hyb/E:.2f}x")
