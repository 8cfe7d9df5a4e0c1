"""The one typed config tree. Every key is documented where it is defined (the `description`).

Load with `load_config(path, overrides)`; overrides are `key.sub=value` strings whose values are parsed
as YAML scalars. Unknown keys are rejected with the closest valid key named.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ConfigError(ValueError):
    """A config file or override the user must fix; the message names the key and what to do."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(_Section):
    name: str = Field("tiny-cpu", description="Run name; outputs go to <output_dir>/<name>/.")
    output_dir: str = Field("runs", description="Parent directory of run directories.")
    seed: int = Field(0, description="Seed for data order, sampling and model init.")
    resume: str = Field(
        "auto",
        description="'auto' resumes from the run dir's last checkpoint if any; 'never'; or a checkpoint path.",
    )
    deterministic: bool = Field(
        False,
        description="Same config + seed on the same machine: identical metrics but timings (results merged in "
        "chunk order, deterministic torch kernels in the learner); see README 'Reproducibility'.",
    )


class TinyModelConfig(_Section):
    family: Literal["qwen2_5_vl", "qwen3_vl"] = Field(
        "qwen2_5_vl", description="Architecture of the tiny model."
    )
    hidden_size: int = Field(128, description="Text hidden size (64 never learned to copy; 128 does).")
    num_layers: int = Field(2, description="Text decoder layers.")
    num_heads: int = Field(4, description="Attention heads.")
    num_kv_heads: int = Field(2, description="Key/value heads.")
    vocab_size: int = Field(
        600, description="Target BPE vocabulary size (the Qwen special tokens are added on top)."
    )
    vision_depth: int = Field(2, description="Vision tower blocks.")
    vision_hidden: int = Field(32, description="Vision tower width.")


class ModelConfig(_Section):
    path: str = Field(
        "",
        description="HF checkpoint dir of a Qwen-VL model. Empty: build the tiny model into <run>/tiny_model.",
    )
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig, description="Used when `path` is empty.")
    freeze_vision: bool = Field(True, description="Freeze the vision tower (paper setting).")
    gradient_checkpointing: bool = Field(False, description="Activation checkpointing in the learner.")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="'auto': bf16 on GPU, fp32 on CPU."
    )
    max_pixels: int = Field(
        1003520,
        description="Processor cap on pixels per image (Qwen default 1280*28*28 / ... set per recipe).",
    )
    min_pixels: int = Field(3136, description="Processor floor on pixels per image.")


class SyntheticDataConfig(_Section):
    kind: Literal["color_count", "small_objects", "video_event", "video_moment", "mixed"] = Field(
        "color_count", description="Synthetic task family used when data.train_path is empty."
    )
    n_train: int = Field(512, description="Synthetic training tasks.")
    n_eval: int = Field(64, description="Synthetic held-out tasks.")
    seed: int = Field(1234, description="Generator seed (independent of run.seed).")


class DataConfig(_Section):
    train_path: str = Field("", description="Training tasks (PyVision JSON/JSONL/Parquet). Empty: synthetic.")
    eval_path: str = Field("", description="Held-out tasks. Empty: synthetic held-out split.")
    skip_bad_rows: bool = Field(False, description="Skip and count malformed rows instead of stopping.")
    shuffle: bool = Field(True, description="Shuffle the training order each epoch (seeded by run.seed).")
    synthetic: SyntheticDataConfig = Field(default_factory=SyntheticDataConfig, description="Synthetic data.")


class RolloutConfig(_Section):
    engine: Literal["hf", "vllm"] = Field(
        "hf", description="Generation engine: transformers (CPU) or vLLM (GPU)."
    )
    num_workers: int = Field(1, description="RolloutWorker actors.")
    n: int = Field(8, description="Rollouts per prompt (group size).")
    gen_batch_size: int = Field(16, description="Prompts per oversampling chunk.")
    temperature: float = Field(1.0, description="Sampling temperature.")
    top_p: float = Field(1.0, description="Nucleus sampling (1.0: off).")
    top_k: int = Field(
        0, description="Top-k sampling (0: off; transformers' default 50 is NOT true sampling)."
    )
    max_turns: int = Field(
        5, description="Assistant turns per trajectory (4 tool calls + answer in the paper)."
    )
    max_new_tokens: int = Field(512, description="Max tokens the model generates in one turn.")
    max_total_len: int = Field(
        8192, description="Max prompt+response tokens; checked before an image is appended."
    )
    max_images: int = Field(16, description="Max images (input + tool) per trajectory.")
    feed_errors: bool = Field(
        False, description="Feed Python errors back (True) or end with ERROR_IN_ACTION (paper)."
    )
    prompt_template: str = Field("", description="Template key; empty picks the release's image/video key.")
    system_prompt: str = Field(
        "You are a helpful assistant.",
        description="System block of the initial prompt. The default is what the Qwen chat template inserts, "
        "so the release's prompts are reproduced byte for byte; '' leaves the system block out.",
    )
    worker_num_cpus: float = Field(1.0, description="CPUs reserved per RolloutWorker.")
    worker_num_gpus: float = Field(0.0, description="GPUs per RolloutWorker (vLLM).")
    vllm_gpu_memory_utilization: float = Field(
        0.5,
        description="Share of each rollout GPU vLLM may use (weights + KV cache; 0.85-0.9 on dedicated GPUs, "
        "less when colocated with the learner). CPU: VLLM_CPU_KVCACHE_SPACE (GiB) sizes the KV cache instead.",
    )
    vllm_tensor_parallel_size: int = Field(1, description="vLLM tensor parallel size per worker.")
    vllm_enable_sleep_mode: bool = Field(
        False, description="Sleep/wake vLLM around learner steps (colocated)."
    )


class SandboxConfig(_Section):
    backend: Literal["docker", "process", "auto"] = Field(
        "auto",
        description="'docker' (containers), 'process' (bwrap + rlimits), 'auto' (docker if an engine answers).",
    )
    image: str = Field(
        "pyvision-sandbox:latest", description="Docker image with the kernel (make sandbox-image)."
    )
    num_pools: int = Field(1, description="SandboxPool actors.")
    max_kernels: int = Field(
        32, description="Live kernels per pool (bounded concurrency; extra requests queue)."
    )
    warm_kernels: int = Field(4, description="Pre-started kernels kept ready per pool.")
    timeout_s: float = Field(30.0, description="Per-execution timeout (release: 30 s).")
    memory_mb: int = Field(1024, description="Memory limit per kernel.")
    cpus: float = Field(1.0, description="CPU limit per kernel (docker).")
    pids: int = Field(128, description="Max processes/threads per kernel.")
    tmpfs_mb: int = Field(64, description="Size of the kernel's private /tmp.")
    max_stdout_bytes: int = Field(
        8192, description="stdout/stderr kept per execution; the rest is cut with a marker."
    )
    max_images_per_exec: int = Field(8, description="Max figures one execution may return.")
    max_image_pixels: int = Field(
        4_000_000, description="Max pixels per returned figure (larger are downscaled)."
    )
    reuse_kernels: bool = Field(
        False,
        description="Fork-server mode: a box's zygote (numpy/PIL/matplotlib imported once) forks a fresh "
        "interpreter per trajectory and, after it, kills all its processes, wipes /tmp and re-stages task files, "
        "so one box serves many trajectories (saves ~0.6 CPU-s per trajectory). A timeout or crash still "
        "discards the box. false: one box per trajectory (fully isolated).",
    )
    max_trajectories_per_box: int = Field(
        64,
        ge=1,
        description="With reuse_kernels: trajectories one box serves before it is replaced by a fresh one.",
    )
    max_starting: int = Field(
        0,
        ge=0,
        description="Boxes starting at once per pool (0: the pool node's CPU count); further opens wait their "
        "turn for a box (reported as sandbox/start_queue_depth), so a burst does not time out every start.",
    )
    max_running: int = Field(
        0,
        ge=0,
        description="Cells running at once per pool (0: 4 x the pool node's CPUs); further cells wait for a "
        "slot before their timeout_s starts (sandbox/exec_wait_*), so a burst cannot time out good cells.",
    )


class FilterConfig(_Section):
    """The release's filters, applied in this order (rewards.filters.select_for_training)."""

    drop_zero_std: bool = Field(
        True, description="Drop groups whose rewards all tie (a group of one is kept)."
    )
    require_tool_image: bool = Field(
        True, description="Drop trajectories where no tool call returned an image."
    )
    drop_vision_mismatch: bool = Field(
        True, description="Drop trajectories whose vision tokens != image grids."
    )
    allowed_end_reasons: list[str] = Field(
        default_factory=lambda: ["DONE", "EXCEED_MAX_TURNS", "ERROR_IN_ACTION"],
        description="Keep only these end reasons (SANDBOX_ERROR is never kept).",
    )


class JudgeConfig(_Section):
    """The LLM judge for judged data sources (rewards.judge)."""

    backend: Literal["none", "http", "engine"] = Field(
        "none",
        description="'http': an OpenAI-compatible endpoint (e.g. a vLLM server); 'engine': an in-cluster "
        "judge actor on a generation engine; 'none': judged sources are an error.",
    )
    base_url: str = Field("", description="http: the API root, e.g. http://judge:8000/v1.")
    model: str = Field("", description="http: the served model name; engine: the judge checkpoint directory.")
    api_key_env: str = Field("", description="http: env var holding the API key (empty: no key).")
    engine: Literal["hf", "vllm"] = Field("hf", description="engine: HF transformers (CPU) or vLLM (GPU).")
    num_gpus: float = Field(0.0, description="engine: GPUs for the judge actor.")
    temperature: float = Field(0.3, description="Judge sampling temperature (release: 0.3).")
    max_tokens: int = Field(32, description="Judge reply length cap.")
    timeout_s: float = Field(120.0, description="Per-request (http) / per-batch (engine) timeout.")
    retries: int = Field(3, description="Retries per request after a failure or an unreadable reply.")
    concurrency: int = Field(16, description="http: requests in flight at once.")


class RewardConfig(_Section):
    tool_bonus: float = Field(0.1, description="c in R = R_acc + c * n_tool * 1{right answer}.")
    tool_bonus_cap: int = Field(0, description="Cap on n_tool in the bonus (0: no cap; max_turns bounds it).")
    answer_format: Literal["strict", "lenient"] = Field(
        "strict",
        description="strict: the release's answer format and zero rules; lenient: any boxed answer "
        "(evaluating other models).",
    )
    default_verifier: str = Field(
        "judge", description="Verifier kind for data_sources not in the registry (release: the judge)."
    )
    verifiers: dict[str, str] = Field(
        default_factory=dict, description="data_source -> verifier kind, overriding the registry."
    )
    num_services: int = Field(1, description="RewardService actors.")
    filters: FilterConfig = Field(default_factory=FilterConfig, description="Oversampling filters.")
    judge: JudgeConfig = Field(default_factory=JudgeConfig, description="The LLM judge.")


class LearnerConfig(_Section):
    world_size: int = Field(1, description="Learner ranks (DeepSpeed processes).")
    num_gpus_per_rank: float = Field(0.0, description="GPUs per learner rank (0: CPU/gloo).")
    placement: Literal["split", "colocated"] = Field(
        "split",
        description="'split': learner ranks and rollout engines on separate GPUs. 'colocated' (the release's "
        "hybrid engine): rank i and RolloutWorker i share bundle i ({GPU: 1}) of one placement group, with "
        "learner.num_gpus_per_rank + rollout.worker_num_gpus <= 1 (e.g. 0.5 each) and rollout.num_workers = "
        "world_size; the engines sleep (KV cache and weights released) during the learner step, wake, then "
        "get the weights from the rank on their GPU (sync.backend auto: colocated).",
    )
    zero_stage: int = Field(2, description="DeepSpeed ZeRO stage (0-3).")
    lr: float = Field(1e-6, description="Learning rate (paper: 1e-6).")
    weight_decay: float = Field(0.0, description="AdamW weight decay.")
    grad_clip: float = Field(1.0, description="Gradient norm clip.")
    ppo_epochs: int = Field(1, description="Passes over each step's batch.")
    mini_batch_size: int = Field(0, description="Trajectories per optimizer update (0: the whole step).")
    micro_batch_size: int = Field(4, description="Trajectories per forward/backward.")
    clip_low: float = Field(0.2, description="PPO clip epsilon below 1.")
    clip_high: float = Field(0.2, description="PPO clip epsilon above 1.")
    dual_clip: float = Field(3.0, description="Dual-clip c for negative advantages (0: off).")
    std_norm: bool = Field(False, description="Normalise group advantages by std (GRPO) or not (Dr.GRPO).")
    kl_coef: float = Field(0.0, description="KL-to-reference coefficient (0: no reference model).")
    entropy_coef: float = Field(0.0, description="Entropy bonus coefficient.")
    recompute_old_logprobs: bool = Field(
        True, description="Recompute old log-probs with the learner (else rollout's)."
    )


class SyncConfig(_Section):
    backend: Literal["object_store", "nccl", "gloo", "in_process", "colocated", "auto"] = Field(
        "auto",
        description="Weight sync: object store (CPU), NCCL broadcast (GPU), gloo broadcast (CPU, tests), "
        "in_process (same-process engines), colocated (each learner rank hands its gathered buckets to the "
        "engine on its GPU by CUDA IPC handles; bytes by value on CPU); auto picks colocated with "
        "learner.placement=colocated, else object_store on CPU and nccl on GPU.",
    )
    bucket_mb: int = Field(256, description="Bucket size for weight transfer.")


class LoggingConfig(_Section):
    wandb: Literal["offline", "online", "disabled", "auto"] = Field(
        "auto", description="'auto': online if WANDB_API_KEY is set, else offline."
    )
    project: str = Field("pyvision-rl", description="wandb project.")
    rollouts_every: int = Field(
        5,
        description="Write the rollout viewer page <run>/rollouts/step_<k>.html (and a wandb Table) every k "
        "steps, at the last step and at every eval (0: never). `pyvision-rl view RUN_DIR` serves them.",
    )
    rollouts_per_step: int = Field(
        4,
        description="Groups sampled per training page (accepted and filtered ones); an eval page shows "
        "this many x rollout.n held-out trajectories.",
    )
    progress: bool = Field(True, description="Progress bar with ETA.")
    collapse_threshold: float = Field(0.2, description="Warn when mean tool calls < this ...")
    collapse_patience: int = Field(3, description="... for this many consecutive steps.")


class TrainerConfig(_Section):
    total_steps: int = Field(20, description="RL steps.")
    train_batch_size: int = Field(
        8, description="Prompts per step: a step trains on train_batch_size x rollout.n trajectories."
    )
    max_chunks_per_step: int = Field(
        0, description="Oversampling chunks before a step is declared underfull (0: no cap, the release's)."
    )
    on_underfull: Literal["train", "stop"] = Field(
        "stop", description="At the chunk cap: stop with an error (the release) or train on what survived."
    )
    max_staleness: int = Field(0, description="0: strictly on-policy (paper); 1: one-step-off rollouts.")
    save_every: int = Field(10, ge=1, description="Checkpoint every k steps (and at the end).")
    keep_checkpoints: int = Field(2, description="Checkpoints kept on disk.")
    eval_every: int = Field(0, description="Held-out eval every k steps (0: only at the end).")
    max_actor_restarts: int = Field(3, description="Restarts per actor before the run stops.")
    learner_retries: int = Field(
        2,
        ge=0,
        description="A learner rank that dies: rebuild the learner group from the last checkpoint and redo the "
        "step, at most this many times per step (needs a checkpoint of the step before: save_every=1 makes "
        "every step redoable; 0: stop at once).",
    )


class EvalConfig(_Section):
    max_turns: int = Field(30, description="Turn budget in evaluation (paper: 30).")
    k: int = Field(1, description="Samples per task for avg@k.")
    temperature: float = Field(0.0, description="Eval sampling temperature (0: greedy).")
    feed_errors: bool = Field(True, description="Feed errors back in evaluation.")
    max_tasks: int = Field(0, description="Evaluate at most this many tasks (0: all).")


class SFTConfig(_Section):
    data_path: str = Field(
        "", description="Trajectory JSONL for the cold start. Empty: scripted expert data."
    )
    steps: int = Field(500, description="SFT optimizer steps.")
    batch_size: int = Field(32, description="Trajectories per SFT step.")
    lr: float = Field(3e-3, description="SFT learning rate.")
    tool_fraction: float = Field(
        0.5,
        description="Share of expert trajectories in the scripted mix; the rest answer directly "
        "(images) or sample frames naively (video_moment).",
    )
    max_tasks: int = Field(
        512, description="Scripted expert trajectories are built for at most this many tasks."
    )


class RayConfig(_Section):
    address: str = Field(
        "", description="Ray address ('' starts/joins a local cluster; 'auto' joins a running one)."
    )
    num_cpus: int = Field(0, description="CPUs for a local cluster (0: all).")
    include_dashboard: bool = Field(True, description="Start the Ray dashboard with a local cluster.")
    reward_num_cpus: float = Field(0.25, description="CPUs per RewardService.")
    sandbox_num_cpus: float = Field(0.25, description="CPUs per SandboxPool actor (kernels run outside it).")
    sandbox_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources per SandboxPool, to pin pools to CPU nodes (KubeRay: {sandbox: 1}).",
    )
    reward_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources per RewardService, e.g. {sandbox: 1}: next to the pools on CPU nodes.",
    )
    learner_num_cpus: float = Field(1.0, description="CPUs per learner rank.")


class Config(_Section):
    """The whole tree. `configs/*.yaml` set subsets of it."""

    run: RunConfig = Field(default_factory=RunConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    sandbox: SandboxConfig = Field(default_factory=SandboxConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    sync: SyncConfig = Field(default_factory=SyncConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name


def _all_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, f in model.model_fields.items():
        full = f"{prefix}{name}"
        keys.append(full)
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.extend(_all_keys(ann, full + "."))
    return keys


def _closest(key: str) -> str:
    keys = _all_keys(Config)
    match = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    if not match:  # try on the last component
        leaf = key.rsplit(".", 1)[-1]
        match = [
            k
            for k in keys
            if k.rsplit(".", 1)[-1]
            in difflib.get_close_matches(leaf, [k.rsplit(".", 1)[-1] for k in keys], n=1)
        ]
    return f" Did you mean '{match[0]}'?" if match else ""


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override '{key}': '{p}' is a value, not a section.")
        node = nxt
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    tree: dict = {}
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(
                f"override '{ov}' is not of the form key.sub=value (e.g. trainer.total_steps=5)."
            )
        k, v = ov.split("=", 1)
        _set_dotted(tree, k.strip(), yaml.safe_load(v) if v != "" else "")
    return tree


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def config_from_dict(tree: dict, source: str = "<dict>") -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        msgs = []
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                msgs.append(f"unknown key '{key}'.{_closest(key)}")
            else:
                msgs.append(f"'{key}': {err['msg']} (got {err.get('input')!r})")
        raise ConfigError(f"{source}: " + "; ".join(msgs)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults when `path` is None) and apply `key.sub=value` overrides."""
    tree: dict = {}
    source = "defaults"
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist (see configs/ for the shipped ones).")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections (run:, model:, ...).")
        source = str(p)
    if overrides:
        tree = _deep_merge(tree, parse_overrides(overrides))
        source += " + overrides"
    return config_from_dict(tree, source)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
