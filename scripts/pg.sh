#!/usr/bin/env bash
# A private, throwaway PostgreSQL cluster for development and tests.
#   scripts/pg.sh start DIR PORT   create (once) and start a cluster in DIR on 127.0.0.1:PORT
#   scripts/pg.sh stop DIR [MODE]  stop it (MODE: fast, the default, smart or immediate)
# The server binaries come from Debian's postgresql package (installed if missing).
# Runs the server as the "postgres" system user when it exists, else as "nobody",
# since PostgreSQL refuses to run as root. Trust authentication, loopback only.
set -euo pipefail

cmd=${1:?usage: pg.sh start DIR PORT | stop DIR [fast|smart|immediate]}
dir=$(realpath -m "${2:?state directory}")
port=${3:-15432}

find_bindir() {
  local d
  for d in /usr/lib/postgresql/*/bin; do
    [ -x "$d/initdb" ] && { echo "$d"; return 0; }
  done
  return 1
}

bindir=$(find_bindir || true)
if [ -z "$bindir" ]; then
  echo "pg.sh: installing PostgreSQL server (Debian package postgresql)" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  bindir=$(find_bindir)
fi

owner=postgres
id -u "$owner" >/dev/null 2>&1 || owner=nobody
as_owner() { if [ "$(id -u)" = 0 ]; then runuser -u "$owner" -- "$@"; else "$@"; fi; }

case "$cmd" in
  start)
    mkdir -p "$dir"
    [ "$(id -u)" = 0 ] && chown "$owner" "$dir"
    if ! as_owner test -w "$dir" 2>/dev/null; then
      echo "pg.sh: the $owner user cannot reach $dir (a parent directory lets no other user in); use a directory under /var/tmp or /var/lib" >&2
      exit 1
    fi
    if [ ! -f "$dir/data/PG_VERSION" ]; then
      as_owner "$bindir/initdb" -D "$dir/data" -U postgres -A trust -E UTF8 --no-locale >"$dir/initdb.log" 2>&1 \
        || { cat "$dir/initdb.log" >&2; exit 1; }
    fi
    if as_owner "$bindir/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
      echo "pg.sh: already running in $dir"
    else
      as_owner "$bindir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 start \
        -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c fsync=off -c max_connections=100" >/dev/null \
        || { tail -20 "$dir/server.log" >&2; exit 1; }
      echo "pg.sh: PostgreSQL running on 127.0.0.1:$port (data in $dir/data)"
    fi
    ;;
  stop)
    mode=${3:-fast}
    case "$mode" in fast|smart|immediate) ;; *) echo "pg.sh: stop mode must be fast, smart or immediate" >&2; exit 2 ;; esac
    if [ -f "$dir/data/PG_VERSION" ]; then
      as_owner "$bindir/pg_ctl" -D "$dir/data" -m "$mode" -w stop >/dev/null 2>&1 || true
      echo "pg.sh: stopped PostgreSQL in $dir"
    fi
    ;;
  *) echo "usage: pg.sh start DIR PORT | stop DIR [fast|smart|immediate]" >&2; exit 2 ;;
esac
