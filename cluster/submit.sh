#!/usr/bin/env bash
# Submit a pyvision-rl job to a running Ray cluster with `ray job submit`.
#
#   cluster/submit.sh [options] CONFIG [key.sub=value ...]   # runs: python -m pyvision_rl.cli train CONFIG ...
#   cluster/submit.sh [options] -- COMMAND [ARGS ...]        # any other entrypoint (e.g. a smoke test)
#
# Options:
#   --address URL         dashboard / job server (default: $RAY_ADDRESS, else http://127.0.0.1:8265)
#   --no-wait             submit and return; do not follow the logs
#   --submission-id ID    job id (default: pyvision-rl-<UTC time>-<random>)
#   --python PY           python the entrypoint runs with on the cluster (default: this checkout's
#                         .venv/bin/python for a cluster on this machine, else `python` from its PATH)
#   --output-dir DIR      adds run.output_dir=DIR to a train job (default for a cluster on this machine:
#                         ./runs of this checkout; the job runs in a temporary copy of the repo)
#   --env KEY=VALUE       extra environment variable for the job (repeatable)
#   --entrypoint-num-gpus N / --entrypoint-num-cpus N   resources reserved for the driver (default 0)
#
# Authentication (Ray >= 2.52 token auth; Ray 2.60 turns it on by default for local clusters, and
# `ray start` turns it on when ~/.ray/auth_token exists): the script asks the job server whether it wants
# a token. If it does, it uses $RAY_AUTH_TOKEN, else the file in
# $RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token, and runs `ray` with RAY_AUTH_MODE=token. A cluster started
# with RAY_AUTH_MODE=disabled needs none. Exit status: 0 if the job succeeded (or was submitted, with
# --no-wait), 1 if it failed or was stopped, 2 on a usage/connection/authentication error.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
die() { echo "submit.sh: error: $*" >&2; exit 2; }
usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

ADDRESS="${RAY_ADDRESS:-}"
WAIT=1
SUBMISSION_ID=""
PYTHON_BIN=""
OUTPUT_DIR=""
EP_GPUS=""
EP_CPUS=""
EXTRA_ENV=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --address) ADDRESS="${2:?--address needs a URL}"; shift 2 ;;
    --address=*) ADDRESS="${1#*=}"; shift ;;
    --no-wait) WAIT=0; shift ;;
    --submission-id) SUBMISSION_ID="${2:?--submission-id needs a value}"; shift 2 ;;
    --python) PYTHON_BIN="${2:?--python needs a path}"; shift 2 ;;
    --output-dir) OUTPUT_DIR="${2:?--output-dir needs a path}"; shift 2 ;;
    --env) [[ "${2:-}" == *=* ]] || die "--env takes KEY=VALUE (got '${2:-}')"; EXTRA_ENV+=("$2"); shift 2 ;;
    --entrypoint-num-gpus) EP_GPUS="${2:?}"; shift 2 ;;
    --entrypoint-num-cpus) EP_CPUS="${2:?}"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    -*) die "unknown option '$1' (see cluster/submit.sh --help)" ;;
    *) break ;;
  esac
done
[[ $# -gt 0 ]] || { usage >&2; die "give a CONFIG (e.g. configs/tiny_cpu.yaml) or -- COMMAND"; }
if [[ "$1" == *.yaml || "$1" == *.yml ]] && [[ ! -f "$REPO/$1" && ! -f "$1" ]]; then
  die "config '$1' not found (give a path inside $REPO, e.g. configs/tiny_cpu.yaml)"
fi

# ---- tools: prefer this checkout's venv (the one `make setup` builds)
if [[ -x "$REPO/.venv/bin/ray" ]]; then RAY="$REPO/.venv/bin/ray"; PY="$REPO/.venv/bin/python"
else RAY="$(command -v ray || true)"; PY="$(command -v python3 || command -v python || true)"; fi
[[ -n "$RAY" ]] || die "no 'ray' command: run 'make setup' in $REPO (or install ray[default]==2.60.*)"

# ---- address: the job server is the dashboard's HTTP port (8265), not the GCS port (6379)
[[ -z "$ADDRESS" || "$ADDRESS" == auto ]] && ADDRESS="http://127.0.0.1:8265"
[[ "$ADDRESS" == ray://* ]] && die "RAY_ADDRESS/--address '$ADDRESS' is a Ray Client address; job submission needs the dashboard URL, e.g. http://HEAD:8265"
[[ "$ADDRESS" == *://* ]] || ADDRESS="http://$ADDRESS"
ADDRESS="${ADDRESS%/}"

# ---- authentication: ask the job server (GET /api/jobs/ answers 401 when it wants a token)
probe() {  # probe [TOKEN] -> prints the HTTP status, or 000 when nothing answers
  "$PY" - "$ADDRESS" "${1:-}" <<'EOF'
import sys, urllib.request, urllib.error
url, token = sys.argv[1] + "/api/jobs/", sys.argv[2]
req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
try:
    print(urllib.request.urlopen(req, timeout=10).status)
except urllib.error.HTTPError as e:
    print(e.code)
except Exception:
    print("000")
EOF
}
status="$(probe)"
case "$status" in
  000) die "no Ray job server answers at $ADDRESS. Start one ('ray start --head' serves http://127.0.0.1:8265),
  or on Kubernetes port-forward the head service: kubectl port-forward svc/<cluster>-head-svc 8265:8265,
  or pass --address http://HEAD:8265 / set RAY_ADDRESS." ;;
  200) AUTH="off"; export RAY_AUTH_MODE=disabled ;;  # the cluster runs with RAY_AUTH_MODE=disabled
  401|403)
    token="${RAY_AUTH_TOKEN:-}"; src="RAY_AUTH_TOKEN"
    if [[ -z "$token" ]]; then
      tfile="${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"; src="$tfile"
      [[ -s "$tfile" ]] && token="$(tr -d '[:space:]' < "$tfile")"
    fi
    [[ -n "$token" ]] || die "the Ray cluster at $ADDRESS requires token authentication, and no token was found
  (looked at \$RAY_AUTH_TOKEN, \$RAY_AUTH_TOKEN_PATH and ~/.ray/auth_token). Do one of:
  - copy the cluster's token: on the head node 'ray get-auth-token' (or, on KubeRay,
    kubectl get secret pyvision-ray-auth -o jsonpath='{.data.auth_token}' | base64 -d) into ~/.ray/auth_token;
  - or restart a local test cluster without auth: ray stop; RAY_AUTH_MODE=disabled ray start --head"
    s2="$(probe "$token")"
    [[ "$s2" == 200 ]] || die "the Ray cluster at $ADDRESS rejected the token from $src (HTTP $s2). Use the
  token the cluster was started with (on its head node: 'ray get-auth-token')."
    AUTH="token (from $src)"; export RAY_AUTH_MODE=token
    [[ -n "${RAY_AUTH_TOKEN:-}" ]] || export RAY_AUTH_TOKEN="$token" ;;
  *) die "the job server at $ADDRESS answered HTTP $status to GET /api/jobs/; is this a Ray dashboard (port 8265)?" ;;
esac

# ---- is the cluster on this machine? (then its `python` on PATH may not be this checkout's venv, and
# relative output paths would land in a temporary copy of the repo). A port-forwarded remote cluster
# also answers on 127.0.0.1, so ask the server for its session name and look for its local processes.
session="$("$PY" - "$ADDRESS" "${RAY_AUTH_TOKEN:-}" <<'EOF'
import json, sys, urllib.request
url, token = sys.argv[1] + "/api/version", sys.argv[2]
req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
try:
    print(json.load(urllib.request.urlopen(req, timeout=10)).get("session_name", ""))
except Exception:
    print("")
EOF
)"
LOCAL=0
if [[ -n "$session" ]] && "$PY" - "$session" <<'EOF'
import os, sys
me = str(os.getpid())
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        if pid != me and sys.argv[1].encode() in open(f"/proc/{pid}/cmdline", "rb").read():
            sys.exit(0)
    except OSError:
        pass
sys.exit(1)
EOF
then LOCAL=1; fi

# ---- entrypoint
if [[ "${1}" == *.yaml || "${1}" == *.yml ]]; then
  CONFIG="$1"; shift
  if [[ "$CONFIG" = /* ]]; then  # the job runs in a copy of the repo: make the path relative to it
    case "$CONFIG" in "$REPO"/*) CONFIG="${CONFIG#"$REPO"/}" ;; *) die "config '$CONFIG' lies outside $REPO; the job only sees files of the working dir" ;; esac
  fi
  if [[ -z "$PYTHON_BIN" ]]; then
    if [[ $LOCAL == 1 && -x "$REPO/.venv/bin/python" ]]; then PYTHON_BIN="$REPO/.venv/bin/python"; else PYTHON_BIN=python; fi
  fi
  ENTRY=("$PYTHON_BIN" -m pyvision_rl.cli train "$CONFIG")
  has_output_dir=0
  for kv in "$@"; do [[ "$kv" == run.output_dir=* ]] && has_output_dir=1; done
  [[ -z "$OUTPUT_DIR" && $LOCAL == 1 ]] && OUTPUT_DIR="$REPO/runs"
  if [[ $has_output_dir == 0 && -n "$OUTPUT_DIR" ]]; then ENTRY+=("run.output_dir=$OUTPUT_DIR"); fi
  ENTRY+=("$@")
else
  ENTRY=("$@")
  # A bare `python` on a local cluster would be the system one, which lacks the project's packages.
  if [[ "${ENTRY[0]}" == python || "${ENTRY[0]}" == python3 ]]; then
    if [[ -n "$PYTHON_BIN" ]]; then ENTRY[0]="$PYTHON_BIN"
    elif [[ $LOCAL == 1 && -x "$REPO/.venv/bin/python" ]]; then ENTRY[0]="$REPO/.venv/bin/python"; fi
  fi
fi

# ---- runtime env: the repo as working dir minus heavy/local dirs, offline-friendly env vars
[[ -n "$SUBMISSION_ID" ]] || SUBMISSION_ID="pyvision-rl-$(date -u +%Y%m%d-%H%M%S)-$(LC_ALL=C tr -dc a-z0-9 </dev/urandom | head -c 6 || true)"
RUNTIME_ENV="$("$PY" - "${EXTRA_ENV[@]+"${EXTRA_ENV[@]}"}" <<'EOF'
import json, os, sys
env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0",
       "PYTHONUNBUFFERED": "1", "WANDB_MODE": os.environ.get("WANDB_MODE", "offline"),
       # The driver's own ray.init(runtime_env=...) may set the same env vars: merge instead of failing.
       "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1"}
for k in ("WANDB_PROJECT", "WANDB_ENTITY", "HF_HOME", "TORCH_EXTENSIONS_DIR"):  # no secrets: the dashboard shows env_vars
    if os.environ.get(k):
        env[k] = os.environ[k]
for kv in sys.argv[1:]:
    k, v = kv.split("=", 1)
    env[k] = v
excludes = [".venv", ".cache", "runs", ".git", "wandb", "**/__pycache__", ".pytest_cache", ".ruff_cache",
            "*.egg-info", "build", "benchmarks/results"]
print(json.dumps({"excludes": excludes, "env_vars": env}))
EOF
)"

ARGS=(job submit --address "$ADDRESS" --submission-id "$SUBMISSION_ID" --working-dir "$REPO"
      --runtime-env-json "$RUNTIME_ENV" --log-style record)
[[ -n "$EP_GPUS" ]] && ARGS+=(--entrypoint-num-gpus "$EP_GPUS")
[[ -n "$EP_CPUS" ]] && ARGS+=(--entrypoint-num-cpus "$EP_CPUS")
[[ $WAIT == 0 ]] && ARGS+=(--no-wait)

echo "submit.sh: address    $ADDRESS (auth: $AUTH)"
echo "submit.sh: job id     $SUBMISSION_ID"
echo "submit.sh: dashboard  $ADDRESS/#/jobs/$SUBMISSION_ID"
echo "submit.sh: entrypoint ${ENTRY[*]}"
# Ctrl-C stops following the logs, not the job.
trap 'echo; echo "submit.sh: stopped following; job $SUBMISSION_ID keeps running. Stop it: $RAY job stop --address $ADDRESS $SUBMISSION_ID"; exit 130' INT
set +e
"$RAY" "${ARGS[@]}" -- "${ENTRY[@]}"
rc=$?
set -e
if [[ $WAIT == 0 ]]; then
  [[ $rc == 0 ]] || exit 2
  echo "submit.sh: submitted. Follow: $RAY job logs -f --address $ADDRESS $SUBMISSION_ID" \
       " | status: $RAY job status --address $ADDRESS $SUBMISSION_ID | stop: $RAY job stop --address $ADDRESS $SUBMISSION_ID"
  exit 0
fi
# `ray job submit` exits 1 on failure; confirm the final state from the server (it also covers STOPPED).
final="$("$PY" -c 'import sys
from ray.job_submission import JobSubmissionClient
print(JobSubmissionClient(sys.argv[1]).get_job_status(sys.argv[2]).value)' "$ADDRESS" "$SUBMISSION_ID" 2>/dev/null || true)"
echo "submit.sh: job $SUBMISSION_ID finished: ${final:-unknown} (dashboard: $ADDRESS/#/jobs/$SUBMISSION_ID)"
if [[ $rc != 0 || "$final" != SUCCEEDED ]]; then exit 1; fi
exit 0
