#!/usr/bin/env bash
# One pod of the Kubernetes verification (deploy/k8s/verify-indexed-job.yaml): one training run.
#
# An Indexed Job gives each pod JOB_COMPLETION_INDEX = 0..N-1. This script turns that index
# into one `qlorax train --resume` writing $RUNS_ROOT/run-XX (the names `qlorax verify` uses), with
# the thread count taken from QLORAX_THREADS_LIST by index (list[index % len]), so that a 1,2
# list alternates 1 and 2 threads and proves the result does not depend on them. It lives in a
# script, not in the manifest, so that the same logic runs (and is tested) on a laptop.
# --resume: when the Job retries a pod (preempted or evicted after writing a checkpoint), the
# new pod continues that run instead of refusing its directory; a fresh directory simply
# starts at step 0, and a resumed run is bit-identical to an uninterrupted one.
#
# Environment:
#   JOB_COMPLETION_INDEX  required, a non-negative integer (set by Kubernetes)
#   RUNS_ROOT             default /artifacts/verify
#   QLORAX_THREADS_LIST   default "1,2"; comma-separated positive integers
#   QLORAX_CONFIG         optional config file, passed as --config
#   QLORAX_TOKEN_FILE     default /var/run/secrets/qlorax/hf-token; passed as --token-file
#                         only when the file exists (the token is never put in the environment)
#   QLORAX_BIN            default "qlorax"
#
# Exit status: 2 for a bad environment, otherwise that of `qlorax train` (exec), so that the
# Job's podFailurePolicy sees the real code.
set -euo pipefail

die() {
    echo "k8s_verify_run: error: $*" >&2
    exit 2
}

index="${JOB_COMPLETION_INDEX:-}"
[[ -n "$index" ]] || die "JOB_COMPLETION_INDEX is not set (run this as an Indexed Job pod, or set it by hand)"
[[ "$index" =~ ^[0-9]+$ ]] || die "JOB_COMPLETION_INDEX must be a non-negative integer, got '$index'"
[[ ${#index} -le 6 ]] || die "JOB_COMPLETION_INDEX is implausibly large: '$index'"
index=$((10#$index))

runs_root="${RUNS_ROOT:-/artifacts/verify}"
[[ -n "$runs_root" ]] || die "RUNS_ROOT is empty"

threads_list="${QLORAX_THREADS_LIST:-1,2}"
IFS=',' read -r -a threads <<<"$threads_list"
[[ ${#threads[@]} -gt 0 ]] || die "QLORAX_THREADS_LIST is empty"
for t in "${threads[@]}"; do
    [[ "$t" =~ ^[1-9][0-9]*$ ]] || die "QLORAX_THREADS_LIST must be positive integers separated by commas, got '$threads_list'"
done
thread_count="${threads[index % ${#threads[@]}]}"

run_dir="$(printf '%s/run-%02d' "${runs_root%/}" "$index")"
token_file="${QLORAX_TOKEN_FILE:-/var/run/secrets/qlorax/hf-token}"
qlorax_bin="${QLORAX_BIN:-qlorax}"

args=(train --output-dir "$run_dir" --threads "$thread_count" --resume)
if [[ -n "${QLORAX_CONFIG:-}" ]]; then
    [[ -f "$QLORAX_CONFIG" ]] || die "QLORAX_CONFIG=$QLORAX_CONFIG does not exist"
    args+=(--config "$QLORAX_CONFIG")
fi
if [[ -f "$token_file" ]]; then
    args+=(--token-file "$token_file")
fi

mkdir -p "$runs_root"
echo "k8s_verify_run: index=$index threads=$thread_count output=$run_dir" >&2
exec "$qlorax_bin" "${args[@]}"
