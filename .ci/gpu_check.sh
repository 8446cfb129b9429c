#!/usr/bin/env bash
# The CUDA checks, for a lent GPU machine (not CI): the kernel and compiled-variant tests, then the
# kernel bandwidth benchmark. The package is laid out as it installs (kernels/, passes/,
# schedules/ inside smoothcache_fx/) without pip, since that machine's torch is another version.
set -uo pipefail
out=${OUT:-/tmp/gpu_out}
mkdir -p "$out" /tmp/pkg/smoothcache_fx
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
fi
cp -r smoothcache_fx/. /tmp/pkg/smoothcache_fx/
for sub in kernels passes schedules; do rm -rf "/tmp/pkg/smoothcache_fx/$sub"; cp -r "$sub" "/tmp/pkg/smoothcache_fx/$sub"; done
export PYTHONPATH=/tmp/pkg:/tmp/site PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch, triton, diffusers; print('torch', torch.__version__, 'triton', triton.__version__, 'diffusers', diffusers.__version__)"
# From /tmp: pytest puts the working directory on sys.path, where the uninstalled tree would shadow
# /tmp/pkg (smoothcache_fx without its subpackages).
repo=$PWD
(cd /tmp && timeout 400 python3 -m pytest -q -p no:cacheprovider -o addopts="" \
  "$repo/tests/test_kernel_gated_residual_add.py" "$repo/tests/test_compile.py::test_cuda_compiled_variants_match_eager" \
  2>&1 | tee "$out/pytest.log" | tail -25)
timeout 150 python3 benchmarks/bench_kernel.py --quick --json "$out/bench.json" 2>&1 | tee "$out/bench.log"
timeout 150 python3 benchmarks/bench_kernel.py --quick --cuda-graph --json "$out/bench_cg.json" 2>&1 | tee "$out/bench_cg.log"
