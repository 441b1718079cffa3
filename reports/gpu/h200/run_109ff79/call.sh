set -u
export BENCH_GIT_COMMIT=$(cat .ref/commit) PYTHONPATH=.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=.:/tmp/site
nvidia-smi -L
mkdir -p $OUT/latency
timeout 240 python3 -m harness.cli latency --model wan1.3b --random-weights --methods cudnn,radial,xattn,svg,svg2 \
  --param xattn.fixed_density=0.344 --param svg2.fixed_density=0.295 --step 12 --warmup 1 --repeats 3 --json \
  > $OUT/latency/eager_sparse.json 2> $OUT/latency/eager_sparse.log; echo latency rc=$?
tail -3 $OUT/latency/eager_sparse.log
python3 - <<'PY'
import json,os
d=json.load(open(os.environ['OUT']+'/latency/eager_sparse.json'))
ms=d.get('methods',d)
for n,e in ms.items():
    try: print(n, round(e['forward']['median_ms'],1), e.get('speedup_vs_baseline'), e.get('backend_used') or e.get('backends'))
    except Exception as ex: print(n, str(e)[:200])
PY
timeout 300 python3 -m harness.benchmarks.sparse_gpu --out $OUT/sparse13 --models wan1.3b --methods svg2,xattn --svg2-densities "" > $OUT/sparse13.log 2>&1; echo sparse13 rc=$?
python3 - <<'PY'
import json,os
d=json.load(open(os.environ['OUT']+'/sparse13/sparse_attention_wan1.3b.json'))
print('cudnn', d['methods']['cudnn']['call']['median_ms'])
for n in ('svg2','xattn'):
    s=d['methods'][n]
    print(n,'sel',round(s['selection']['median_ms'],3),round(s['selection_share_of_dense'],3),'b2b',round(s['selection_back_to_back_ms'],3),round(s['selection_back_to_back_share_of_dense'],3),'incalls',round(s['selection_in_calls_ms'],3),round(s['selection_in_calls_share_of_dense'],3),'calls',round(s['calls_back_to_back_ms'],3),'kern',round(s['kernels_back_to_back_ms'],3))
PY
timeout 60 python3 -m pytest -q -x tests/test_variable_blocks_triton.py > $OUT/vb_tests.log 2>&1; echo vbtests rc=$?; tail -2 $OUT/vb_tests.log
timeout 200 python3 -m harness.benchmarks.variable_blocks_gpu --out $OUT/vb13 --models wan1.3b --densities 0.295 \
  --configs 64x64x4x3r,64x64x4x3r+t32,64x64x4x3r+t16,64x32x4x3r+t32,128x64x4x3,128x64x4x3+t64,128x64x8x4+t64,128x64x8x4+t32 > $OUT/vb13.log 2>&1; echo vb rc=$?
grep -v Warn $OUT/vb13.log | grep "ideal\|FAIL" | tail -12
