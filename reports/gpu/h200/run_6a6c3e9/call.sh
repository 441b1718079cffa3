set -u
export BENCH_GIT_COMMIT=$(cat .ref/commit)
export PYTHONPATH=.
nvidia-smi --query-gpu=name,clocks.sm,temperature.gpu --format=csv,noheader
timeout 200 python3 -m pytest -q -x tests/test_popularity_triton.py tests/test_svg2_plan.py tests/test_kernel_ops.py tests/test_kmeans_triton.py -k "pair or both or counting or popularity or svg2 or plan or kernel_op or opcheck or sorted" -p no:cacheprovider > $OUT/tests.log 2>&1; echo tests rc=$?; tail -3 $OUT/tests.log
timeout 280 python3 .ref/svg2_probe5.py wan1.3b wan14b > $OUT/svg2_probe5.log 2>&1; echo probe rc=$?
grep -v -i warn $OUT/svg2_probe5.log | tail -75
