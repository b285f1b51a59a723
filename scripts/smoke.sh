#!/usr/bin/env bash
# The tiny preset end to end on easy-vqa with retrieval: LM, pretrain, bank, finetune (20 % of
# the QA pairs), and accuracy on 1,000 test questions. Outputs under ${OUT:-runs/smoke}.
set -euo pipefail
OUT=${OUT:-runs/smoke}
tinyalign train --dataset easy-vqa --stage lm --out "$OUT/lm" --steps 600 --batch-size 64 --force
tinyalign train --dataset easy-vqa --stage pretrain --init "$OUT/lm" --out "$OUT/pretrain" --steps 400 --force
tinyalign bank build --checkpoint "$OUT/pretrain" --dataset easy-vqa --out "$OUT/bank" --force
tinyalign train --dataset easy-vqa --stage finetune --init "$OUT/pretrain" --bank "$OUT/bank" \
    --data-fraction 0.2 --out "$OUT/finetune" --force
tinyalign bank eval "$OUT/bank" --checkpoint "$OUT/finetune" --dataset easy-vqa --split test
tinyalign eval --checkpoint "$OUT/finetune" --dataset easy-vqa --split test --bank "$OUT/bank" --limit 1000
