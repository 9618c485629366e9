#!/usr/bin/env bash
# Builds the images underflow-coordinator and underflow-worker from the release binaries,
# FROM scratch: each holds its binary, the shared libraries it links (as `ldd` reports them)
# and empty, writable /data, /cache, /runs and /tmp. No base image is pulled.
#
#   deploy/build-images.sh [TAG]      (default tag: latest)
#
# With a registry, tag and push as usual:
#   docker tag underflow-worker:latest registry.example.com/underflow-worker:v1
#   docker push registry.example.com/underflow-worker:v1
set -euo pipefail
cd "$(dirname "$0")/.."
tag="${1:-latest}"
cargo build --release --locked --bin coordinator --bin worker >&2
stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
for binary in coordinator worker; do
  root="$stage/$binary/rootfs"
  mkdir -p "$root/bin" "$root/data" "$root/cache" "$root/runs" "$root/tmp"
  chmod 1777 "$root/cache" "$root/runs" "$root/tmp"
  # Debug info stays in target/; the image gets the stripped binary.
  strip -o "$root/bin/entrypoint" "target/release/$binary"
  ln -s entrypoint "$root/bin/$binary"
  # The dynamic loader and every library the binary needs, at the paths it looks for them.
  for lib in $(ldd "target/release/$binary" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}'); do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done
  cp deploy/Dockerfile "$stage/$binary/Dockerfile"
  docker build --quiet --build-arg BINARY="$binary" -t "underflow-$binary:$tag" "$stage/$binary" >&2
  size=$(docker image inspect "underflow-$binary:$tag" --format '{{.Size}}')
  echo "underflow-$binary:$tag $size bytes"
done
