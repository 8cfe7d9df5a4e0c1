"""pyvision-rl: agentic multimodal RL (PyVision-RL) as a Ray actor system."""

__version__ = "0.1.0"
