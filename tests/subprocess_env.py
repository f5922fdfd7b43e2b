"""The environment of the ``jaxlm`` processes tests start (``python -m jaxlm ...``)."""

import os

# The XLA:CPU optimization level every test process compiles at (tests/conftest.py says why). It is
# part of JAX's compilation-cache key, so in-process tests and their children must agree on it.
TEST_XLA_LEVEL = "--xla_backend_optimization_level=1"


def subprocess_env(devices: int = 1, **extra: str) -> dict[str, str]:
    """``os.environ`` for a child process on ``devices`` simulated CPU devices, plus ``extra``.

    The child compiles at the optimization level of ``tests/conftest.py`` (faster than XLA's
    default, same values within every test's tolerance). XLA_FLAGS are part of JAX's
    compilation-cache key, so children started with the same flags share the session cache's
    programs: a test's second, third... run of the same command compiles nothing.
    """
    env = dict(os.environ, JAX_PLATFORMS="cpu", **extra)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices} {TEST_XLA_LEVEL}"
    return env
