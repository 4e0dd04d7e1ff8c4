#!/usr/bin/env bash
# The GPU measurements the open issues still need, as parts that each fit one 10-minute device call.
#
#   bash benchmarks/gpu_session.sh PART [PART ...]     # parts: deps train eval corrupt study-a study-b ablation
#   bash benchmarks/gpu_session.sh all                 # every part in order (about 33 min on one H100:
#                                                      # more than one session's 30, so run parts by priority)
#
# The GPU box sees only the repository, so carry two git-excluded folders made on the workstation:
# .wheels312 (bash benchmarks/gpu_wheels.sh) and .bench (mkdir .bench && cp ../shared/data/cifar10_dev.npz
# .bench/; echo /.bench/ >> .git/info/exclude): run(carry=[".wheels312", ".bench"], command="bash
# benchmarks/gpu_session.sh deps study-a").
#
# Results go to $OUT (the device tool's return folder) or benchmarks/results/gpu_session/, one JSON
# per part plus its log. Estimated H100 minutes per part are in brackets; the issue each answers after it.
#
#   deps     [<1]  install what the GPU box lacks (optuna, hydra-core, pydantic and deps) from
#                  .wheels312/ (py3.12 wheels, carried from the workstation: bash benchmarks/gpu_wheels.sh) into /tmp/pydeps
#   train    [~6]  benchmarks/train_throughput.py: WRN-40-2 in every mode (standard, augmix, policy,
#                  auxiliary), eager and compiled, then the other architectures, standard, compiled (issue 5)
#   eval     [~4]  benchmarks/eval_throughput.py at CIFAR-C's set size (10,000 images): every method, issue 19's
#                  gps, agg_aug, agg_class, bn_adapt, tent and ten_crop included (issues 6, 19)
#   corrupt  [~1]  benchmarks/corruption_throughput.py --device cuda, all 19 x 5 x 10,000 (issue 4)
#   study-a  [~9]  benchmarks/dev_study.py, WRN-40-2, 200 epochs, standard + AugMix, every TTA method, the
#                  cifar10 profile's loss predictor (width 48, 60 epochs, 128 rows per step):
#                  the paper's table on the dev sample (issues 5 and 6)
#   study-b  [~8]  the same for the policy (searched on this split) and auxiliary targets (issue 5)
#   ablation [~5]  benchmarks/predictor_ablation.py on the WRN-40-2 standard target of study-a: does the
#                  predictor beat the input-independent prior with other training settings, over seeds? (issue 6)
#
# Real CIFAR-10 is not here: neither the workstation nor the GPU box reaches its download site. The
# clean-error run on it is `ltta params profile=cifar10 && dvc repro train_target` where it can be
# downloaded (or with data/raw/ carried in from there).
set -euo pipefail
case "${1:-}" in  # before anything is created
"" | -h | --help)
    sed -n '2,/^set -euo/p' "$0" | sed '$d'
    [ $# -ge 1 ] && exit 0 || exit 2
    ;;
esac
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results/gpu_session}"
mkdir -p "$out"
export PYTHONPATH="src:/tmp/pydeps${PYTHONPATH:+:$PYTHONPATH}"
data="${LTTA_DEV_DATA:-.bench/cifar10_dev.npz}"
[ -f "$data" ] || data="../shared/data/cifar10_dev.npz"
policy="benchmarks/results/faa_policy_cifar10dev_h100.json"

run() {  # run NAME CMD...: the command's output to the terminal and to $out/NAME.log
    local name=$1
    shift
    echo "== $name: $*"
    "$@" 2>&1 | tee "$out/$name.log"
}

part() {
    case "$1" in
    deps)
        if python -c "import optuna, hydra, pydantic" 2>/dev/null; then
            echo "deps: already importable"
        elif compgen -G ".wheels312/*.whl" >/dev/null; then
            python -m pip install --quiet --no-deps --target /tmp/pydeps .wheels312/*.whl
        else
            echo "deps: optuna / hydra-core / pydantic missing and no .wheels312/ carried" >&2
            return 1
        fi
        ;;
    train)
        run train_wrn40_2 python benchmarks/train_throughput.py --device cuda --out "$out/train_throughput_wrn40-2.json"
        run train_archs python benchmarks/train_throughput.py --device cuda --archs resnet18 preact_resnet18 wrn_28_10 \
            --modes standard --no-eager --out "$out/train_throughput_archs.json"
        ;;
    eval)
        run eval python benchmarks/eval_throughput.py --device cuda --arch wrn_40_2 --n 10000 --sets 4 \
            --batch-size 1024 --out "$out/eval_throughput_wrn40-2_n10000.json"
        ;;
    corrupt)
        run corrupt python benchmarks/corruption_throughput.py --device cuda --reference '' \
            --out "$out/corruption_throughput_cuda.json"
        ;;
    study-a)
        run study_a python benchmarks/dev_study.py --data "$data" --modes standard augmix --epochs 200 --compile \
            --policy "$policy" --out-dir "$out/dev_study_a"
        ;;
    study-b)
        run study_b python benchmarks/dev_study.py --data "$data" --modes policy auxiliary --epochs 200 --compile \
            --policy "$policy" --out-dir "$out/dev_study_b"
        ;;
    ablation)
        run ablation python benchmarks/predictor_ablation.py --data "$data" --arch wrn_40_2 --epochs 200 --compile \
            --eval --variants paper no_cutout:cutout=0 small_batch:batch_size=128 spearman:objective=spearman,rank_temperature=0.1 \
            both:batch_size=128,objective=spearman,rank_temperature=0.1 long:epochs=60 wide:width=32 \
            half:images=0.5,batch_size=128,epochs=60 paper_s1:seed=1 paper_s2:seed=2 small_batch_s1:batch_size=128,seed=1 \
            small_batch_s2:batch_size=128,seed=2 --out-dir "$out/predictor_ablation" --cache /tmp/predictor_ablation_cache
        ;;
    all)
        for p in deps train eval corrupt study-a study-b ablation; do part "$p"; done
        ;;
    *)
        echo "unknown part '$1'; parts: deps train eval corrupt study-a study-b ablation all" >&2
        return 2
        ;;
    esac
}

for p in "$@"; do part "$p"; done
