#!/usr/bin/env bash
# Usage: scripts/with-chromium.sh CMD [ARGS...]
#
# Runs CMD with EVOMERGE_TEST_CHROMIUM=/path/to/chromium exported, so the browser tests
# (tests/test_search_view.py: optuna-dashboard rendered in headless Chromium) run.
#
# - Uses EVOMERGE_TEST_CHROMIUM when it is already set to a browser that runs, else the first
#   of chromium, chromium-browser, google-chrome, google-chrome-stable found on PATH.
# - Installs Debian's `chromium` package only when none is found (as root: apt-get update,
#   then apt-get install -y --no-install-recommends chromium).
# - If no browser can be had, it prints one line and runs CMD anyway without the variable
#   (the browser tests then look on PATH themselves and skip, saying why).
# - CMD replaces this script (exec): its exit status and signals are CMD's own; nothing is
#   left running and nothing is written besides the installed package.
set -uo pipefail

readonly APT_TIMEOUT=900 VERSION_TIMEOUT=60 CANDIDATES="chromium chromium-browser google-chrome google-chrome-stable"

say() { echo "with-chromium: $*" >&2; }

if [ "$#" -eq 0 ]; then
    echo "usage: $0 CMD [ARGS...]" >&2
    exit 2
fi

runs() {
    # A browser that starts: `--version` answers (bounded, so a broken install cannot hang CI).
    [ -n "$1" ] && [ -x "$1" ] && timeout "$VERSION_TIMEOUT" "$1" --version >/dev/null 2>&1
}

find_browser() {
    local name path
    if [ -n "${EVOMERGE_TEST_CHROMIUM:-}" ] && runs "$EVOMERGE_TEST_CHROMIUM"; then
        echo "$EVOMERGE_TEST_CHROMIUM"
        return 0
    fi
    for name in $CANDIDATES; do
        path=$(command -v "$name" 2>/dev/null) || continue
        if runs "$path"; then
            echo "$path"
            return 0
        fi
    done
    return 1
}

install_chromium() {
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
        failure="no browser found, and installing Debian's chromium needs root and apt-get"
        return 1
    fi
    say "installing Debian's chromium (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    if ! { timeout "$APT_TIMEOUT" apt-get update -qq </dev/null >&2 \
            && timeout "$APT_TIMEOUT" apt-get install -y -qq --no-install-recommends chromium </dev/null >&2; }; then
        failure="apt-get install -y chromium failed"
        return 1
    fi
}

failure=""
if browser=$(find_browser) || { install_chromium && browser=$(find_browser); }; then
    export EVOMERGE_TEST_CHROMIUM=$browser
    say "$("$browser" --version 2>/dev/null | head -n 1) at $browser"
else
    unset EVOMERGE_TEST_CHROMIUM
    say "Chromium unavailable (${failure:-installed, but it does not start}); running without EVOMERGE_TEST_CHROMIUM, so the browser tests skip"
fi
exec "$@"
