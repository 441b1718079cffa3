set -u
export BENCH_GIT_COMMIT=$(cat .ref/commit)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=.:/tmp/site
nvidia-smi -L
mkdir -p $OUT/sparse13 $OUT/latency
timeout 150 python3 -m pytest -q -x tests/test_variable_blocks_triton.py tests/test_svg2_plan.py -p no:cacheprovider > $OUT/tests.log 2>&1; echo tests rc=$?; tail -3 $OUT/tests.log
timeout 200 python3 -m harness.benchmarks.sparse_gpu --out $OUT/sparse13 --models wan1.3b --methods svg2 --svg2-densities "" > $OUT/sparse13.log 2>&1; echo sparse rc=$?
grep -v -i warn $OUT/sparse13.log | grep -v "k-means .* configs" | tail -22
timeout 200 python3 -m harness.cli latency --model wan1.3b --random-weights --methods cudnn,svg2 --param svg2.fixed_density=0.295 --step 12 --warmup 1 --repeats 3 --json \
  > $OUT/latency/eager.json 2> $OUT/latency/eager.log; echo latency rc=$?
python3 - <<'PY'
import json,os
try:
    d=json.load(open(os.environ['OUT']+'/latency/eager.json'))
    for n,e in d['methods'].items(): print(n, round(e['forward']['median_ms'],1), e.get('speedup_vs_baseline'), e.get('method_params_resolved',{}).get('backend_used'))
except Exception as e: print('latency unreadable', e)
PY
