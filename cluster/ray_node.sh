#!/usr/bin/env bash
# One Ray node of a dala-search Slurm job (cluster/slurm.sbatch), in the foreground:
#   ray_node.sh head HEAD_IP PORT      the head: Ray's GCS on HEAD_IP:PORT, and trials
#   ray_node.sh worker HEAD_IP:PORT    a worker joining that head
# `ray start --block` stays in the foreground while its node lives, and stops the node's
# processes (raylet, object store, trial workers) when it gets SIGTERM: what srun and the
# job's cleanup send. tests/search/test_slurm.py starts a loopback cluster with this file.
#
# Environment:
#   RAY_AUTH_MODE=token and a token (~/.ray/auth_token, $RAY_AUTH_TOKEN_PATH or
#     $RAY_AUTH_TOKEN) the same on every node: slurm.sbatch sets both.
#   CPUs and GPUs of the node: Slurm's $SLURM_CPUS_PER_TASK (else $SLURM_CPUS_ON_NODE) and
#     $SLURM_GPUS_ON_NODE, unless $DALA_NODE_CPUS / $DALA_NODE_GPUS say otherwise.
#   $DALA_RAY_START_ARGS: more `ray start` options (e.g. ports, when several nodes share
#     one host as in the test), split on spaces.
set -euo pipefail

usage="usage: ray_node.sh head HEAD_IP PORT | ray_node.sh worker HEAD_IP:PORT"
if [[ ${RAY_AUTH_MODE:-} != token ]]; then
    echo "ray_node.sh: RAY_AUTH_MODE must be 'token' (got '${RAY_AUTH_MODE:-}')" >&2
    exit 2
fi
cpus=${DALA_NODE_CPUS:-${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}}
gpus=${DALA_NODE_GPUS:-${SLURM_GPUS_ON_NODE:-0}}
read -r -a extra <<< "${DALA_RAY_START_ARGS:-}"

case ${1:-} in
    head)
        [[ $# -eq 3 ]] || { echo "$usage" >&2; exit 2; }
        exec ray start --head --node-ip-address="$2" --port="$3" \
            --num-cpus="$cpus" --num-gpus="$gpus" --include-dashboard=false \
            --disable-usage-stats "${extra[@]}" --block
        ;;
    worker)
        [[ $# -eq 2 ]] || { echo "$usage" >&2; exit 2; }
        exec ray start --address="$2" --num-cpus="$cpus" --num-gpus="$gpus" \
            --disable-usage-stats "${extra[@]}" --block
        ;;
    *)
        echo "$usage" >&2
        exit 2
        ;;
esac
