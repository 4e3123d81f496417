"""Run the suite on 8 simulated CPU devices: XLA reads this flag when jax is first imported."""

import os

import pytest

_FLAG = "--xla_force_host_platform_device_count"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}=8".strip()


@pytest.fixture
def compiles():
    """The XLA compilations made while the test body runs (a check that bad input is refused
    before anything compiles)."""
    import jax  # after the flag above is set

    events = []

    def listen(event, duration, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            events.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listen)
    yield events
    jax.monitoring.unregister_event_duration_listener(listen)
