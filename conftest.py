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
def fresh_param_store():
    """Pyro's parameter store is global: start every test with an empty one."""
    pyro.clear_param_store()
    yield
