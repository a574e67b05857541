#!/bin/sh
# Entrypoint of the compose `search` service (installed as /usr/local/bin/evomerge-driver): runs
# `evomerge "$@"`.
#
# A Ray driver has to run on a Ray node: ray.init(address=...) connects to the cluster's GCS and then
# to a raylet on its own host, and fails when there is none. So before `evomerge run` (the only
# subcommand that uses Ray), and only when RAY_ADDRESS names a cluster, this container joins the
# cluster as a node with no CPUs and no GPUs: it hosts the driver, and no worker actor is ever placed
# on it. Other subcommands (front, export, validate, ...) run directly. The node goes away with the
# container. RAY_AUTH_MODE comes from the environment, the same as on every other node.
set -eu

if [ "${1:-}" = "run" ] && [ -n "${RAY_ADDRESS:-}" ]; then
    ray start --address="$RAY_ADDRESS" --num-cpus=0 --num-gpus=0 \
        --object-store-memory="${EVOMERGE_DRIVER_OBJECT_STORE_BYTES:-500000000}" \
        --disable-usage-stats
fi
exec evomerge "$@"
