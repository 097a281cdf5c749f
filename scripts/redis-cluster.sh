#!/usr/bin/env bash
# A local Redis Cluster for ctxstore's cluster tests: 3 masters and 3
# replicas on 127.0.0.1 ports 7000-7005, from this machine's redis-server
# (Redis >= 7 for sharded pub/sub). Nothing listens outside 127.0.0.1.
#
#   scripts/redis-cluster.sh start    # start (or keep) it; waits for cluster_state:ok
#   scripts/redis-cluster.sh stop     # shut every node down and remove its files
#   scripts/redis-cluster.sh status   # cluster_state and the nodes
#   scripts/redis-cluster.sh nodes    # the seed list for CTXSTORE_REDIS_CLUSTER
#   scripts/redis-cluster.sh masters  # the ports of the current masters
#   scripts/redis-cluster.sh kill-master [PORT]
#                                     # SIGKILL a master (PORT, else the first
#                                     # one found) and print its port
#   scripts/redis-cluster.sh revive   # restart every node that is down (it
#                                     # rejoins from its nodes.conf, a former
#                                     # master as a replica); waits until the
#                                     # cluster is whole again
#   scripts/redis-cluster.sh reshard FROM_PORT TO_PORT SLOTS [PIPELINE]
#                                     # move SLOTS slots (the lowest ones
#                                     # FROM_PORT serves) from master
#                                     # FROM_PORT to master TO_PORT with
#                                     # redis-cli --cluster reshard, keys
#                                     # and all, PIPELINE keys per MIGRATE
#                                     # (default 10; 1 keeps each slot
#                                     # migrating longest); waits until
#                                     # every node agrees on the slot map
#                                     # and no slot is left migrating or
#                                     # importing
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

# One node's redis-server, daemonized: the same command line for `start`
# and `revive` (a restarted node finds its identity in its nodes.conf).
server() {
  local p=$1
  mkdir -p "$DIR/$p"
  redis-server --port "$p" --bind "$HOST" --daemonize yes \
    --cluster-enabled yes --cluster-config-file "$DIR/$p/nodes.conf" \
    --cluster-node-timeout 1000 --cluster-replica-validity-factor 0 \
    --dir "$DIR/$p" --logfile "$DIR/$p/redis.log" --pidfile "$DIR/$p/redis.pid" \
    --save "" --appendonly no
}

up() { cli "$1" ping >/dev/null 2>&1; }

wait_up() {
  for _ in $(seq 1 50); do
    up "$1" && return 0
    sleep 0.1
  done
  return 1
}

# CLUSTER NODES as seen from the first node that answers.
cluster_nodes() {
  for p in "${PORTS[@]}"; do
    if up "$p"; then
      cli "$p" cluster nodes | tr -d '\r'
      return 0
    fi
  done
  echo "redis-cluster: no node answers" >&2
  return 1
}

# The ports of the masters that are not marked failed, one a line.
masters() {
  cluster_nodes | awk '$3 ~ /master/ && $3 !~ /fail/ { split($2, a, "[:@]"); print a[2] }' | sort -n
}

kill_master() {
  local port=${1:-}
  if [ -z "$port" ]; then
    port=$(masters | sed -n 1p)
    [ -n "$port" ] || { echo "redis-cluster: no master found" >&2; return 1; }
  elif ! masters | grep -x "$port" >/dev/null; then
    echo "redis-cluster: $port is not a master" >&2
    return 1
  fi
  local pid
  pid=$(cli "$port" info server | tr -d '\r' | sed -n 's/^process_id://p')
  [ -n "$pid" ] || pid=$(cat "$DIR/$port/redis.pid")
  kill -KILL "$pid"
  for _ in $(seq 1 50); do
    up "$port" || break
    sleep 0.1
  done
  echo "$port"
}

# Every node up, cluster_state:ok everywhere, every slot covered, no node
# flagged as failing by any node, every replica in sync with its master.
wait_whole() {
  wait_ok
  for _ in $(seq 1 120); do
    local whole=1
    for p in "${PORTS[@]}"; do
      if cli "$p" cluster nodes | tr -d '\r' | awk '$3 ~ /fail/ { bad = 1 } END { exit !bad }'; then
        whole=0
        break
      fi
      local info
      info=$(cli "$p" info replication 2>/dev/null | tr -d '\r') || { whole=0; break; }
      if grep -q '^role:slave$' <<<"$info" && ! grep -q '^master_link_status:up$' <<<"$info"; then
        whole=0
        break
      fi
    done
    if [ "$whole" = 1 ] && [ "$(state "${PORTS[0]}")" = ok ]; then
      return 0
    fi
    sleep 0.5
  done
  echo "redis-cluster: the cluster did not become whole again" >&2
  return 1
}

revive() {
  local revived=()
  for p in "${PORTS[@]}"; do
    if ! up "$p"; then
      [ -f "$DIR/$p/nodes.conf" ] || {
        echo "redis-cluster: no $DIR/$p/nodes.conf; run $0 start" >&2
        return 1
      }
      server "$p"
      revived+=("$p")
    fi
  done
  for p in "${revived[@]}"; do
    wait_up "$p" || { echo "redis-cluster: node $p did not come up" >&2; return 1; }
  done
  wait_whole
  echo "redis-cluster: revived ${revived[*]:-nothing}; cluster_state:ok, every node up and in sync"
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
    server "$p"
  done
  for p in "${PORTS[@]}"; do
    wait_up "$p" || true
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

# `redis-cli --cluster check`: every node agrees on the slots, all 16384
# are covered, none is open (migrating or importing).
agreed() {
  local out
  out=$(redis-cli --cluster check "$HOST:$1" 2>&1) || return 1
  grep -q 'All nodes agree about slots configuration' <<<"$out" || return 1
  grep -q 'All 16384 slots covered' <<<"$out" || return 1
  ! grep -qE '^\[(ERR|WARNING)\]' <<<"$out"
}

# The slots that the CLUSTER NODES line(s) on stdin assign, one a line
# (open slots, `[slot->-id]` or `[slot-<-id]`, are not counted).
expand_slots() {
  awk '{ for (i = 9; i <= NF; i++) { if ($i ~ /^\[/) continue; n = split($i, r, "-");
         for (s = r[1]; s <= r[n]; s++) print s } }'
}

# A Redis 7.0 race (fixed in later Redis: "process loss of slot ownership
# in cluster bus") can leave the importing master without a slot that it
# took and that every other node assigns to it; nothing makes it claim the
# slot again, so redirections for the slot would go back and forth between
# the two masters. For every master, claim on it each such slot (that
# every other node that answers assigns to it) with CLUSTER SETSLOT NODE.
heal() {
  local m id others own missing q s
  for m in $(masters); do
    id=$(cli "$m" cluster myid | tr -d '\r')
    own=$(cli "$m" cluster nodes | tr -d '\r' | awk '$3 ~ /myself/' | expand_slots | sort -u)
    others=0
    missing=$(
      for q in "${PORTS[@]}"; do
        [ "$q" = "$m" ] && continue
        up "$q" || continue
        cli "$q" cluster nodes | tr -d '\r' | awk -v id="$id" '$1 == id' | expand_slots | sort -u
      done | sort | uniq -c
    )
    for q in "${PORTS[@]}"; do
      [ "$q" != "$m" ] && up "$q" && others=$((others + 1))
    done
    missing=$(awk -v n="$others" '$1 == n { print $2 }' <<<"$missing" | sort -u | comm -23 - <(echo "$own"))
    for s in $missing; do
      echo "redis-cluster: master $m does not claim slot $s that every other node assigns to it; CLUSTER SETSLOT $s NODE on it" >&2
      cli "$m" cluster setslot "$s" node "$id" >/dev/null
    done
  done
}

wait_agreed() {
  for i in $(seq 1 120); do
    agreed "$1" && return 0
    # After 5 s of disagreement, look for the one kind that never heals.
    [ "$i" -eq 20 ] && heal
    sleep 0.25
  done
  echo "redis-cluster: the nodes do not agree on the slot map (redis-cli --cluster check $HOST:$1):" >&2
  redis-cli --cluster check "$HOST:$1" >&2 || true
  return 1
}

reshard() {
  local from=${1:-} to=${2:-} slots=${3:-} pipeline=${4:-10}
  if [ -z "$from" ] || [ -z "$to" ] || ! [[ "$slots" =~ ^[0-9]+$ ]] || [ "$slots" -eq 0 ] ||
    ! [[ "$pipeline" =~ ^[0-9]+$ ]] || [ "$pipeline" -eq 0 ]; then
    echo "usage: $0 reshard FROM_PORT TO_PORT SLOTS [PIPELINE]" >&2
    return 2
  fi
  local p
  for p in "$from" "$to"; do
    masters | grep -x "$p" >/dev/null || { echo "redis-cluster: $p is not a master" >&2; return 1; }
  done
  local from_id to_id
  from_id=$(cli "$from" cluster myid | tr -d '\r')
  to_id=$(cli "$to" cluster myid | tr -d '\r')
  # redis-cli refuses to reshard while the nodes disagree (gossip after
  # a previous reshard may still be on its way).
  wait_agreed "$from"
  mkdir -p "$DIR"
  if ! redis-cli --cluster reshard "$HOST:$from" --cluster-from "$from_id" --cluster-to "$to_id" \
    --cluster-slots "$slots" --cluster-pipeline "$pipeline" --cluster-yes >"$DIR/reshard.log" 2>&1; then
    echo "redis-cluster: reshard $from -> $to ($slots slots) failed; the end of $DIR/reshard.log:" >&2
    tail -20 "$DIR/reshard.log" >&2
    return 1
  fi
  wait_ok
  wait_agreed "$from"
  echo "redis-cluster: moved $slots slots from $from to $to"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) cli "${PORTS[0]}" cluster info | head -3; cli "${PORTS[0]}" cluster nodes ;;
  nodes) nodes ;;
  masters) masters ;;
  kill-master) kill_master "${2:-}" ;;
  revive) revive ;;
  reshard) reshard "${2:-}" "${3:-}" "${4:-}" "${5:-}" ;;
  *) echo "usage: $0 start|stop|status|nodes|masters|kill-master [PORT]|revive|reshard FROM_PORT TO_PORT SLOTS [PIPELINE]" >&2; exit 2 ;;
esac
