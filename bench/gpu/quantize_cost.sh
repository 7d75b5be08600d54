#!/usr/bin/env bash
# What `python -m quantization quantize` costs on a CUDA GPU at the real sizes, and how good its
# printed estimate is: bench.quantize_cost for DiT-XL/2 (256 px) and SD 1.5 (512 px), random
# weights, recipes w8a8 and w4a8-sqnr, --device cuda --dtype bf16, 50 steps.
#
#     bash bench/gpu/quantize_cost.sh        # DiT-XL/2 w8a8 within 6 minutes: fits one call of
#                                            # the device tool (10 min a command, 15 a session)
#     MODELS="dit-xl-2 sd15" RECIPES="w8a8 w4a8-sqnr" MAX_MINUTES=20 bash bench/gpu/quantize_cost.sh
#
# Writes bench/results/quantize-cost-<model>-<recipe>-cuda.json (under $OUT instead when set),
# and each run's log beside its work folder (/tmp/t2i-quantize-cost/<model>/<recipe>.log).
#
# How long: each quantize run chooses the most thorough effort that fits --max-minutes (the
# CLI's default 20, or MAX_MINUTES), so expect up to that plus loading (~1 min); then a reload
# (~0.5 min) and a re-plan from the saved analysis (at most 3 min, no sensitivity measured).
# Building a pipeline folder the first time, on the CPU, adds ~1-2 min per model (3-4 GB
# written). All four: up to ~25 min each at the default budget, ~100 min in all; with
# MAX_MINUTES=5 about 8-10 min each. These are bounds from the budgets, not measurements.
# Env: MODELS, RECIPES (space separated), MAX_MINUTES, STEPS (default 50), PYTHON.
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python
MODELS=${MODELS:-"dit-xl-2"}
RECIPES=${RECIPES:-"w8a8"}
MAX_MINUTES=${MAX_MINUTES:-6}
STEPS=${STEPS:-50}
RESULTS=${OUT:-bench/results}
mkdir -p "$RESULTS"
export HF_HUB_OFFLINE=1

"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; \
print(torch.cuda.get_device_name(), torch.__version__)"

status=0
for model in $MODELS; do
  for recipe in $RECIPES; do
    args=(--model "$model" --recipe "$recipe" --steps "$STEPS" --device cuda --dtype bf16
          --out "$RESULTS/quantize-cost-$model-$recipe-cuda.json")
    [ -n "${MAX_MINUTES:-}" ] && args+=(--max-minutes "$MAX_MINUTES")
    echo "== $model $recipe: python -m bench.quantize_cost ${args[*]}"
    start=$(date +%s)
    "$PYTHON" -m bench.quantize_cost "${args[@]}" || status=1
    echo "== $model $recipe: $(( $(date +%s) - start )) s"
  done
done
exit $status
