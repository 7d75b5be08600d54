#!/usr/bin/env bash
# On a CUDA GPU, in bf16: the DiT-XL/2 and SD 1.5 UNet shapes (random weights, batch 2), with
# torchao's int8 (per-token dynamic activations), fp8 (e4m3, per token) and int8 weight-only,
# each compiled, against the compiled bf16 model: step time (median of 20 calls after the
# compiling one), SQNR against bf16, weight bytes and peak memory
# (torch.cuda.max_memory_allocated while the variant alone is on the GPU).
#
#     bash bench/gpu/int8_fp8.sh                 # about 6-8 minutes on an H200 (fits one call
#                                                # of the device tool: 10 min a command)
#     ARCHS=dit-xl-2 bash bench/gpu/int8_fp8.sh  # one shape
#
# Writes bench/results/full_size-<arch>-cuda-bf16.json (under $OUT instead when set) after every
# variant, so a run cut short keeps what it measured; a variant that fails is recorded with its
# error (--keep-going) and the next one runs. Print a table with
#     python -m bench.full_size --markdown bench/results/full_size-dit-xl-2-cuda-bf16.json
# Env: ARCHS (space separated), REPEATS (default 20), SECONDS_PER_ARCH (default 270), PYTHON.
set -uo pipefail
cd "$(dirname "$0")/../.."

PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
ARCHS=${ARCHS:-"dit-xl-2 sd15-unet"}
REPEATS=${REPEATS:-20}
SECONDS_PER_ARCH=${SECONDS_PER_ARCH:-270}
RESULTS=${OUT:-bench/results}
mkdir -p "$RESULTS"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

"$PYTHON" -c "import torch, torchao, diffusers; assert torch.cuda.is_available(), 'no CUDA GPU'; \
print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'torchao', torchao.__version__, \
'diffusers', diffusers.__version__)" || exit 1

status=0
for arch in $ARCHS; do
  out="$RESULTS/full_size-$arch-cuda-bf16.json"
  echo "== $arch -> $out (at most ${SECONDS_PER_ARCH} s)"
  start=$(date +%s)
  timeout "$SECONDS_PER_ARCH" "$PYTHON" -m bench.full_size --arch "$arch" --device cuda \
    --dtype bf16 --repeats "$REPEATS" --keep-going --out "$out" --variants \
    fp+compile w8a8-static:token@torchao+compile fp8:token@torchao+compile \
    w8a16@torchao+compile || status=1
  echo "== $arch: $(( $(date +%s) - start )) s"
  [ -f "$out" ] && "$PYTHON" -m bench.full_size --markdown "$out"
done
exit $status
