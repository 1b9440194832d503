import pyro
import pytest


@pytest.fixture(autouse=True)
def fresh_param_store():
    """Pyro's parameter store is global: start every test with an empty one."""
    pyro.clear_param_store()
    yield
