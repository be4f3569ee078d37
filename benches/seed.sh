#!/usr/bin/env bash
# Seed benchmark: the same pgbench data copied hub → member by PostgreSQL's native
# subscription (initial copy), by `pgcopydb clone`, and by `switchback seed`, side
# by side on the same throwaway clusters, in one invocation. Prints times and ratios.
#
#   benches/seed.sh                      # SCALE=10 JOBS=2 RUNS=1
#   SCALE=50 RUNS=3 benches/seed.sh
#
# What each one does (the member starts empty each time, in a new database):
#   native_copy       schema from pg_dump -s (keys and indexes before the data), then
#                     CREATE SUBSCRIPTION; until every table is ready (srsubstate 'r')
#   switchback_seed   the same pre-created schema, then `switchback seed --jobs JOBS`
#   pgcopydb_clone    `pgcopydb clone --table-jobs JOBS --index-jobs JOBS` into an empty
#                     database (schema, data, then indexes and constraints)
#   switchback_create `switchback seed --create-schema --jobs JOBS` into an empty
#                     database (tables and keys, data, then indexes): pgcopydb's shape
# Ratios: switchback_seed / native_copy and switchback_create / pgcopydb_clone
# (below 1: switchback is faster). Every copy is checked against the hub.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
# A directory of its own: the EXIT trap removes it (an inherited SB_ROOT would go too).
SB_ROOT=$(mktemp -d /tmp/switchback.XXXXXX)
source "$here/scripts/cluster.sh"
SCALE=${SCALE:-10} JOBS=${JOBS:-2} RUNS=${RUNS:-1}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/switchback-target}
(cd "$here" && cargo build --release -q -p switchback-cli)
SB=$CARGO_TARGET_DIR/release/switchback
command -v pgcopydb >/dev/null || { echo "pgcopydb is missing: apt-get install -y pgcopydb" >&2; exit 1; }
HP=$(free_port); MP=$(free_port)
trap 'kill $(jobs -p) 2>/dev/null || true; cluster_destroy hub; cluster_destroy member; rm -rf "$SB_ROOT"' EXIT
cluster_start hub "$HP" "max_sync_workers_per_subscription = $JOBS"
cluster_start member "$MP" "max_sync_workers_per_subscription = $JOBS"
H() { psql -h 127.0.0.1 -p "$HP" -U postgres -X -q -v ON_ERROR_STOP=1 "$@"; }
M() { psql -h 127.0.0.1 -p "$MP" -U postgres -X -q -v ON_ERROR_STOP=1 "$@"; }
now() { date +%s.%N; }
since() { echo "$(now) - $1" | bc; }
HUB="host=127.0.0.1 port=$HP user=postgres dbname=postgres"

"$PG_BIN/pgbench" -h 127.0.0.1 -p "$HP" -U postgres -i -s "$SCALE" -q postgres >/dev/null 2>&1
H -c "alter table pgbench_history add column hid bigserial primary key"
H -c "vacuum analyze"
"$PG_BIN/pg_dump" -h 127.0.0.1 -p "$HP" -U postgres -s postgres > "$SB_ROOT/schema.sql"
H -c "create publication native_pub for all tables"
size=$(H -Atc "select pg_size_pretty(sum(pg_relation_size(oid))) from pg_class where relname like 'pgbench_%' and relkind = 'r'")
echo "scale $SCALE ($size of heap), jobs $JOBS, runs $RUNS"

check() { # db: every pgbench table equal to the hub's
  for t in pgbench_accounts pgbench_branches pgbench_tellers pgbench_history; do
    q="select count(*) || ':' || sum(hashtext(x::text)::int8) from $t x"
    [ "$(H -Atc "$q")" = "$(M -d "$1" -Atc "$q")" ] || { echo "MISMATCH in $1.$t" >&2; exit 1; }
  done
}
sb_config() { # name db
  cat > "$SB_ROOT/$1.toml" <<TOML
[hub]
url = "postgres://postgres@127.0.0.1:$HP/postgres"
[member]
url = "postgres://postgres@127.0.0.1:$MP/$2"
[pipeline]
name = "$1"
[queue]
path = "$SB_ROOT/$1-queue"
TOML
}

for run in $(seq 1 "$RUNS"); do
  # native subscription initial copy
  M -c "create database native$run"; M -d "native$run" -f "$SB_ROOT/schema.sql" >/dev/null
  t=$(now)
  M -d "native$run" -c "create subscription native_sub$run connection '$HUB' publication native_pub" 2>/dev/null
  until [ "$(M -d "native$run" -Atc "select count(*) from pg_subscription_rel where srsubstate <> 'r'")" = 0 ]; do sleep 0.05; done
  native=$(since "$t")
  M -d "native$run" -c "drop subscription native_sub$run" >/dev/null
  check "native$run"

  # switchback seed into the same pre-created schema
  M -c "create database sb$run"; M -d "sb$run" -f "$SB_ROOT/schema.sql" >/dev/null
  sb_config "sb$run" "sb$run"
  t=$(now)
  "$SB" --log warn seed --config "$SB_ROOT/sb$run.toml" --jobs "$JOBS" 2>>"$SB_ROOT/seed.log"
  seed=$(since "$t")
  H -c "select pg_drop_replication_slot('switchback_sb$run')" >/dev/null
  check "sb$run"

  # pgcopydb clone into an empty database
  M -c "create database clone$run"
  t=$(now)
  pgcopydb clone --source "$HUB" --target "host=127.0.0.1 port=$MP user=postgres dbname=clone$run" \
    --table-jobs "$JOBS" --index-jobs "$JOBS" --dir "$SB_ROOT/pgcopydb$run" --skip-extensions --no-owner \
    >"$SB_ROOT/pgcopydb$run.log" 2>&1 || { echo "pgcopydb clone failed:"; tail -20 "$SB_ROOT/pgcopydb$run.log"; exit 1; }
  clone=$(since "$t")
  check "clone$run"

  # switchback seed --create-schema into an empty database
  M -c "create database sbc$run"
  sb_config "sbc$run" "sbc$run"
  t=$(now)
  "$SB" --log warn seed --config "$SB_ROOT/sbc$run.toml" --jobs "$JOBS" --create-schema 2>>"$SB_ROOT/seed.log"
  create=$(since "$t")
  H -c "select pg_drop_replication_slot('switchback_sbc$run')" >/dev/null
  check "sbc$run"

  printf 'run %d: native_copy %.2f s  switchback_seed %.2f s  ratio %.2f | pgcopydb_clone %.2f s  switchback_create %.2f s  ratio %.2f\n' \
    "$run" "$native" "$seed" "$(echo "$seed / $native" | bc -l)" "$clone" "$create" "$(echo "$create / $clone" | bc -l)"
  for db in "native$run" "sb$run" "clone$run" "sbc$run"; do M -c "drop database $db" >/dev/null; done
done
echo "every copy equal to the hub"
