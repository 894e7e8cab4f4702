"""How close to a tie the fp32 reference's expert choices come on the bf16 suite's prompts.

    python benchmarks/router_margins.py [--seeds 7 42]

For each MoE test variant (tests/engine_checkpoints.py) and prompt, the smallest gap, over all
MoE layers and tokens, between the k-th and (k+1)-th expert score that decides the top-k (and,
for grouped routing, between the last kept and the first dropped group). Gaps of a few 1e-4
flip under bf16 rounding, so a prompt with one in a shared, cached prefix moves every later
step; tests/test_engine_bf16.py picks its prefix seed with this.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from engine_checkpoints import build_variant, reference_model
from test_engine_bf16 import PROMPTS, _prefix_prompts

MOE_VARIANTS = ("qwen3_moe", "qwen3_moe_mixed", "mixtral", "glm4_moe", "deepseek_v3")


def smallest_margin(model: torch.nn.Module, prompt: list[int]) -> float:
    gaps: list[torch.Tensor] = []

    def record(router: torch.nn.Module, args: tuple, _out: object) -> None:
        x = args[0].reshape(-1, args[0].shape[-1]).float()
        logits = x @ router.weight.float().t()
        if hasattr(router, "e_score_correction_bias"):  # DeepSeek / GLM grouped sigmoid routing
            choice = logits.sigmoid() + router.e_score_correction_bias.float()
            groups = choice.view(x.shape[0], router.num_group, -1)
            group_scores = groups.topk(2, -1).values.sum(-1)
            if router.topk_group < router.num_group:
                best = group_scores.topk(router.topk_group + 1, -1).values
                gaps.append((best[:, -2] - best[:, -1]).min())
                keep = group_scores.topk(router.topk_group, -1).indices
                dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
                choice = groups.masked_fill(dropped[:, :, None], float("-inf")).view_as(choice)
        else:
            choice = logits.softmax(-1)
        best = choice.topk(router.top_k + 1, -1).values
        gaps.append((best[:, -2] - best[:, -1]).min())

    hooks = [
        module.register_forward_hook(record)
        for name, module in model.named_modules()
        if name.endswith("mlp.gate") and hasattr(module, "top_k")
    ]
    with torch.no_grad():
        model(torch.tensor([prompt]))
    for hook in hooks:
        hook.remove()
    return float(torch.stack(gaps).min())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="*", default=[7, 42])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        models = {v: reference_model(build_variant(v, Path(tmp) / v)).float() for v in MOE_VARIANTS}
        for i, prompt in enumerate(PROMPTS):
            row = {v: round(smallest_margin(m, prompt), 5) for v, m in models.items()}
            print(f"PROMPTS[{i}] ({len(prompt)} tokens): {row}")
        for seed in args.seeds:
            prompts = _prefix_prompts(seed)
            row = {
                v: round(min(smallest_margin(m, p) for p in prompts), 5) for v, m in models.items()
            }
            print(f"prefix seed {seed}: {row}")


if __name__ == "__main__":
    main()
