"""smoothcache_fx: SmoothCache as a torch.fx compiler pass for Diffusion Transformers.

passes/, kernels/ and schedules/ live at the top of the repository (one concern per folder) and are
installed as subpackages of smoothcache_fx; nothing installs a top-level `passes` or `kernels`.
"""

from setuptools import setup

setup(
    name="smoothcache-fx",
    version="0.1.0",
    description="SmoothCache for Diffusion Transformers as a torch.fx pass with compiled, cached inference",
    python_requires=">=3.10",
    packages=[
        "smoothcache_fx",
        "smoothcache_fx.passes",
        "smoothcache_fx.kernels",
        "smoothcache_fx.schedules",
        "smoothcache_fx.demo",
    ],
    package_dir={
        "smoothcache_fx": "smoothcache_fx",
        "smoothcache_fx.passes": "passes",
        "smoothcache_fx.kernels": "kernels",
        "smoothcache_fx.schedules": "schedules",
    },
    package_data={
        # the trained digits DiT and classifier (fp16/fp32 safetensors, ~4.6 MB) and their record
        "smoothcache_fx.demo": ["*.safetensors", "*.json"],
    },
    # Only the torch that CI runs: the private APIs in kernels/compat.py were checked on 2.13 alone.
    # The local CPU build (2.13.0) satisfies it, so installing next to it pulls nothing else.
    install_requires=["torch>=2.13,<2.14", "numpy"],
    extras_require={
        "diffusers": ["diffusers>=0.42"],
        # smoothcache_fx.demo: the shipped digits DiT is a diffusers model; weights are safetensors.
        # No triton: torch's CPU wheel has none, and the demo must (and does) work without it.
        "demo": ["diffusers>=0.42", "safetensors", "matplotlib", "Pillow"],
        "plot": ["matplotlib"],
        # Ranges that CI's fresh venv resolves to: the suite relies on these in detail (pytest's
        # monkeypatch, ruff's formatting, diffusers' model internals), so a new release is taken
        # on purpose, not by a fresh install.
        "test": [
            "pytest>=9.2,<9.3",
            "pytest-timeout>=2.4,<2.5",
            "ruff==0.17.6",
            "diffusers>=0.42,<0.43",
            "matplotlib>=3.11,<3.12",
            "safetensors>=0.8,<0.9",
            "dit-smoothcache==0.1.1",
            "peft>=0.21,<0.22",  # adapter changes must make blocks capture again (test_dependencies)
            "triton==3.7.1; platform_system == 'Linux'",  # what torch 2.13.0's CUDA wheel pins; no torch dep
        ],
    },
    entry_points={"console_scripts": ["smoothcache-fx=smoothcache_fx.cli:main"]},
)
