"""smoothcache_fx: SmoothCache as a compiler pass for Diffusion Transformers.

`transform(model, schedule)` rewrites every residual branch of every transformer block into a
step-indexed choice between fresh compute and a persistent cache buffer.
"""

from smoothcache_fx.calibrate import CalibrationErrors, calibrate
from smoothcache_fx.package import export_package, reset_package
from smoothcache_fx.profile import profile
from smoothcache_fx.schedules import Schedule
from smoothcache_fx.transform import transform, untransform

__all__ = [
    "CalibrationErrors",
    "Schedule",
    "calibrate",
    "export_package",
    "profile",
    "reset_package",
    "transform",
    "untransform",
]
