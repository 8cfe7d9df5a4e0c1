#!/usr/bin/env bash
# Start a Docker engine (overlay2) unless one already answers. Idempotent; safe to run many times.
# Honors DOCKER_HOST (unix:// only for a locally started engine); default /var/run/docker.sock.
# Logs: $PYVISION_CACHE/dockerd.log (default <repo>/.cache/dockerd.log).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="$(cd "$here/.." && pwd)/.cache"; cache="${PYVISION_CACHE:-$cache}"
mkdir -p "$cache"
host="${DOCKER_HOST:-unix:///var/run/docker.sock}"
log="$cache/dockerd.log"

if ! command -v docker >/dev/null 2>&1; then
  echo "start-dockerd: no docker client; install docker.io (make sysdeps)" >&2; exit 1
fi
if docker -H "$host" version --format '{{.Server.Version}}' >/dev/null 2>&1; then
  echo "start-dockerd: engine already answers at $host"; exit 0
fi
case "$host" in
  unix://*) sock="${host#unix://}" ;;
  *) echo "start-dockerd: no engine answers at DOCKER_HOST=$host and only a local unix socket can be started" >&2; exit 1 ;;
esac
if ! command -v dockerd >/dev/null 2>&1; then
  echo "start-dockerd: no dockerd binary; install docker.io (make sysdeps)" >&2; exit 1
fi
if [ "$(id -u)" != 0 ]; then
  echo "start-dockerd: starting dockerd needs root; start an engine yourself or run as root" >&2; exit 1
fi
# containerd may be bundled with docker.io (dockerd starts its own when none runs).
# No bridge/iptables: sandbox containers run with --network none, and iptables is often unavailable here.
nohup dockerd --storage-driver=overlay2 --iptables=false --ip6tables=false --bridge=none \
  --host="unix://$sock" --pidfile="$cache/dockerd.pid" >>"$log" 2>&1 &
for _ in $(seq 1 60); do
  if docker -H "$host" version --format '{{.Server.Version}}' >/dev/null 2>&1; then
    echo "start-dockerd: engine up at $host (log: $log)"; exit 0
  fi
  sleep 0.5
done
echo "start-dockerd: dockerd did not answer within 30 s; see $log" >&2
tail -n 20 "$log" >&2 || true
exit 1
