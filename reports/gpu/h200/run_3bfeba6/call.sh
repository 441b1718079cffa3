set -u
export BENCH_GIT_COMMIT=$(cat .ref/commit)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=.:/tmp/site
nvidia-smi -L
mkdir -p $OUT/sparse13
timeout 150 python3 -m pytest -q -x tests/test_kmeans_triton.py tests/test_svg2_plan.py -p no:cacheprovider > $OUT/tests.log 2>&1; echo tests rc=$?; tail -3 $OUT/tests.log
timeout 200 python3 .ref/kmeans_probe2.py 2>&1 | grep -v -i warn > $OUT/kmeans_probe2.log; echo probe rc=$?; cat $OUT/kmeans_probe2.log
timeout 180 python3 -m harness.benchmarks.sparse_gpu --out $OUT/sparse13 --models wan1.3b --methods svg2 --svg2-densities "" > $OUT/sparse13.log 2>&1; echo sparse rc=$?
grep -v -i warn $OUT/sparse13.log | grep -v "k-means .* configs" | tail -22
