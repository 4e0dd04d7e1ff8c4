#!/usr/bin/env bash
# The self-hosted GPU runner's job (.github/workflows/gpu.yml runs exactly this), so a person on a
# GPU box runs the same steps by hand:
#
#   bash pipeline/gpu_job.sh [PROFILE]          # default cifar10; run in the checkout, venv active
#
# 1. dvc pull: data and models of this commit from the DVC remote (a first run finds none)
# 2. pytest -m gpu: the GPU-only tests
# 3. a short run of the profile: params composed with LTTA_JOB_OVERRIDES, then dvc repro
# 4. the report: reports/results.md (+ the promotion) into $GITHUB_STEP_SUMMARY when set, and the
#    reports, metrics and plots copied to $LTTA_JOB_OUT for upload as the job's artifact
# 5. dvc push: what the run made, for the next runner and for `dvc pull` on any machine
# 6. ltta promote: champion moves to this run's candidate only if it wins on promote.metric
#
# Environment:
#   LTTA_JOB_OVERRIDES  Hydra overrides of the short run (default below: minutes on one H100;
#                       set it to "" for the profile's full recipe)
#   LTTA_GPU_TESTS      0 skips step 2 (a CPU machine, or a checkout without tests/)
#   LTTA_JOB_OUT        where the artifact files go (default job-artifacts/)
#   MLFLOW_TRACKING_URI the team's tracking server (default: mlflow.db in the checkout)
set -euo pipefail

PROFILE="${1:-${PROFILE:-cifar10}}"
OVERRIDES="${LTTA_JOB_OVERRIDES-train_target.epochs=10 train_predictor.epochs=10 search_policy.folds=2 search_policy.trials=20 search_policy.epochs=10 evaluate.max_images=2000}"
OUT="${LTTA_JOB_OUT:-job-artifacts}"

step() { printf '\n== %s\n' "$*"; }

step "dvc pull (profile ${PROFILE})"
dvc pull --allow-missing || echo "dvc pull: nothing cached for this commit yet; the run builds it"

if [ "${LTTA_GPU_TESTS:-1}" != "0" ]; then
  step "GPU tests"
  nvidia-smi || true
  pytest -m gpu
else
  step "GPU tests skipped (LTTA_GPU_TESTS=0)"
fi

step "short run: ltta params profile=${PROFILE} ${OVERRIDES}"
# shellcheck disable=SC2086  # the overrides are words on purpose
ltta params "profile=${PROFILE}" ${OVERRIDES}
dvc repro

step "report"
mkdir -p "${OUT}"
cp -r reports metrics plots params.yaml dvc.lock "${OUT}/"

step "dvc push"
dvc push

step "ltta promote"
ltta promote --json "${OUT}/promotion.json" | tee "${OUT}/promotion.txt"

if [ -n "${GITHUB_STEP_SUMMARY:-}" ]; then
  {
    cat reports/results.md
    printf '\n**Promotion:** %s\n' "$(cat "${OUT}/promotion.txt")"
  } >> "${GITHUB_STEP_SUMMARY}"
fi
step "done: ${OUT}/ holds the report"
