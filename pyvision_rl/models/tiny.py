"""A tiny random Qwen2.5-VL / Qwen3-VL with its tokenizer and processor, built fully offline.

No package ships a Qwen vocabulary, so the tokenizer is a byte-level BPE trained here (a fraction of a
second) on the protocol's strings and the synthetic tasks' expert texts, plus the Qwen special tokens and
the Qwen chat template. Everything is deterministic: the same seed gives identical weights and tokenizer.
The result is an ordinary HF checkpoint directory that `load_policy` (and vLLM, on GPU) can read.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from pyvision_rl.config import TinyModelConfig

# Qwen's special tokens, in Qwen's id order (151643..): ids are appended after the BPE vocabulary.
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# The Qwen2-VL / Qwen2.5-VL chat template (as shipped with the real checkpoints).
QWEN_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Observation strings of the protocol (README, "Fidelity to PyVision-RL"), for the tokenizer corpus.
_PROTOCOL_STRINGS = [
    "\n<|im_start|>user\n<tool_response>\n<interpreter>\nText Result:\n{stdout}</interpreter>\n\n</tool_response>"
    "<|im_end|>\n<|im_start|>assistant\n",
    "<tool_response>\n<interpreter>",
    "Text Result:\n{stdout}\n",
    "Image Result:\n",
    "<image_clue_0><image></image_clue_0>",
    "<image_clue_1></image_clue_1><image_clue_2></image_clue_2><image_clue_3></image_clue_3>",
    "</interpreter>\n\n</tool_response>",
    "\n<|im_start|>user\n<tool_response>\n<interpreter>\nError: {message}</interpreter>\n\n</tool_response>"
    "<|im_end|>\n<|im_start|>assistant\n",
    "Error: No Python code or final answer found. There is something wrong with the format.",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n",
    "<|im_end|>\n<|im_start|>assistant\n",
    "Traceback (most recent call last):\nNameError: name is not defined\nSyntaxError: invalid syntax\n"
    "TimeoutError: execution timed out\nIndexError: index out of range\nValueError\nTypeError\n",
    "Image Width: 112; Image Height: 112\nFrame Width: 64; Frame Height: 64;\nVideo Length: 32; Sample FPS: 8.00",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 20 24 28 32 36 40 44 48 56 64 112 128 224 255 448",
]

TOKENIZER_CORPUS_SEED = 0  # the corpus does not depend on the model seed: one vocabulary for all tiny models


def _template_texts() -> list[str]:
    """Values of the agent's template files (raw and formatted with typical sizes)."""
    texts: list[str] = []
    tdir = resources.files("pyvision_rl.agent") / "templates"
    for name in ("rl_system_prompt_template.json", "extra_templates.json"):
        f = tdir / name
        if not f.is_file():
            continue
        for value in json.loads(f.read_text()).values():
            if not isinstance(value, str):
                continue
            texts.append(value)
            try:
                texts.append(
                    value.format(
                        query="How many red squares are there?",
                        width=112,
                        height=112,
                        video_info="Frame Width: 64; Frame Height: 64;\nVideo Length: 32; Sample FPS: 8.00\n"
                        "The original video has been read into the global variable `video_clue_0`.",
                    )
                )
            except (KeyError, IndexError, ValueError):
                pass  # templates with other placeholders: the raw text is enough
    return texts


def tokenizer_training_corpus(extra_corpus: list[str] | None = None) -> list[str]:
    """The texts the tiny tokenizer is trained on (templates, protocol, synthetic expert data, extra)."""
    from pyvision_rl.data.synthetic import tokenizer_corpus

    return (
        _template_texts()
        + _PROTOCOL_STRINGS
        + tokenizer_corpus(TOKENIZER_CORPUS_SEED)
        + list(extra_corpus or [])
    )


def build_tokenizer(vocab_size: int = 600, extra_corpus: list[str] | None = None):
    """A byte-level BPE `PreTrainedTokenizerFast` with the Qwen special tokens and chat template.

    `vocab_size` is the BPE target (the trainer stops earlier when the corpus saturates); the special
    tokens get the ids right after the BPE vocabulary, as in Qwen.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # No GPT-2 word-splitting regex: merges may cross spaces and punctuation, so the expert's fixed code
    # lines become a few tokens and a tool turn is ~20 generated tokens instead of ~120 (the tiny model
    # then only has to choose the colour's RGB and copy the printed number).
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        special_tokens=[],
    )
    tok.train_from_iterator(tokenizer_training_corpus(extra_corpus), trainer)
    tok.add_special_tokens(QWEN_SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=[
            t for t in QWEN_SPECIAL_TOKENS if t not in ("<|im_end|>", "<|endoftext|>")
        ],
        model_max_length=32768,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )
    fast.chat_template = QWEN_VL_CHAT_TEMPLATE
    return fast


def build_config(cfg: TinyModelConfig, tokenizer):
    """The HF config of the tiny model for `cfg.family`, with token ids taken from `tokenizer`."""
    head_dim = cfg.hidden_size // cfg.num_heads
    if head_dim % 2:
        raise ValueError(f"model.tiny: hidden_size/num_heads = {head_dim} must be even (rotary)")
    half = head_dim // 2
    # mrope sections (temporal, height, width) must sum to head_dim/2; Qwen's real split is ~1:1.5:1.5
    t = max(1, half // 4)
    h = (half - t) // 2
    mrope = [t, h, half - t - h]
    ids = {n: tokenizer.convert_tokens_to_ids(n) for n in QWEN_SPECIAL_TOKENS}
    vocab = len(tokenizer)
    text = dict(
        vocab_size=vocab,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.hidden_size * 2,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    vision = dict(
        depth=cfg.vision_depth,
        hidden_size=cfg.vision_hidden,
        intermediate_size=cfg.vision_hidden * 2,
        num_heads=max(1, cfg.vision_hidden // 16),
        out_hidden_size=cfg.hidden_size,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        in_channels=3,
    )
    common = dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False,
    )
    if cfg.family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig

        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope}
        vision.update(
            window_size=112, fullatt_block_indexes=list(range(cfg.vision_depth)), tokens_per_second=2
        )
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **common)
    if cfg.family == "qwen3_vl":
        from transformers import Qwen3VLConfig

        text["head_dim"] = head_dim
        text["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": 5e6,
            "mrope_section": mrope,
            "mrope_interleaved": True,
        }
        vision.update(num_position_embeddings=256, deepstack_visual_indexes=[0])
        vision["hidden_act"] = "gelu_pytorch_tanh"
        return Qwen3VLConfig(text_config=text, vision_config=vision, **common)
    raise ValueError(f"model.tiny.family: unknown family {cfg.family!r}; use qwen2_5_vl or qwen3_vl")


def make_tiny_model(
    out_dir: str | Path,
    cfg: TinyModelConfig | None = None,
    seed: int = 0,
    extra_corpus: list[str] | None = None,
) -> Path:
    """Build a random tiny Qwen-VL (`cfg.family`) with tokenizer and processor; save it to `out_dir`.

    Deterministic: the same `cfg`, `seed` and `extra_corpus` give identical files. Returns `out_dir`.
    """
    import torch
    from transformers import AutoModelForImageTextToText

    from pyvision_rl.models.loading import build_processor

    cfg = cfg or TinyModelConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(cfg.vocab_size, extra_corpus)
    config = build_config(cfg, tokenizer)
    # fork the global RNG so building a model does not disturb the caller's random stream
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    tc = config.get_text_config()  # transformers 5.19 keeps the special ids only on the text config
    model.generation_config.eos_token_id = [tc.eos_token_id, tc.pad_token_id]
    model.generation_config.pad_token_id = tc.pad_token_id
    model.generation_config.do_sample = True
    model.generation_config.top_k = 0
    model.generation_config.top_p = 1.0
    model.generation_config.temperature = 1.0
    model.save_pretrained(out, safe_serialization=True)
    processor = build_processor(tokenizer, cfg.family, patch_size=14, merge_size=2)
    processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # Name the stock processor class so other readers (vLLM with torchvision) load the dir as a normal
    # Qwen-VL checkpoint; load_processor rebuilds the image-only variant regardless.
    pc_file = out / "processor_config.json"
    if pc_file.is_file():
        pc = json.loads(pc_file.read_text())
        pc["processor_class"] = {"qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen3_vl": "Qwen3VLProcessor"}[
            cfg.family
        ]
        pc_file.write_text(json.dumps(pc, indent=2, sort_keys=True) + "\n")
    (out / "tiny_model.json").write_text(
        json.dumps({"config": cfg.model_dump(), "seed": seed}, indent=1) + "\n"
    )
    return out
