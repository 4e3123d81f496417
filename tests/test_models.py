"""Reference models: presets match their papers and plan abstractly, without allocating."""

import math
import time

import pytest

from jaxpar.models.gpt import build
from jaxpar.models.presets import PRESETS
from jaxpar.tracing.params import abstract_params

# Parameter counts (billions) of Table 1, Narayanan et al. SC'21, and GPT-3 (Brown et al.).
PAPER_BILLIONS = {
    "megatron-1.7b": 1.7, "megatron-3.6b": 3.6, "megatron-7.5b": 7.5, "megatron-18b": 18.4,
    "megatron-39b": 39.1, "megatron-76b": 76.1, "megatron-146b": 145.6, "megatron-310b": 310.1,
    "megatron-530b": 529.6, "megatron-1t": 1008.0, "gpt3-175b": 175.0,
}


@pytest.mark.parametrize("name", PAPER_BILLIONS)
def test_preset_sizes_match_the_papers(name):
    assert PRESETS[name].num_params / 1e9 == pytest.approx(PAPER_BILLIONS[name], rel=0.03)


def test_gpt3_175b_traces_abstractly_with_every_parameter_annotated():
    start = time.perf_counter()
    _, _, params = abstract_params(build("gpt3-175b"))
    assert time.perf_counter() - start < 30  # shapes only: nothing of 700 GB is allocated
    assert sum(math.prod(p.shape) for p in params) == PRESETS["gpt3-175b"].num_params
    assert all(len(p.logical_axes) == len(p.shape) for p in params)
    stacked = [p for p in params if p.path.startswith("blocks/")]
    assert stacked and all(p.logical_axes[0] == "layers" and p.shape[0] == 96 for p in stacked)


@pytest.mark.parametrize("name", ["megatron-1.7b", "gpt3-175b", "megatron-1t"])
def test_flops_per_token_is_six_n_plus_attention(name):
    cfg = PRESETS[name]
    positions = cfg.length * cfg.embed
    dense = 6 * (cfg.num_params - positions)  # every weight is in one matmul, embedding too
    attention = 6 * 2 * cfg.layers * cfg.length * cfg.embed
    assert cfg.flops_per_token() == pytest.approx(dense + attention, rel=0.01)
