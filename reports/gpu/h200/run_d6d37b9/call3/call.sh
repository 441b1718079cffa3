set -u
export BENCH_GIT_COMMIT=$(cat .ref/commit)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=.:/tmp/site
nvidia-smi -L
mkdir -p $OUT/latency $OUT/sparse
timeout 330 python3 -m harness.cli latency --model wan1.3b --random-weights --compile --methods cudnn,sla,radial,xattn --param xattn.fixed_density=0.344 --step 12 --warmup 1 --repeats 3 --json \
  > $OUT/latency/compiled.json 2> $OUT/latency/compiled.log; echo latency rc=$?
python3 - <<'PY'
import json,os
try:
    d=json.load(open(os.environ['OUT']+'/latency/compiled.json'))
    for n,e in d['methods'].items(): print(n, round(e['forward']['median_ms'],1), e.get('speedup_vs_baseline'))
except Exception as e: print('latency unreadable', e)
PY
grep -i "graph\|recompil" $OUT/latency/compiled.log | tail -5
timeout 230 python3 -m harness.benchmarks.sparse_gpu --out $OUT/sparse --models wan1.3b --methods radial,xattn > $OUT/sparse.log 2>&1; echo sparse rc=$?
grep -v -i warn $OUT/sparse.log | grep -i "over\|ideal\|radial\|xattn" | tail -20
