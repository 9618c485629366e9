#!/usr/bin/env bash
# Builds and runs es-bench (release), passing every argument through; uses the trained
# parameters of the default 15-minute run as --trained when they exist.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

cargo build --release -p es-bench

args=()
trained="runs/default-15min/theta.f32"
# An explicit --trained wins: clap refuses the flag twice.
given=no
for a in "$@"; do
    if [[ "$a" == --trained || "$a" == --trained=* ]]; then
        given=yes
    fi
done
if [[ "$given" == no && -f "$trained" ]]; then
    args+=(--trained "$trained")
fi

exec "$root/target/release/es-bench" "${args[@]}" "$@"
