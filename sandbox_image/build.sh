#!/usr/bin/env bash
# Build the sandbox image: bash sandbox_image/build.sh IMAGE[:TAG]
#
# Offline by default (no registry needed): debootstrap a Debian bookworm rootfs with Python's numeric stack
# (~2 min, Debian's mirror must be reachable once), slim it, `docker import` it as the base image, then
# `docker build` the Dockerfile FROM it. The slimmed rootfs tarball is cached under $PYVISION_CACHE/sandbox
# (default <repo>/.cache/sandbox), and the final image carries a content-hash label of the kernel, the
# Dockerfile and this script: when the image exists with the same hash, the script exits at once.
#
# With a registry: BASE_IMAGE=python:3.11-slim PIP_PACKAGES="numpy pillow matplotlib av" bash build.sh IMAGE
# Env: DEBIAN_MIRROR (default http://deb.debian.org/debian), DEBIAN_SUITE (bookworm), DOCKER_HOST.
set -euo pipefail
image="${1:?usage: build.sh IMAGE[:TAG]}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
cache="$(mkdir -p "${PYVISION_CACHE:-$repo/.cache}/sandbox" && cd "${PYVISION_CACHE:-$repo/.cache}/sandbox" && pwd)"
kernel="$repo/pyvision_rl/sandbox/kernel.py"
suite="${DEBIAN_SUITE:-bookworm}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
packages="python3-minimal,python3-numpy,python3-matplotlib,python3-pil,python3-av"
pip_packages="${PIP_PACKAGES:-}"
base_offline="pyvision-sandbox-base:$suite"
base="${BASE_IMAGE:-$base_offline}"

if ! docker version --format '{{.Server.Version}}' >/dev/null 2>&1; then
  echo "build.sh: no Docker engine answers (DOCKER_HOST=${DOCKER_HOST:-unset}); run: make docker-up" >&2; exit 1
fi

hash="$(cat "$here/Dockerfile" "$kernel" "$0" <(echo "$base|$pip_packages|$packages|$suite") | sha256sum | cut -c1-16)"
have="$(docker image inspect -f '{{ index .Config.Labels "pyvision.sandbox.hash" }}' "$image" 2>/dev/null || true)"
if [ "$have" = "$hash" ]; then
  echo "build.sh: $image is up to date (hash $hash)"; exit 0
fi

if [ "$base" = "$base_offline" ] && ! docker image inspect "$base" >/dev/null 2>&1; then
  tarball="$cache/rootfs-$suite-$(echo "$packages" | sha256sum | cut -c1-8).tar"
  if [ ! -s "$tarball" ]; then
    command -v debootstrap >/dev/null || { echo "build.sh: debootstrap is missing; run: make sysdeps" >&2; exit 1; }
    root="$cache/rootfs.partial"
    if [ ! -f "$cache/rootfs.done" ]; then
      rm -rf "$root"
      echo "build.sh: debootstrap $suite with $packages (about 2 minutes; log: $cache/debootstrap.log)"
      debootstrap --variant=minbase --include="$packages" "$suite" "$root" "$mirror" >"$cache/debootstrap.log" 2>&1 \
        || { echo "build.sh: debootstrap failed; see $cache/debootstrap.log" >&2; tail -n 20 "$cache/debootstrap.log" >&2; exit 1; }
      touch "$cache/rootfs.done"
    fi
    # Slim: package caches, docs, man pages, locales, headers, the compiler a dependency pulls in, and
    # the GPU drivers (mesa/LLVM) that nothing in a headless Agg + numpy box loads.
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/usr/share/doc \
      "$root"/usr/share/man "$root"/usr/share/info "$root"/usr/share/locale "$root"/usr/include \
      "$root"/usr/lib/gcc "$root"/usr/lib/x86_64-linux-gnu/dri "$root"/usr/lib/x86_64-linux-gnu/libLLVM-*
    chroot "$root" python3 -c "import numpy, PIL, matplotlib, matplotlib.pyplot, av" \
      || { echo "build.sh: the slimmed rootfs cannot import the stack" >&2; exit 1; }
    tar --numeric-owner -C "$root" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
    rm -rf "$root" "$cache/rootfs.done"
  fi
  echo "build.sh: docker import $tarball as $base"
  docker import -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' "$tarball" "$base" >/dev/null
fi

ctx="$(mktemp -d)"
trap 'rm -rf "$ctx"' EXIT
cp "$here/Dockerfile" "$kernel" "$ctx/"
echo "build.sh: docker build $image FROM $base"
DOCKER_BUILDKIT=0 docker build -q 2>"$cache/docker-build.log" --build-arg BASE_IMAGE="$base" --build-arg PIP_PACKAGES="$pip_packages" \
  --label "pyvision.sandbox.hash=$hash" -t "$image" "$ctx" >/dev/null \
  || { echo "build.sh: docker build failed; see $cache/docker-build.log" >&2; tail -n 30 "$cache/docker-build.log" >&2; exit 1; }
docker image prune -f --filter label=pyvision.sandbox.hash >/dev/null 2>&1 || true  # the superseded build
echo "build.sh: built $image (hash $hash)"
