set -u
export BENCH_GIT_COMMIT=$(cat .ref/commit)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=.:/tmp/site
nvidia-smi -L
mkdir -p $OUT/dfa_sla $OUT/latency
timeout 150 python3 -m pytest -q -x tests/test_block_list_triton.py -p no:cacheprovider > $OUT/block_list_tests.log 2>&1; echo tests rc=$?; tail -3 $OUT/block_list_tests.log
timeout 240 python3 -m harness.benchmarks.dfa_sla_gpu --out $OUT/dfa_sla --repeats 10 > $OUT/dfa_sla.log 2>&1; echo dfa_sla rc=$?
grep -v -i warn $OUT/dfa_sla.log | tail -12
timeout 260 python3 -m harness.cli latency --model wan1.3b --random-weights --methods cudnn,sla,radial,xattn --param xattn.fixed_density=0.344 --step 12 --warmup 1 --repeats 3 --json \
  > $OUT/latency/eager.json 2> $OUT/latency/eager.log; echo latency rc=$?
python3 - <<'PY'
import json,os
try:
    d=json.load(open(os.environ['OUT']+'/latency/eager.json'))
    for n,e in d['methods'].items(): print(n, round(e['forward']['median_ms'],1), e.get('speedup_vs_baseline'), e.get('method_params_resolved',{}).get('backend_used'))
except Exception as e: print('latency unreadable', e)
PY
