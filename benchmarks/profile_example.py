"""`smoothcache_fx.profile` on a small diffusers DiT: the report quoted in BENCHMARKS.md ("Profile").

The model is `DiTTransformer2DModel` with 4 layers, hidden 256 (4 heads x 64), a 16x16x4 latent in
2x2 patches (64 tokens), batch 2, random weights (profiling measures cost, not image quality). The
schedule is FORA-2: attn1 and ff of every block computed at even steps and reused at odd ones. A
plain loop of 20 model calls stands in for a pipeline, so the report is about the transformer.

Usage::

    python benchmarks/profile_example.py                          # eager variants, CPU
    python benchmarks/profile_example.py --compile                # compiled (split for profiling)
    python benchmarks/profile_example.py --compile --no-branches  # compiled, as it normally runs
    python benchmarks/profile_example.py --trace trace.json --json report.json --threads 1

Open the trace in https://ui.perfetto.dev or chrome://tracing.
"""

from __future__ import annotations

import argparse

import torch

import smoothcache_fx
from smoothcache_fx import Schedule
from smoothcache_fx.profile import ProfileReport

COMPONENTS = ("attn1", "ff")


def build_model(layers: int, heads: int, head_dim: int, sample: int, seed: int = 0):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    return DiTTransformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=4,
        out_channels=4,
        num_layers=layers,
        sample_size=sample,
        patch_size=2,
        num_embeds_ada_norm=1000,
    ).eval()


def main(argv=None) -> ProfileReport:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--sample", type=int, default=16, help="latent height/width")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--interval", type=int, default=2, help="FORA interval")
    parser.add_argument("--compile", action="store_true", help="transform(..., compile=True)")
    parser.add_argument(
        "--no-branches", action="store_true", help="profile(..., branches=False): no split, step ranges only"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--trace", default=None, help="write the Chrome/Perfetto trace here")
    parser.add_argument("--json", default=None, help="write the report as JSON here")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    model = build_model(args.layers, args.heads, args.head_dim, args.sample).to(device)
    schedule = Schedule.uniform(args.steps, args.interval, list(COMPONENTS))
    model = smoothcache_fx.transform(model, schedule, compile=args.compile)

    g = torch.Generator().manual_seed(0)
    latents = torch.randn(args.batch, 4, args.sample, args.sample, generator=g).to(device)
    labels = torch.arange(args.batch, device=device) % 1000

    def run():
        with torch.no_grad():
            x = latents
            for step in range(args.steps):
                t = torch.full((args.batch,), 999 - step * (1000 // args.steps), device=device)
                x = model(x, timestep=t, class_labels=labels).sample

    report = smoothcache_fx.profile(
        model, run, trace=args.trace, baseline=True, branches=not args.no_branches
    )
    print(
        f"# DiT {args.layers} layers, hidden {args.heads * args.head_dim}, {(args.sample // 2) ** 2} tokens, "
        f"batch {args.batch}, {args.steps} steps, FORA-{args.interval} on {COMPONENTS}; "
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, compile={args.compile}, "
        f"branches={not args.no_branches}"
    )
    print(report)
    if args.json:
        report.to_json(args.json)
    return report


if __name__ == "__main__":
    main()
