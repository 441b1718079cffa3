set -u
export PYTHONPATH=.
timeout 200 python3 .ref/ws_debug2.py 2>&1 | grep -v -i warn | tail -20
