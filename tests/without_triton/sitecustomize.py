"""Put this folder first on PYTHONPATH to run a process as on a machine without triton.

torch's CPU wheel does not depend on triton, so a new user's environment has none. `None` in
`sys.modules` makes `import triton` raise ImportError and `importlib.util.find_spec("triton")`
return None, which is what torch, inductor and smoothcache_fx check.
"""

import sys

sys.modules["triton"] = None
