#!/usr/bin/env bash
# Drain benchmark: the same backlog of pgbench -N transactions is drained by
# PostgreSQL's native subscription and by `switchback run`, side by side on the
# same throwaway clusters (one hub; one member cluster per consumer, set up
# alike), in one invocation. Prints both times and the ratio.
#
#   benches/drain.sh                 # TXNS=20000 SCALE=10 RUNS=1
#   TXNS=20000 RUNS=3 benches/drain.sh
#   KAFKA=1 benches/drain.sh         # also `switchback capture` + `switchback apply` over
#                                    # Kafka (a tansu broker, memory storage), same backlog
#
# Method (as ../shared/bench/native-peers.sh): both slots exist before the
# backlog is written; the clock starts when the consumer is enabled and stops
# when the member holds every pgbench_history row of the hub. Odd runs drain with
# the native subscription first, even runs with switchback first; after each run
# both slots' restart_lsn is moved past the backlog (settle_slots). Each run also
# times pg_recvlogical reading the backlog into /dev/null: the decoder's pace,
# which bounds every consumer.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
# A directory of its own: the EXIT trap removes it (an inherited SB_ROOT would go too).
SB_ROOT=$(mktemp -d /tmp/switchback.XXXXXX)
source "$here/scripts/cluster.sh"
TXNS=${TXNS:-20000} SCALE=${SCALE:-10} RUNS=${RUNS:-1} KAFKA=${KAFKA:-0}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/switchback-target}
(cd "$here" && cargo build --release -q -p switchback-cli)
SB=$CARGO_TARGET_DIR/release/switchback
HP=$(free_port)
DBS="native sb"
[ "$KAFKA" = 1 ] && DBS="native sb kf"
trap 'kill $(jobs -p) 2>/dev/null || true; cluster_destroy hub; for db in $DBS; do cluster_destroy "member_$db"; done; rm -rf "$SB_ROOT"' EXIT
cluster_start hub "$HP" "shared_buffers = 1GB" "autovacuum = off"
# Each consumer writes into a member cluster of its own, all set up alike: in a
# shared one, the WAL flushes, checkpoints and buffer evictions one drain causes
# land in the next drain's time.
declare -A MPORT
for db in $DBS; do
  MPORT[$db]=$(free_port)
  cluster_start "member_$db" "${MPORT[$db]}" "shared_buffers = 1GB" "autovacuum = off"
done
if [ "$KAFKA" = 1 ]; then
  KP=$(free_port)
  TANSU=$(command -v tansu || echo "$HOME/.cargo/bin/tansu")
  "$TANSU" broker --listener-url "tcp://127.0.0.1:$KP" --advertised-listener-url "tcp://127.0.0.1:$KP" \
    --storage-engine memory://tansu/ >"$SB_ROOT/tansu.log" 2>&1 &
  until (exec 3<>"/dev/tcp/127.0.0.1/$KP") 2>/dev/null; do sleep 0.1; done
fi
# The server's own psql (Debian's wrapper is a Perl script: its start-up would steal
# CPU from the drain being measured on a small machine).
H() { "$PG_BIN/psql" -h 127.0.0.1 -p "$HP" -U postgres -X -q -v ON_ERROR_STOP=1 "$@"; }
M() { # -d DB ...: the member cluster of that consumer
  local db=$2; shift 2
  "$PG_BIN/psql" -h 127.0.0.1 -p "${MPORT[$db]}" -U postgres -X -q -v ON_ERROR_STOP=1 -d "$db" "$@"
}
now() { date +%s.%N; }

"$PG_BIN/pgbench" -h 127.0.0.1 -p "$HP" -U postgres -i -s "$SCALE" -q postgres >/dev/null 2>&1
H -c "alter table pgbench_history add column hid bigserial primary key"
for db in $DBS; do
  "$PG_BIN/psql" -h 127.0.0.1 -p "${MPORT[$db]}" -U postgres -X -q -v ON_ERROR_STOP=1 -c "create database $db"
  "$PG_BIN/pg_dump" -h 127.0.0.1 -p "$HP" -U postgres postgres | M -d "$db" >/dev/null
done
H -c "create publication native_pub for all tables"
M -d native -c "create subscription native_sub connection 'host=127.0.0.1 port=$HP user=postgres dbname=postgres' publication native_pub with (copy_data = false, enabled = false)"
cat > "$SB_ROOT/sb.toml" <<TOML
[hub]
url = "postgres://postgres@127.0.0.1:$HP/postgres"
[member]
url = "postgres://postgres@127.0.0.1:${MPORT[sb]}/sb"
[pipeline]
name = "bench"
[queue]
path = "$SB_ROOT/queue"
TOML
# Create switchback's publication and slot, then stop: both consumers start behind.
"$SB" --log warn capture --config "$SB_ROOT/sb.toml" & pid=$!
until [ "$(H -Atc "select count(*) from pg_replication_slots where slot_name = 'switchback_bench'")" = 1 ]; do sleep 0.1; done
kill -INT $pid; wait $pid
if [ "$KAFKA" = 1 ]; then
  # batch.num.messages = 1: tansu 0.6 mis-serves fetches inside multi-message
  # batches (see docs/ARCHITECTURE.md, known limits); real Kafka needs no such line.
  cat > "$SB_ROOT/kf.toml" <<TOML
[hub]
url = "postgres://postgres@127.0.0.1:$HP/postgres"
[member]
url = "postgres://postgres@127.0.0.1:${MPORT[kf]}/kf"
[pipeline]
name = "benchk"
[queue]
kind = "kafka"
brokers = "127.0.0.1:$KP"
replication_factor = 1
path = "$SB_ROOT/kfq"
[queue.kafka]
"batch.num.messages" = "1"
TOML
  "$SB" --log warn capture --config "$SB_ROOT/kf.toml" & pid=$!
  until [ "$(H -Atc "select count(*) from pg_replication_slots where slot_name = 'switchback_benchk'")" = 1 ]; do sleep 0.1; done
  kill -INT $pid; wait $pid
fi

HIST="select count(*) || ':' || coalesce(max(hid), 0) from pgbench_history"
wait_rows() { # db want: until the member's history matches the hub's exactly.
  # One session polls every 5 ms (through the key index, then the exact count),
  # so neither consumer pays for a psql start per poll.
  M -d "$1" -c "DO \$\$ BEGIN
    LOOP EXIT WHEN (SELECT coalesce(max(hid), 0) FROM pgbench_history) >= ${2#*:}; PERFORM pg_sleep(0.005); END LOOP;
    LOOP EXIT WHEN ($HIST) = '$2'; PERFORM pg_sleep(0.005); END LOOP;
  END \$\$"
}
drain_native() { t=$(now); M -d native -c "alter subscription native_sub enable"; wait_rows native "$want"; native=$(echo "$(now) - $t" | bc); }
drain_sb() {
  t=$(now); "$SB" --log warn run --config "$SB_ROOT/sb.toml" 2>>"$SB_ROOT/run.log" & pid=$!; wait_rows sb "$want"
  sb=$(echo "$(now) - $t" | bc)
}
# While both consumers are connected and idle: a checkpoint logs the running
# transactions, and both slots' restart_lsn moves past this run's backlog. Without
# it the next run's walsender decodes this backlog again (as in production, where
# the consumer stays connected and restart_lsn keeps moving).
# A slot's restart_lsn moves only to a running-transactions record that its
# walsender decoded before the consumer confirmed past it; on an idle hub no new
# one comes, so a slot that missed the checkpoint's would wait forever: checkpoint
# again every 3 s (each logs one), and give up after 60 s.
settle_slots() { # slot names, quoted for SQL
  local lsn; lsn=$(H -Atc "select pg_current_wal_lsn()")
  for _ in $(seq 20); do
    H -c checkpoint
    for _ in $(seq 30); do
      [ "$(H -Atc "select bool_and(restart_lsn >= '$lsn') from pg_replication_slots where slot_name in ($1)")" = t ] && return 0
      sleep 0.1
    done
  done
  echo "slots $1 did not move past $lsn in 60 s:"; H -c "select slot_name, active, restart_lsn, confirmed_flush_lsn from pg_replication_slots"
  return 1
}
# The decoder's own pace: pg_recvlogical reads the same backlog through pgoutput
# into /dev/null (a fresh slot per run). No consumer can drain faster than this.
drain_ceiling() {
  local end; end=$(H -Atc "select pg_current_wal_lsn()")
  t=$(now)
  "$PG_BIN/pg_recvlogical" -h 127.0.0.1 -p "$HP" -U postgres -d postgres -S bench_ceiling --start \
    -o proto_version=1 -o publication_names=native_pub --endpos="$end" -f /dev/null
  ceiling=$(echo "$(now) - $t" | bc)
  H -Atc "select pg_drop_replication_slot('bench_ceiling')" >/dev/null
}
RATIOS=()
for run in $(seq 1 "$RUNS"); do
  M -d native -c "alter subscription native_sub disable"
  H -Atc "select pg_create_logical_replication_slot('bench_ceiling', 'pgoutput')" >/dev/null
  # -n: no vacuum, and above all no TRUNCATE of pgbench_history before the run.
  "$PG_BIN/pgbench" -n -h 127.0.0.1 -p "$HP" -U postgres -c 4 -j 2 -t $((TXNS / 4)) -N postgres >/dev/null 2>&1
  want=$(H -Atc "$HIST")
  # The hub writes pgbench's dirty pages back now, not during the first drain (which
  # was the slower one, whichever consumer it was).
  H -c checkpoint
  # Odd runs drain with the native subscription first, even runs with switchback first.
  if [ $((run % 2)) = 1 ]; then drain_native; drain_sb; else drain_sb; drain_native; fi
  settle_slots "'native_sub', 'switchback_bench'"
  kill -INT $pid; wait $pid
  drain_ceiling
  RATIOS+=("$(echo "$sb / $native" | bc -l)")
  printf 'run %d: txns %d  native_drain %.2f s  switchback_drain %.2f s  ratio switchback/native %.2f  (pg_recvlogical alone %.2f s)\n' \
    "$run" "$TXNS" "$native" "$sb" "${RATIOS[-1]}" "$ceiling"
  if [ "$KAFKA" = 1 ]; then
    t=$(now)
    "$SB" --log warn capture --config "$SB_ROOT/kf.toml" 2>>"$SB_ROOT/kf-capture.log" & cpid=$!
    "$SB" --log warn apply --config "$SB_ROOT/kf.toml" 2>>"$SB_ROOT/kf-apply.log" & apid=$!
    wait_rows kf "$want"
    kf=$(echo "$(now) - $t" | bc)
    settle_slots "'switchback_benchk'"
    kill -INT $cpid $apid; wait $cpid $apid
    printf 'run %d: txns %d  kafka_drain %.2f s  ratio kafka/native %.2f  ratio kafka/sled %.2f\n' \
      "$run" "$TXNS" "$kf" "$(echo "$kf / $native" | bc -l)" "$(echo "$kf / $sb" | bc -l)"
  fi
done
# The two members must be equal to the hub.
for t in pgbench_accounts pgbench_branches pgbench_tellers pgbench_history; do
  q="select count(*) || ':' || md5(string_agg(x::text, ',' order by x::text)) from $t x"
  h=$(H -Atc "$q"); n=$(M -d native -Atc "$q"); s=$(M -d sb -Atc "$q")
  if [ "$KAFKA" = 1 ]; then
    k=$(M -d kf -Atc "$q")
    [ "$h" = "$k" ] || { echo "MISMATCH in $t: hub $h kafka $k"; tail -30 "$SB_ROOT"/kf-*.log; exit 1; }
  fi
  [ "$h" = "$s" ] && [ "$h" = "$n" ] || { echo "MISMATCH in $t: hub $h native $n switchback $s"; grep -v "hub wins" "$SB_ROOT/run.log" | tail -30; exit 1; }
done
echo "members equal to the hub"
# The runs vary by about 20% on a small machine: the median says more than one run.
printf 'median ratio switchback/native over %d runs: %.2f\n' "$RUNS" \
  "$(printf '%s\n' "${RATIOS[@]}" | sort -g | awk '{a[NR] = $1} END {print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}')"
