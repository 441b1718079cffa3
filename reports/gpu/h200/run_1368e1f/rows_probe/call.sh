# Session 20, call 2: several query blocks a program for SLA's full lists (probe).
set -u
export BENCH_GIT_COMMIT=$(cat .ref/commit)
export PYTHONPATH=.
nvidia-smi -L
cp .ref/rows_probe.py $OUT/
timeout 400 python3 .ref/rows_probe.py $OUT > $OUT/rows_probe.log 2>&1; echo probe rc=$?
cat $OUT/rows_probe.log | grep -v "^ *$" | tail -40
