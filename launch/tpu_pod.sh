#!/usr/bin/env bash
# Run one kdjax training command on every worker of a Cloud TPU VM pod slice, at the same time.
#
#   ACCELERATOR_TYPE=v4-32 launch/tpu_pod.sh plan --config=configs/NAME.py [--config.x=y ...] [--search]
#       # here, before booking: compile the command's programs for that slice (kdjax plan)
#   TPU_NAME=my-v4-32 ZONE=us-central2-b launch/tpu_pod.sh setup      # copy this checkout, install
#   TPU_NAME=my-v4-32 ZONE=us-central2-b launch/tpu_pod.sh [distill|sft|minillm|grpo|gkd] \
#       --config=configs/NAME.py[:ARG] [--config.x=y ...] [--resume]
#   TPU_NAME=my-v4-32 ZONE=us-central2-b launch/tpu_pod.sh stop       # end a DETACH=1 run on all workers
#
# Each worker runs one process that sees its own chips; `kdjax COMMAND --distributed` joins them
# into one program over all chips of the slice (jax.distributed.initialize(): on a TPU VM the
# environment tells JAX the coordinator and the process ids), and the config's mesh spans them. The run directory (--config.out_dir) must be one file system
# that every worker sees (a Filestore/NFS mount or a gcsfuse-mounted bucket): checkpoints are
# written by all workers together.
#
# Environment:
#   ACCELERATOR_TYPE `plan` only: the slice to plan for (v4-8, v5litepod-16, v5p-8, v6e-8, or
#                    CHIP:SHAPE such as v5e:4x4); `plan` runs here, with PYTHON (default: this
#                    checkout's .venv/bin/python, else python3) and libtpu (pip install '.[tpu]')
#   TPU_NAME         the TPU VM (required except for `plan`)
#   ZONE, PROJECT    where it is (default: gcloud's configured compute/zone and project)
#   REMOTE_DIR       the checkout on every worker (default: kdjax, relative to the worker's home)
#   REMOTE_PYTHON    interpreter there (default: .venv/bin/python, made by `setup`); relative
#                    paths here and in REMOTE_LOG are inside REMOTE_DIR
#   REMOTE_ENV       extra VAR=value words exported on the workers, e.g. "LIBTPU_INIT_ARGS=..."
#   DETACH=1         start in the background (nohup) and return; output goes to REMOTE_LOG
#   REMOTE_LOG       log file on each worker (default: kdjax-COMMAND.log)
#   GCLOUD_ARGS      extra words for `gcloud compute tpus tpu-vm ssh/scp`, e.g. --internal-ip
#   DRY_RUN=1        print the gcloud commands instead of running them
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
usage="usage: TPU_NAME=NAME [ZONE=ZONE] launch/tpu_pod.sh [setup|stop|distill|sft|minillm|grpo|gkd] [--config=configs/NAME.py[:ARG]] [--config.x=y ...] [--resume]
       ACCELERATOR_TYPE=v5litepod-16 launch/tpu_pod.sh plan --config=configs/NAME.py [--config.x=y ...] [--search]"

cmd=distill
case "${1:-}" in
  distill|sft|minillm|grpo|gkd|setup|stop|plan) cmd=$1; shift ;;
  -h|--help) echo "$usage"; exit 0 ;;
esac
for arg in "$@"; do
  if [[ $arg != --* || $cmd == setup || $cmd == stop ]]; then
    echo "launch/tpu_pod.sh: unexpected argument '$arg' for '$cmd'" >&2
    echo "$usage" >&2
    exit 2
  fi
done
if [[ $cmd == plan ]]; then
  # Nothing is booked yet: compile here for the slice's chips (libtpu's compile-only client).
  if [[ -z ${ACCELERATOR_TYPE:-} ]]; then
    echo "launch/tpu_pod.sh plan: set ACCELERATOR_TYPE to the slice you mean to book (v4-8, v5litepod-16, v5p-8," \
         "v6e-8, or CHIP:SHAPE such as v5e:4x4)" >&2
    exit 2
  fi
  if [[ -z ${PYTHON:-} ]]; then
    if [[ -x $here/.venv/bin/python ]]; then PYTHON=$here/.venv/bin/python; else PYTHON=python3; fi
  fi
  cd "$here"
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    printf '%q ' "$PYTHON" -m kdjax plan "--topology=$ACCELERATOR_TYPE" "$@"; echo
    exit 0
  fi
  exec "$PYTHON" -m kdjax plan "--topology=$ACCELERATOR_TYPE" "$@"
fi
if [[ -z ${TPU_NAME:-} ]]; then
  echo "launch/tpu_pod.sh: set TPU_NAME to the TPU VM's name (gcloud compute tpus tpu-vm list)" >&2
  exit 2
fi

REMOTE_DIR=${REMOTE_DIR:-kdjax}
REMOTE_PYTHON=${REMOTE_PYTHON:-.venv/bin/python}
REMOTE_LOG=${REMOTE_LOG:-kdjax-$cmd.log}
read -r -a extra <<< "${GCLOUD_ARGS:-}"
where=()
[[ -n ${ZONE:-} ]] && where+=(--zone="$ZONE")
[[ -n ${PROJECT:-} ]] && where+=(--project="$PROJECT")

q() { printf '%q ' "$@"; }  # words quoted for the workers' shell

gcloud_tpu() {  # gcloud compute tpus tpu-vm ssh|scp ... (printed instead under DRY_RUN=1)
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    q gcloud compute tpus tpu-vm "$@"; echo
  else
    gcloud compute tpus tpu-vm "$@"
  fi
}

on_all_workers() {
  # ${a[@]+"${a[@]}"}: an empty array under `set -u` in the bash 3 of macOS too
  gcloud_tpu ssh "$TPU_NAME" --worker=all ${where[@]+"${where[@]}"} ${extra[@]+"${extra[@]}"} --command="$1"
}

case $cmd in
  setup)
    # This checkout's files (tracked and untracked, not ignored) to every worker, then a venv
    # with kdjax for TPUs. Workers need network access to PyPI for the install.
    tarball=$(mktemp -t kdjax-XXXXXX.tgz)
    trap 'rm -f "$tarball"' EXIT
    (cd "$here" && git ls-files -z -co --exclude-standard | tar -czf "$tarball" --ignore-failed-read --null -T -)
    gcloud_tpu scp "$tarball" "$TPU_NAME:kdjax-src.tgz" --worker=all ${where[@]+"${where[@]}"} ${extra[@]+"${extra[@]}"}
    on_all_workers "set -e; mkdir -p $(q "$REMOTE_DIR"); tar -xzf kdjax-src.tgz -C $(q "$REMOTE_DIR");
      cd $(q "$REMOTE_DIR"); [ -x .venv/bin/python ] || python3 -m venv .venv;
      .venv/bin/python -m pip install -q --upgrade pip; .venv/bin/python -m pip install -q -e '.[tpu]';
      .venv/bin/python -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.default_backend())'"
    exit 0
    ;;
  stop)
    on_all_workers "cd $(q "$REMOTE_DIR") && if [ -f kdjax.pid ]; then kill -- -\$(cat kdjax.pid) 2>/dev/null || true; rm -f kdjax.pid; fi"
    exit 0
    ;;
esac

# --distributed: jax.distributed.initialize() joins the workers' processes (the TPU VM's environment
# gives the coordinator, the process count and each worker's id).
run="$(q "$REMOTE_PYTHON" -m kdjax "$cmd" --distributed "$@")"
prelude="set -o pipefail; cd $(q "$REMOTE_DIR") && export TOKENIZERS_PARALLELISM=false PYTHONPATH=\$PWD${REMOTE_ENV:+ $REMOTE_ENV}"
if [[ ${DETACH:-0} == 1 ]]; then
  # setsid: the run leads its own process group (its pid in kdjax.pid), which `stop` ends.
  on_all_workers "$prelude && { nohup setsid $run > $(q "$REMOTE_LOG") 2>&1 < /dev/null & echo \$! > kdjax.pid; echo \"\$(hostname): started in \$PWD, log $REMOTE_LOG\"; }"
else
  on_all_workers "$prelude && $run 2>&1 | tee $(q "$REMOTE_LOG")"
fi
