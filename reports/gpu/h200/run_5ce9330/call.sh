set -u
export BENCH_GIT_COMMIT=$(cat .ref/commit) PYTHONPATH=.
nvidia-smi -L
(export CUDA_VISIBLE_DEVICES=1
 timeout 400 python3 -m harness.benchmarks.sparse_gpu --out $OUT/sparse14 --models wan14b --methods svg2,xattn --svg2-densities "" > $OUT/sparse14.log 2>&1; echo "sparse14 rc=$?" >> $OUT/sparse14.log
 timeout 150 python3 -m harness.benchmarks.variable_blocks_gpu --out $OUT/vb13 --models wan1.3b --densities 0.295 --configs 64x64x4x3r,64x32x4x3,128x64x4x3,128x64x8x4 > $OUT/vb13.log 2>&1; echo "vb rc=$?" >> $OUT/vb13.log) &
export CUDA_VISIBLE_DEVICES=0
timeout 130 python3 -m pytest -q tests/test_kmeans_triton.py -k "counting or sort or order or well_separated or deterministic or autotuner or random_points" > $OUT/kmeans_tests.log 2>&1; echo kmeans tests rc=$?; tail -2 $OUT/kmeans_tests.log
timeout 90 python3 -m pytest -q tests/test_ranked_selection_triton.py > $OUT/ranked_tests.log 2>&1; echo ranked tests rc=$?; tail -2 $OUT/ranked_tests.log
timeout 300 python3 -m harness.benchmarks.sparse_gpu --out $OUT/sparse13 --models wan1.3b --methods svg2,xattn --svg2-densities "" > $OUT/sparse13.log 2>&1; echo sparse13 rc=$?
wait
for f in sparse14 vb13; do grep -v Warn $OUT/$f.log | grep "rc=\|ideal\|dense call\|FAIL" | tail -8; done
python3 - <<'PY'
import json,os,glob
for f in sorted(glob.glob(os.environ['OUT']+'/sparse1*/sparse_attention_*.json')):
    d=json.load(open(f)); print(f.split('/')[-2], 'cudnn', round(d['methods']['cudnn']['call']['median_ms'],3))
    for n in ('svg2','xattn'):
        s=d['methods'].get(n)
        if not s: continue
        print(' ',n,'sel',round(s['selection']['median_ms'],3),round(s['selection_share_of_dense'],3),'b2b',round(s['selection_back_to_back_ms'],3),round(s['selection_back_to_back_share_of_dense'],3),'incalls',round(s['selection_in_calls_ms'],3),round(s['selection_in_calls_share_of_dense'],3),'kernel x ideal',round(s['kernel_over_ideal'],2))
        for o in s['selection_top_ops'][:9]: print('    ', o['op'][:60], o['count'], round(o['self_ms'],3))
    k=d.get('svg2_kmeans')
    if k: print('  kmeans passed', k['passed'], 'sorted warm q/k', round(k['paths']['triton_sorted']['q']['warm']['median_ms'],3), round(k['paths']['triton_sorted']['k']['warm']['median_ms'],3), 'sel', round(k['paths']['triton_sorted']['selection'],3))
PY
