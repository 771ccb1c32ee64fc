"""Run by tests/test_train_loop.py with 8 simulated CPU devices: the DiT train loop on a
(data=2, fsdp=2, tensor=2) mesh against the same loop on one device."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

from tests.conftest import tiny_dit_config, tiny_tokenbridge_config, tiny_xar_config  # noqa: E402
from trainers import sharding, train  # noqa: E402
from trainers.method import ModelDef, get_method  # noqa: E402


def losses(workdir):
    rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return [loss for row in rows for loss in row["per_step_loss"]]


def main(root, model):
    assert jax.device_count() == 8, jax.devices()
    base = dict(num_steps=5, checkpoint_every=5, num_grid_samples=0)
    from tests.test_lit import tiny_lit_config

    make = {"dit": tiny_dit_config, "xar": tiny_xar_config, "dydi_lit": tiny_lit_config, "tokenbridge": tiny_tokenbridge_config}[model]
    sharded_cfg = make(**base, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
    single_cfg = make(**base, **{"mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1})
    sharded = train.train_and_evaluate(sharded_cfg, f"{root}/sharded")
    single = train.train_and_evaluate(single_cfg, f"{root}/single", devices=jax.devices()[:1])

    report = {"losses_sharded": losses(f"{root}/sharded"), "losses_single": losses(f"{root}/single")}
    # Per tensor: max|a - b| / max(1, max|b|) (the golden-fixture form); and over the whole tree:
    # ||a - b|| / ||b||. Reduction order differs between meshes, so bit-equality is not expected.
    worst, where, diff_sq, ref_sq = 0.0, "", 0.0, 0.0
    for tree in ("params", "ema_params"):
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(sharded[tree]), jax.tree.leaves(single[tree])):
            a, b = np.asarray(jax.device_get(a), np.float64), np.asarray(jax.device_get(b), np.float64)
            rel = float(np.max(np.abs(a - b)) / max(1.0, np.max(np.abs(b))))
            diff_sq += float(np.sum((a - b) ** 2))
            ref_sq += float(np.sum(b ** 2))
            if rel > worst:
                worst, where = rel, tree + jax.tree_util.keystr(path)
    report["max_param_rel_diff"] = worst
    report["worst_param"] = where
    report["tree_rel_diff"] = (diff_sq / ref_sq) ** 0.5
    # Every parameter (and its EMA and Adam moments) is sharded as the logical-axis rules say.
    mesh = sharding.make_mesh(sharded_cfg.mesh)
    names = ModelDef(get_method(sharded_cfg)).param_names()
    wrong, axes_used = [], set()
    flat_names = dict(jax.tree_util.tree_leaves_with_path(
        names, is_leaf=lambda x: x is None or isinstance(x, tuple)))
    for tree in ("params", "ema_params"):
        for path, leaf in jax.tree_util.tree_leaves_with_path(sharded[tree]):
            expected = sharding.logical_to_spec(flat_names[path], leaf.shape, mesh)
            if not leaf.sharding.is_equivalent_to(NamedSharding(mesh, expected), leaf.ndim):
                wrong.append(f"{tree}{jax.tree_util.keystr(path)}: {leaf.sharding.spec} != {expected}")
            axes_used.update(a for a in jax.tree.leaves(tuple(leaf.sharding.spec)) if a)
    mu = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(sharded["opt_state"]) if leaf.ndim >= 2]
    axes_used_mu = {a for leaf in mu for a in jax.tree.leaves(tuple(leaf.sharding.spec)) if a}
    report["wrong_specs"] = wrong[:10]
    report["axes_used"] = sorted(axes_used)
    report["axes_used_by_adam_moments"] = sorted(axes_used_mu)
    print("REPORT " + json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "dit")
