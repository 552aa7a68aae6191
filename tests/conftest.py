import jax
import pytest


jax.config.update("jax_enable_x64", True)


@pytest.fixture(autouse=True)
def _strict_dtype_promotion(request):
    """Run every test under JAX's strict dtype promotion, so that a missing cast in the
    package (float16 weights on a float32 state, ...) raises instead of promoting.

    Tests marked `standard_promotion` are exempt: optax itself is not strict-clean
    (Adam's bias correction raises a float to an int32 power), and some tests' own
    functions mix dtypes (a Python float times the int32 stage index k).
    """
    if request.node.get_closest_marker("standard_promotion") is not None:
        yield
    else:
        with jax.numpy_dtype_promotion("strict"):
            yield


@pytest.fixture
def getkey():
    """A fresh PRNG key on every call, reproducible per test."""
    state = {"key": jax.random.key(0)}

    def _getkey():
        state["key"], sub = jax.random.split(state["key"])
        return sub

    return _getkey
