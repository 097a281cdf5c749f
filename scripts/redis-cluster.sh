#!/usr/bin/env bash
# A local Redis Cluster for ctxstore's cluster tests: 3 masters and 3
# replicas on 127.0.0.1 ports 7000-7005, from this machine's redis-server
# (Redis >= 7 for sharded pub/sub). Nothing listens outside 127.0.0.1.
#
#   scripts/redis-cluster.sh start    # start (or keep) it; waits for cluster_state:ok
#   scripts/redis-cluster.sh stop     # shut every node down and remove its files
#   scripts/redis-cluster.sh status   # cluster_state and the nodes
#   scripts/redis-cluster.sh nodes    # the seed list for CTXSTORE_REDIS_CLUSTER
#
# Then: CTXSTORE_REDIS_CLUSTER=$(scripts/redis-cluster.sh nodes) \
#         cargo test --features redis,conformance --test redis_cluster
#
# Node files live in $CTXSTORE_CLUSTER_DIR (default /tmp/ctxstore-redis-cluster).
# A short node timeout (1 s) makes a killed master's replica take over
# within a few seconds, for the failover test.
set -euo pipefail

PORTS=(7000 7001 7002 7003 7004 7005)
DIR=${CTXSTORE_CLUSTER_DIR:-/tmp/ctxstore-redis-cluster}
HOST=127.0.0.1

cli() { redis-cli -h "$HOST" -p "$1" "${@:2}"; }

state() { cli "$1" cluster info 2>/dev/null | tr -d '\r' | sed -n 's/^cluster_state://p'; }

wait_ok() {
  for _ in $(seq 1 120); do
    local ok=1
    for p in "${PORTS[@]}"; do
      [ "$(state "$p")" = ok ] || { ok=0; break; }
    done
    # Every slot covered, seen from the first node.
    if [ "$ok" = 1 ] && cli "${PORTS[0]}" cluster info | tr -d '\r' | grep -q '^cluster_slots_ok:16384$'; then
      return 0
    fi
    sleep 0.5
  done
  echo "redis-cluster: the cluster did not reach cluster_state:ok" >&2
  return 1
}

start() {
  if [ "$(state "${PORTS[0]}")" = ok ]; then
    echo "redis-cluster: already running (cluster_state:ok)"
    return 0
  fi
  # Anything half-started before: stop it and start clean.
  stop >/dev/null 2>&1 || true
  mkdir -p "$DIR"
  for p in "${PORTS[@]}"; do
    mkdir -p "$DIR/$p"
    redis-server --port "$p" --bind "$HOST" --daemonize yes \
      --cluster-enabled yes --cluster-config-file "$DIR/$p/nodes.conf" \
      --cluster-node-timeout 1000 --cluster-replica-validity-factor 0 \
      --dir "$DIR/$p" --logfile "$DIR/$p/redis.log" --pidfile "$DIR/$p/redis.pid" \
      --save "" --appendonly no
  done
  for p in "${PORTS[@]}"; do
    for _ in $(seq 1 50); do
      cli "$p" ping >/dev/null 2>&1 && break
      sleep 0.1
    done
  done
  local addrs=()
  for p in "${PORTS[@]}"; do addrs+=("$HOST:$p"); done
  redis-cli --cluster create "${addrs[@]}" --cluster-replicas 1 --cluster-yes >"$DIR/create.log"
  wait_ok
  echo "redis-cluster: 3 masters + 3 replicas on $HOST:${PORTS[0]}-${PORTS[5]} (cluster_state:ok)"
}

stop() {
  for p in "${PORTS[@]}"; do
    cli "$p" shutdown nosave >/dev/null 2>&1 || true
    if [ -f "$DIR/$p/redis.pid" ]; then
      kill "$(cat "$DIR/$p/redis.pid")" 2>/dev/null || true
    fi
  done
  for p in "${PORTS[@]}"; do
    for _ in $(seq 1 50); do
      cli "$p" ping >/dev/null 2>&1 || break
      sleep 0.1
    done
  done
  rm -rf "$DIR"
}

nodes() {
  local out=()
  for p in "${PORTS[@]}"; do out+=("redis://$HOST:$p"); done
  (IFS=,; echo "${out[*]}")
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) cli "${PORTS[0]}" cluster info | head -3; cli "${PORTS[0]}" cluster nodes ;;
  nodes) nodes ;;
  *) echo "usage: $0 start|stop|status|nodes" >&2; exit 2 ;;
esac
