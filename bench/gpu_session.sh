#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md, in parts that each fit one command of <= 10 minutes on a
# lent GPU machine (its image has jax, flax, optax, torch, transformers; not ml-collections or
# liger-kernel), each part running the PyTorch anchor and kdjax back to back so the ratio holds.
#
#   bash bench/gpu_session.sh prepare    # HERE: wheels the GPU image lacks -> .whl/, and a copy of
#                                        #   ../shared/bench -> .bench/ (both git-ignored: carry them)
#   bash bench/gpu_session.sh kd         # THERE: torch.compile anchor, kdjax kd_step 0.5B<-3B b16, 0.5B<-1.5B b8
#   bash bench/gpu_session.sh gen        # THERE: HF generate anchor, kdjax generate b256 and b64
#   bash bench/gpu_session.sh variants   # THERE: kd_step sweep (remat policy, attention, chunk, bf16 state), profile
#   bash bench/gpu_session.sh liger      # THERE: the anchor's HF full-logits and Liger lines (several minutes)
#
# e.g. the device tool: run(command="bash bench/gpu_session.sh kd", carry=[".whl", ".bench"]).
# JSON lines go to stdout and to $OUT/PART.jsonl ($OUT is the device tool's; ./bench-PART-DATE.jsonl
# without it). KD_ARGS / GEN_ARGS are appended to every kdjax command (tiny sizes for a dry run on CPU).
set -uo pipefail
cd "$(dirname "$0")/.."
part=${1:?usage: bash bench/gpu_session.sh prepare|kd|gen|variants|liger}
A=.bench

if [ "$part" = prepare ]; then
    set -e
    mkdir -p .whl "$A"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl ml-collections liger-kernel
    cp ../shared/bench/*.py "$A"/
    ls .whl "$A"
    exit 0
fi

if ls .whl/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
log=${OUT:-.}/$( [ -n "${OUT:-}" ] && echo "$part" || echo "bench-$part-$(date +%F)").jsonl
KD_ARGS=${KD_ARGS:-}
GEN_ARGS=${GEN_ARGS:-}

anchor() {  # the PyTorch anchor, when its copy and a GPU are here
    if [ -f "$A/$1" ] && python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
        python3 "$A/$@"
    else
        echo "{\"skipped\": \"anchor $1: no $A/$1 or no CUDA GPU\"}"
    fi
}

{
    echo "{\"part\": \"$part\", \"date\": \"$(date -u +%FT%TZ)\", \"gpu\": \"$(nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv,noheader 2>/dev/null || echo none)\"}"
    case $part in
        kd)
            anchor torch_kd.py --what compile
            python3 bench/kd_step.py $KD_ARGS
            python3 bench/kd_step.py --teacher=qwen2.5-1.5b --batch=8 $KD_ARGS ;;
        gen)
            anchor torch_generate.py
            python3 bench/generate.py $GEN_ARGS
            python3 bench/generate.py --batch=64 $GEN_ARGS ;;
        variants)
            python3 bench/kd_step.py --remat_policy=dots_with_no_batch_dims_saveable $KD_ARGS
            python3 bench/kd_step.py --no-remat --steps=3 $KD_ARGS
            python3 bench/kd_step.py --attention=xla --steps=3 $KD_ARGS
            python3 bench/kd_step.py --chunk_size=2048 --steps=3 $KD_ARGS
            python3 bench/kd_step.py --param_dtype=bfloat16 --steps=3 $KD_ARGS
            python3 bench/kd_step.py --profile=/tmp/kd_profile --steps=3 $KD_ARGS ;;
        liger)
            anchor torch_kd.py --what kd ;;
        *)
            echo "unknown part $part: prepare, kd, gen, variants or liger" >&2; exit 2 ;;
    esac
} 2>&1 | tee /dev/stderr | grep '^{' > "$log"
echo "wrote $log" >&2
