set -u
export PYTHONPATH=.
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
timeout 500 python3 .ref/ws_probe.py $OUT 2>&1 | tee $OUT/ws_probe.log | grep -v "^ *$" | tail -90
