#!/bin/sh
# Make sure a Docker engine answers, for the container provider and `blip-build-image`. Idempotent: installs
# docker.io (and debootstrap, for the CPU image's base) only when missing, starts dockerd only when none
# answers, and waits a bounded time for it. Needs root for the install and for dockerd.
#   usage: server/docker_engine.sh    env: DOCKER_WAIT_S (default 60), DOCKERD_LOG (default /tmp/dockerd.log)
set -eu

wait_s="${DOCKER_WAIT_S:-60}"
log="${DOCKERD_LOG:-/tmp/dockerd.log}"

answers() { timeout 10 docker info >/dev/null 2>&1; }

if command -v docker >/dev/null 2>&1 && answers; then
    echo "docker engine: answering ($(docker info --format '{{.ServerVersion}}' 2>/dev/null))"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "docker engine: none answers, and installing or starting one needs root (run this as root)" >&2
    exit 1
fi

missing=""
command -v dockerd >/dev/null 2>&1 || missing=" docker.io"
command -v debootstrap >/dev/null 2>&1 || missing="$missing debootstrap"
if [ -n "$missing" ]; then
    echo "docker engine: installing$missing"
    export DEBIAN_FRONTEND=noninteractive
    timeout 600 apt-get update -qq
    # shellcheck disable=SC2086  # the package list is meant to split
    timeout 900 apt-get install -y -qq $missing >/dev/null
fi

if ! answers; then
    # A dockerd that died leaves its pid file behind, and a new one refuses to start while it is there.
    pidfile=/var/run/docker.pid
    if [ -f "$pidfile" ] && ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        rm -f "$pidfile"
    fi
    if [ ! -f "$pidfile" ]; then
        echo "docker engine: starting dockerd (log: $log)"
        setsid dockerd >"$log" 2>&1 < /dev/null &
    fi
    waited=0
    until answers; do
        if [ "$waited" -ge "$wait_s" ]; then
            echo "docker engine: dockerd did not answer within ${wait_s} s; its log ends with:" >&2
            tail -n 20 "$log" >&2 || true
            exit 1
        fi
        sleep 1
        waited=$((waited + 1))
    done
fi
echo "docker engine: answering ($(docker info --format '{{.ServerVersion}}' 2>/dev/null))"
