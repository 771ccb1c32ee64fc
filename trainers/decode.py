"""Tokenizer pairing: the frozen tokenizer that maps a generator's space to pixels.

Contract (what a latent or discrete generator, and a zoo tokenizer, need to know)
-------------------------------------------------------------------------------

* A generator config names its tokenizer in ``config.tokenizer`` (configs/common.py):

  ``kind``     ``""``: pixel space, ``sample`` returns images and nothing is decoded;
               ``"kl16"``: MAR's KL-16 VAE from its published ``kl16.ckpt``;
               ``"sd_vae"``: Stable Diffusion's VAE from its published ``.ckpt``/``.safetensors``;
               ``"workdir"``: any zoo tokenizer (a ``trainers.main`` run or a ``trainers.convert
               import`` of a tokenizer: its ``config.json`` names a method with ``kind ==
               "tokenizer"``).
  ``weights``  the published file (kinds ``kl16``, ``sd_vae``; see ``PUBLISHED`` for where).
  ``workdir``  the zoo tokenizer's workdir (kind ``workdir``); its newest checkpoint, EMA params
               where the tokenizer's own ``config.sample.use_ema`` says so, unless ``use_ema`` is
               False (raw params).
  ``scale``    generator space = tokenizer latent x ``scale`` (MAR KL-16: 0.2325; SD-VAE:
               0.18215); the latent cache reader (trainers/latents.py) multiplies by it, the
               pairing divides by it. 1.0 for discrete codes.
  ``model``    the tokenizer network's ``config.model`` for the published kinds (defaults: the
               published architecture, configs/kl_vae_f16.py / configs/sd_vae.py); ignored for
               ``workdir`` (the workdir's config.json describes the network).

* A generator's ``sample(model, rng, labels) -> x`` returns, for a latent config, latents of the
  tokenizer's space as the generator is trained on them ((B, h, w, C) float, already times
  ``scale``), or discrete codes ((B, ...) int32) for a discrete generator. It never decodes.
* :class:`Decoder` (``decoder(x) -> images`` (B, H, W, C) in [-1, 1], jitted, sharded over the
  batch) turns them into pixels; ``trainers.sample``, the loop's grids and its FID/IS evaluation
  all call it through :func:`build_decoder` (``None`` for pixel configs).
* A zoo tokenizer (``Method.kind == "tokenizer"``, trainers/method.py) provides
  ``encode(model, images) -> latents`` (what a latent cache stores: for a KL-VAE the posterior
  moments (B, h, w, 2C); a deterministic tokenizer its latents; a VQ tokenizer int codes) and
  ``decode(model, latents) -> images`` in [-1, 1] taking *generator-space* latents (native
  latents x the tokenizer's ``config.model.scale_factor``; the pairing sets that field from
  ``config.tokenizer.scale`` when the tokenizer's model config has one, and otherwise divides by
  ``config.tokenizer.scale`` itself before calling ``decode``), and the attribute ``latent_type``:
  ``"moments"`` (Gaussian posterior moments, sampled per step by the cache reader), ``"latents"``
  or ``"codes"`` (stored as they are).

Missing weights fail in :func:`validate` (called by trainers/config_validation.py before
anything compiles), naming the file and where it is published.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from trainers import sharding

KINDS = ("", "kl16", "sd_vae", "workdir")

# kind -> where the published file comes from (named in every missing-file error).
PUBLISHED = {
    "kl16": "MAR's KL-16 VAE kl16.ckpt: https://www.dropbox.com/scl/fi/hhmuvaiacrarfg28qxhwz/kl16.ckpt "
            "(linked from https://github.com/LTH14/mar)",
    "sd_vae": "Stable Diffusion VAE ft-EMA/ft-MSE: https://huggingface.co/stabilityai/sd-vae-ft-ema "
              "(diffusion_pytorch_model.safetensors) or https://huggingface.co/stabilityai/sd-vae-ft-mse",
}


# ----------------------------------------------------------------------------- config


def published_model(kind: str) -> ml_collections.ConfigDict:
    """The published tokenizer's network config (``config.model`` without the training loss)."""
    if kind == "kl16":
        from configs import kl_vae_f16 as module
    elif kind == "sd_vae":
        from configs import sd_vae as module
    else:
        raise ValueError(f"no published network for tokenizer kind {kind!r}")
    model = module.get_config().model
    with model.unlocked():
        del model["loss"]
    return model


def is_latent(config) -> bool:
    """True when the generator's space is a tokenizer's (``config.tokenizer.kind`` set)."""
    return bool(config.get("tokenizer") and config.tokenizer.kind)


def validate(config) -> None:
    """Raise ValueError naming the field (and, for a missing file, where it is published).

    Cheap: reads a workdir's config.json, never compiles or loads weights.
    """
    if "latent_scale" in config.data:
        raise ValueError("config.data.latent_scale is gone: the latent scale is config.tokenizer.scale")
    t = config.get("tokenizer")
    if t is None or not t.kind:
        if config.data.get("latents"):
            raise ValueError(f"config.data.latents={config.data.latents!r} but config.tokenizer.kind is empty: name "
                             "the tokenizer whose latents these are (kl16 | sd_vae + weights, or workdir), so that "
                             "samples can be decoded to images")
        return
    if t.kind not in KINDS:
        raise ValueError(f"config.tokenizer.kind={t.kind!r}: one of {KINDS}")
    if not float(t.scale) > 0:
        raise ValueError(f"config.tokenizer.scale={t.scale} must be positive")
    if t.kind in PUBLISHED:
        if not t.weights:
            raise ValueError(f"config.tokenizer.weights is empty: set it to the local copy of {PUBLISHED[t.kind]} "
                             "(--config.tokenizer.weights=FILE; trainers.sample on a workdir: "
                             "--set tokenizer.weights=FILE)")
        if not os.path.isfile(t.weights):
            raise ValueError(f"config.tokenizer.weights={t.weights!r}: file not found; it is "
                             f"{PUBLISHED[t.kind]}")
        return
    tok = tokenizer_config(config)  # kind "workdir": config.json must exist and name a tokenizer
    from trainers import checkpoint
    from trainers.method import get_method

    method = get_method(tok)
    if method.kind != "tokenizer" or not hasattr(method, "decode"):
        raise ValueError(f"config.tokenizer.workdir={t.workdir!r} holds a {tok.model.name!r} run "
                         f"(kind {method.kind!r}), not a tokenizer with encode/decode")
    if getattr(method, "latent_type", "latents") == "codes" and float(t.scale) != 1.0:
        raise ValueError(f"config.tokenizer.scale={t.scale}: the tokenizer in {t.workdir!r} makes discrete codes, "
                         "which are never scaled; use 1.0")
    if not checkpoint.checkpoint_dir(t.workdir).is_dir() or not any(
            p.name.isdigit() for p in checkpoint.checkpoint_dir(t.workdir).iterdir()):
        raise ValueError(f"config.tokenizer.workdir={t.workdir!r} has no checkpoint under "
                         f"{checkpoint.checkpoint_dir(t.workdir)}: train the tokenizer there first")


def tokenizer_config(config) -> ml_collections.ConfigDict:
    """The tokenizer's own run config (model + data), its scale set from ``config.tokenizer.scale``."""
    t = config.tokenizer
    if t.kind == "workdir":
        if not t.workdir:
            raise ValueError("config.tokenizer.workdir is empty: name the zoo tokenizer's workdir")
        from trainers import checkpoint

        try:
            tok = checkpoint.read_config(t.workdir)
        except FileNotFoundError as e:
            raise ValueError(f"config.tokenizer.workdir={t.workdir!r}: {e}") from None
    elif t.kind in PUBLISHED:
        from configs import common

        tok = common.base()
        tok.model = ml_collections.ConfigDict(t.model.to_dict()) if t.get("model") else published_model(t.kind)
        tok.data = ml_collections.ConfigDict(config.data.to_dict())
    else:
        raise ValueError(f"config.tokenizer.kind={t.kind!r} names no tokenizer")
    with tok.unlocked():
        if "scale_factor" in tok.model:
            tok.model.scale_factor = float(t.scale)
        if "name" not in tok.model:
            tok.model.name = "kl_vae"
    return tok


# ----------------------------------------------------------------------------- loading


def restore_params(workdir: str | Path, model_def, mesh, *, use_ema: bool = True):
    """(step, params, rest) of ``workdir``'s newest readable checkpoint, sharded on ``mesh``.

    Reads only the params (EMA or raw) and the non-trainable state of the train state
    (every method's state has ``step``, ``params``, ``ema_params``, ``rest``), so the
    optimizer state and a tokenizer's discriminator are never loaded.
    """
    import orbax.checkpoint as ocp

    from trainers import checkpoint

    key = "ema_params" if use_ema else "params"
    shardings = {key: model_def.param_shardings(mesh), "rest": model_def.rest_shardings(mesh),
                 "step": sharding.replicated(mesh)}
    abstract = {key: nnx_pure(model_def.abstract_params), "rest": nnx_pure(model_def.abstract_rest),
                "step": jax.ShapeDtypeStruct((), jnp.int32)}
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), abstract)
    root = checkpoint.checkpoint_dir(workdir)
    steps = sorted((int(p.name) for p in root.iterdir() if p.name.isdigit()), reverse=True) if root.is_dir() else []
    errors = []
    for step in steps:
        path = root / str(step) / checkpoint.STATE
        if not path.exists():
            continue
        try:
            # Eager even when called while a train state is being traced (a stage's init_from read
            # inside the loop's jitted init): orbax's device_put would otherwise yield tracers.
            with jax.ensure_compile_time_eval():
                state = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
                    abstract, restore_args=restore_args, partial_restore=True))
        except Exception as e:  # noqa: BLE001 - an unreadable (partial) step falls back to an older one
            errors.append(f"step {step}: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
            continue
        return int(state["step"]), state[key], state["rest"]
    raise FileNotFoundError(f"no readable checkpoint in {root}" + (f" ({'; '.join(errors)})" if errors else ""))


def nnx_pure(abstract_state):
    """An abstract nnx.State -> a pure dict of ShapeDtypeStructs."""
    from flax import nnx

    return jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), nnx.to_pure_dict(abstract_state))


def load_tokenizer(config, mesh):
    """(method, model_def, params, rest) of ``config.tokenizer``, params on ``mesh`` (replicated by the
    tokenizer's own sharding rules)."""
    from trainers.method import ModelDef, get_method

    validate(config)
    t = config.tokenizer
    tok = tokenizer_config(config)
    method = get_method(tok)
    model_def = ModelDef(method)
    if t.kind == "workdir":
        # EMA params only where the tokenizer itself reconstructs with them (its config.sample.use_ema):
        # e.g. the demo KL-VAE, like LDM's autoencoders, uses its raw params.
        use_ema = bool(t.get("use_ema", True)) and bool(tok.sample.get("use_ema", True))
        _, params, rest = restore_params(t.workdir, model_def, mesh, use_ema=use_ema)
        return method, model_def, params, rest
    from tokenizers import kl_vae

    params = kl_vae.IMPORTERS[t.kind](kl_vae.load_state_dict(t.weights), tok)
    params = jax.device_put(jax.tree.map(jnp.asarray, params), model_def.param_shardings(mesh))
    _, rest = jax.eval_shape(model_def.init, jax.random.PRNGKey(0))
    rest = jax.device_put(jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), rest), model_def.rest_shardings(mesh))
    return method, model_def, params, rest


# ----------------------------------------------------------------------------- decoding


class Decoder:
    """``decoder(x, labels=None) -> images`` (B, H, W, C) in [-1, 1]: the paired tokenizer's decode,
    jitted and sharded over the batch (B must be a multiple of the data-parallel size). A tokenizer
    whose ``decode`` takes ``labels`` (TexTok: a caption drawn from the class's pool) gets the
    sampled labels."""

    def __init__(self, config, mesh, tokenizer=None):
        self.mesh = mesh
        self.method, self.model_def, self.params, self.rest = tokenizer or load_tokenizer(config, mesh)
        tok_model = self.method.config.model
        # Tokenizers with a scale_factor divide by it themselves (tokenizer_config set it).
        divide = 1.0 if "scale_factor" in tok_model else float(config.tokenizer.scale)
        method, model_def = self.method, self.model_def
        self.takes_labels = "labels" in inspect.signature(method.decode).parameters

        def decode(params, rest, x, labels):
            with sharding.use_mesh(mesh):
                if divide != 1.0:
                    x = x / divide
                extra = {"labels": labels} if labels is not None else {}
                images = method.decode(model_def.merge(params, rest), x, **extra)
                return jax.lax.with_sharding_constraint(images, sharding.batch_sharding(mesh, images.ndim))

        self._decode = jax.jit(decode)

    def __call__(self, x, labels=None) -> jax.Array:
        x = jax.device_put(x, sharding.batch_sharding(self.mesh, np.ndim(x))) if not isinstance(
            x, jax.Array) or len(x.sharding.device_set) != self.mesh.size else x
        if labels is not None and self.takes_labels:
            labels = jax.device_put(jnp.asarray(labels, jnp.int32), sharding.batch_sharding(self.mesh, 1))
        else:
            labels = None
        return self._decode(self.params, self.rest, x, labels)


def build_decoder(config, mesh) -> Decoder | None:
    """The config's :class:`Decoder`, or None for pixel-space configs (samples are images)."""
    return Decoder(config, mesh) if is_latent(config) else None


def describe(config) -> dict[str, Any]:
    """What a run's tokenizer is, for logs and cache metadata."""
    t = config.tokenizer
    return {"kind": t.kind, "weights": t.weights, "workdir": t.workdir, "scale": float(t.scale)}
