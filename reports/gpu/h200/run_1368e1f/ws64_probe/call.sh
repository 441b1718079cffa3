# Session 20, call 4: 64-token key tiles under warp specialisation (probe).
set -u
export PYTHONPATH=.
nvidia-smi -L
cp .ref/ws64_probe.py $OUT/
timeout 400 python3 .ref/ws64_probe.py $OUT > $OUT/ws64_probe.log 2>&1; echo probe rc=$?
tail -40 $OUT/ws64_probe.log
