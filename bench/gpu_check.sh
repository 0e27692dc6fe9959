#!/usr/bin/env bash
# The one prepared GPU check of featurelt (issue 16): run it when a GPU machine is lent, from the repo root.
#
#   bash bench/gpu_check.sh            # every step, each time-boxed with `timeout`; logs under $OUT
#   bash bench/gpu_check.sh --dry-run  # print the steps and their budgets, run nothing (CPU-side check)
#
# Steps (budget in seconds; the script stops starting steps past TOTAL_BUDGET, 460 s < 8 minutes):
#   setup          40  unpack the carried wheels (.whl-*/*.tar.xz -> .site, FINETUNE.md "An offline GPU box"),
#                      print the versions, stop unless torch sees CUDA
#   pytest_gpu    100  pytest -m gpu: the CUDA tests (device stages, launches without host syncs, CUDA = CPU,
#                      VectorIndex on the GPU, extract finetuned:<run> on CUDA = the CPU export)
#   knn            60  bench/knn.py: 100k queries over 1M x 512 rows, torch on CUDA vs CPU faiss (2k queries, scaled)
#   finetune_bench 180 bench/finetune.py --sections gpu: ResNet-50 bf16 and ViT-B/32 LoRA, store loader vs
#                      in-memory batches, CPU decode and --gpu-decode (nvJPEG)
#   finetune_cli   80  featurelt finetune on digits (timm resnet18, random init, 64 px) with --amp bf16 on cuda and
#                      --export, then `extract finetuned:latest --device cuda` into a second set, compared with it
# Results: $OUT/<step>.log and $OUT/summary.txt (step, exit status, seconds; 124 = timed out): 6 files, within the
# device tool's 8. OUT defaults to ./.gpu-check-out outside the device tool.
#
# The device tool sends the session's main checkout: run it there after this branch landed, carrying the wheel
# folders packed here with ../shared/gpu/pack-wheels (bench/RESULTS.md, "GPU check", has the exact call).
set -uo pipefail

DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: bash bench/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/.gpu-check-out}
TOTAL_BUDGET=${TOTAL_BUDGET:-460}
PY=${PYTHON:-python3}
WORK=${GPU_CHECK_WORK:-/tmp/featurelt-gpu-check}

STEPS=(setup pytest_gpu knn finetune_bench finetune_cli)
declare -A BUDGET=([setup]=40 [pytest_gpu]=100 [knn]=60 [finetune_bench]=180 [finetune_cli]=80)
declare -A CMD
CMD[setup]="mkdir -p .site && for f in .whl-*/*.tar.xz; do [ -e \"\$f\" ] && tar xJf \"\$f\" -C .site; done; \
nvidia-smi -L; $PY -c 'import sys, torch, torchvision, timm, peft, pyarrow, lance, duckdb, faiss, open_clip, featurelt; \
print(sys.version.split()[0], \"torch\", torch.__version__, \"torchvision\", torchvision.__version__, \"timm\", \
timm.__version__, \"peft\", peft.__version__, \"pyarrow\", pyarrow.__version__, \"lance\", lance.__version__, \
\"duckdb\", duckdb.__version__, \"faiss\", faiss.__version__); assert torch.cuda.is_available(), \"torch sees no CUDA\"; \
print(torch.cuda.get_device_name(0))'"
CMD[pytest_gpu]="$PY -m pytest -q -p no:cacheprovider -m gpu -rs --timeout 90 tests/test_encoders.py tests/test_extract.py \
tests/test_index.py tests/test_finetuned_encoder.py"
CMD[knn]="$PY bench/knn.py --queries 100000 --rows 1000000 --dim 512 --cpu-queries 2000 --runs 3"
CMD[finetune_bench]="$PY bench/finetune.py --sections gpu --device cuda --workers 12 --images 2000 --gpu-decode --steps 20 \
--runs 3 --workdir $WORK/bench --machine h200"
CMD[finetune_cli]="rm -rf $WORK/store && $PY -m featurelt --store $WORK/store ingest --builtin digits --no-progress && \
$PY -m featurelt --store $WORK/store make-lt --imbalance 10 --profile exp --seed 0 --many 60 --few 20 && \
$PY -m featurelt --store $WORK/store finetune --backbone timm:resnet18 --pretrained none --image-size 64 --epochs 2 \
--batch-size 64 --lr 0.01 --loss balanced-softmax --augment flip-crop --amp bf16 --device cuda --loader-workers 4 \
--eval-every 0 --export --json && \
$PY -m featurelt --store $WORK/store extract finetuned:latest --name ft_cuda_again --device cuda --num-workers 4 \
--no-progress && STORE=$WORK/store $PY -c \"\$COMPARE\""
# finetune_cli's last command: the run's figures, and extract finetuned:<run> on cuda against the run's export
read -r -d '' COMPARE <<'EOF'
import os
import numpy as np
from featurelt.store import Store
s = Store(os.environ["STORE"])
run = s.sql("SELECT run_id, images_per_second, data_stall_fraction, peak_memory_bytes, acc_all FROM finetune_runs").to_pylist()[0]
def vectors(table):
    t = s.read(table, columns=["sample_id", "vector"])
    return dict(zip(t.column("sample_id").to_pylist(), np.asarray(t.column("vector").to_pylist(), np.float64)))
a, b = vectors("emb_ft_" + run["run_id"]), vectors("emb_ft_cuda_again")
ids = sorted(a)
x, y = np.stack([a[i] for i in ids]), np.stack([b[i] for i in ids])
cos = (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
print("finetune run:", run)
print(f"extract finetuned vs export on cuda (bf16 both): {len(ids)} rows, max abs diff {np.abs(x - y).max():.3g}, "
      f"min cosine {cos.min():.6f}")
assert set(b) == set(a) and cos.min() > 0.99
EOF
export COMPARE

if [ "$DRY" = 1 ]; then
  total=0
  for s in "${STEPS[@]}"; do
    total=$((total + BUDGET[$s]))
    printf 'step %s budget=%ss: %s\n' "$s" "${BUDGET[$s]}" "${CMD[$s]}"
  done
  printf 'COMPARE (python, finetune_cli):\n%s\n' "$COMPARE"
  printf 'total budget %ss (limit %ss); logs under %s\n' "$total" "$TOTAL_BUDGET" "$OUT"
  [ "$total" -le "$TOTAL_BUDGET" ] || { echo "step budgets exceed TOTAL_BUDGET" >&2; exit 1; }
  exit 0
fi

mkdir -p "$OUT" "$WORK"
export PYTHONPATH="$PWD/.site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
summary="$OUT/summary.txt"
: > "$summary"
start=$SECONDS
status=0
for s in "${STEPS[@]}"; do
  used=$((SECONDS - start))
  if [ $((used + BUDGET[$s])) -gt "$TOTAL_BUDGET" ]; then
    printf '%-15s skipped (%ss used, budget %ss would pass %ss)\n' "$s" "$used" "${BUDGET[$s]}" "$TOTAL_BUDGET" | tee -a "$summary"
    status=1
    continue
  fi
  t0=$SECONDS
  timeout -k 10 "${BUDGET[$s]}" bash -c "${CMD[$s]}" > "$OUT/$s.log" 2>&1
  rc=$?
  printf '%-15s rc=%-3s %4ss (budget %ss)%s\n' "$s" "$rc" "$((SECONDS - t0))" "${BUDGET[$s]}" \
    "$([ "$rc" = 124 ] && echo ' TIMED OUT')" | tee -a "$summary"
  tail -n 3 "$OUT/$s.log" | sed 's/^/    /'
  if [ "$rc" != 0 ]; then
    status=1
    [ "$s" = setup ] && { echo "setup failed: no CUDA or a package missing (see $OUT/setup.log)" | tee -a "$summary"; break; }
  fi
done
echo "total $((SECONDS - start))s" | tee -a "$summary"
exit "$status"
