#!/usr/bin/env bash
# Usage: scripts/with-postgres.sh CMD [ARGS...]
#
# Runs CMD with a private, throwaway PostgreSQL server and
#   EVOMERGE_TEST_POSTGRES_URL=postgresql+psycopg://postgres@127.0.0.1:PORT/evomerge_test
# exported, so the storage tests run against PostgreSQL as well as SQLite.
#
# - Installs the Debian server packages only when no /usr/lib/postgresql/*/bin/initdb exists
#   (as root: apt-get update, then apt-get install -y postgresql, with services kept from starting).
# - The cluster lives in a fresh temp dir (owned by the postgres user when run as root: initdb
#   refuses root), listens on 127.0.0.1 only, on the first free port from 54329 upward, with its
#   unix socket in the temp dir and trust authentication. Nothing is written outside the temp dir.
# - On exit the server is stopped and the temp dir deleted; the script exits with CMD's status.
#   INT/TERM sent to the script are passed on to CMD (run in its own process group when there
#   is no terminal, as in CI), then the same cleanup runs.
# - If PostgreSQL cannot be installed or started, it prints one line and runs CMD anyway without
#   the variable (the PostgreSQL tests then skip). Once the server is up, failures are real.
# - If EVOMERGE_TEST_POSTGRES_URL is already set, that server is used and none is started.
set -uo pipefail

readonly FIRST_PORT=54329 PORT_TRIES=100 START_TIMEOUT=60 STOP_TIMEOUT=30 APT_TIMEOUT=900
readonly DATABASE=evomerge_test

say() { echo "with-postgres: $*" >&2; }

if [ "$#" -eq 0 ]; then
    echo "usage: $0 CMD [ARGS...]" >&2
    exit 2
fi

if [ -n "${EVOMERGE_TEST_POSTGRES_URL:-}" ]; then
    say "EVOMERGE_TEST_POSTGRES_URL is already set; using that server, starting none"
    exec "$@"
fi

tmp_dir=""
bindir=""
data_dir=""
started=0

as_postgres() {
    # initdb and the server refuse to run as root; as another user, run them as that user.
    if [ "$(id -u)" -eq 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

find_bindir() {
    local dir best=""
    for dir in /usr/lib/postgresql/*/bin; do
        [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ] || continue
        if [ -z "$best" ] || [ "$(printf '%s\n%s\n' "$best" "$dir" | sort -V | tail -n 1)" = "$dir" ]; then
            best=$dir
        fi
    done
    [ -n "$best" ] && echo "$best"
}

install_postgres() {
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
        fail "the server is not installed and installing it needs root and apt-get"
        return 1
    fi
    say "installing the PostgreSQL server packages (apt-get)"
    # Keep the package scripts from starting the default cluster as a service: this script
    # wants only its own private server, and nothing left running afterwards.
    local policy=/usr/sbin/policy-rc.d added_policy=0 status=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && added_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    timeout "$APT_TIMEOUT" apt-get update -qq </dev/null >&2 \
        && timeout "$APT_TIMEOUT" apt-get install -y -qq --no-install-recommends \
            -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
            postgresql </dev/null >&2 \
        || status=1
    [ "$added_policy" -eq 1 ] && rm -f "$policy"
    [ "$status" -eq 0 ] || fail "apt-get install -y postgresql failed"
}

port_is_free() {
    python3 - "$1" <<'PY' 2>/dev/null
import socket, sys
with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does: TIME_WAIT is no obstacle
    s.bind(("127.0.0.1", int(sys.argv[1])))
PY
}

make_tmp_dir() {
    # The postgres user must reach the directory: every parent must be traversable by it.
    local base
    for base in "${TMPDIR:-/tmp}" /tmp; do
        tmp_dir=$(mktemp -d "$base/evomerge-pg.XXXXXX" 2>/dev/null) || continue
        if [ "$(id -u)" -ne 0 ]; then
            return 0
        fi
        if chown postgres:postgres "$tmp_dir" && runuser -u postgres -- test -w "$tmp_dir"; then
            return 0
        fi
        rm -rf "$tmp_dir"
        tmp_dir=""
    done
    return 1
}

stop_and_remove() {
    # Stop our server (if it got as far as starting) and delete the temp dir. Bounded.
    if [ "$started" -eq 1 ] && [ -f "$data_dir/postmaster.pid" ]; then
        if ! as_postgres "$bindir/pg_ctl" -D "$data_dir" -m fast -w -t "$STOP_TIMEOUT" stop >/dev/null 2>&1; then
            say "fast stop did not finish in ${STOP_TIMEOUT}s; stopping the server immediately"
            if ! as_postgres "$bindir/pg_ctl" -D "$data_dir" -m immediate -w -t "$STOP_TIMEOUT" stop >/dev/null 2>&1; then
                local pid
                pid=$(head -n 1 "$data_dir/postmaster.pid" 2>/dev/null)
                [[ "$pid" =~ ^[0-9]+$ ]] && kill -KILL "$pid" 2>/dev/null
            fi
        fi
    fi
    started=0
    if [ -n "$tmp_dir" ]; then
        rm -rf "$tmp_dir"
    fi
    tmp_dir=""
}

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    stop_and_remove
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

failure=""
fail() { failure=$*; return 1; }

start_postgres() {
    if ! bindir=$(find_bindir); then
        install_postgres || return 1
        bindir=$(find_bindir) || fail "no server binaries under /usr/lib/postgresql after installing" || return 1
    fi
    command -v python3 >/dev/null || fail "python3 is needed to find a free port" || return 1
    make_tmp_dir || fail "could not make a temp dir the postgres user can use" || return 1
    data_dir=$tmp_dir/data

    # initdb and pg_ctl run in the temp dir: the postgres user may not read the caller's cwd.
    if ! (cd "$tmp_dir" && as_postgres "$bindir/initdb" -D "$data_dir" -U postgres -A trust \
            -E UTF8 --locale=C --no-sync) >"$tmp_dir/initdb.log" 2>&1; then
        fail "initdb failed: $(tail -n 3 "$tmp_dir/initdb.log" | tr '\n' ' ')"
        return 1
    fi

    # The check-then-bind gap is racy: if another process takes the port first, try the next.
    local port=$FIRST_PORT last=$((FIRST_PORT + PORT_TRIES)) attempts=0
    while [ "$port" -lt "$last" ]; do
        if port_is_free "$port"; then
            attempts=$((attempts + 1))
            started=1  # from here on, cleanup stops whatever may have started
            if (cd "$tmp_dir" && as_postgres "$bindir/pg_ctl" -D "$data_dir" -l "$tmp_dir/server.log" \
                    -w -t "$START_TIMEOUT" \
                    -o "-p $port -k $tmp_dir -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off" \
                    start) >/dev/null 2>&1; then
                break
            fi
            # A server that did not come up in time may still be starting: stop it before moving on.
            as_postgres "$bindir/pg_ctl" -D "$data_dir" -m immediate -w -t "$STOP_TIMEOUT" stop >/dev/null 2>&1
            if [ "$attempts" -ge 3 ]; then
                fail "the server did not start: $(tail -n 3 "$tmp_dir/server.log" 2>/dev/null | tr '\n' ' ')"
                return 1
            fi
        fi
        port=$((port + 1))
    done
    if [ "$port" -ge "$last" ]; then
        fail "no free port on 127.0.0.1 in $FIRST_PORT..$((last - 1))"
        return 1
    fi

    if ! PGCONNECT_TIMEOUT=10 "$bindir/psql" -X -q -h 127.0.0.1 -p "$port" -U postgres -d postgres \
            -v ON_ERROR_STOP=1 -c "CREATE DATABASE $DATABASE" >"$tmp_dir/createdb.log" 2>&1; then
        fail "could not create database $DATABASE: $(tr '\n' ' ' <"$tmp_dir/createdb.log")"
        return 1
    fi
    export EVOMERGE_TEST_POSTGRES_URL="postgresql+psycopg://postgres@127.0.0.1:$port/$DATABASE"
    say "PostgreSQL $("$bindir/postgres" --version | awk '{print $3}') on 127.0.0.1:$port (data in $tmp_dir): $EVOMERGE_TEST_POSTGRES_URL"
}

if ! start_postgres; then
    stop_and_remove
    unset EVOMERGE_TEST_POSTGRES_URL
    say "PostgreSQL unavailable (${failure:-unknown reason}); running without EVOMERGE_TEST_POSTGRES_URL, so its tests skip"
fi

if [ -t 0 ]; then
    # At a terminal: CMD in the foreground with the terminal (Ctrl-C reaches it directly, a
    # debugger can read stdin); the server is stopped as soon as it returns.
    "$@"
    exit $?
fi

# No terminal (CI): CMD in its own process group, so an INT or TERM sent to this script is
# passed on to all of CMD at once and the server is stopped right after (a trap cannot run while
# bash waits for a foreground command, which would defer the cleanup until CMD ended by itself).
set -m
"$@" &
child=$!
set +m
interrupted=0
forward() {
    interrupted=1
    kill -s "$1" -- "-$child" 2>/dev/null || kill -s "$1" "$child" 2>/dev/null || true
}
trap 'forward INT' INT
trap 'forward TERM' TERM
while :; do
    interrupted=0
    wait "$child"
    status=$?
    # A signal interrupts `wait` (status > 128) while CMD may still be running: wait again.
    # bash keeps a reaped child's status, so waiting twice on a finished CMD gives it again.
    [ "$interrupted" -eq 1 ] || break
done
exit "$status"
