# Session 20, call 8: SLA's call in parts and its Wan 1.3B forward eager and compiled, with today's code.
set -u
export BENCH_GIT_COMMIT=$(cat .ref/commit)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=.:/tmp/site
nvidia-smi -L
mkdir -p $OUT/dfa_sla $OUT/latency
timeout 170 python3 -m harness.benchmarks.dfa_sla_gpu --out $OUT/dfa_sla --repeats 10 > $OUT/dfa_sla.log 2>&1; echo dfa_sla rc=$?
tail -25 $OUT/dfa_sla.log | cut -c1-200
timeout 360 python3 -m harness.cli latency --model wan1.3b --random-weights --compile --methods cudnn,sla --step 12 --warmup 1 --repeats 3 --json --out $OUT/latency/compiled_sla.json > $OUT/latency/compiled_sla.stdout 2> $OUT/latency/compiled_sla.log; echo latency rc=$?
python3 - <<'PY'
import json,os
try:
    d=json.load(open(os.environ['OUT']+'/latency/compiled_sla.json'))
    for n,e in d['methods'].items():
        c = e.get('compiled') or {}
        print(n, 'eager', round(e['forward']['median_ms'], 1), 'x', round(e['speedup_vs_baseline'], 3), '| compiled', round((c.get('forward') or {}).get('median_ms', float('nan')), 1), 'x', c.get('speedup_vs_baseline'), 'graphs', c.get('graphs'), 'breaks', c.get('graph_breaks'), 'err', c.get('rel_error_vs_eager'), '| backend', e.get('params', {}).get('backend_used'), e.get('params', {}).get('backend_config'))
except Exception as e: print('latency unreadable', e)
PY
tail -3 $OUT/latency/compiled_sla.log
