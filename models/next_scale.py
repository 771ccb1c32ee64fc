"""A class-conditional next-scale generator on TokenFlow's multi-scale indices (tokenizers/tokenflow.py).

Built like upstream's t2i model (ByteFlow-AI/TokenFlow ``t2i/llava_t2i/model/llava_arch.py``,
``language_model/llava_llama.py``: a VAR-style next-scale predictor inside Llama) with a class
embedding in place of the text prompt and sizes as config:

* tokens of all scales in one sequence, coarse-to-fine, row-major per scale; the input of scale 0 is
  the class embedding (``sos``); the input of scale k > 0 is the running sum of the earlier scales'
  codes, bicubic-upsampled *progressively* scale to scale (``vision_tokenizer.py``: acc = up(acc,
  s_k) + codes_k), through the ``mlp2x_gelu`` projector (code dim -> D);
* + ``lvl_embed`` (scale id) + ``pos_1LC`` (absolute position per token);
* a block-causal mask: a token attends to every token of its own and earlier scales;
* Llama blocks (RMSNorm, SwiGLU, no biases) with QK-norm in every attention (as upstream adds);
* loss: cross-entropy of every scale's indices;
* sampling (``autoregressive_infer_cfg``): one forward per scale without a KV cache, CFG with
  t = cfg * k / (n_scales - 1) (0 at the first scale), logits = (1 + t) cond - t uncond (uncond =
  the null class here, a negative prompt upstream), top-k / top-p (LlamaGen's filter), temperature.

The code vectors: ``code_table = "tokenizer"`` (upstream) takes the paired TokenFlow workdir's
normalised dual codebook (K, 32 + 8), frozen; ``"learned"`` (a choice) learns a (K, code_dim) table.
``sample`` returns (B, sum s^2) int32 indices; the pairing (config.tokenizer.workdir) decodes them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eval.resize import torch_bicubic
from models import layers
from models.llamagen import FeedForward, ffn_hidden_dim, top_k_top_p_filtering
from trainers.method import Method

CODE_TABLES = ("tokenizer", "learned")


def scale_ids(scales) -> np.ndarray:
    """(L,) int32: the scale index of every token."""
    return np.concatenate([np.full(s * s, k, np.int32) for k, s in enumerate(scales)])


def block_causal_mask(scales) -> np.ndarray:
    """(L, L) bool: query i may attend key j iff scale(j) <= scale(i) (VAR's ``attn_bias_for_masking``)."""
    ids = scale_ids(scales)
    return ids[None, :] <= ids[:, None]


class Block(nnx.Module):
    def __init__(self, dim: int, heads: int, hidden: int, norm_eps: float, *, rngs: nnx.Rngs, dtype):
        self.attention_norm = layers.RMSNorm(dim, eps=norm_eps)
        self.attention = layers.Attention(dim, heads, qkv_bias=False, proj_bias=False, qk_norm=True, rngs=rngs,
                                          dtype=dtype)
        self.ffn_norm = layers.RMSNorm(dim, eps=norm_eps)
        self.feed_forward = FeedForward(dim, hidden, rngs=rngs, dtype=dtype, init=nnx.initializers.normal(0.02))

    def __call__(self, x, mask):
        h = x + self.attention(self.attention_norm(x), mask=mask)
        return h + self.feed_forward(self.ffn_norm(h))


class NextScaleGPT(nnx.Module):
    """(inputs (B, L, code_dim) from :meth:`teacher_inputs`, labels (B,)) -> logits (B, L, K)."""

    def __init__(self, *, scales, codebook_size: int, code_dim: int, dim: int, n_layer: int, n_head: int,
                 num_classes: int, class_dropout_prob: float = 0.1, learned_codes: bool = False, norm_eps: float = 1e-5,
                 rngs: nnx.Rngs, dtype=jnp.float32):
        self.scales = tuple(int(s) for s in scales)
        self.length = sum(s * s for s in self.scales)
        self.codebook_size, self.code_dim, self.num_classes = codebook_size, code_dim, num_classes
        init = nnx.initializers.normal(0.02)
        self.cls_embedding = layers.LabelEmbedder(num_classes, dim, class_dropout_prob, rngs=rngs)
        self.code_table = (nnx.Param(jax.random.normal(rngs.params(), (codebook_size, code_dim)) * 0.02,
                                     out_sharding=("vocab", None)) if learned_codes else None)
        # mlp2x_gelu projector
        self.projector_1 = layers.dense(code_dim, dim, (None, "embed"), rngs=rngs, dtype=dtype)
        self.projector_2 = layers.dense(dim, dim, ("embed", "mlp"), rngs=rngs, dtype=dtype)
        self.lvl_embed = nnx.Embed(len(self.scales), dim, embedding_init=nnx.with_partitioning(init, (None, "embed")),
                                   rngs=rngs)
        self.pos_1LC = nnx.Param(init(rngs.params(), (self.length, dim)), out_sharding=("position", "embed"))
        hidden = ffn_hidden_dim(dim, 256 if dim >= 256 else 32)
        self.layers = nnx.List([Block(dim, n_head, hidden, norm_eps, rngs=rngs, dtype=dtype) for _ in range(n_layer)])
        self.norm = layers.RMSNorm(dim, eps=norm_eps)
        self.output = layers.dense(dim, codebook_size, ("embed", "vocab"), use_bias=False, rngs=rngs, dtype=dtype)

    def codes(self, table, indices):
        return jnp.take(table if self.code_table is None else self.code_table[...], indices, axis=0)

    def teacher_inputs(self, table, indices):
        """(B, L) indices -> (B, L - s0^2, code_dim): the progressive-upsampled running sums fed at
        scales 1 .. n-1 (upstream ``vision_tokenizer.py``)."""
        b, at, acc, out = indices.shape[0], 0, None, []
        for k, s in enumerate(self.scales):
            code = self.codes(table, indices[:, at:at + s * s]).reshape(b, s, s, -1)
            if k > 0:
                acc = torch_bicubic(acc, (s, s))
                out.append(acc.reshape(b, s * s, -1))
                acc = acc + code
            else:
                acc = code
            at += s * s
        return jnp.concatenate(out, axis=1)

    def __call__(self, inputs, labels):
        b = labels.shape[0]
        s0 = self.scales[0] ** 2
        sos = jnp.broadcast_to(self.cls_embedding(labels)[:, None], (b, s0, self.pos_1LC.shape[-1]))
        x = self.projector_2(nnx.gelu(self.projector_1(inputs.astype(jnp.float32)), approximate=False))
        h = jnp.concatenate([sos.astype(x.dtype), x], axis=1)
        h = h + self.pos_1LC[...].astype(h.dtype) + self.lvl_embed(jnp.asarray(scale_ids(self.scales))).astype(h.dtype)
        mask = jnp.asarray(block_causal_mask(self.scales))[None, None]
        for block in self.layers:
            h = block(h, mask)
        return self.output(self.norm(h)).astype(jnp.float32)


def generate(model: NextScaleGPT, table, rng, labels, *, cfg_scale: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, temperature: float = 1.0):
    """Scale-by-scale sampling with CFG (linear in the scale index) and top-k/top-p; (B, L) int32."""
    b = labels.shape[0]
    null = jnp.full_like(labels, model.num_classes)
    both = jnp.concatenate([labels, null])
    indices = jnp.zeros((b, model.length), jnp.int32)
    n, at = len(model.scales), 0
    for k, s in enumerate(model.scales):
        inputs = (model.teacher_inputs(table, indices) if n > 1 else
                  jnp.zeros((b, 0, model.code_dim), jnp.float32))
        logits = model(jnp.concatenate([inputs, inputs]), both)[:, at:at + s * s]
        t = cfg_scale * k / (n - 1) if n > 1 else 0.0
        cond, uncond = logits[:b], logits[b:]
        logits = (1.0 + t) * cond - t * uncond
        flat = top_k_top_p_filtering(logits.reshape(b * s * s, -1) / temperature, top_k=top_k, top_p=top_p)
        rng, key = jax.random.split(rng)
        new = jax.random.categorical(key, flat).reshape(b, s * s).astype(jnp.int32)
        indices = indices.at[:, at:at + s * s].set(new)
        at += s * s
    return indices


class NextScale(Method):
    """Next-scale prediction over a TokenFlow tokenizer's cached multi-scale indices, class-conditional."""

    def __init__(self, config):
        super().__init__(config)
        self._table = None

    def validate_config(self, config) -> None:
        m = config.model
        if m.dim % m.n_head:
            raise ValueError(f"config.model.dim={m.dim} is not divisible by config.model.n_head={m.n_head}")
        if m.code_table not in CODE_TABLES:
            raise ValueError(f"config.model.code_table={m.code_table!r}: one of {CODE_TABLES}")
        if m.code_table == "tokenizer" and not config.tokenizer.workdir:
            raise ValueError("config.model.code_table='tokenizer' needs config.tokenizer.workdir (a TokenFlow workdir)")
        if not 0.0 < config.sample.top_p <= 1.0:
            raise ValueError(f"config.sample.top_p={config.sample.top_p} must be in (0, 1]")
        if config.sample.top_k < 0:
            raise ValueError(f"config.sample.top_k={config.sample.top_k} must be >= 0 (0 = off)")
        if float(config.sample.cfg_scale) > 0 and float(m.class_dropout_prob) <= 0:
            raise ValueError(f"config.sample.cfg_scale={config.sample.cfg_scale} needs a null class: "
                             "config.model.class_dropout_prob > 0")
        if list(m.scales) != sorted(set(int(s) for s in m.scales)):
            raise ValueError(f"config.model.scales={tuple(m.scales)}: strictly increasing")
        if m.code_table == "tokenizer" and config.data.get("latents"):
            table = self.table()  # reads the paired workdir's codebook now, before compilation
            if table.shape != (int(m.codebook_size), int(m.code_dim)):
                raise ValueError(f"config.model.codebook_size/code_dim=({m.codebook_size}, {m.code_dim}) differ from "
                                 f"the tokenizer's codebook {tuple(table.shape)}")

    def table(self):
        """The frozen (K, 40) normalised dual codebook of the paired TokenFlow workdir (or a (1, 1) dummy)."""
        if self._table is None:
            m = self.config.model
            if m.code_table != "tokenizer":
                self._table = np.zeros((1, 1), np.float32)
            else:
                from trainers import cache_latents, sharding

                with jax.ensure_compile_time_eval():  # also when first asked for inside a traced loss
                    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
                    tok, params, _ = cache_latents.load_workdir_tokenizer(
                        self.config.tokenizer.workdir, mesh, use_ema=bool(self.config.tokenizer.use_ema))
                    params = jax.tree.map(np.asarray, params)
                if tok.model.name != "tokenflow":
                    raise ValueError(f"config.tokenizer.workdir is a {tok.model.name!r} workdir, not tokenflow")
                q = params["quantize"]
                # l2-normalised per half (quantizers.l2_normalize, in numpy: this may run inside a trace)
                norm = lambda e: e / np.maximum(np.linalg.norm(e, axis=-1, keepdims=True), 1e-12)  # noqa: E731
                self._table = np.concatenate([norm(np.asarray(q[p]["embedding"], np.float32))
                                              for p in ("semantic", "pixel")], axis=-1)
                if tuple(tok.model.scales) != tuple(m.scales):
                    raise ValueError(f"config.model.scales={tuple(m.scales)} differ from the tokenizer's "
                                     f"{tuple(tok.model.scales)}")
        return jnp.asarray(self._table)

    def create_model(self, rngs: nnx.Rngs) -> NextScaleGPT:
        m, c = self.config.model, self.config
        return NextScaleGPT(scales=m.scales, codebook_size=int(m.codebook_size), code_dim=int(m.code_dim),
                            dim=int(m.dim), n_layer=int(m.n_layer), n_head=int(m.n_head),
                            num_classes=int(c.data.num_classes), class_dropout_prob=float(m.class_dropout_prob),
                            learned_codes=m.code_table == "learned", rngs=rngs, dtype=jnp.dtype(c.compute_dtype))

    def loss(self, model: NextScaleGPT, batch, rng):
        z = batch["latent"]
        z = z.reshape(z.shape[0], -1).astype(jnp.int32)
        if z.shape[1] != model.length:
            raise ValueError(f"batch has {z.shape[1]} codes per example; config.model.scales need {model.length}")
        labels = batch["label"]
        if model.cls_embedding.dropout_prob > 0:
            labels = model.cls_embedding.drop_labels(labels, rng)
        logits = model(model.teacher_inputs(self.table(), z), labels)
        ce = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), z[..., None], axis=-1)[..., 0]
        loss = ce.mean()
        acc = jnp.mean(jnp.argmax(logits, -1) == z)
        return loss, {"loss": loss, "accuracy": acc, "last_scale_loss": ce[:, -model.scales[-1] ** 2:].mean()}

    def sample(self, model: NextScaleGPT, rng, labels, **overrides):
        s = dict(self.config.sample)
        s.update(overrides)
        return generate(model, self.table(), rng, labels, cfg_scale=float(s["cfg_scale"]), top_k=int(s["top_k"]),
                        top_p=float(s["top_p"]), temperature=float(s["temperature"]))
