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


@pytest.fixture(scope="session")
def calibration_cache(tmp_path_factory):
    """One calibration cache for the session: calibrate() times probe training steps, which
    takes about 2.5 minutes, so the tests that need a measured cluster share one."""
    return tmp_path_factory.mktemp("calibration")


@pytest.fixture(scope="module")
def quick_bench(tmp_path_factory, calibration_cache):
    """Run `scripts/<name> --quick` in a subprocess on 8 CPU devices, with the session's
    calibration cache; its JSON result."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]

    def run(name: str) -> dict:
        out = tmp_path_factory.mktemp("bench") / "bench.json"
        env = {**os.environ, "XLA_FLAGS": f"{_FLAG}=8", "JAXPAR_CACHE": str(calibration_cache)}
        subprocess.run([sys.executable, str(root / "scripts" / name), "--quick", "--out",
                        str(out)], check=True, env=env, cwd=root, timeout=600,
                       capture_output=True)
        return json.loads(out.read_text())

    return run
