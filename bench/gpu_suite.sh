#!/usr/bin/env bash
# Every GPU figure of issue 8 in one go, for a machine lent through the device tool (one call, < 10 minutes).
#
# The device image has PyTorch and transformers but not culturemert's smaller dependencies, so build their wheels
# here first and carry them:   make gpu-wheels      then run, carrying ".wheels":
#     bash bench/gpu_suite.sh            (writes every bench's output to $OUT/gpu-bench.txt, or ./gpu-bench.txt)
# GPU_SUITE_SMOKE=1 runs each bench at toy sizes (checks the plumbing on any machine, CPU included).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOG=${OUT:-.}/gpu-bench.txt
if [ -d .wheels ]; then
    # --no-deps: keep the image's own numpy and typing_extensions, which its PyTorch was built against
    mapfile -t wheels < <(ls .wheels/*.whl | grep -v -e /numpy- -e /typing_extensions-)
    "$PY" -m pip install -q --no-index --no-deps "${wheels[@]}" 2>&1 | tail -2
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ "${GPU_SUITE_SMOKE:-0}" = 1 ]; then
    runs=(
        "bench/train_step.py --preset tiny --batch 2 --seconds 1 --steps 1"
        "bench/memory.py --preset tiny --batch 2 --seconds 1"
        "bench/cqt.py --batch 2 --seconds 1 --repeats 1"
        "bench/teacher_tokenize.py --teacher kmeans --clips 4 --seconds 1 --rounds 1"
        "bench/embed.py --preset tiny --tracks 2 --seconds 2"
        "bench/probe.py --train 64 --valid 16 --test 16 --layers 3 --lrs 2 --seeds 2 --epochs 1 --sequential-probes 2"
    )
else
    runs=(
        "bench/train_step.py --steps 5"
        "bench/memory.py --batch 32 --seconds 5"
        "bench/cqt.py"
        "bench/teacher_tokenize.py --device cuda --clips 64 --seconds 5 --batch-size 16 --rounds 2"
        "bench/embed.py --preset mert-v1-95m --tracks 32 --seconds 30"
        "bench/probe.py --epochs 2"
    )
fi
{
    echo "== $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi')"
    "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), '| transformers', transformers.__version__)"
    for r in "${runs[@]}"; do
        echo "== python $r"
        start=$(date +%s)
        # shellcheck disable=SC2086  # each entry is a script followed by its arguments
        "$PY" $r 2>&1 | grep -v -e "^USDT" -e "Warning" | tail -12
        echo "(exit ${PIPESTATUS[0]}, $(( $(date +%s) - start )) s)"
    done
} 2>&1 | tee "$LOG"
