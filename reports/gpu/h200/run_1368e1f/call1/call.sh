# Next session's first call (prepared in session 19): the review's fixes and the restored masked loop on CUDA.
set -u
export BENCH_GIT_COMMIT=$(cat .ref/commit)
export PYTHONPATH=.
nvidia-smi -L
timeout 150 python3 -m pytest -q tests/test_block_list_triton.py tests/test_variable_blocks_triton.py -p no:cacheprovider > $OUT/tests.log 2>&1; echo tests rc=$?; tail -3 $OUT/tests.log
mkdir -p $OUT/block_list
timeout 330 python3 -m harness.benchmarks.block_list_gpu --out $OUT/block_list --repeats 10 > $OUT/block_list.log 2>&1; echo block_list rc=$?
python3 - <<'PY'
import json, os
r = json.load(open(os.environ["OUT"] + "/block_list/block_list_gpu.json"))
print("status", r.get("status"), "failed:", list(r.get("failed", {})))
for pat, labels in r["correctness"].items():
    print(pat, " ".join(f"{k}={v['relative']:.2e}/{v['worst_row']:.2e}" if "raised" not in v else f"{k}=raised" for k, v in labels.items()))
for shape, e in r["shapes"].items():
    for pat in ("sla", "tiles64", "tiles128"):
        print(shape, pat, " ".join(f"{k}={v:.2f}" for k, v in e[pat]["over_ideal"].items()))
PY
