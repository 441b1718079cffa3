set -u
export BENCH_GIT_COMMIT=$(cat .ref/commit)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=.:/tmp/site
mkdir -p $OUT/latency $OUT/scaling
timeout 150 python3 -m harness.cli latency --model wan1.3b --random-weights --compile --methods svg --baseline svg \
  --step 12 --warmup 1 --repeats 3 --out $OUT/latency/compiled_svg.json > $OUT/latency/compiled_svg.log 2>&1; echo latency rc=$?
python3 - <<'PY'
import json,os
d=json.load(open(os.environ['OUT']+'/latency/compiled_svg.json'))
for n,e in d['methods'].items():
    c=e.get('compiled') or {}
    print(n, round(e['forward']['median_ms'],1), c.get('forward',{}).get('median_ms'), c.get('graphs'), c.get('graph_breaks'), c.get('error'))
PY
timeout 175 python3 -m harness.benchmarks.scaling_gpu --out $OUT/scaling > $OUT/scaling.log 2>&1; echo scaling rc=$?
grep -v -i warn $OUT/scaling.log | tail -10
