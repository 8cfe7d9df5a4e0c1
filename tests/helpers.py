"""Helpers shared by the tests (a uniquely named module: tests/conftest.py is `conftest`; pytest puts tests/ on
sys.path), and by benchmarks/learner.py: PNG bytes, real trajectories for the tiny model, a tiny run's overrides."""

from __future__ import annotations

import io
import random
from pathlib import Path

from PIL import Image

from pyvision_rl.learner.losses import group_advantages
from pyvision_rl.models.processing import encode_images, image_placeholder_ids, special_ids
from pyvision_rl.types import EndReason, ImageRef, Trajectory


def png(w: int, h: int, color: tuple[int, int, int] | str) -> bytes:
    """A `w` x `h` PNG of one colour."""
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="PNG")
    return buf.getvalue()


def tiny_overrides(out: Path, model: Path, name: str = "t", steps: int = 2) -> list[str]:
    """configs/tiny_cpu.yaml overrides for a short real run (process sandbox, 2 kernels, no W&B)."""
    return [
        f"run.output_dir={out}",
        f"run.name={name}",
        f"model.path={model}",
        f"trainer.total_steps={steps}",
        "trainer.save_every=2",
        "trainer.eval_every=0",
        "rollout.n=4",
        "rollout.gen_batch_size=4",
        "trainer.train_batch_size=2",
        "rollout.max_new_tokens=48",
        "sandbox.backend=process",
        "sandbox.warm_kernels=2",
        "sandbox.timeout_s=5",
        "data.synthetic.n_train=24",
        "data.synthetic.n_eval=4",
        "logging.wandb=disabled",
        "logging.progress=false",
        "ray.include_dashboard=false",
        # The random tiny model rarely produces a clean answer: keep every group so steps always fill.
        "reward.filters.drop_zero_std=false",
    ]


def make_trajs(
    processor, n_groups: int = 2, n: int = 4, seed: int = 0, tool_image: bool = True
) -> list[Trajectory]:
    """`n_groups` groups of `n` trajectories with varied rewards, images in prompt and observation."""
    rng = random.Random(seed)
    tok = processor.tokenizer
    sp = special_ids(tok)
    merge = int(processor.image_processor.merge_size)
    out = []
    for g in range(n_groups):
        img = png(56, 56, (rng.randrange(256), 40, 200))
        _, grids = encode_images(processor, [img])
        (t, h, w) = grids[0]
        prompt = [sp["im_start"]] + tok.encode("user\n") + image_placeholder_ids(tok, t * h * w // merge**2)
        prompt += tok.encode(f"How many squares? {g}") + [sp["im_end"]] + tok.encode("\n") + [sp["im_start"]]
        prompt += tok.encode("assistant\n")
        for k in range(n):
            model1 = tok.encode(f"<code>\nprint({rng.randrange(100)})\n</code>")
            images = [ImageRef(img, grids[0], "input")]
            obs = tok.encode("\n") + [sp["im_start"]] + tok.encode("user\nText Result:\n3\n")
            if tool_image:
                timg = png(56, 56, (10, rng.randrange(256), 10))
                _, tg = encode_images(processor, [timg])
                obs += image_placeholder_ids(tok, tg[0][0] * tg[0][1] * tg[0][2] // merge**2)
                images.append(ImageRef(timg, tg[0], "tool"))
            obs += [sp["im_end"]] + tok.encode("\n") + [sp["im_start"]] + tok.encode("assistant\n")
            model2 = tok.encode(f"<answer>\n\\boxed{{{rng.randrange(10)}}}\n</answer>") + [sp["im_end"]]
            resp = model1 + obs + model2
            mask = [1] * len(model1) + [0] * len(obs) + [1] * len(model2)
            out.append(
                Trajectory(
                    task_id=f"t{g}",
                    group_id=f"g{g}",
                    prompt_ids=prompt,
                    response_ids=resp,
                    loss_mask=mask,
                    rollout_logprobs=[-1.0 if m else 0.0 for m in mask],
                    images=images,
                    n_tool_calls=1,
                    n_tool_images=int(tool_image),
                    end_reason=EndReason.DONE,
                    reward=float(k % 2) * (1 + 0.1 * g),
                )
            )
    # what the selection (rewards.filters.select_for_training) sets and the learner trains with
    adv, std = group_advantages([t.reward for t in out], [t.group_id for t in out], return_std=True)
    for t, a, s in zip(out, adv.tolist(), std.tolist(), strict=True):
        t.advantage, t.group_std = a, s
    return out
