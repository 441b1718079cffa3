# Session 20, call 3: the block-list kernel's traffic from L2 (probe).
set -u
export PYTHONPATH=.
nvidia-smi -L
cp .ref/l2_probe.py $OUT/
timeout 400 python3 .ref/l2_probe.py $OUT > $OUT/l2_probe.log 2>&1; echo probe rc=$?
tail -40 $OUT/l2_probe.log
