"""smoothcache_fx: SmoothCache as a compiler pass for Diffusion Transformers.

`transform(model, schedule)` rewrites every residual branch of every transformer block into a
step-indexed choice between fresh compute and a persistent cache buffer.
"""

from smoothcache_fx.schedules import Schedule
from smoothcache_fx.transform import transform, untransform

__all__ = ["Schedule", "transform", "untransform"]
