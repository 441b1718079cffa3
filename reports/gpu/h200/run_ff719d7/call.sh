set -u
export BENCH_GIT_COMMIT=$(cat .ref/commit)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=.:/tmp/site
nvidia-smi -L
mkdir -p $OUT/latency
timeout 200 python3 -m harness.benchmarks.scaling_gpu --out $OUT/scaling > $OUT/scaling.log 2>&1; echo scaling rc=$?
grep -v -i warn $OUT/scaling.log | tail -12
timeout 330 python3 -m harness.cli latency --model wan1.3b --random-weights --compile --methods cudnn,sla --step 12 --warmup 1 --repeats 3 --json \
  > $OUT/latency/compile_sla.json 2> $OUT/latency/compile_sla.log; echo compile rc=$?
python3 - <<'PY'
import json,os
try:
    d=json.load(open(os.environ['OUT']+'/latency/compile_sla.json'))
    for n,e in d['methods'].items():
        c=e.get('compiled') or {}
        print(n, round(e['forward']['median_ms'],1), e.get('speedup_vs_baseline'), 'compiled', (c.get('forward') or {}).get('median_ms'), c.get('speedup_vs_baseline'), c.get('graphs'), c.get('graph_breaks'), (e.get('params') or {}).get('linear_branch_used'))
except Exception as e: print('latency unreadable', e)
PY
tail -3 $OUT/latency/compile_sla.log
