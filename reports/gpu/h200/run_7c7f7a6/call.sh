set -u
export BENCH_GIT_COMMIT=$(cat .ref/commit) PYTHONPATH=.
nvidia-smi -L
timeout 90 python3 -m pytest -q -x tests/test_kmeans_triton.py -k "autotuner or strided or sorted_update or deterministic" > $OUT/tests.log 2>&1; echo tests rc=$?; tail -2 $OUT/tests.log
timeout 400 python3 -m harness.benchmarks.sparse_gpu --out $OUT/sparse13 --models wan1.3b --methods svg2,xattn --svg2-densities "" > $OUT/sparse13.log 2>&1; echo sparse13 rc=$?
grep -v Warn $OUT/sparse13.log | tail -6
python3 - <<'PY'
import json,os
d=json.load(open(os.environ['OUT']+'/sparse13/sparse_attention_wan1.3b.json'))
print('cudnn', d['methods']['cudnn']['call']['median_ms'])
for n in ('svg2','xattn'):
    s=d['methods'][n]
    print(n,'sel',round(s['selection']['median_ms'],3),round(s['selection_share_of_dense'],3),'b2b',round(s['selection_back_to_back_ms'],3),round(s['selection_back_to_back_share_of_dense'],3),'incalls',round(s['selection_in_calls_ms'],3),round(s['selection_in_calls_share_of_dense'],3),'calls',round(s['calls_back_to_back_ms'],3),'kern',round(s['kernels_back_to_back_ms'],3))
    for o in s['selection_top_ops'][:8]: print('  ', o['op'][:60], o['count'], round(o['self_ms'],3))
x=d.get('xattn_selection'); print('xattn_selection', json.dumps(x)[:600] if x else None)
k=d.get('svg2_kmeans'); print('svg2_kmeans', json.dumps(k)[:900] if k else None)
PY
