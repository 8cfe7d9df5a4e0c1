"""pyvision-rl: agentic multimodal RL (PyVision-RL) as a Ray actor system."""

__version__ = "0.1.0"

# Defaults for every process the command starts (Ray actors get them through the runtime env too):
# offline hub, no telemetry, no per-load progress bars.
QUIET_ENV = {
    "HF_HUB_OFFLINE": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TOKENIZERS_PARALLELISM": "false",
}
