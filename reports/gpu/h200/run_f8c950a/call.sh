set -u
export PYTHONPATH=.
nvidia-smi -L
timeout 200 python3 .ref/assign_ws_probe.py $OUT 2>&1 | grep -v -i warn | tail -20
