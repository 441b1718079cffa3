set -u
export BENCH_GIT_COMMIT=$(cat .ref/commit)
export PYTHONPATH=.
nvidia-smi -L
timeout 170 python3 -m pytest -q tests/test_block_list_triton.py tests/test_variable_blocks_triton.py -p no:cacheprovider > $OUT/tests.log 2>&1; echo tests rc=$?; tail -3 $OUT/tests.log
mkdir -p $OUT/block_list $OUT/vb
timeout 300 python3 -m harness.benchmarks.block_list_gpu --out $OUT/block_list --repeats 10 > $OUT/block_list.log 2>&1; echo block_list rc=$?
grep -v -i warn $OUT/block_list.log | grep -v '^ *"' | tail -30
python3 - <<'PY'
import json, os
r = json.load(open(os.environ["OUT"] + "/block_list/block_list_gpu.json"))
print("failed:", r.get("failed"))
for shape, e in r["shapes"].items():
    for pat in ("sla", "tiles64", "tiles128"):
        if pat in e:
            print(shape, pat, " ".join(f"{k}={v:.2f}" for k, v in e[pat]["over_ideal"].items()))
PY
timeout 110 python3 -m harness.benchmarks.variable_blocks_gpu --out $OUT/vb --models wan1.3b --densities 0.295 --configs 64x64x4x3rt40 --full-blocks 0 > $OUT/vb.log 2>&1; echo vb rc=$?; grep -v -i warn $OUT/vb.log | tail -8
