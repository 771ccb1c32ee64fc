"""The one training loop. Every method in the zoo trains here; nothing in it knows which.

Read top to bottom, as one batch travels: config -> mesh -> data -> method and
model (shapes first, then a sharded jitted init) -> optimizer -> checkpoint
restore -> the loop (jitted, donated train step; metrics, progress, samples,
checkpoints, preemption) -> final samples and evaluation.
"""

from __future__ import annotations

import hashlib
import json
import signal
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import NamedSharding

from trainers import checkpoint, decode, sharding
from trainers.method import ModelDef, get_method
from trainers.optim import make_optimizer
from trainers.sample import (Sampler, fetch_global, generate, grid_labels, images_to_uint8, make_grid,  # noqa: F401
                             sample_batch_size, sample_images, save_png)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stops without saving the bad state."""


# ============================================================================ train state
# A plain dict of arrays (what orbax saves and optax updates):
#   step              number of completed optimizer steps
#   params, ema_params  pure dicts of the method's nnx.Params
#   opt_state         optax state
#   rng               base key; step k uses fold_in(rng, k)
#   rest              non-trainable model state (pure dict)
#   nonfinite_step    first step whose loss was not finite (-1 if none), checked on the host lazily


def _init_fn(model_def: ModelDef, tx, seed_rng):
    def init(rng):
        rng_init, rng_train = jax.random.split(rng)
        params, rest = model_def.init(rng_init)
        return {"step": jnp.zeros((), jnp.int32), "params": params,
                "ema_params": jax.tree.map(jnp.copy, params), "opt_state": tx.init(params),
                "rng": rng_train, "rest": rest, "nonfinite_step": jnp.full((), -1, jnp.int32)}
    return init


def _suffix_sharding(path, by_param_path, default):
    keys = tuple(_key_str(k) for k in path)
    for start in range(len(keys)):
        if keys[start:] in by_param_path:
            return by_param_path[keys[start:]]
    return default


def _key_str(k):
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def opt_state_shardings(abstract_opt, param_shardings, default):
    """Shardings of an optimizer state: each moment leaf takes the sharding of the parameter whose
    path ends its own path (optax nests the params tree below its state tuples); scalars
    (counts) and unmatched leaves get ``default``."""
    by_path = {tuple(_key_str(k) for k in path): s
               for path, s in jax.tree_util.tree_leaves_with_path(param_shardings)}
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: _suffix_sharding(path, by_path, default) if np.ndim(leaf) else default, abstract_opt)


def state_shardings(abstract_state, model_def: ModelDef, mesh):
    """Shardings of the whole train state: params (and EMA, and the optimizer moments, matched by
    parameter path) as the logical-axis rules say; scalars replicated."""
    param_sh = model_def.param_shardings(mesh)
    rest_sh = model_def.rest_shardings(mesh)
    repl = sharding.replicated(mesh)
    opt_sh = opt_state_shardings(abstract_state["opt_state"], param_sh, repl)
    return {"step": repl, "params": param_sh, "ema_params": param_sh, "opt_state": opt_sh, "rng": repl,
            "rest": rest_sh, "nonfinite_step": repl}


def state_from_params(config, params, rest=None):
    """A step-0 train state around given (e.g. converted) params, and optionally the non-trainable
    ``rest`` (e.g. a frozen teacher); used by checkpoint import."""
    method = get_method(config)
    plan = TrainPlan(method, ModelDef(method), config)
    state = plan.init(jax.random.PRNGKey(config.seed))
    params = jax.tree.map(lambda ref, p: jnp.asarray(p, ref.dtype), state["params"], params)
    if rest is not None:
        state = {**state, "rest": jax.tree.map(lambda ref, r: jnp.asarray(r, ref.dtype), state["rest"], rest)}
    return {**state, "params": params, "ema_params": jax.tree.map(jnp.copy, params),
            "opt_state": plan.tx.init(params)}


def make_train_step(method, model_def: ModelDef, tx, schedule, ema_rate: float):
    def train_step(state, batch):
        rng = jax.random.fold_in(state["rng"], state["step"])

        def loss_fn(params):
            model = model_def.merge(params, state["rest"])
            return method.loss(model, batch, rng)

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        ema = jax.tree.map(lambda e, p: ema_rate * e + (1.0 - ema_rate) * p, state["ema_params"], params)
        step = state["step"] + 1
        nonfinite = jnp.where((state["nonfinite_step"] < 0) & ~jnp.isfinite(loss), step, state["nonfinite_step"])
        metrics = {**metrics, "grad_norm": optax.global_norm(grads), "lr": schedule(state["step"])}
        new_state = {**state, "step": step, "params": params, "ema_params": ema, "opt_state": opt_state,
                     "nonfinite_step": nonfinite}
        return new_state, metrics

    return train_step


LOOP_KEYS = ("rng", "nonfinite_step")


class TrainPlan:
    """How the loop trains one method: ``init(rng) -> state``, ``shardings(abstract, mesh)``,
    ``step(state, batch) -> (state, metrics)``.

    One-optimizer methods give ``loss`` and the loop owns the optimizer and EMA;
    methods with several optimizers (tokenizers with a discriminator) give
    ``init_train_state``/``train_state_shardings``/``train_step`` and the loop adds
    only its own keys (``rng``, ``nonfinite_step``) around their state.
    """

    def __init__(self, method, model_def: ModelDef, config):
        self.method, self.model_def, self.config = method, model_def, config
        self.tx, self.schedule = make_optimizer(config)
        self.custom = hasattr(method, "train_step")

    def init(self, rng):
        if not self.custom:
            return _init_fn(self.model_def, self.tx, None)(rng)
        rng_init, rng_train = jax.random.split(rng)
        return {**self.method.init_train_state(rng_init), "rng": rng_train,
                "nonfinite_step": jnp.full((), -1, jnp.int32)}

    def shardings(self, abstract, mesh):
        if not self.custom:
            return state_shardings(abstract, self.model_def, mesh)
        inner = {k: v for k, v in abstract.items() if k not in LOOP_KEYS}
        repl = sharding.replicated(mesh)
        return {**self.method.train_state_shardings(inner, mesh), "rng": repl, "nonfinite_step": repl}

    def step(self, state, batch):
        if not self.custom:
            return make_train_step(self.method, self.model_def, self.tx, self.schedule,
                                   self.config.ema_rate)(state, batch)
        rng = jax.random.fold_in(state["rng"], state["step"])
        inner = {k: v for k, v in state.items() if k not in LOOP_KEYS}
        new_inner, metrics = self.method.train_step(inner, batch, rng)
        loss = metrics["loss"]
        nonfinite = jnp.where((state["nonfinite_step"] < 0) & ~jnp.isfinite(loss), new_inner["step"],
                              state["nonfinite_step"])
        return {**new_inner, "rng": state["rng"], "nonfinite_step": nonfinite}, metrics


# ============================================================================ helpers
def to_global(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """Per-process numpy batch -> global jax.Arrays sharded over (data, fsdp) on the batch dim."""
    return {k: jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, np.ndim(v)), np.asarray(v))
            for k, v in batch.items()}


class Reconstructor:
    """Jitted tokenizer round trip (encode, decode) from the (EMA) params, sharded over the batch."""

    def __init__(self, method, model_def: ModelDef, mesh):
        def reconstruct(params, rest, images):
            with sharding.use_mesh(mesh):
                return method.reconstruct(model_def.merge(params, rest), images)

        self._reconstruct = jax.jit(reconstruct, out_shardings=sharding.batch_sharding(mesh, 4))

    def __call__(self, params, rest, images) -> jax.Array:
        return self._reconstruct(params, rest, images)


# ============================================================================ preemption
class PreemptionWatcher:
    """SIGTERM sets a flag; the loop saves at the next step and exits cleanly.

    With several processes every one must stop at the same step, so the flag is agreed on by a
    collective, only every ``check_every`` steps (config.preemption_check_every) to keep it off
    the step's critical path; a single process checks every step for free.
    """

    def __init__(self, check_every: int = 1):
        self.requested = False
        self.check_every = max(1, int(check_every))
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint at the next step, then exiting")
        self.requested = True

    def should_stop(self, step: int = 0) -> bool:
        flag = self.requested
        if jax.process_count() > 1:  # every process must stop at the same step
            if step % self.check_every:
                return False
            from jax.experimental import multihost_utils

            flag = bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))
        return flag

    def restore(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


# ============================================================================ the loop
def train_and_evaluate(config, workdir: str, *, devices=None) -> dict:
    """Train ``config`` in ``workdir`` (resuming from its newest checkpoint); returns the final state.

    Before step 1: the workdir is locked (one trainer per workdir), it and its checkpoint directory
    are checked writable, and every file the run reads later (Inception weights, references) is
    checked (config_validation.check_run_files)."""
    from trainers import config_validation, workdir_lock

    workdir = str(Path(workdir).absolute())
    Path(workdir).mkdir(parents=True, exist_ok=True)
    lock = workdir_lock.WorkdirLock(workdir).acquire()
    try:
        config_validation.check_run_files(config)
        checkpoint.check_writable(workdir)
        return _train(config, workdir, devices)
    finally:
        lock.release()


def _train(config, workdir: str, devices) -> dict:
    from clu import metric_writers, periodic_actions

    from trainers import data

    # ---- data (first: a dataset with no usable images fails before any model is set up)
    method = get_method(config)
    data_iter = data.create_iterator(config, seed=config.seed, global_batch_size=config.batch_size,
                                     source_transform=method.data_source)

    # ---- mesh
    mesh = sharding.make_mesh(config.mesh, devices)
    logging.info("mesh %s on %d processes", dict(mesh.shape), jax.process_count())

    # ---- model shapes, optimizer
    model_def = ModelDef(method)
    plan = TrainPlan(method, model_def, config)
    init = plan.init
    seed_key = jax.random.PRNGKey(config.seed)
    abstract_state = jax.eval_shape(init, seed_key)
    shardings = plan.shardings(abstract_state, mesh)
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_state["params"]))
    logging.info("%s: %.2fM parameters", config.model.name, num_params / 1e6)

    def report_skipped(prefix=""):
        if hasattr(data_iter, "skip_counts"):
            counts = data_iter.skip_counts()
            if sum(counts.values()):
                msg = f"{prefix}skipped {sum(counts.values())} corrupt or unusable images ({counts})"
                logging.warning(msg)
                print(msg, flush=True)
            return sum(counts.values())
        return 0

    # ---- restore or init (sharded: init is jitted with out_shardings)
    manager = checkpoint.make_manager(workdir, keep_last=config.keep_last, keep_every=config.keep_every)
    abstract_sharded = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                    abstract_state, shardings)
    # A checkpoint of another model or optimizer is an error (nothing moved); damage falls back.
    start_step, state = checkpoint.restore_latest(manager, abstract_sharded, data_iter, config=config)
    checkpoint.log_config_changes(workdir, config)
    checkpoint.write_config(workdir, config)
    if state is None:
        with sharding.use_mesh(mesh):
            state = jax.jit(init, out_shardings=shardings)(seed_key)
        start_step = 0
        logging.info("initialised from scratch")
    else:
        logging.info("resumed from step %d", start_step)
        print(f"resumed from checkpoint at step {start_step}", flush=True)

    # ---- compiled functions
    batch_sh = None  # batches arrive already sharded

    def step_fn(state, batch):
        with sharding.use_mesh(mesh):
            return plan.step(state, batch)

    p_train_step = jax.jit(step_fn, in_shardings=(shardings, batch_sh),
                           out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,))

    # ---- writers, progress, preemption
    is_main = jax.process_index() == 0
    writer = metric_writers.create_default_writer(workdir, just_logging=not is_main, asynchronous=True)
    hooks = [periodic_actions.ReportProgress(num_train_steps=config.num_steps, writer=writer,
                                             every_steps=config.log_every)]
    if config.profile and is_main:
        hooks.append(periodic_actions.Profile(logdir=workdir, num_profile_steps=5, first_profile=start_step + 10))
    watcher = PreemptionWatcher(config.get("preemption_check_every", 1))
    metrics_log = Path(workdir) / "metrics.jsonl"
    digest_log = Path(workdir) / f"batch_digests.p{jax.process_index()}.jsonl" if config.get(
        "log_batch_digest", False) else None
    sampler = Sampler(method, model_def, mesh) if method.kind == "generator" else None
    # A latent generator's samples are decoded by its paired tokenizer (trainers/decode.py), loaded once.
    decoder = decode.build_decoder(config, mesh) if sampler is not None else None

    def check_finite(state):
        bad = int(jax.device_get(state["nonfinite_step"]))
        if bad >= 0:
            raise NonFiniteLossError(
                f"non-finite loss at step {bad}; stopping without saving. The newest checkpoint "
                f"(step {manager.latest_step()}) in {checkpoint.checkpoint_dir(workdir)} precedes it; its "
                "checksums are verified when a rerun restores it.")

    reconstructor = Reconstructor(method, model_def, mesh) if hasattr(method, "reconstruct") else None
    grid_batch: dict = {}  # tokenizers: the first batch, reconstructed at every grid

    def write_grid(step):
        n = config.num_grid_samples
        if n == 0 or (sampler is None and (reconstructor is None or not grid_batch)):
            return
        params = state["ema_params"] if config.sample.use_ema else state["params"]
        if sampler is not None:
            labels = grid_labels(sample_batch_size(n, mesh), config.data.num_classes)
            x, _ = sample_images(sampler, decoder, params, state["rest"], jax.random.PRNGKey(config.seed), labels)
            images = images_to_uint8(fetch_global(x))[:n]
        else:  # originals and their reconstructions, interleaved
            originals = grid_batch["image"]
            recon = images_to_uint8(fetch_global(reconstructor(params, state["rest"], originals)))
            originals = images_to_uint8(fetch_global(originals))
            k = min(n, len(originals))
            images = np.stack([originals[:k], recon[:k]], axis=1).reshape(2 * k, *recon.shape[1:])
        if images.shape[-1] in (1, 3) and is_main:
            # Class-conditional grids: one column per class (when there are few classes).
            grid = make_grid(images, columns=config.data.num_classes if sampler is not None
                             and config.data.num_classes <= 16 else None)
            save_png(Path(workdir) / "samples" / f"step_{step:08d}.png", grid)
            writer.write_images(step, {"samples": grid[None]})

    report_skipped()

    # ---- the loop
    pending: list[dict] = []
    step = start_step
    t_log = time.time()
    try:
        for step in range(start_step + 1, config.num_steps + 1):
            local_batch = next(data_iter)
            if digest_log is not None:
                with digest_log.open("a") as f:
                    f.write(json.dumps({"step": step, "sha1": _digest(local_batch)}) + "\n")
            global_batch = to_global(local_batch, mesh)
            if reconstructor is not None and not grid_batch and "image" in global_batch:
                grid_batch["image"] = jnp.copy(global_batch["image"])
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                state, metrics = p_train_step(state, global_batch)
            manager.poll()  # a failed background save raises here, with its cause
            pending.append(metrics)
            for hook in hooks:
                hook(step)

            if step % config.log_every == 0 or step == config.num_steps:
                check_finite(state)
                fetched = jax.device_get(pending)
                summary = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[-1]}
                elapsed = time.time() - t_log
                summary["examples_per_sec"] = len(fetched) * config.batch_size / max(elapsed, 1e-9)
                if hasattr(data_iter, "skipped_images"):
                    summary["data/skipped_images"] = float(data_iter.skipped_images)
                writer.write_scalars(step, summary)
                if is_main:
                    with metrics_log.open("a") as f:
                        f.write(json.dumps({"step": step, **summary,
                                            "per_step_loss": [float(m["loss"]) for m in fetched]}) + "\n")
                pending.clear()
                t_log = time.time()

            if watcher.should_stop(step):
                check_finite(state)
                checkpoint.save(manager, step, state, data_iter)
                manager.wait_until_finished()
                print(f"preempted: saved checkpoint at step {step}; exiting", flush=True)
                return state

            if step % config.checkpoint_every == 0 or step == config.num_steps:
                check_finite(state)
                checkpoint.save(manager, step, state, data_iter)

            if config.sample_every and step % config.sample_every == 0:
                write_grid(step)
            if config.eval.every and step % config.eval.every == 0 and step != config.num_steps:
                evaluate(config, workdir, method, model_def, mesh, state, writer, sampler, reconstructor, decoder)
        manager.wait_until_finished()
        report_skipped("data: ")
        if step > start_step:
            write_grid(step)
        if step > start_step or not _has_final_scores(config, workdir, step):
            evaluate(config, workdir, method, model_def, mesh, state, writer, sampler, reconstructor, decoder)
    finally:
        if not manager.failed:  # (a failed save was raised already; waiting again would mask it)
            manager.wait_until_finished()
        writer.flush()
        watcher.restore()
    return state


def _has_final_scores(config, workdir: str, step: int) -> bool:
    """Whether scores.jsonl holds the final evaluation (a finished run rerun without it evaluates)."""
    if not int(config.eval.num_samples):
        return True
    path = Path(workdir) / "scores.jsonl"
    if not path.exists():
        return False
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step") == step:
                return True
        except ValueError:
            continue
    return False


def _digest(batch: dict[str, np.ndarray]) -> str:
    h = hashlib.sha1()
    for k in sorted(batch):
        h.update(np.ascontiguousarray(batch[k]).tobytes())
    return h.hexdigest()


def dataset_images(config, num: int, *, seed: int) -> np.ndarray:
    """``num`` uint8 training images (a fresh iterator, no flips) as the evaluation reference."""
    from trainers import data

    c = config.copy_and_resolve_references()
    with c.unlocked():
        c.data.random_flip = False
        c.data.latents = ""
    it = data.create_iterator(c, seed=seed, global_batch_size=c.batch_size)
    out, have = [], 0
    while have < num:
        batch = next(it)["image"]
        if jax.process_count() > 1:  # every process evaluates the same (global) images
            from jax.experimental import multihost_utils

            batch = multihost_utils.process_allgather(batch, tiled=True)
        out.append(images_to_uint8(batch))
        have += len(batch)
    return np.concatenate(out)[:num]


def evaluate(config, workdir, method, model_def, mesh, state, writer, sampler, reconstructor=None, decoder=None):
    """Scores of ``config.eval.num_samples`` samples (generators) or reconstructions (tokenizers):
    FID/IS/sFID/precision/recall with Inception weights (config.eval.inception_weights) and, on the
    embedded MNIST data, the MNIST-feature FID and MNIST-classifier IS (eval/domain.py). A latent
    generator's samples are decoded by ``decoder`` (its paired tokenizer) first."""
    n = int(config.eval.num_samples)
    if not n or (sampler is None and reconstructor is None):
        return None
    from eval import harness

    reference = dataset_images(config, n, seed=config.seed + 17)
    if sampler is not None:
        params = state["ema_params"] if config.sample.use_ema else state["params"]
        images, labels, _ = generate(config, sampler, params, state["rest"], mesh, n, seed=config.seed + 1,
                                     decoder=decoder)
    else:
        params = state["ema_params"] if config.sample.use_ema else state["params"]
        chunks = []
        for i in range(0, n, config.batch_size):
            x = np.asarray(reference[i:i + config.batch_size], np.float32) / 127.5 - 1.0
            pad = config.batch_size - len(x)
            x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), np.float32)])
            x = jax.device_put(x, sharding.batch_sharding(mesh, 4))
            chunks.append(images_to_uint8(fetch_global(reconstructor(params, state["rest"], x)))[:len(x) - pad])
        images = np.concatenate(chunks)
    scores = harness.evaluate(images, ref=config.eval.ref or None,
                              inception_weights=config.eval.inception_weights or None,
                              dataset_images=reference, domain=config.data.name == "mnist_embedded",
                              labels=labels if sampler is not None else None)
    step = int(jax.device_get(state["step"]))
    writer.write_scalars(step, {f"eval/{k}": v for k, v in scores.items()})
    if jax.process_index() == 0:
        with (Path(workdir) / "scores.jsonl").open("a") as f:
            f.write(json.dumps({"step": step, "num_samples": n, **scores}) + "\n")
        print(f"scores at step {step} ({n} samples): " + ", ".join(f"{k}={v:.4g}" for k, v in scores.items()),
              flush=True)
    return scores
