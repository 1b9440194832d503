import os

# one thread per process: on a small shared machine torch's default (one per core) makes the
# suite many times slower, and results do not depend on it
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import pyro  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(autouse=True)
def fresh_global_state():
    """Pyro's parameter store and the random generators are global: start every test with
    an empty store and seed 0, so that its draws do not depend on which tests ran before it
    in the same process (pytest-xdist schedules them differently from run to run)."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
