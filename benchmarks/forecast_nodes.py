"""In what to extrapolate a skipped branch: step index, the sampler's timestep, or its noise level.

The forecast of a skipped step is a polynomial through the branch's last computed outputs, placed at
the positions of the steps that computed them. Three candidate positions, all known before the first
model call (so every choice keeps the weights static):

- step index (what `schedules/forecast.py` uses),
- the scheduler's timestep t,
- the noise level sigma(t) = sqrt((1 - alpha_bar_t) / alpha_bar_t), and log sigma.

One uncached generation of the shipped demo DiT records every block's attn1 and ff output at every
step (forward hooks); then, for FORA-n patterns (computed at steps 0, n, 2n, ... and the last step),
the order-1 and order-2 forecasts of every skipped step are compared with the real output: relative
L1 error (mean |forecast - real| / mean |real|), averaged over skipped steps and the 12 branches.
Order 0 (plain reuse) is the same for every position and is printed for scale.

    python benchmarks/forecast_nodes.py [--steps 50] [--per-class 1]
"""

from __future__ import annotations

import argparse

import torch

from smoothcache_fx.demo.model import NUM_CLASSES, generate, load_demo_model, make_scheduler
from smoothcache_fx.schedules.forecast import lagrange_weights


def record_outputs(steps: int, per_class: int) -> dict[str, list[torch.Tensor]]:
    """Every block's attn1 and ff output at every step of one uncached generation."""
    model = load_demo_model()
    outputs: dict[str, list[torch.Tensor]] = {}
    for index, block in enumerate(model.transformer_blocks):
        for name in ("attn1", "ff"):
            key = f"{name}-{index}"
            outputs[key] = []
            getattr(block, name).register_forward_hook(
                lambda module, args, output, key=key: outputs[key].append(output.detach().clone())
            )
    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    generate(model, labels, steps, generator=torch.Generator().manual_seed(0))
    return outputs


def positions(steps: int) -> dict[str, list[float]]:
    scheduler = make_scheduler(steps)
    timesteps = [float(t) for t in scheduler.timesteps]
    alpha_bar = scheduler.alphas_cumprod[scheduler.timesteps].double()
    sigma = ((1 - alpha_bar) / alpha_bar).sqrt()
    return {
        "step index": [float(i) for i in range(steps)],
        "timestep": timesteps,
        "sigma": sigma.tolist(),
        "log sigma": sigma.log().tolist(),
    }


def fora_computes(steps: int, interval: int) -> list[int]:
    return sorted(set(range(0, steps, interval)) | {steps - 1})


def forecast_error(outputs, nodes: list[float], computes: list[int], order: int) -> float:
    """Mean relative L1 error of the order-`order` forecast over skipped steps and branches."""
    errors = []
    for series in outputs.values():
        for step in range(len(series)):
            if step in computes:
                continue
            past = [c for c in computes if c < step][-(order + 1) :]
            weights = lagrange_weights([nodes[c] for c in past], nodes[step])
            forecast = sum(w * series[c] for w, c in zip(weights, past, strict=True))
            errors.append(((forecast - series[step]).abs().mean() / series[step].abs().mean()).item())
    return sum(errors) / len(errors)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--per-class", type=int, default=1)
    args = parser.parse_args(argv)
    outputs = record_outputs(args.steps, args.per_class)
    places = positions(args.steps)
    results = {}
    print(
        f"demo DiT, {args.steps} DDIM steps, mean relative L1 error of skipped steps' forecasts, 12 branches"
    )
    print(f"{'FORA':>5}{'order':>7}" + "".join(f"{name:>12}" for name in places))
    for interval in (2, 3, 4, 5):
        computes = fora_computes(args.steps, interval)
        reuse = forecast_error(outputs, places["step index"], computes, 0)
        print(f"{interval:>5}{0:>7}" + f"{reuse:>12.4f}" * len(places))
        for order in (1, 2):
            row = {name: forecast_error(outputs, nodes, computes, order) for name, nodes in places.items()}
            results[(interval, order)] = row
            print(f"{interval:>5}{order:>7}" + "".join(f"{value:>12.4f}" for value in row.values()))
    return results


if __name__ == "__main__":
    main()
