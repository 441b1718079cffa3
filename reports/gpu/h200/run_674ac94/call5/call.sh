set -u
export BENCH_GIT_COMMIT=$(cat .ref/commit)
export PYTHONPATH=.
timeout 200 python3 .ref/svg2_probe4.py 2>&1 | grep -v -i warn | tee $OUT/svg2_probe4.log; echo probe rc=$?
