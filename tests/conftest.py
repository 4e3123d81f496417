"""Run the suite on 8 simulated CPU devices: XLA reads these flags when jax is first imported.

The tests in this process check what a program computes and contains (values against the
single-device run, collectives in the HLO), not how fast it runs, so they compile with
LLVM's optimisations off: the same HLO passes and partitioning, a third less suite time.
What is timed (calibration, the benchmarks) runs in subprocesses at XLA's defaults.
"""

import os
import subprocess
import sys

import pytest

_FLAG = "--xla_force_host_platform_device_count"
_FAST_COMPILE = "--xla_backend_optimization_level=0"
_TIMED_ENV = {**os.environ, "XLA_FLAGS": f"{_FLAG}=8"}  # for subprocesses that measure
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}=8".strip()
if "--xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += f" {_FAST_COMPILE}"


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
    """One calibration for the session, measured in a subprocess at XLA's default
    optimisation (what a user's programs compile with): calibrate() times probe training
    steps for about 5 minutes on 2 cores, so every test that needs a measured cluster reads
    this cache."""
    cache = tmp_path_factory.mktemp("calibration")
    subprocess.run([sys.executable, "-c", "import jaxpar; jaxpar.calibrate(verbose=False)"],
                   check=True, env={**_TIMED_ENV, "JAXPAR_CACHE": str(cache)}, timeout=1200,
                   capture_output=True)
    return cache


@pytest.fixture(scope="module")
def quick_bench(tmp_path_factory, calibration_cache):
    """Run `scripts/<name> --quick` in a subprocess on 8 CPU devices, with the session's
    calibration cache; its JSON result."""
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]

    def run(name: str) -> dict:
        out = tmp_path_factory.mktemp("bench") / "bench.json"
        env = {**_TIMED_ENV, "JAXPAR_CACHE": str(calibration_cache)}
        subprocess.run([sys.executable, str(root / "scripts" / name), "--quick", "--out",
                        str(out)], check=True, env=env, cwd=root, timeout=600,
                       capture_output=True)
        return json.loads(out.read_text())

    return run
