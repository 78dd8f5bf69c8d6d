# Source from the repository root on a GPU machine that has JAX but neither this project nor its pure-Python
# dependencies installed (the lent H100/H200 images): installs the wheels carried in .whl/ into /tmp/site and makes
# the repository's folders importable under their installed names (kernels_pallas -> qwen3next_kernels,
# train -> qwen3next_train), without building anything.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
mkdir -p /tmp/pkgs
ln -sfn "$PWD/qwen3next_jax" /tmp/pkgs/qwen3next_jax
ln -sfn "$PWD/kernels_pallas" /tmp/pkgs/qwen3next_kernels
ln -sfn "$PWD/train" /tmp/pkgs/qwen3next_train
export PYTHONPATH="/tmp/pkgs:/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
