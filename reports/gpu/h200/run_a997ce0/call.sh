set -u
export BENCH_GIT_COMMIT=$(cat .ref/commit)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=.:/tmp/site
mkdir -p $OUT/latency
timeout 540 python3 -m harness.cli latency --model wan1.3b --random-weights --compile --methods cudnn,sla,xattn,svg --param xattn.fixed_density=0.344 \
  --step 12 --warmup 1 --repeats 3 --out $OUT/latency/compiled.json > $OUT/latency/compiled.log 2>&1; echo latency rc=$?
grep -E "eager forward|compiled forward" $OUT/latency/compiled.log | tail -8
python3 - <<'PY'
import json,os
d=json.load(open(os.environ['OUT']+'/latency/compiled.json'))
print(d.get('status'))
for n,e in d['methods'].items():
    c=e.get('compiled') or {}
    print(n, round(e['forward']['median_ms'],1), e.get('speedup_vs_baseline'), c.get('forward',{}).get('median_ms'), c.get('graphs'), c.get('graph_breaks'), c.get('speedup_vs_baseline'), e.get('params',{}).get('backend_used'), e.get('params',{}).get('backend_used_compiled'))
PY
