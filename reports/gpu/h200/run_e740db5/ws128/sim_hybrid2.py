import sys, torch
from safetensors.torch import load_file
from dataclasses import replace
from methods.kernels.block_sparse import VariableBlocks
from methods.kernels.variable_blocks_triton import Config, computed_entries
d = load_file(sys.argv[1])  # safetensors: tensors only
vb = VariableBlocks(d["kept"], d["rows"], d["cols"])
N = int(d["rows"][0, 0].sum()); H = d["kept"].shape[1]; total = H * N * N
kept = computed_entries(vb, N, Config(64, 64, 4, 3, True, True, 40))[1] / total
full = vb.row_sizes // 128 * 128
def work(rows, cfg):
    return computed_entries(replace(vb, row_sizes=rows), N, cfg)[0] / total
shipped = work(vb.row_sizes, Config(64, 64, 4, 3, True, True, 40))
w_whole = work(full, Config(128, 64, 4, 2, True, True, 0))
w_mixed_whole = work(full, Config(128, 64, 4, 2, True, True, 40))  # whole tiles + gathered padded (all)
w_gath = work(full, Config(128, 64, 4, 2, False, False, 0))
rest = work(vb.row_sizes - full, Config(64, 64, 4, 3, True, True, 40))
print(f"kept {kept:.4f} shipped work {shipped/kept:.3f}; full chunks: whole-only {w_whole/kept:.3f}, mixed {w_mixed_whole/kept:.3f}; rest {rest/kept:.3f}")
