"""Time MaxText's own jitted GPT-3 train step on 8 simulated CPU devices (a benchmark peer).

Run with the MaxText venv (scripts/maxtext_setup.sh), not jaxpar's:
    .venv-maxtext/bin/python scripts/maxtext_step.py --plan fsdp2+tp4 --steps 20

Builds the step the way `maxtext.trainers.pre_train.train.train_loop` does: pyconfig over
base.yml + models/gpt3-52k.yml (sizes overridden), `train_utils.setup_train_loop`,
`train_utils.jit_train_and_eval_step(train.train_step)`, then `.lower(...).compile()`; every
step (warm-up and timed) runs that compiled executable on MaxText's synthetic batches.
The last stdout line is one JSON object. `--serve` then reads `step K` / `quit` from stdin.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import jax  # noqa: E402
from flax import nnx  # noqa: E402
from flax.core.spmd import logical_axis_rules  # noqa: E402
from maxtext.configs import pyconfig  # noqa: E402
from maxtext.trainers.pre_train import train  # noqa: E402
from maxtext.utils import maxtext_utils, sharding, train_utils  # noqa: E402
from maxtext.version import __version__ as maxtext_version  # noqa: E402

PLANS = {  # plan -> (ici_data, ici_fsdp, ici_tensor)
    "dp8": (8, 1, 1),
    "fsdp8": (1, 8, 1),
    "dp2+tp4": (2, 1, 4),
    "fsdp2+tp4": (1, 2, 4),
}
SIZES = {"embed": 128, "layers": 4, "heads": 8, "head_dim": 16, "mlp": 512, "vocab": 256,
         "length": 128, "batch": 16}
# Saves every named matmul output (q/k/v/qkv_proj, out_proj, mlpwi, mlpwo) and the attention
# context. MaxText wraps the scanned layer in jax.checkpoint whatever the policy ("none" and
# "full" both mean policy=None there, i.e. save nothing), so this is its least-remat policy.
# "everything_saveable" (not a MaxText option) patches the decoder's policy to save all.
REMAT = "minimal_with_context"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in SIZES.items():
        p.add_argument("--" + name.replace("_", "-"), type=int, default=default)
    p.add_argument("--plan", choices=sorted(PLANS), default="dp8")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--remat-policy", default=REMAT)
    p.add_argument("--out", help="also write the JSON result here")
    p.add_argument("--hlo-out", help="write the compiled step's HLO text here")
    p.add_argument("--serve", action="store_true", help="then serve 'step K' lines on stdin")
    return p.parse_args(argv)


def maxtext_config(a, workdir):
    data, fsdp, tensor = PLANS[a.plan]
    ndev = jax.device_count()
    if a.batch % ndev:
        sys.exit(f"--batch {a.batch} must divide over {ndev} devices")
    overrides = dict(
        model_name="gpt3-52k", override_model_config=True, decoder_block="gpt3",
        base_emb_dim=a.embed, base_num_decoder_layers=a.layers, base_num_query_heads=a.heads,
        base_num_kv_heads=a.heads, head_dim=a.head_dim, base_mlp_dim=a.mlp,
        vocab_size=a.vocab, max_target_length=a.length, trainable_position_size=a.length,
        per_device_batch_size=a.batch / ndev, dtype="float32", weight_dtype="float32",
        opt_type="adamw", learning_rate=a.lr, steps=a.steps + 2,
        normalize_embedding_logits=True,  # tied logits / sqrt(embed): init loss ~ ln(vocab)
        remat_policy=REMAT if a.remat_policy == "everything_saveable" else a.remat_policy,
        scan_layers=True, attention="dot_product",
        dataset_type="synthetic", enable_checkpointing=False, profiler="",
        enable_tensorboard=False, gcs_metrics=False, save_config_to_gcs=False,
        hardware="cpu", skip_jax_distributed_system=True,  # one process, no jax.distributed
        jax_cache_dir="",  # no persistent compilation cache: compile_s is a real compile
        base_output_directory=workdir, run_name="maxtext_step",
        ici_data_parallelism=data, ici_fsdp_parallelism=fsdp, ici_tensor_parallelism=tensor,
    )
    base_yml = os.path.join(os.path.dirname(pyconfig.__file__), "base.yml")
    return pyconfig.initialize(["maxtext_step", base_yml], **overrides)


class Runner:
    """MaxText's train state, compiled train step and synthetic data loader."""

    def __init__(self, config):
        # As maxtext.trainers.pre_train.train.initialize does.
        jax.config.update("jax_default_prng_impl", "unsafe_rbg")
        jax.config.update("jax_use_shardy_partitioner", config.shardy)
        jax.config.update("jax_remove_size_one_mesh_axis_from_type",
                          config.remove_size_one_mesh_axis_from_type)
        (_, _, shardings, _, mesh, _, _, self.loader, self.rampup, _, state) = (
            train_utils.setup_train_loop(config, None))
        graphdef, state = nnx.split(state)
        params_sh, shardings = sharding.maybe_update_params_sharding_with_opt(config, shardings)
        p_train_step, _ = train_utils.jit_train_and_eval_step(
            config, graphdef, mesh, state, shardings, train.train_step, params_shardings=params_sh)
        self.mesh, self.rules = mesh, config.logical_axis_rules
        with jax.set_mesh(mesh), logical_axis_rules(self.rules):
            batch_sh = sharding.get_input_data_sharding(config, mesh)
            shaped = maxtext_utils.get_shaped_batch(config, batch_sharding=batch_sh)
            t0 = time.perf_counter()
            lowered = p_train_step.lower(state, shaped)
            t1 = time.perf_counter()
            self.compiled = lowered.compile()
            t2 = time.perf_counter()
        self.lower_s, self.compile_s = t1 - t0, t2 - t1
        self.state, self.losses = state, []
        params = [x for p, x in jax.tree_util.tree_leaves_with_path(state["model"])
                  if "rngs" not in jax.tree_util.keystr(p)]
        self.num_params = int(sum(x.size for x in params))

    def steps(self, n):
        times = []
        for _ in range(n):
            batch = self.loader.load_next_batch(rampup_manager=self.rampup)
            jax.block_until_ready(batch)
            with jax.set_mesh(self.mesh), logical_axis_rules(self.rules):
                t0 = time.perf_counter()
                self.state, metrics = self.compiled(self.state, batch)
                jax.block_until_ready((self.state, metrics))
                times.append(time.perf_counter() - t0)
            self.losses.append(float(metrics["scalar"]["learning/loss"]))
        return times


def memory(compiled):
    stats = compiled.memory_analysis()
    names = ("argument", "output", "alias", "temp", "generated_code")
    return {n: getattr(stats, f"{n}_size_in_bytes") for n in names
            if stats is not None and hasattr(stats, f"{n}_size_in_bytes")}


def main(argv=None):
    a = parse_args(argv)
    if a.remat_policy == "everything_saveable":
        from maxtext.layers.nnx_decoders import NNXDecoder

        NNXDecoder.get_remat_policy = lambda self: jax.checkpoint_policies.everything_saveable
    with tempfile.TemporaryDirectory(prefix="maxtext_step_") as workdir:
        runner = Runner(maxtext_config(a, workdir))
        if a.hlo_out:
            with open(a.hlo_out, "w") as f:
                f.write(runner.compiled.as_text())
        runner.steps(2)  # warm-up
        step_s = runner.steps(a.steps)
        result = {
            "peer": "maxtext", "maxtext_version": maxtext_version, "jax_version": jax.__version__,
            "plan": a.plan, "config": {k: getattr(a, k) for k in SIZES},
            "remat_policy": a.remat_policy, "step_s": step_s,
            "median_s": statistics.median(step_s) if step_s else None,
            "lower_s": runner.lower_s, "compile_s": runner.compile_s,
            "memory": memory(runner.compiled), "losses": runner.losses[:10],
            "num_params": runner.num_params,
        }
        line = json.dumps(result)
        if a.out:
            with open(a.out, "w") as f:
                f.write(line + "\n")
        print(line, flush=True)
        if a.serve:
            for cmd in sys.stdin:
                words = cmd.split()
                if not words or words[0] == "quit":
                    break
                if words[0] == "step" and (len(words) == 1 or words[1].isdigit()):
                    k = int(words[1]) if len(words) > 1 else 1
                    print(json.dumps({"step_s": runner.steps(k)}), flush=True)
                else:
                    print(json.dumps({"error": f"unknown command {cmd.strip()!r}"}), flush=True)


if __name__ == "__main__":
    main()
