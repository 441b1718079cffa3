set -u
export BENCH_GIT_COMMIT=$(cat .ref/commit)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=.:/tmp/site
mkdir -p $OUT/sparse13 $OUT/latency
timeout 150 python3 -m pytest -q -x tests/test_permute_triton.py tests/test_variable_blocks_triton.py tests/test_svg2_plan.py tests/test_block_sparse.py tests/test_kernel_ops.py -p no:cacheprovider > $OUT/tests.log 2>&1; echo tests rc=$?; tail -3 $OUT/tests.log
timeout 170 python3 -m harness.benchmarks.sparse_gpu --out $OUT/sparse13 --models wan1.3b --methods svg2 --svg2-densities "" > $OUT/sparse13.log 2>&1; echo sparse rc=$?
grep -v -i warn $OUT/sparse13.log | grep -v "k-means .* configs" | grep -E "wan1.3b|triton" | tail -8
timeout 200 python3 -m harness.cli latency --model wan1.3b --random-weights --methods cudnn,svg2,svg --param svg2.fixed_density=0.295 --step 12 --warmup 1 --repeats 3 --out $OUT/latency/eager.json > $OUT/latency/eager.log 2>&1; echo latency rc=$?
python3 - <<'PY'
import json, os
try:
    d = json.load(open(os.environ["OUT"] + "/latency/eager.json"))
    for n, e in d["methods"].items():
        print(n, round(e["forward"]["median_ms"], 1), e.get("speedup_vs", {}).get("cudnn"), e.get("attention_ms_per_layer"))
except Exception as e:
    print("latency unreadable", e)
PY
