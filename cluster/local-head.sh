#!/usr/bin/env bash
# Start a one-node Ray head for asft-ray on this machine, bound to 127.0.0.1 only:
# GCS on $RAY_PORT (6379), dashboard and job server on http://127.0.0.1:8265.
#
#   bash cluster/local-head.sh            # start
#   RAY_ADDRESS=127.0.0.1:6379 asft prune --config configs/demo.yaml
#   ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/prune.py configs/demo.yaml
#   ray stop                              # note: stops every Ray process of this user on the host
#
# Ray 2.60 turns token authentication on by default: `ray job submit` then needs
# RAY_AUTH_MODE=token in the client's environment (the token is in ~/.ray/auth_token).
set -euo pipefail
exec ray start --head \
  --node-ip-address=127.0.0.1 \
  --port="${RAY_PORT:-6379}" \
  --dashboard-host=127.0.0.1 \
  --dashboard-port="${RAY_DASHBOARD_PORT:-8265}" \
  --num-cpus="${RAY_NUM_CPUS:-$(nproc)}" \
  --disable-usage-stats
