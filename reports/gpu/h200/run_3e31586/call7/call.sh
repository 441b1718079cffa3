set -u
export BENCH_GIT_COMMIT=$(cat .ref/commit)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=.:/tmp/site
nvidia-smi -L
mkdir -p $OUT/latency
timeout 470 python3 -m harness.cli latency --model wan1.3b --random-weights --compile --methods cudnn,radial,xattn --param xattn.fixed_density=0.344 --step 12 --warmup 1 --repeats 3 --json --out $OUT/latency/compiled.json > $OUT/latency/compiled.stdout 2> $OUT/latency/compiled.log; echo latency rc=$?
python3 - <<'PY'
import json,os
try:
    d=json.load(open(os.environ['OUT']+'/latency/compiled.json'))
    print("status", d.get("status"))
    for n,e in d['methods'].items():
        c = e.get('compiled') or {}
        print(n, 'eager', round(e['forward']['median_ms'], 1), 'x', round(e['speedup_vs_baseline'], 3), '| compiled', round((c.get('forward') or {}).get('median_ms', float('nan')), 1), 'x', c.get('speedup_vs_baseline'), 'graphs', c.get('graphs'), 'breaks', c.get('graph_breaks'), 'err', c.get('rel_error_vs_eager'), '| eff', e.get('kernel_efficiency'))
except Exception as e: print('latency unreadable', e)
PY
grep -i "graph\|recompil" $OUT/latency/compiled.log | tail -5
