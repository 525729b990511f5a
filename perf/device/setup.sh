# Sourced by the device scripts: the carried wheels (.whl) into /tmp/site, this tree and them on the path, the card's
# name in $gpu (printed). The device has no tinyllama installed: it runs from src/.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src:/tmp/site
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "GPU: $gpu"
