#!/usr/bin/env bash
# Check a qlorax host (Docker daemon, image, old artifacts) and, only when asked, repair it.
#
# The guide's version restarted Docker, rebuilt the image, deleted files with find -delete and
# ran `docker system prune -f` on every call. This one reports by default and changes nothing;
# each repair needs --apply, and pruning Docker (which deletes every stopped container, unused
# network and dangling image on the host, not only ours) needs --prune-docker as well.
# Old run directories are removed by `qlorax gc`, which honours live locks and never follows
# links out of the artifacts root.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: scripts/auto_recovery.sh [--apply] [--prune-docker] [options]

Checks, in order, and reports what it would do (a dry run; nothing is changed):
  1. the Docker daemon answers `docker info`      fix: systemctl restart docker
  2. the image starts (`qlorax version` in it)     fix: docker build -f docker/Dockerfile
  3. run directories older than --older-than       fix: qlorax gc --older-than AGE --yes
  4. Docker disk usage (docker system df)          fix: docker system prune -f (see below)

Options:
  --apply               carry out the fixes above (otherwise only report)
  --prune-docker        with --apply, also run `docker system prune -f`; this removes ALL
                        stopped containers, unused networks and dangling images on the host
  --image NAME          image to check and rebuild (default: qlorax:latest, or $QLORAX_IMAGE)
  --artifacts-root DIR  root of run directories for gc (default: runs, or $QLORAX_RUNS_ROOT)
  --older-than AGE      age for gc, e.g. 36h, 7d, 2w (default: 7d)
  --skip-docker         skip checks 1, 2 and 4 (hosts without Docker)
  -h, --help            show this help

Environment: QLORAX_BIN (default: qlorax, else .venv/bin/qlorax), RECOVERY_WAIT_SECONDS
(how long to wait for Docker after a restart, default 30).
Exit status: 0 when healthy or in a dry run, 1 when a fix was attempted and failed,
2 for a usage error.
EOF
}

apply=0
prune_docker=0
skip_docker=0
image="${QLORAX_IMAGE:-qlorax:latest}"
artifacts_root="${QLORAX_RUNS_ROOT:-runs}"
older_than="7d"
wait_seconds="${RECOVERY_WAIT_SECONDS:-30}"

need_value() {
    if [[ $# -lt 2 || -z "$2" ]]; then
        echo "auto_recovery: $1 needs a value" >&2
        usage >&2
        exit 2
    fi
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --apply) apply=1 ;;
        --prune-docker) prune_docker=1 ;;
        --skip-docker) skip_docker=1 ;;
        --image) need_value "$@"; image="$2"; shift ;;
        --artifacts-root) need_value "$@"; artifacts_root="$2"; shift ;;
        --older-than) need_value "$@"; older_than="$2"; shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "auto_recovery: unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

if [[ ! "$wait_seconds" =~ ^[0-9]+$ ]]; then
    echo "auto_recovery: RECOVERY_WAIT_SECONDS must be a whole number, got '$wait_seconds'" >&2
    exit 2
fi

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

problems=0
failures=0

say() { printf '%s\n' "$*"; }
problem() { problems=$((problems + 1)); say "  PROBLEM: $*"; }
would() { say "  dry run: would $*"; }
failed() { failures=$((failures + 1)); say "  FAILED: $*"; }

# The qlorax CLI: explicit, else on PATH, else the project's virtualenv.
if [[ -n "${QLORAX_BIN:-}" ]]; then
    qlorax_bin="$QLORAX_BIN"
elif command -v qlorax >/dev/null 2>&1; then
    qlorax_bin="qlorax"
else
    qlorax_bin="$repo_root/.venv/bin/qlorax"
fi

# Use sudo for systemctl only when not root and sudo exists (never prompt: -n).
as_root() {
    if [[ "$(id -u)" -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo -n "$@"
    else
        "$@"
    fi
}

if [[ "$apply" -eq 1 ]]; then
    say "qlorax auto-recovery: APPLY mode (repairs will be made)"
else
    say "qlorax auto-recovery: report only (dry run; pass --apply to repair)"
fi

docker_ok=0
if [[ "$skip_docker" -eq 1 ]]; then
    say "[1/4] Docker daemon: skipped (--skip-docker)"
elif ! command -v docker >/dev/null 2>&1; then
    say "[1/4] Docker daemon: docker CLI not installed; Docker checks skipped"
    skip_docker=1
else
    say "[1/4] Docker daemon"
    if docker info >/dev/null 2>&1; then
        docker_ok=1
        say "  ok: daemon answers"
    else
        problem "docker info fails (daemon down or not reachable)"
        if [[ "$apply" -eq 1 ]]; then
            say "  restarting Docker: systemctl restart docker"
            if as_root systemctl restart docker; then
                waited=0
                until docker info >/dev/null 2>&1; do
                    if [[ "$waited" -ge "$wait_seconds" ]]; then
                        break
                    fi
                    sleep 1
                    waited=$((waited + 1))
                done
                if docker info >/dev/null 2>&1; then
                    docker_ok=1
                    say "  fixed: daemon answers after restart"
                else
                    failed "daemon still not answering ${wait_seconds}s after restart"
                fi
            else
                failed "systemctl restart docker"
            fi
        else
            would "run: systemctl restart docker"
        fi
    fi
fi

if [[ "$skip_docker" -eq 0 ]]; then
    say "[2/4] Image $image"
    if [[ "$docker_ok" -ne 1 ]]; then
        say "  skipped: no Docker daemon"
    elif docker run --rm --pull never --network none "$image" version >/dev/null 2>&1; then
        say "  ok: image starts"
    else
        problem "image $image is missing or does not start"
        if [[ "$apply" -eq 1 ]]; then
            say "  rebuilding: docker build -f docker/Dockerfile -t $image ."
            if docker build -f docker/Dockerfile -t "$image" .; then
                say "  fixed: image rebuilt"
            else
                failed "docker build"
            fi
        else
            would "run: docker build -f docker/Dockerfile -t $image ."
        fi
    fi
fi

say "[3/4] Run directories under $artifacts_root older than $older_than"
if [[ ! -d "$artifacts_root" ]]; then
    say "  ok: $artifacts_root does not exist; nothing to collect"
elif ! command -v "$qlorax_bin" >/dev/null 2>&1; then
    problem "qlorax CLI not found ($qlorax_bin); cannot collect old runs (run make install or set QLORAX_BIN)"
elif [[ "$apply" -eq 1 ]]; then
    if ! "$qlorax_bin" gc --older-than "$older_than" --root "$artifacts_root" --yes; then
        failed "qlorax gc"
    fi
else
    # qlorax gc without --yes lists what it would delete and deletes nothing.
    if ! "$qlorax_bin" gc --older-than "$older_than" --root "$artifacts_root"; then
        problem "qlorax gc (dry run) failed"
    fi
fi

if [[ "$skip_docker" -eq 0 ]]; then
    say "[4/4] Docker disk usage"
    if [[ "$docker_ok" -ne 1 ]]; then
        say "  skipped: no Docker daemon"
    else
        docker system df || true
        if [[ "$prune_docker" -eq 1 && "$apply" -eq 1 ]]; then
            say "  pruning: docker system prune -f"
            if ! docker system prune -f; then
                failed "docker system prune"
            fi
        elif [[ "$prune_docker" -eq 1 ]]; then
            would "run: docker system prune -f (host-wide: all stopped containers, unused networks, dangling images)"
        else
            say "  not pruning (pass --apply --prune-docker to run docker system prune -f)"
        fi
    fi
fi

if [[ "$apply" -eq 1 ]]; then
    say "Done: $problems problem(s) found, $failures fix(es) failed."
    if [[ "$failures" -gt 0 ]]; then
        exit 1
    fi
else
    say "Done (dry run): $problems problem(s) found; nothing was changed."
fi
exit 0
