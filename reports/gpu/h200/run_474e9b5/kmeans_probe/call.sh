set -u
export BENCH_GIT_COMMIT=$(cat .ref/commit)
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv
timeout 500 python3 .ref/kmeans_probe.py 2>&1 | grep -v -i warn | tee $OUT/kmeans_probe.log | tail -150
