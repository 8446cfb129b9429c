"""Test-session setup shared by every test module.

Without a GPU, the Triton kernels run under the Triton interpreter (numpy, CPU tensors). `triton.jit`
decides between interpreted and compiled when a kernel is defined, i.e. when
`smoothcache_fx.kernels` is first imported, so TRITON_INTERPRET must be set before any test module
imports it; pytest imports this file first. The interpreter only affects user-defined Triton
kernels: torch.compile on CPU still uses Inductor's C++ backend. `setdefault` lets a run force
either mode from the environment.
"""

import contextlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def one_thread():
    """One torch thread for the test: tiny tensors on a shared 2-core machine only spin with more.
    Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fresh_dynamo():
    """Dynamo's caches and counters empty before and after the test, so graph and recompile counts
    are the test's own. Modules opt in with `pytestmark = pytest.mark.usefixtures("fresh_dynamo")`."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.fixture
def forbid_recompiles():
    """Call it to make every dynamo recompile an error for the rest of the test.

    torch's own `config.patch`, not `monkeypatch.setattr`: pytest 9.2's monkeypatch records the old
    value from the module's `__dict__`, where torch's config module keeps none, so undoing the patch
    deletes the config entry and every later test that reads it fails.
    """
    with contextlib.ExitStack() as stack:
        yield lambda: stack.enter_context(torch._dynamo.config.patch(error_on_recompile=True))
