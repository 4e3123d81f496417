"""Run the suite on 8 simulated CPU devices: XLA reads these flags when jax is first imported.

The tests in this process check what a program computes and contains (values against the
single-device run, collectives in the HLO), not how fast it runs, so they compile with
LLVM's optimisations off: the same HLO passes and partitioning, a third less suite time.
The calibration, which is timed and judged, runs in a subprocess at XLA's defaults; the
benchmarks' quick smoke runs, timed but not judged, compile as the tests do.

The suite runs on two pytest-xdist workers. One calibration serves the session: the first
worker to collect a test that needs it starts it in the background at once, and the tests
that need it run last. While it times (and only then) no other test runs: each test holds
the timing lock shared (`jaxpar.timing.working`), the calibration holds it exclusively
around its timed steps (`jaxpar.timing.alone`); compiling, it shares the cores, ahead of
the test processes, which lower their priority once it has started.
"""

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

_FLAG = "--xla_force_host_platform_device_count"
_FAST_COMPILE = "--xla_backend_optimization_level=0"
_SHARED = "JAXPAR_TEST_SHARED"  # a directory every worker of the session sees
_CALIBRATED = ("calibration_cache", "quick_bench")  # fixtures that need the calibration
_CALIBRATION_TIMEOUT = 1500  # seconds
_TEST_NICENESS = 10  # test processes yield the cores to the calibration's compiles
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}=8".strip()
if "--xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += f" {_FAST_COMPILE}"

from jaxpar.timing import LOCK_VARIABLE, working  # noqa: E402  (imports jax: after the flags)


@pytest.fixture
def compiles():
    """The XLA compilations made while the test body runs (a check that bad input is refused
    before anything compiles); a program read from the compilation cache counts too."""
    import jax  # after the flag above is set

    events = []

    def listen(event, duration, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            events.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listen)
    yield events
    jax.monitoring.unregister_event_duration_listener(listen)


def _timed_env() -> dict[str, str]:
    """The environment of a subprocess that measures: XLA's default flags, 8 devices."""
    return {**os.environ, "XLA_FLAGS": f"{_FLAG}=8"}


def pytest_configure(config):
    """In the controller (or a run without workers), before any worker starts: the shared
    directory and the timing lock in it, which the workers inherit. In every process: one
    persistent XLA compilation cache there, so a program several tests (or both workers)
    compile, such as a single-device reference, compiles once per session."""
    if _SHARED not in os.environ:
        shared = tempfile.mkdtemp(prefix="jaxpar-tests-")
        os.environ[_SHARED] = shared
        os.environ[LOCK_VARIABLE] = str(Path(shared) / "timing.lock")
        config.jaxpar_shared = shared
    import jax

    jax.config.update("jax_compilation_cache_dir", str(Path(os.environ[_SHARED]) / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config):
    if getattr(config, "jaxpar_shared", None):
        import shutil

        shutil.rmtree(config.jaxpar_shared, ignore_errors=True)


def _needs_calibration(item) -> bool:
    return any(name in item.fixturenames for name in _CALIBRATED)


_calibration: subprocess.Popen | None = None  # the calibration this process started


def pytest_collection_modifyitems(session, config, items):
    """Tests that need the calibration run last (every worker sorts alike); if any is
    collected, the calibration starts now, once per session, and this process steps back
    (`_TEST_NICENESS`): the calibration is the session's longest path (the tests that need
    it wait for it), so its compiles go first when both want the cores."""
    items.sort(key=_needs_calibration)
    if not any(map(_needs_calibration, items)):
        return
    _start_calibration()
    os.nice(_TEST_NICENESS)


def _start_calibration() -> None:
    """Start the session's calibration in a subprocess, unless another worker did."""
    shared = Path(os.environ[_SHARED])
    try:
        os.close(os.open(shared / "calibration.started", os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return
    script = ("import sys, traceback\nfrom pathlib import Path\ntry:\n"
              "    import jaxpar\n    jaxpar.calibrate(verbose=False)\n"
              "    Path(sys.argv[1]).write_text('ok')\n"
              "except BaseException:\n    Path(sys.argv[1]).write_text(traceback.format_exc())\n"
              "    raise\n")
    global _calibration
    _calibration = subprocess.Popen(
        [sys.executable, "-c", script, str(shared / "calibration.status")],
        env={**_timed_env(), "JAXPAR_CACHE": str(shared / "calibration")},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def pytest_sessionfinish(session):
    if _calibration is not None and _calibration.poll() is None:
        _calibration.kill()
        _calibration.wait()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Every test holds the timing lock shared, but those waiting for the calibration
    (which would wait for themselves) and the benchmarks' smoke runs (timed, not judged)."""
    with contextlib.nullcontext() if _needs_calibration(item) else working():
        yield


@pytest.fixture(scope="session")
def calibration_cache():
    """The session's calibration (started at collection, see the module docstring),
    measured in a subprocess at XLA's default optimisation (what a user's programs compile
    with): calibrate() times probe training steps for about 5 minutes on 2 cores, so every
    test that needs a measured cluster reads this cache."""
    shared = Path(os.environ[_SHARED])
    status = shared / "calibration.status"
    deadline = time.monotonic() + _CALIBRATION_TIMEOUT
    while not status.exists() or not status.read_text():
        if time.monotonic() > deadline:
            pytest.fail(f"the calibration did not finish in {_CALIBRATION_TIMEOUT} s")
        time.sleep(1.0)
    if status.read_text() != "ok":
        pytest.fail(f"the calibration failed:\n{status.read_text()}")
    return shared / "calibration"


def _quick_run(tmp_path_factory, env: dict[str, str]):
    """A function running `scripts/<name> --quick` in a subprocess on 8 CPU devices,
    compiled as this process compiles (a smoke run: what it times is not judged), with
    `env` added; it returns the JSON result."""
    import json

    root = Path(__file__).resolve().parents[1]

    def run(name: str) -> dict:
        out = tmp_path_factory.mktemp("quick") / "result.json"
        subprocess.run([sys.executable, str(root / "scripts" / name), "--quick", "--out",
                        str(out)], check=True, env={**os.environ, **env}, cwd=root,
                       timeout=600, capture_output=True)
        return json.loads(out.read_text())

    return run


@pytest.fixture(scope="module")
def quick_script(tmp_path_factory):
    """Run a script's quick smoke run (see `_quick_run`)."""
    return _quick_run(tmp_path_factory, {})


@pytest.fixture(scope="module")
def quick_bench(tmp_path_factory, calibration_cache):
    """Run a benchmark's quick smoke run (see `_quick_run`) on the session's calibration."""
    return _quick_run(tmp_path_factory, {"JAXPAR_CACHE": str(calibration_cache)})
