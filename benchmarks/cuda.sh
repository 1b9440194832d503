#!/usr/bin/env bash
# Every CUDA check in one run, sized for about eight minutes on one GPU: the GPU-marked tests,
# then each benchmark with --device cuda (benchmarks/results/*-cuda.json). Each step has its
# own time limit, so that one slow or failing step does not stop the others; the summary at
# the end gives each step's exit status.
#
#     bash benchmarks/cuda.sh [LOG_DIR]
#
# LOG_DIR (default: a temporary folder) gets each step's output and a copy of the JSON it
# wrote. Statically binarized MNIST is read from ../shared/data (or from ./shared/data, linked
# there when only that exists); the steps that need it skip without it. Run from the
# repository's root with pyroflows importable (pip install -e .). DEVICE=cpu runs the same
# steps on the CPU, to check the script itself.
set -u
cd "$(dirname "$0")/.."
logs="${1:-$(mktemp -d)}"
mkdir -p "$logs"
device="${DEVICE:-cuda}"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
if [ ! -e ../shared/data/binarized_mnist.npz ] && [ -e shared/data/binarized_mnist.npz ]; then
    ln -sfn "$PWD/shared" ../shared
fi
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else '')" | tee "$logs/device.txt"

summary=()
step() {  # step NAME SECONDS COMMAND...: run with a limit, log, record the exit status
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" >"$logs/$name.log" 2>&1
    local status=$?
    summary+=("$name: exit $status, $((SECONDS - start)) s")
    tail -n 25 "$logs/$name.log"
}

step tests 120 python -m pytest -m gpu -q --maxfail=20 -p no:cacheprovider -n 0
step iwae_eval 90 python benchmarks/iwae_eval.py --device "$device" --images 10000 \
    --samples 5000 --chunk 500 --single-images 10 --rounds 3
step vae 40 python benchmarks/vae.py --device "$device" --rounds 5 --steps 10
step eval_chunks 40 python benchmarks/eval_chunks.py --device "$device" --rounds 5
step guides 50 python benchmarks/guides.py --device "$device" --rounds 5 --steps 10 --threads 1
step transforms 50 python benchmarks/transforms.py --device "$device" --rounds 5 --calls 10
step cnf 75 python benchmarks/cnf.py --device "$device" --steps 5
step cnf_trace 30 python benchmarks/cnf_trace.py --device "$device" --rounds 3 --steps 3 \
    --pretrain 50
step density 40 python benchmarks/density.py --device "$device" --epochs 1 --flows maf nsf-coupling
step cnf_regularization 30 python benchmarks/cnf_regularization.py --device "$device" \
    --epochs 2 --rows 2000 --rounds 3
step reverse_kl 45 python benchmarks/reverse_kl.py --device "$device" --targets funnel-10 \
    --flows iaf --steps 500 --no-pyro

cp benchmarks/results/*-cuda.json "$logs"/ 2>/dev/null
printf '%s\n' "${summary[@]}" | tee "$logs/summary.txt"
