#!/usr/bin/env bash
# Train on several GPU hosts: one process per host, joined by JAX's own runtime
# (jax.distributed.initialize through `kdjax COMMAND --distributed`); the config's mesh spans every
# GPU of every host.
#
#   launch/gpu_hosts.sh --hosts=gpu0,gpu1[,...] [--port=1234] [--dry_run] COMMAND [kdjax flags...]
#       start process i on the i-th host over ssh (the first host is the coordinator)
#   launch/gpu_hosts.sh --coordinator=gpu0 --port=1234 --num_processes=2 --process_id=1 COMMAND [flags...]
#       start this host's process only (a scheduler such as SLURM runs it once on every host)
#
# COMMAND is distill, sft, minillm, grpo or gkd; the flags after it go to `kdjax COMMAND` unchanged.
# With --dry_run the exact commands are printed, not run.
# Every host needs the same checkout at the same path (REMOTE_DIR, default: this checkout's path)
# with kdjax and jax[cuda12] installed (PYTHON, default .venv/bin/python there), and the run
# directory (--config.out_dir) on a file system all hosts see: checkpoints are written by all
# processes together.
# Environment: REMOTE_DIR, PYTHON, SSH (default: ssh), XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.92).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
usage="usage: launch/gpu_hosts.sh (--hosts=H0,H1,... | --coordinator=HOST --num_processes=N --process_id=I) [--port=PORT] [--dry_run] COMMAND [--flags for kdjax COMMAND]"

hosts="" coordinator="" port=1234 num_processes="" process_id="" dry_run=0
while [[ $# -gt 0 ]]; do
  case $1 in
    --hosts=*) hosts=${1#*=} ;;
    --coordinator=*) coordinator=${1#*=} ;;
    --port=*) port=${1#*=} ;;
    --num_processes=*) num_processes=${1#*=} ;;
    --process_id=*) process_id=${1#*=} ;;
    --dry_run) dry_run=1 ;;
    -h|--help) echo "$usage"; exit 0 ;;
    distill|sft|minillm|grpo|gkd) break ;;
    *) echo "launch/gpu_hosts.sh: unexpected '$1' before the command (distill, sft, minillm, grpo, gkd)" >&2
       echo "$usage" >&2; exit 2 ;;
  esac
  shift
done
if [[ $# -eq 0 ]]; then
  echo "launch/gpu_hosts.sh: no command (distill, sft, minillm, grpo, gkd)" >&2; echo "$usage" >&2; exit 2
fi
cmd=$1; shift
for arg in "$@"; do
  if [[ $arg != --* ]]; then
    echo "launch/gpu_hosts.sh: unexpected argument '$arg' for kdjax $cmd (every option is a --flag)" >&2; exit 2
  fi
done
if ! [[ $port =~ ^[0-9]+$ ]] || (( port < 1 || port > 65535 )); then
  echo "launch/gpu_hosts.sh: --port=$port must be a TCP port number" >&2; exit 2
fi

REMOTE_DIR=${REMOTE_DIR:-$here}
PYTHON=${PYTHON:-.venv/bin/python}
read -r -a ssh <<< "${SSH:-ssh}"
q() { local out; printf -v out '%q ' "$@"; printf '%s' "${out% }"; }  # words quoted for a shell
sq() { printf "'%s'" "${1//\'/\'\\\'\'}"; }  # one word in single quotes, as a reader types it

# the shell line of process $1 of $2 with coordinator $3; the kdjax flags follow
process_command() {
  local id=$1 count=$2 coord=$3
  shift 3
  local args=("$PYTHON" -m kdjax "$cmd" --distributed "--coordinator=$coord:$port" "--num_processes=$count"
              "--process_id=$id" "$@")
  echo "cd $(q "$REMOTE_DIR") && export PYTHONPATH=\$PWD TOKENIZERS_PARALLELISM=false" \
       "XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92} && $(q "${args[@]}")"
}

if [[ -n $hosts ]]; then
  if [[ -n $coordinator$num_processes$process_id ]]; then
    echo "launch/gpu_hosts.sh: --hosts starts every process itself; leave out --coordinator, --num_processes" \
         "and --process_id (or give those three without --hosts)" >&2; exit 2
  fi
  IFS=, read -r -a list <<< "$hosts"
  n=${#list[@]}
  pids=()
  for i in "${!list[@]}"; do
    line="$(process_command "$i" "$n" "${list[0]}" "$@")"
    if [[ $dry_run == 1 ]]; then
      echo "$(q "${ssh[@]}" "${list[$i]}") $(sq "$line")"
    else
      "${ssh[@]}" "${list[$i]}" "$line" 2>&1 | sed -u "s/^/[${list[$i]}] /" &
      pids+=($!)
    fi
  done
  status=0
  for pid in ${pids[@]+"${pids[@]}"}; do wait "$pid" || status=$?; done
  exit $status
fi

if [[ -z $coordinator || -z $num_processes || -z $process_id ]]; then
  echo "launch/gpu_hosts.sh: give --hosts=H0,H1,..., or all of --coordinator, --num_processes and --process_id" >&2
  echo "$usage" >&2; exit 2
fi
if ! [[ $num_processes =~ ^[0-9]+$ && $process_id =~ ^[0-9]+$ ]] || (( process_id >= num_processes )); then
  echo "launch/gpu_hosts.sh: --process_id=$process_id must be an integer in [0, --num_processes=$num_processes)" >&2
  exit 2
fi
line="$(process_command "$process_id" "$num_processes" "$coordinator" "$@")"
if [[ $dry_run == 1 ]]; then
  echo "bash -c $(sq "$line")"
else
  exec bash -c "$line"
fi
