#!/usr/bin/env bash
# Throwaway PostgreSQL clusters for the demo and the benchmarks (sourced).
#   cluster_start NAME PORT [extra postgresql.conf lines...]
#   cluster_destroy NAME
# Clusters live under $SB_ROOT (a temp dir); initdb runs as postgres when root.
SB_ROOT=${SB_ROOT:-$(mktemp -d /tmp/switchback.XXXXXX)}
chmod 777 "$SB_ROOT"
PG_BIN=${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)}

as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

cluster_start() {
  local name=$1 port=$2; shift 2
  local dir=$SB_ROOT/$name
  if [ ! -d "$dir" ]; then
    as_pg "$PG_BIN/initdb" -D "$dir" -U postgres -A trust --no-sync >/dev/null
    {
      echo "port = $port"; echo "listen_addresses = '127.0.0.1'"
      echo "unix_socket_directories = '$SB_ROOT'"
      echo "wal_level = logical"; echo "max_replication_slots = 20"; echo "max_wal_senders = 20"
      echo "max_logical_replication_workers = 8"; echo "shared_buffers = 256MB"
      echo "fsync = on"; echo "synchronous_commit = on"
      for l in "$@"; do echo "$l"; done
    } >> "$dir/postgresql.conf"
  fi
  as_pg "$PG_BIN/pg_ctl" -D "$dir" -l "$dir/log" -w start >/dev/null
}

cluster_destroy() {
  as_pg "$PG_BIN/pg_ctl" -D "$SB_ROOT/$1" -m immediate -w stop >/dev/null 2>&1 || true
  rm -rf "${SB_ROOT:?}/$1"
}
