set -u
export BENCH_GIT_COMMIT=$(cat .ref/commit)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=.:/tmp/site
nvidia-smi --query-gpu=name,clocks.sm,temperature.gpu --format=csv,noheader
timeout 150 python3 -m pytest -q -x tests/test_kmeans_triton.py -k "script" -p no:cacheprovider > $OUT/tests.log 2>&1; echo tests rc=$?; tail -2 $OUT/tests.log
mkdir -p $OUT/sparse13
timeout 230 python3 -m harness.benchmarks.sparse_gpu --out $OUT/sparse13 --models wan1.3b --methods svg2 --svg2-densities "" > $OUT/sparse13.log 2>&1; echo sparse rc=$?
grep "128, num_warps: 4, num_ctas: 1, num_stages: 2" $OUT/sparse13.log | cut -c1-200
grep -v -i warn $OUT/sparse13.log | grep -v "k-means .* configs" | tail -12
