"""The method interface the one training loop asks for, and the method registry.

A method is a small object defined in the same file as its networks:

* ``create_model(rngs) -> nnx.Module``: the network (every ``nnx.Param``
  carries logical axis names);
* ``loss(model, batch, rng) -> (loss, metrics)``: the objective, for
  one-optimizer methods; ``batch`` is a dict of global arrays (``image``
  (B, H, W, C) in [-1, 1] or ``latent``, ``label`` (B,) int32);
* ``sample(model, rng, labels, **sampler) -> x`` (generators): images in
  [-1, 1], (B, H, W, C), for pixel configs; for a latent or discrete generator
  (``config.tokenizer.kind`` set) latents in the paired tokenizer's space,
  already times ``config.tokenizer.scale``, or int codes: the pairing
  (trainers/decode.py) decodes them, a generator never does;
* tokenizers (``kind = "tokenizer"``): ``encode(model, images) -> latents``
  (what a latent cache stores: Gaussian posterior moments (B, h, w, 2C),
  latents, or int codes, as the attribute ``latent_type`` = "moments" |
  "latents" | "codes" says) and ``decode(model, latents) -> images`` in
  [-1, 1] from generator-space latents (native latents times
  ``config.model.scale_factor`` where the tokenizer has that field); any zoo
  tokenizer workdir with these serves as ``config.tokenizer.workdir``;
* optionally ``train_step(state, batch, rng)`` for methods with several
  optimizers, and ``validate_config(config)`` for method-specific checks that
  must fail before compilation.

The loop never imports a method directly: it looks the name up in ``METHODS``.
"""

from __future__ import annotations

import abc
import importlib
from typing import Any

import jax
from flax import nnx

from models import layers

# config.model.name -> "module:Class". Lazy, so that a run imports only its method.
METHODS: dict[str, str] = {
    "dit": "models.dit:DiTMethod",
    "lit": "models.lit:LiTMethod",
    "dydi_lit": "models.lit:LiTMethod",
    "meanflow": "models.meanflow:MeanFlow", "splitmeanflow": "models.splitmeanflow:SplitMeanFlow",
    "xar": "models.xar:XAR",
    "llamagen_gpt": "models.llamagen:LlamaGenGPT",
    "tokenbridge": "models.tokenbridge:TokenBridge",
    "kl_vae": "tokenizers.kl_vae:KLVAEMethod",
    "retok": "tokenizers.retok:ReTokMethod",
    "one_d_piece": "tokenizers.one_d_piece:OneDPieceMethod", "maskgit_vqgan": "tokenizers.maskgit_vqgan:MaskGITVQGANMethod",
    "maskgit": "models.maskgit:MaskGIT",
    "textok": "tokenizers.textok:TexTokMethod", "textok_dit": "tokenizers.textok:TexTokDiT",
    "tokenflow": "tokenizers.tokenflow:TokenFlowMethod", "next_scale": "models.next_scale:NextScale",
}


def get_method(config) -> "Method":
    name = config.model.name
    if name not in METHODS:
        raise ValueError(f"config.model.name={name!r} is not a registered method; known: {sorted(METHODS)}")
    module_name, class_name = METHODS[name].split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(config)


def check_data_shape(config) -> None:
    """A class-conditional generator's model fields against its data: on pixels, the model's
    input size and channels must be the images'; the class count always the data's."""
    m, d = config.model, config.data
    if not d.latents and (m.input_size != d.image_size or m.in_channels != d.channels):
        raise ValueError(f"config.model.input_size={m.input_size}/in_channels={m.in_channels} must match "
                         f"config.data.image_size={d.image_size}/channels={d.channels} when training on pixels")
    if m.num_classes != d.num_classes:
        raise ValueError(f"config.model.num_classes={m.num_classes} != config.data.num_classes={d.num_classes}")


class Method(abc.ABC):
    """Base class: holds the config; subclasses define the network, loss and sampler."""

    #: "generator" methods are sampled by trainers.sample; "tokenizer" ones reconstruct.
    kind = "generator"

    def __init__(self, config):
        self.config = config

    def validate_config(self, config) -> None:
        """Raise ValueError naming the field for a method-specific config mistake."""

    def data_source(self, source):
        """The training record source this method reads (``source[i] -> record dict``): the data
        pipeline's records by default; a method that needs more per record (TexTok's caption
        embeddings) joins it here, so the data module never imports method-specific code."""
        return source

    @abc.abstractmethod
    def create_model(self, rngs: nnx.Rngs) -> nnx.Module:
        """The network, with logical axis names on every parameter."""

    @abc.abstractmethod
    def loss(self, model: nnx.Module, batch: dict[str, jax.Array], rng: jax.Array):
        """(scalar loss, dict of scalar metrics) for one global batch."""

    def sample(self, model: nnx.Module, rng: jax.Array, labels: jax.Array, **sampler: Any) -> jax.Array:
        raise TypeError(f"{type(self).__name__} is a {self.kind}; it has no class-conditional sampler")


class ModelDef:
    """Splits an nnx model into a static graph and pure-dict params / non-param state.

    The train state holds plain nested dicts (what optax, orbax and the
    checkpoint converters see); ``merge`` rebuilds the module inside a trace.
    """

    def __init__(self, method: Method):
        abstract = layers.abstract_module(method.create_model)
        self.graphdef, self.abstract_params, self.abstract_rest = nnx.split(abstract, nnx.Param, ...)
        self._method = method

    def init(self, rng: jax.Array):
        """(params, rest) as pure dicts; jit this with out_shardings to init sharded."""
        model = self._method.create_model(nnx.Rngs(rng))
        _, params, rest = nnx.split(model, nnx.Param, ...)
        return nnx.to_pure_dict(params), nnx.to_pure_dict(rest)

    def merge(self, params, rest=None) -> nnx.Module:
        p = jax.tree.map(lambda v: v, self.abstract_params, is_leaf=lambda v: isinstance(v, nnx.Variable))
        nnx.replace_by_pure_dict(p, params)
        r = jax.tree.map(lambda v: v, self.abstract_rest, is_leaf=lambda v: isinstance(v, nnx.Variable))
        if rest is not None:
            nnx.replace_by_pure_dict(r, rest)
        return nnx.merge(self.graphdef, p, r)

    def param_shardings(self, mesh):
        from trainers import sharding

        return nnx.to_pure_dict(sharding.state_shardings(self.abstract_params, mesh))

    def rest_shardings(self, mesh):
        from trainers import sharding

        return nnx.to_pure_dict(sharding.state_shardings(self.abstract_rest, mesh))

    def param_names(self):
        """Logical axis names per parameter, as a pure dict."""
        from trainers import sharding

        return nnx.to_pure_dict(sharding.logical_specs(self.abstract_params))
