"""docs/models.md: its python blocks run in order in one namespace and compute what the page
says; its excerpts quote the code; its rule table is `jaxpar.DEFAULT_RULES`; every
`jaxpar.X` it names exists.

Convention: every fenced ```python block runs, except one whose first line starts with
`# not run`; `# not run: excerpt of <path>` marks a quote of that file."""

import importlib
import math
import re
from pathlib import Path

import numpy as np
import pytest

import jaxpar

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "models.md"
SKIP = "# not run"
EXCERPT = re.compile(r"# not run: excerpt of (\S+)")
RTOL = 1e-5  # fp32: plans only reorder sums
# what the page must name by these public names
EXPORTS = ("DEFAULT_RULES", "run_stack", "attention", "layer", "constrain", "Stages")


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", PAGE.read_text(), re.M | re.S)


def section(title: str) -> str:
    """The page's text from heading `title` to the next heading of any level."""
    text = PAGE.read_text()
    start = text.index(f"{title}\n")
    end = text.find("\n#", start + len(title))
    return text[start:end if end >= 0 else None]


@pytest.fixture(scope="module")
def namespace() -> dict:
    """The runnable blocks executed in order, in one namespace."""
    ns: dict = {"__name__": "docs_models"}
    blocks = [b for b in python_blocks() if not b.startswith(SKIP)]
    assert len(blocks) >= 8
    for i, block in enumerate(blocks):
        exec(compile(block, f"{PAGE}:block{i}", "exec"), ns)
    return ns


def test_examples_train_and_agree(namespace):
    """Every example's first step computes the same loss on the same initial Llama and batch,
    whatever its plan (fsdp2+tp4, a pp2 pipeline over `Stages`, dp8 with aux); the small
    unrolled model trains under remat; the accuracy aux is a fraction."""
    loss = float(namespace["metrics"]["loss"])
    assert math.isclose(loss, math.log(128), rel_tol=0.05)  # about uniform at init
    np.testing.assert_allclose(float(namespace["piped_metrics"]["loss"]), loss, rtol=RTOL)
    np.testing.assert_allclose(float(namespace["scored_metrics"]["loss"]), loss, rtol=RTOL)
    assert 0.0 <= float(namespace["scored_metrics"]["aux"]["accuracy"]) <= 1.0
    assert set(namespace["metrics"]) == {"loss", "grad_norm"}
    assert np.isfinite(float(namespace["tiny_metrics"]["loss"]))


def test_plain_flax_model_runs_outside_jaxpar(namespace):
    assert namespace["logits"].shape == (8, 16, 128)


def test_loaded_parameters_give_the_steps_loss(namespace):
    """The trained parameters loaded into a plain Flax module give the loss the parallel step
    computes on them (its next step's loss)."""
    ns = namespace
    loaded = float(ns["lm_loss"](ns["trained"], ns["batch"]))
    par = ns["par"]
    _, metrics = par.step(ns["state"], par.shard_batch(ns["batch"]))
    np.testing.assert_allclose(float(metrics["loss"]), loaded, rtol=RTOL)


def test_refused_loss_says_what_it_returned(namespace):
    assert "the loss returned float32[8, 16]" in namespace["refusal"]


def test_paths_in_the_page_are_the_models(namespace):
    """The parameter paths the page shows are the Llama's, stacked and unrolled (the last
    model its group_rules example builds)."""
    table = section("## Rules and group_rules")
    for form, par in (("stacked", namespace["par"]), ("unrolled", namespace["grouped"])):
        paths = {p.path for p in par.plan.params}
        row = next(line for line in table.splitlines() if line.startswith(f"| {form} |"))
        shown = re.findall(r"`([^`]+)`", row)
        assert shown and set(shown) <= paths, (form, shown)


def test_excerpts_quote_the_code():
    excerpts = [b for b in python_blocks() if EXCERPT.match(b)]
    assert len(excerpts) >= 3
    for block in excerpts:
        source = ROOT / EXCERPT.match(block).group(1)
        lines = {line.strip() for line in source.read_text().splitlines()}
        for line in block.splitlines()[1:]:
            if line.strip() and line.strip() != "...":
                assert line.strip() in lines, f"{source.name} has no line {line.strip()!r}"


def test_rule_table_is_the_default_rules():
    rows = [line.split("|")[1:3] for line in section("### The default rules").splitlines()
            if line.startswith("| `")]
    table = tuple((re.findall(r"`(\w+)`", name)[0], tuple(re.findall(r"`(\w+)`", axes)))
                  for name, axes in rows)
    assert table == jaxpar.DEFAULT_RULES


def resolve(dotted: str):
    """The object `jaxpar.a.b.c` names: attributes, importing submodules as needed."""
    obj, prefix = jaxpar, "jaxpar"
    for part in dotted.split(".")[1:]:
        prefix = f"{prefix}.{part}"
        try:
            obj = getattr(obj, part)
        except AttributeError:
            obj = importlib.import_module(prefix)
    return obj


def test_every_jaxpar_name_exists():
    names = set(re.findall(r"\bjaxpar(?:\.[A-Za-z_]\w*)+", PAGE.read_text()))
    assert len(names) > 10
    for name in sorted(names):
        resolve(name)  # raises for a name that does not exist
    for export in EXPORTS:
        assert export in jaxpar.__all__
        assert f"jaxpar.{export}" in names, f"the page never names jaxpar.{export}"
