"""Deployment files: KubeRay manifests against KubeRay's own CRD schemas, the Ray cluster launcher YAML
against Ray's own schema, and cluster/submit.sh against a real local `ray start --head` (marker `slow`)."""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
SUBMIT = CLUSTER / "submit.sh"
RAY_BIN = Path(sys.executable).parent / "ray"
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# ----------------------------------------------------------------------------- CRD schema -> JSON schema
def k8s_to_jsonschema(node, strict: bool = True):
    """Turn a Kubernetes structural OpenAPI v3 schema into a JSON schema that `jsonschema` enforces.

    - `x-kubernetes-int-or-string` becomes integer-or-string (quantities like "8Gi" or 8);
    - `nullable: true` admits null;
    - an object with `properties` and neither `additionalProperties` nor
      `x-kubernetes-preserve-unknown-fields` rejects unknown fields, as `kubectl apply` does with its
      default strict field validation (the API server would otherwise prune them silently: a typo such
      as `rayStartParam:` would vanish);
    - `x-kubernetes-embedded-resource` objects also accept apiVersion/kind/metadata;
    - `x-kubernetes-list-type` map/set is checked by `_list_type` below. CEL rules
      (`x-kubernetes-validations`) are not evaluated.
    """
    if isinstance(node, list):
        return [k8s_to_jsonschema(n, strict) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: k8s_to_jsonschema(v, strict) for k, v in node.items() if k != "x-kubernetes-validations"}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if node.get("x-kubernetes-embedded-resource"):
        props = out.setdefault("properties", {})
        props.setdefault("apiVersion", {"type": "string"})
        props.setdefault("kind", {"type": "string"})
        props.setdefault("metadata", {"type": "object"})
    if (
        strict
        and out.get("type") == "object"
        and "properties" in out
        and "additionalProperties" not in out
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def _list_type(validator, list_type, instance, schema):
    """`x-kubernetes-list-type`: `set` items are unique; `map` items are unique by their map keys."""
    if not validator.is_type(instance, "array"):
        return
    if list_type == "set":
        seen = [json.dumps(i, sort_keys=True) for i in instance]
        if len(seen) != len(set(seen)):
            yield jsonschema.ValidationError(f"x-kubernetes-list-type=set has duplicates: {instance!r}")
    elif list_type == "map":
        keys = schema.get("x-kubernetes-list-map-keys", [])
        seen: set = set()
        for item in instance:
            if not isinstance(item, dict):
                continue
            k = tuple(item.get(key) for key in keys)
            if k in seen:
                yield jsonschema.ValidationError(f"duplicate entry for list-map keys {keys}={k!r}")
            seen.add(k)


K8sValidator = jsonschema.validators.extend(
    jsonschema.Draft4Validator, {"x-kubernetes-list-type": _list_type}
)
_CRD_CACHE: dict[str, tuple[dict, dict]] = {}


def crd_validator(kind: str) -> tuple[jsonschema.protocols.Validator, dict]:
    """The validator for `ray.io/v1` `kind` from the vendored CRD (cluster/kuberay/crds/), and the CRD."""
    if kind not in _CRD_CACHE:
        path = KUBERAY / "crds" / f"ray.io_{kind.lower()}s.yaml"
        crd = yaml.load(path.read_text(), Loader=_Loader)
        assert crd["spec"]["names"]["kind"] == kind
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        assert version["served"] and version["storage"]
        _CRD_CACHE[kind] = (k8s_to_jsonschema(version["schema"]["openAPIV3Schema"]), crd)
    schema, crd = _CRD_CACHE[kind]
    return K8sValidator(schema), crd


def errors_of(manifest: dict) -> list[str]:
    """Schema violations of a RayCluster/RayJob manifest, as 'path: message' strings (empty when valid)."""
    validator, crd = crd_validator(manifest["kind"])
    assert manifest["apiVersion"] == f"{crd['spec']['group']}/v1"
    return [
        "/".join(str(p) for p in e.absolute_path) + ": " + e.message
        for e in sorted(validator.iter_errors(manifest), key=lambda e: list(map(str, e.absolute_path)))
    ]


def load_manifest(name: str) -> dict:
    return yaml.safe_load((KUBERAY / name).read_text())


# ----------------------------------------------------------------------------- KubeRay manifests
@pytest.mark.parametrize("name,kind", [("raycluster.yaml", "RayCluster"), ("rayjob.yaml", "RayJob")])
def test_manifest_is_valid_against_kuberay_crd(name, kind):
    m = load_manifest(name)
    assert m["kind"] == kind and m["metadata"]["name"]
    assert errors_of(m) == []


@pytest.mark.parametrize(
    "mutate,expected",
    [
        # wrong type: an integer field given a word
        (lambda s: s["workerGroupSpecs"][0].__setitem__("replicas", "one"), "replicas"),
        # rayStartParams values must be strings: the classic `num-cpus: 0`
        (lambda s: s["headGroupSpec"]["rayStartParams"].__setitem__("num-cpus", 0), "num-cpus"),
        # unknown field (a typo) is rejected, not pruned
        (lambda s: s["headGroupSpec"].__setitem__("rayStartParam", {}), "rayStartParam"),
        # a required field is missing: a worker group without a groupName
        (lambda s: s["workerGroupSpecs"][1].pop("groupName"), "groupName"),
        # a pod without containers
        (lambda s: s["headGroupSpec"]["template"]["spec"].pop("containers"), "containers"),
        # enum
        (lambda s: s["authOptions"].__setitem__("mode", "password"), "password"),
        # resource quantity pattern
        (
            lambda s: s["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"][
                "limits"
            ].__setitem__("memory", "lots"),
            "lots",
        ),
        # list-map keys: two containers with the same name
        (
            lambda s: s["headGroupSpec"]["template"]["spec"]["containers"].append(
                copy.deepcopy(s["headGroupSpec"]["template"]["spec"]["containers"][0])
            ),
            "duplicate",
        ),
    ],
)
def test_crd_validation_rejects_broken_manifests(mutate, expected):
    """The schema check is not vacuous: each single mutation of a valid manifest is rejected."""
    for name, spec_path in [("raycluster.yaml", ("spec",)), ("rayjob.yaml", ("spec", "rayClusterSpec"))]:
        m = load_manifest(name)
        spec = m
        for p in spec_path:
            spec = spec[p]
        mutate(spec)
        errs = errors_of(m)
        assert errs, f"{name}: mutation was accepted"
        assert any(expected in e for e in errs), errs


def test_rayjob_fields_are_checked_too():
    m = load_manifest("rayjob.yaml")
    m["spec"]["shutdownAfterJobFinishes"] = "yes"
    m["spec"]["entrypointNumCpus"] = "zero"
    errs = errors_of(m)
    assert any("shutdownAfterJobFinishes" in e for e in errs) and any("entrypointNumCpus" in e for e in errs)


def test_rayjob_creates_the_same_cluster_as_raycluster_yaml():
    assert load_manifest("rayjob.yaml")["spec"]["rayClusterSpec"] == load_manifest("raycluster.yaml")["spec"]


def _groups(spec: dict) -> dict[str, dict]:
    return {g["groupName"]: g for g in spec["workerGroupSpecs"]}


def _container(group: dict) -> dict:
    (c,) = group["template"]["spec"]["containers"]
    return c


def test_manifests_follow_the_7b_config():
    """Resources, entrypoint and storage agree with configs/pyvision_image_7b.yaml."""
    from pyvision_rl.config import load_config

    cfg = load_config(REPO / "configs" / "pyvision_image_7b.yaml")
    spec = load_manifest("raycluster.yaml")["spec"]
    groups = _groups(spec)
    gpu = groups["gpu"]
    gpus_per_node = int(_container(gpu)["resources"]["limits"]["nvidia.com/gpu"])
    assert int(gpu["rayStartParams"]["num-gpus"]) == gpus_per_node
    need = (
        cfg.rollout.num_workers * cfg.rollout.worker_num_gpus * cfg.rollout.vllm_tensor_parallel_size
        + cfg.learner.world_size * cfg.learner.num_gpus_per_rank
    )
    assert gpu["replicas"] * gpus_per_node >= need, (need, gpus_per_node)
    assert need == 8  # the paper's 8xH100
    # CPU workers can hold the sandbox pools and reward services.
    cpu = groups["cpu"]
    cpu_slots = cpu["minReplicas"] * int(cpu["rayStartParams"]["num-cpus"])
    assert (
        cpu_slots
        >= cfg.sandbox.num_pools * cfg.ray.sandbox_num_cpus
        + cfg.reward.num_services * cfg.ray.reward_num_cpus
    )
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    # One image everywhere; the shared PVC is mounted where the config writes runs and reads the model.
    images = {_container(g)["image"] for g in [spec["headGroupSpec"], *groups.values()]}
    assert len(images) == 1
    for g in [spec["headGroupSpec"], *groups.values()]:
        mounts = {v["mountPath"]: v["name"] for v in _container(g)["volumeMounts"]}
        assert mounts["/mnt/shared"] == "shared"
        vols = {v["name"]: v for v in g["template"]["spec"]["volumes"]}
        assert vols["shared"]["persistentVolumeClaim"]["claimName"] == "pyvision-shared"
    for p in (cfg.run.output_dir, cfg.model.path, cfg.data.train_path):
        assert p.startswith("/mnt/shared/"), p
    pvc = yaml.safe_load((KUBERAY / "pvc.yaml").read_text())
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["metadata"]["name"] == "pyvision-shared"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    # The RayJob trains with that config and the process sandbox backend the pods are hardened for.
    job = load_manifest("rayjob.yaml")["spec"]
    entry = job["entrypoint"].split()
    assert entry[:4] == ["python", "-m", "pyvision_rl.cli", "train"]
    assert entry[4].endswith("configs/pyvision_image_7b.yaml") and "sandbox.backend=process" in entry[5:]
    assert not any(op in job["entrypoint"] for op in ("&&", ";", "|"))  # pasted into the submitter's shell
    overrides = [e for e in entry[5:] if "=" in e]
    assert load_config(REPO / "configs" / "pyvision_image_7b.yaml", overrides).sandbox.backend == "process"


def test_pods_are_hardened_for_the_process_sandbox():
    """No privileged container anywhere (no Docker-in-Docker); the sandbox group can run bwrap."""
    spec = load_manifest("raycluster.yaml")["spec"]
    pods = [
        spec["headGroupSpec"]["template"]["spec"],
        *(g["template"]["spec"] for g in spec["workerGroupSpecs"]),
    ]
    for pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert not sc.get("privileged") and sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add")
    sandbox_pod = _groups(spec)["cpu"]["template"]["spec"]
    assert sandbox_pod["hostUsers"] is False
    assert sandbox_pod["containers"][0]["securityContext"]["procMount"] == "Unmasked"
    assert "sandbox" in _groups(spec)["cpu"]["rayStartParams"]["resources"]


# ----------------------------------------------------------------------------- cluster launcher YAML
def test_launcher_yaml_is_a_valid_ray_cluster_config():
    from ray.autoscaler._private.util import validate_config

    cfg = yaml.safe_load((CLUSTER / "launcher" / "ray-cluster.yaml").read_text())
    for key in (
        "cluster_name",
        "provider",
        "auth",
        "head_node_type",
        "available_node_types",
        "setup_commands",
        "head_start_ray_commands",
        "worker_start_ray_commands",
    ):
        assert key in cfg, key
    validate_config(cfg)  # Ray's own ray-schema.json plus its cross-field checks
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    assert types["gpu_worker"]["node_config"]["InstanceType"] == "p5.48xlarge"  # 8 x H100
    assert any("make setup" in c for c in cfg["setup_commands"])
    assert any("--head" in c and "RAY_AUTH_MODE=token" in c for c in cfg["head_start_ray_commands"])
    assert any("$RAY_HEAD_IP:6379" in c for c in cfg["worker_start_ray_commands"])
    bad = copy.deepcopy(cfg)
    bad["available_node_types"]["gpu_worker"]["min_workers"] = "one"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(bad)


# ----------------------------------------------------------------------------- submit.sh
def _free_port() -> int:
    return _free_ports(1)[0]


def _free_ports(n: int) -> list[int]:
    """n distinct free ports (all sockets stay open until every port is chosen, so none repeats)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0", WANDB_MODE="offline", **extra)
    # As the Makefile does: DeepSpeed's JIT-built ops are cached in the repo (submit.sh passes it on).
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    return env


def test_submit_without_a_server_says_what_to_do():
    port = _free_port()
    r = subprocess.run(
        [str(SUBMIT), "--address", f"127.0.0.1:{port}", "--", "true"],
        capture_output=True,
        text=True,
        env=_clean_env(),
        timeout=60,
    )
    assert r.returncode == 2
    assert (
        f"no Ray job server answers at http://127.0.0.1:{port}" in r.stderr and "ray start --head" in r.stderr
    )


def test_submit_names_a_missing_config_before_contacting_anything():
    r = subprocess.run(
        [str(SUBMIT), "--address", "127.0.0.1:1", "configs/no_such.yaml", "trainer.total_steps=1"],
        capture_output=True,
        text=True,
        env=_clean_env(),
        timeout=60,
    )
    assert r.returncode == 2 and "config 'configs/no_such.yaml' not found" in r.stderr, r.stderr


def test_submit_rejects_a_ray_client_address():
    r = subprocess.run(
        [str(SUBMIT), "--address", "ray://head:10001", "--", "true"],
        capture_output=True,
        text=True,
        env=_clean_env(),
        timeout=60,
    )
    assert r.returncode == 2 and "dashboard URL" in r.stderr


class LocalRayHead:
    """`ray start --head` in its own session, private temp dir and free ports; `stop()` ends exactly it."""

    def __init__(self, tmp: Path, auth: str, num_cpus: int = 2):
        self.tmp = tmp
        self.auth = auth
        self.token_path = tmp / "auth_token"
        self.env = _clean_env(RAY_AUTH_MODE=auth)
        if auth == "token":  # a private token file: never touch ~/.ray/auth_token
            self.token_path.write_text(os.urandom(16).hex())
            self.env["RAY_AUTH_TOKEN_PATH"] = str(self.token_path)
        self.num_cpus = num_cpus
        for attempt in range(3):  # a chosen port can be taken by another process before Ray binds it
            out = self._start()
            if out is None:
                break
            if attempt == 2:
                raise RuntimeError(f"ray start --head failed:\n{out}")
        self.address = f"http://127.0.0.1:{self.dashboard_port}"

    def _start(self) -> str | None:
        """Start the head; None on success, else `ray start`'s output (after cleaning up)."""
        ports = _free_ports(9)
        self.dashboard_port = ports[0]
        # A short temp dir: Ray's unix socket paths must stay under ~107 characters.
        self.temp_dir = Path(f"/tmp/pvrl_{os.getpid()}_{self.dashboard_port}")
        flags = [
            "port",
            "ray-client-server-port",
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "metrics-export-port",
            "runtime-env-agent-port",
            "node-manager-port",
            "object-manager-port",
        ]
        cmd = [
            str(RAY_BIN),
            "start",
            "--head",
            f"--num-cpus={self.num_cpus}",
            "--include-dashboard=true",
            "--disable-usage-stats",
            f"--temp-dir={self.temp_dir}",
            f"--dashboard-port={self.dashboard_port}",
            *(f"--{flag}={port}" for flag, port in zip(flags, ports[1:], strict=True)),
        ]
        # A new session: every daemon (GCS, raylet, dashboard, workers) shares this process group.
        proc = subprocess.Popen(
            cmd,
            env=self.env,
            start_new_session=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.pgid = proc.pid
        out, _ = proc.communicate(timeout=120)
        if proc.returncode != 0:
            self.stop()
            return out
        return None

    def submit(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        env = dict(self.env)
        env.pop("RAY_AUTH_MODE")  # the client must find out by itself
        return subprocess.run(
            [str(SUBMIT), "--address", self.address, *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
            cwd=REPO,
        )

    def stop(self) -> None:
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.pgid, sig)
            except ProcessLookupError:
                break
            deadline = time.time() + wait
            while time.time() < deadline:
                try:
                    os.killpg(self.pgid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.2)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize("auth", ["token", "disabled"])
def test_submit_trivial_job_to_a_local_head(tmp_path, auth):
    head = LocalRayHead(tmp_path, auth)
    try:
        if auth == "token":  # the server really wants a token: without one the script stops with advice
            env = dict(head.env)
            env.pop("RAY_AUTH_TOKEN_PATH")
            env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token either
            r = subprocess.run(
                [str(SUBMIT), "--address", head.address, "--", "true"],
                capture_output=True,
                text=True,
                env=env,
                timeout=60,
            )
            assert r.returncode == 2 and "requires token authentication" in r.stderr, r.stderr
        r = head.submit(
            "--",
            "python",
            "-c",
            "import pyvision_rl, sys; print('pyvision-ok', pyvision_rl.__name__, sys.prefix)",
        )
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"auth: {'token' if auth == 'token' else 'off'}" in r.stdout
        assert "pyvision-ok pyvision_rl" in r.stdout and str(REPO / ".venv") in r.stdout
        job_id = next(line.split()[-1] for line in r.stdout.splitlines() if "job id" in line)
        assert f"{head.address}/#/jobs/{job_id}" in r.stdout
        assert "finished: SUCCEEDED" in r.stdout
        r = head.submit("--", "python", "-c", "import sys; print('about to fail'); sys.exit(3)")
        assert r.returncode == 1 and "about to fail" in r.stdout and "finished: FAILED" in r.stdout
    finally:
        head.stop()


def _trainer_built() -> bool:
    """The driver and every actor module it starts exist (they are written in parallel with this test)."""
    import importlib.util

    mods = [
        "pyvision_rl.trainer",
        "pyvision_rl.actors.rollout",
        "pyvision_rl.actors.learner",
        "pyvision_rl.actors.sandbox",
        "pyvision_rl.actors.reward",
    ]
    try:
        return all(importlib.util.find_spec(m) is not None for m in mods)
    except ModuleNotFoundError:
        return False


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.skipif(not _trainer_built(), reason="trainer not built")
def test_submit_tiny_training_to_a_local_head(tmp_path):
    # Logical CPUs: rollout worker 1 + learner 1 + sandbox pool 0.25 + reward 0.25 must fit (2 would not).
    head = LocalRayHead(tmp_path, "token", num_cpus=4)
    out_dir = tmp_path / "runs"
    try:
        r = head.submit(
            "--output-dir",
            str(out_dir),
            "configs/tiny_cpu.yaml",
            "run.name=e2e",
            "trainer.total_steps=2",
            "trainer.save_every=2",
            "trainer.eval_every=0",
            # small enough for 2 shared cores: 4 prompts x 4 samples, one chunk per step
            "trainer.train_batch_size=4",
            "rollout.gen_batch_size=4",
            "rollout.n=4",
            "rollout.max_new_tokens=64",
            "trainer.max_chunks_per_step=1",
            # the untrained tiny model scores 0 everywhere: keep tied groups so the step has data
            "reward.filters.drop_zero_std=false",
            "data.synthetic.n_train=64",
            "data.synthetic.n_eval=8",
            "eval.max_tasks=4",
            "sandbox.warm_kernels=2",
            "sandbox.backend=process",
            "ray.address=auto",
            timeout=1100,
        )
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
        assert "finished: SUCCEEDED" in r.stdout
        run = out_dir / "e2e"
        steps = [json.loads(s)["step"] for s in (run / "metrics.jsonl").read_text().splitlines() if s.strip()]
        assert sorted(set(steps)) in ([1, 2], [0, 1]), steps  # exactly two RL steps
        ck = run / "checkpoints" / f"step_{max(steps)}"  # the final checkpoint, complete
        assert (ck / "COMPLETE").exists(), sorted(str(p.relative_to(run)) for p in run.rglob("*"))[:40]
    finally:
        head.stop()
