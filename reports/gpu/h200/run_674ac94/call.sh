set -u
export BENCH_GIT_COMMIT=$(cat .ref/commit)
export PYTHONPATH=.
timeout 300 python3 -m pytest -q -x tests/test_kmeans_triton.py tests/test_svg2_plan.py -p no:cacheprovider > $OUT/tests.log 2>&1; echo tests rc=$?; tail -3 $OUT/tests.log
timeout 200 python3 .ref/svg2_profile.py 2>&1 | grep -v -i warn | tee $OUT/svg2_profile.log
