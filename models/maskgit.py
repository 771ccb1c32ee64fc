"""MaskGIT on any VQ tokenizer's codes: TiTok's ``ImageBert`` (a BERT), its MLM objective and sampler.

Upstream: bytedance/1d-tokenizer ``modeling/maskgit.py`` (``ImageBert``, copied unchanged by
turingmotors/One-D-Piece), ``modeling/modules/losses.py`` (``MLMLoss``); sampling after
MUSE/MaskGIT (Chang et al. 2022) with MDT's power-cosine guidance schedule.

* Token space of the BERT vocabulary: [0, V-1] image codes, V the mask token, V+1..V+C the
  classes, V+C+1 the dropped (null) class. The class token is *prepended*; the output at its
  position is discarded.
* Network: HF ``BertModel`` (post-LN: x = LN(x + sublayer(x)); word + position + token-type-0
  embeddings, LN eps 1e-12, exact GELU, hidden and attention dropout), then an *untied*
  ``lm_head`` Linear(hidden, V) with bias. (transformers 4.54-4.57 tie and resize ``lm_head``,
  which breaks the released weights; the converter reads the untied layout they store.)
* Training: per example t ~ U(0, 1), mask ratio acos(t)/(pi/2) in [1e-6, 1], n = round(L * ratio)
  >= 1 masked positions from a random permutation; CE with label smoothing 0.1 on every
  position, unmasked ones weighted 0.1; class dropout 0.1.
* Sampling: ``num_steps`` rounds; each samples every masked position (Gumbel-max with
  temperature T * (1 - ratio)) and re-masks the mask_len = floor(L * acos(ratio) / (pi/2)) least
  confident (confidence = the sampled logit + Gumbel noise); classifier-free guidance with a
  constant, linear or power-cosine scale.

Layouts: codes (B, L) int32, logits (B, L, V). Order: network, masking and loss, sampler,
converter and golden fixture, the method.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import layers
from models.pretrained import merge_module
from tokenizers import vit
from trainers.method import Method

GUIDANCE_DECAYS = ("constant", "linear", "power-cosine")


# ----------------------------------------------------------------------------
# Network
# ----------------------------------------------------------------------------


class BertLayer(nnx.Module):
    """Post-LN BERT layer: x = LN(x + attn(x)); x = LN(x + W2 gelu(W1 x))."""

    def __init__(self, hidden: int, heads: int, intermediate: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.attention = layers.Attention(hidden, heads, rngs=rngs, dtype=dtype)  # BertSelfAttention + output.dense
        self.attention_norm = vit.layer_norm(hidden, eps=1e-12, rngs=rngs)
        self.intermediate = layers.dense(hidden, intermediate, ("embed", "mlp"), rngs=rngs, dtype=dtype)
        self.output = layers.dense(intermediate, hidden, ("mlp", "embed"), rngs=rngs, dtype=dtype)
        self.output_norm = vit.layer_norm(hidden, eps=1e-12, rngs=rngs)

    def __call__(self, x, *, dropout: float = 0.0, attn_dropout: float = 0.0, rng=None):
        rngs = list(jax.random.split(rng, 3)) if rng is not None else [None] * 3
        a = self.attention(x, dropout_rate=attn_dropout, dropout_rng=rngs[0])
        x = self.attention_norm(x + layers.dropout(a, dropout, rngs[1])).astype(x.dtype)
        h = self.output(vit.gelu_exact(self.intermediate(x)))
        return self.output_norm(x + layers.dropout(h, dropout, rngs[2])).astype(x.dtype)


class ImageBert(nnx.Module):
    """(codes with mask tokens (B, L), classes (B,), drop (B,) bool) -> logits (B, L, codebook_size)."""

    def __init__(self, *, codebook_size: int, num_classes: int, seq_len: int, hidden: int, depth: int, heads: int,
                 intermediate: int, dropout: float = 0.1, attn_dropout: float = 0.1, rngs: nnx.Rngs,
                 dtype=jnp.float32):
        self.codebook_size, self.num_classes, self.seq_len = codebook_size, num_classes, seq_len
        self.mask_token_id = codebook_size
        self.drop_label_id = codebook_size + 1 + num_classes
        self.dropout, self.attn_dropout = dropout, attn_dropout
        init = nnx.initializers.truncated_normal(0.02)  # BertModel initializer_range 0.02
        embed = lambda n, names: nnx.Embed(n, hidden, embedding_init=nnx.with_partitioning(init, names),  # noqa: E731
                                           rngs=rngs)
        self.word_embeddings = embed(codebook_size + num_classes + 2, ("vocab", "embed"))
        self.position_embeddings = embed(seq_len + 1, ("position", "embed"))
        self.token_type_embeddings = embed(2, (None, "embed"))
        self.embeddings_norm = vit.layer_norm(hidden, eps=1e-12, rngs=rngs)
        self.layer = nnx.List([BertLayer(hidden, heads, intermediate, rngs=rngs, dtype=dtype) for _ in range(depth)])
        self.lm_head = layers.dense(hidden, codebook_size, ("embed", "vocab"), kernel_init=init, rngs=rngs,
                                    dtype=dtype)

    def class_tokens(self, labels, drop):
        """Class ids in BERT vocabulary; ``drop`` rows get the null class."""
        return jnp.where(drop, self.drop_label_id, labels + self.codebook_size + 1).astype(jnp.int32)

    def __call__(self, ids, labels, drop, *, train: bool = False, rng=None):
        x_ids = jnp.concatenate([self.class_tokens(labels, drop)[:, None], ids.astype(jnp.int32)], axis=1)
        n = x_ids.shape[1]
        x = (self.word_embeddings(x_ids) + self.position_embeddings.embedding[...][:n]
             + self.token_type_embeddings.embedding[...][0])
        x = self.embeddings_norm(x)
        p, pa = (self.dropout, self.attn_dropout) if train else (0.0, 0.0)
        rngs = list(jax.random.split(rng, len(self.layer) + 1)) if (train and rng is not None) else [None] * (
            len(self.layer) + 1)
        x = layers.dropout(x, p, rngs[0])
        for i, layer in enumerate(self.layer):
            x = layer(x, dropout=p, attn_dropout=pa, rng=rngs[i + 1])
        return self.lm_head(x[:, 1:])


# ----------------------------------------------------------------------------
# Masking and the MLM objective
# ----------------------------------------------------------------------------


def mask_tokens(tokens, timesteps_u, perm_u, mask_token_id: int):
    """Upstream ``masking_input_tokens`` with its random draws given.

    tokens (B, L); timesteps_u (B,) ~ U(0, 1); perm_u (B, L) ~ U(0, 1). Returns (masked tokens,
    masks (B, L) bool). masks[b, j] = argsort(perm_u[b])[j] < n_b, literally as upstream.
    """
    seq_len = tokens.shape[1]
    ratio = jnp.clip(jnp.arccos(timesteps_u) / (math.pi * 0.5), 1e-6, 1.0)
    num_masked = jnp.maximum(jnp.round(seq_len * ratio), 1.0)  # torch.round: half to even, as jnp.round
    masks = jnp.argsort(perm_u, axis=-1) < num_masked[:, None]
    return jnp.where(masks, mask_token_id, tokens), masks


def mlm_loss(logits, targets, masks, *, label_smoothing: float = 0.1, unmasked_weight: float = 0.1):
    """(loss, correct_tokens): CE with label smoothing over the codes, masked positions weight 1 and
    unmasked ``unmasked_weight``, normalised by the summed weights (upstream ``MLMLoss``)."""
    logits = logits.astype(jnp.float32)
    v = logits.shape[-1]
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    ce = (1.0 - label_smoothing) * nll - label_smoothing * jnp.mean(log_probs, axis=-1) if v else nll
    w = masks.astype(jnp.float32)
    weights = (1.0 - w) * unmasked_weight + w
    loss = jnp.sum(ce * weights) / (jnp.sum(weights) + 1e-8)
    correct = jnp.sum((jnp.argmax(logits, -1) == targets) * w, axis=1) / (jnp.sum(w, axis=1) + 1e-8)
    return loss, jnp.mean(correct)


# ----------------------------------------------------------------------------
# Sampler
# ----------------------------------------------------------------------------


def gumbel(u):
    """-log(-log(u)) with both logs of values clamped at 1e-20 (upstream ``gumbel_noise``)."""
    log = lambda t: jnp.log(jnp.maximum(t, 1e-20))  # noqa: E731
    return -log(-log(u))


def guidance_scales(num_steps: int, guidance_scale: float, decay: str, power: float = 3.0) -> list[float]:
    """The CFG scale of each step (upstream ``generate``): constant g; linear 0 at step 0 then
    (s/S) g; power-cosine (g - 1)(1 - cos((s/S)^p pi))/2 + 1 in float32."""
    if decay not in GUIDANCE_DECAYS:
        raise ValueError(f"guidance_decay={decay!r}: one of {GUIDANCE_DECAYS}")
    if decay == "constant":
        return [float(guidance_scale)] * num_steps
    if decay == "linear":
        return [float(s / num_steps * guidance_scale) for s in range(num_steps)]
    out = []
    for s in range(num_steps):
        base = np.float32(s / num_steps) ** np.float32(power)
        step = (np.float32(1.0) - np.cos(base * np.float32(np.pi), dtype=np.float32)) * np.float32(0.5)
        out.append(float(np.float32(guidance_scale - 1) * step + np.float32(1.0)))
    return out


def sample_step(logits_fn, ids, step: int, num_steps: int, u_logits, u_conf, *, cfg_scale: float, decay: str,
                temperature: float, softmax_temperature_annealing: bool, mask_token_id: int):
    """One MaskGIT round. ``logits_fn(ids, drop: bool) -> (B, L, V)`` runs the network
    conditional (drop=False) or unconditional. Returns (new ids, dict of the step's intermediates)."""
    seq_len = ids.shape[1]
    ratio = (step + 1) / num_steps
    annealed_temp = temperature * (1.0 - ratio)
    is_mask = ids == mask_token_id
    out = {}
    if cfg_scale != 0:
        cond, uncond = logits_fn(ids, False), logits_fn(ids, True)
        out.update(cond_logits=cond, uncond_logits=uncond)
        if decay == "power-cosine":
            logits = uncond + (cond - uncond) * cfg_scale
        else:  # constant/linear: upstream's cond + s (cond - uncond)
            logits = cond + (cond - uncond) * cfg_scale
    else:
        logits = logits_fn(ids, False)
    if softmax_temperature_annealing:
        logits = logits / (0.5 + 0.8 * (1.0 - ratio))
    sampled = jnp.argmax(logits + annealed_temp * gumbel(u_logits), axis=-1).astype(jnp.int32)
    sampled_logits = jnp.take_along_axis(logits, sampled[..., None], axis=-1)[..., 0]
    sampled = jnp.where(is_mask, sampled, ids)
    sampled_logits = jnp.where(is_mask, sampled_logits, jnp.inf).astype(jnp.float32)
    # mask_len from batch row 0's masked count, as upstream; floor in float64 on the host.
    schedule_len = float(np.floor(seq_len * np.arccos(ratio) / (math.pi * 0.5)))
    mask_len = jnp.maximum(1, jnp.minimum(jnp.sum(is_mask[0]) - 1, schedule_len)).astype(jnp.int32)
    confidence = sampled_logits + annealed_temp * gumbel(u_conf)
    cut_off = jnp.take(jnp.sort(confidence, axis=-1), mask_len - 1, axis=-1)[:, None]
    masking = confidence <= cut_off
    new_ids = sampled if step == num_steps - 1 else jnp.where(masking, mask_token_id, sampled)
    out.update(ids_in=ids, logits=logits, sampled_ids=sampled, sampled_logits=sampled_logits, confidence=confidence,
               masking=masking, ids_out=new_ids, cfg_scale=jnp.float32(cfg_scale),
               annealed_temp=jnp.float32(annealed_temp), mask_len=mask_len)
    return new_ids, out


def generate(model: ImageBert, labels, rng=None, *, num_steps: int = 16, guidance_scale: float = 3.0,
             guidance_decay: str = "power-cosine", guidance_scale_pow: float = 3.0, randomize_temperature: float = 4.5,
             softmax_temperature_annealing: bool = False, uniforms=None, return_steps: bool = False):
    """Class-conditional codes (B, L) int32. ``uniforms``: optional list of (u_logits (B, L, V),
    u_conf (B, L)) per step, replacing the draws from ``rng`` (for parity checks)."""
    b = labels.shape[0]
    ids = jnp.full((b, model.seq_len), model.mask_token_id, jnp.int32)
    scales = guidance_scales(num_steps, guidance_scale, guidance_decay, guidance_scale_pow)

    def logits_fn(x, drop: bool):
        return model(x, labels, jnp.full((b,), drop))

    steps = []
    for s in range(num_steps):
        if uniforms is not None:
            u_logits, u_conf = uniforms[s]
        else:
            k1, k2 = jax.random.split(jax.random.fold_in(rng, s))
            u_logits = jax.random.uniform(k1, (b, model.seq_len, model.codebook_size))
            u_conf = jax.random.uniform(k2, (b, model.seq_len))
        ids, info = sample_step(logits_fn, ids, s, num_steps, u_logits, u_conf, cfg_scale=scales[s],
                                decay=guidance_decay, temperature=randomize_temperature,
                                softmax_temperature_annealing=softmax_temperature_annealing,
                                mask_token_id=model.mask_token_id)
        steps.append(info)
    return (ids, steps) if return_steps else ids


# ----------------------------------------------------------------------------
# Converter (released TiTok / One-D-Piece generators) and the golden fixture
# ----------------------------------------------------------------------------

RELEASED = {
    "s": "https://huggingface.co/turing-motors/MaskGIT_One-D-Piece-S-256",
    "b": "https://huggingface.co/turing-motors/MaskGIT_One-D-Piece-B-256",
    "l": "https://huggingface.co/turing-motors/MaskGIT_One-D-Piece-L-256",
}


def params_from_torch(state_dict: dict[str, np.ndarray], model_kwargs: dict) -> dict:
    """Pure params of :class:`ImageBert` from upstream's keys (``model.embeddings.*``,
    ``model.encoder.layer.{i}.*``, ``model.lm_head.*``); q, k, v are fused into ``qkv``."""
    sd = {k[len("model."):] if k.startswith("model.") else k: np.asarray(v, np.float32) for k, v in state_dict.items()}
    sd.pop("embeddings.position_ids", None)
    lm = sd.get("lm_head.weight")
    if lm is not None and lm.shape[0] != model_kwargs["codebook_size"]:
        raise ValueError(f"lm_head.weight has {lm.shape[0]} rows, not codebook_size={model_kwargs['codebook_size']}: "
                         "the checkpoint was saved with transformers 4.54-4.57, which tie lm_head to the word "
                         "embeddings (bytedance/1d-tokenizer issue #113); use the released checkpoint")
    used = set()

    def take(key):
        if key not in sd:
            raise ValueError(f"ImageBert checkpoint lacks {key!r}")
        used.add(key)
        return sd[key]

    dense = lambda p: {"kernel": take(p + ".weight").T, "bias": take(p + ".bias")}  # noqa: E731
    norm = lambda p: {"scale": take(p + ".weight"), "bias": take(p + ".bias")}  # noqa: E731
    params = {"word_embeddings": {"embedding": take("embeddings.word_embeddings.weight")},
              "position_embeddings": {"embedding": take("embeddings.position_embeddings.weight")},
              "token_type_embeddings": {"embedding": take("embeddings.token_type_embeddings.weight")},
              "embeddings_norm": norm("embeddings.LayerNorm"), "lm_head": dense("lm_head"), "layer": {}}
    for i in range(model_kwargs["depth"]):
        p = f"encoder.layer.{i}."
        q, k, v = (dense(p + f"attention.self.{n}") for n in ("query", "key", "value"))
        params["layer"][i] = {
            "attention": {"qkv": {"kernel": np.concatenate([q["kernel"], k["kernel"], v["kernel"]], axis=1),
                                  "bias": np.concatenate([q["bias"], k["bias"], v["bias"]])},
                          "proj": dense(p + "attention.output.dense")},
            "attention_norm": norm(p + "attention.output.LayerNorm"),
            "intermediate": dense(p + "intermediate.dense"), "output": dense(p + "output.dense"),
            "output_norm": norm(p + "output.LayerNorm")}
    extra = sorted(set(sd) - used)
    if extra:
        raise ValueError(f"ImageBert checkpoint has keys the model does not: {extra[:8]} ({len(extra)})")
    abstract = layers.abstract_module(lambda rngs: ImageBert(**model_kwargs, rngs=rngs))
    want = {jax.tree_util.keystr(p): tuple(v.shape) for p, v in
            jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.split(abstract, nnx.Param, ...)[1]))}
    got = {jax.tree_util.keystr(p): tuple(np.shape(v)) for p, v in jax.tree_util.tree_leaves_with_path(params)}
    if want != got:
        bad = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
        raise ValueError(f"ImageBert checkpoint does not fit the configured model: {bad[:8]} "
                         f"(model {[want.get(k) for k in bad[:4]]}, checkpoint {[got.get(k) for k in bad[:4]]})")
    return params


def merge(model_kwargs, params) -> ImageBert:
    return merge_module(layers.abstract_module(lambda rngs: ImageBert(**model_kwargs, rngs=rngs)), params)


def fixture_check(meta, params, buffers, inputs) -> dict[str, np.ndarray]:
    cfg = meta["constructor"]["config"]
    g, losses = cfg["model"]["generator"], cfg["losses"]
    kwargs = dict(codebook_size=int(cfg["model"]["vq_model"]["codebook_size"]),
                  num_classes=int(g["condition_num_classes"]), seq_len=int(g["image_seq_len"]),
                  hidden=int(g["hidden_size"]), depth=int(g["num_hidden_layers"]), heads=int(g["num_attention_heads"]),
                  intermediate=int(g["intermediate_size"]), dropout=float(g["dropout"]),
                  attn_dropout=float(g["attn_drop"]))
    model = merge(kwargs, params_from_torch(params, kwargs))
    fwd = jax.jit(lambda ids, c, drop: model(ids, c, drop))
    ids, cond = jnp.asarray(inputs["fwd_ids"]), jnp.asarray(inputs["fwd_cond"])
    b = ids.shape[0]
    out = {"fwd_logits_cond": fwd(ids, cond, jnp.zeros(b, bool)),
           "fwd_logits_uncond": fwd(ids, cond, jnp.ones(b, bool))}
    drop = jnp.asarray(inputs["fwd_drop_u"], jnp.float32) < jnp.float32(inputs["fwd_cond_drop_prob"])
    out["fwd_logits_drop"] = fwd(ids, cond, drop)
    tokens = jnp.asarray(inputs["train_tokens"])
    masked, masks = mask_tokens(tokens, jnp.asarray(inputs["train_timesteps_u"]), jnp.asarray(inputs["train_perm_rand"]),
                                model.mask_token_id)
    logits = fwd(masked, cond, drop)
    loss, correct = mlm_loss(logits, tokens, masks, label_smoothing=float(losses["label_smoothing"]),
                             unmasked_weight=float(losses["loss_weight_unmasked_token"]))
    out.update(train_masked_tokens=masked, train_masks=masks, train_logits=logits, train_loss=loss,
               train_correct_tokens=correct)
    for run in meta["calls"]:
        if "run" not in run:
            continue
        name, kw = run["run"], run["generate_kwargs"]
        u_logits, u_conf = inputs[f"{name}_u_logits"], inputs[f"{name}_u_conf"]
        uniforms = [(jnp.asarray(u_logits[s]), jnp.asarray(u_conf[s])) for s in range(kw["num_sample_steps"])]
        ids_out, steps = generate(
            model, jnp.asarray(inputs[f"{name}_cond"]), num_steps=int(kw["num_sample_steps"]),
            guidance_scale=float(inputs[f"{name}_guidance_scale"]), guidance_decay=kw["guidance_decay"],
            guidance_scale_pow=float(inputs[f"{name}_guidance_scale_pow"]),
            randomize_temperature=float(inputs[f"{name}_randomize_temperature"]),
            softmax_temperature_annealing=bool(kw["softmax_temperature_annealing"]), uniforms=uniforms,
            return_steps=True)
        out[f"{name}_ids"] = ids_out
        for s, info in enumerate(steps):
            for key, value in info.items():
                out[f"{name}_s{s}_{key}"] = value
    return {k: np.asarray(v) for k, v in out.items()}


FIXTURE_CHECKS = {"titok_maskgit": fixture_check}


# ----------------------------------------------------------------------------
# The method (config.model.name == "maskgit"): a generator over a VQ tokenizer's codes
# ----------------------------------------------------------------------------


class MaskGIT(Method):
    """MaskGIT on the codes of the tokenizer named by ``config.tokenizer`` (a zoo tokenizer workdir
    with ``latent_type == "codes"``, e.g. One-D-Piece). Training batches bring the codes either
    from a code cache (``config.data.latents``, ``batch["latent"]`` (B, L) int32) or as images,
    encoded on the fly by the frozen tokenizer (its params held as constants: meant for small
    tokenizers; cache the codes for large ones). ``sample`` returns codes (B, L); the pairing
    (trainers/decode.py) decodes them to images.
    """

    kind = "generator"

    def __init__(self, config):
        super().__init__(config)
        m = config.model
        self.kwargs = dict(codebook_size=int(m.codebook_size), num_classes=int(config.data.num_classes),
                           seq_len=int(m.seq_len), hidden=int(m.hidden), depth=int(m.depth), heads=int(m.heads),
                           intermediate=int(m.intermediate), dropout=float(m.dropout),
                           attn_dropout=float(m.attn_dropout))
        self._tokenizer = None

    def validate_config(self, config) -> None:
        m, s = config.model, config.sample
        if int(m.hidden) % int(m.heads):
            raise ValueError(f"config.model.hidden={m.hidden} is not divisible by config.model.heads={m.heads}")
        if s.guidance_decay not in GUIDANCE_DECAYS:
            raise ValueError(f"config.sample.guidance_decay={s.guidance_decay!r}: one of {GUIDANCE_DECAYS}")
        if not (config.get("tokenizer") and config.tokenizer.kind == "workdir"):
            raise ValueError("config.tokenizer.kind must be 'workdir' (a zoo VQ tokenizer, e.g. a One-D-Piece run) "
                             "so that the sampled codes decode to images")
        from trainers import decode
        from trainers.method import get_method

        tok_config = decode.tokenizer_config(config)
        tok = get_method(tok_config)
        if getattr(tok, "latent_type", None) != "codes":
            raise ValueError(f"config.tokenizer.workdir={config.tokenizer.workdir!r} holds a "
                             f"{tok_config.model.name!r} tokenizer whose latents are not discrete codes")
        want = {"codebook_size": int(tok_config.model.codebook_size),
                "seq_len": int(tok_config.model.num_latent_tokens)}
        for field, value in want.items():
            if int(m[field]) != value:
                raise ValueError(f"config.model.{field}={m[field]} but the tokenizer in {config.tokenizer.workdir} "
                                 f"has {value}")

    def create_model(self, rngs: nnx.Rngs) -> ImageBert:
        return ImageBert(**self.kwargs, rngs=rngs)

    # -- codes of a batch
    def tokenizer(self):
        """(method, model_def, params, rest) of the frozen tokenizer, loaded once (numpy params)."""
        if self._tokenizer is None:
            from trainers import decode, sharding
            from trainers.method import ModelDef, get_method

            with jax.ensure_compile_time_eval():
                tok_config = decode.tokenizer_config(self.config)
                method = get_method(tok_config)
                model_def = ModelDef(method)
                mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
                _, params, rest = decode.restore_params(self.config.tokenizer.workdir, model_def, mesh,
                                                        use_ema=bool(self.config.tokenizer.get("use_ema", True)))
                self._tokenizer = (method, model_def, jax.tree.map(np.asarray, params), jax.tree.map(np.asarray, rest))
        return self._tokenizer

    def codes(self, batch):
        if "latent" in batch:
            codes = batch["latent"]
            if not jnp.issubdtype(codes.dtype, jnp.integer):
                raise ValueError(f"batch['latent'] has dtype {codes.dtype}: a MaskGIT code cache holds int codes")
            return codes.reshape(codes.shape[0], -1).astype(jnp.int32)
        method, model_def, params, rest = self.tokenizer()
        codes = method.encode(model_def.merge(params, rest), batch["image"])
        return jax.lax.stop_gradient(codes).astype(jnp.int32)

    # -- the objective
    def loss(self, model: ImageBert, batch, rng):
        m = self.config.model
        tokens = self.codes(batch)
        b, seq_len = tokens.shape
        k_t, k_perm, k_drop, k_net = jax.random.split(rng, 4)
        masked, masks = mask_tokens(tokens, jax.random.uniform(k_t, (b,)), jax.random.uniform(k_perm, (b, seq_len)),
                                    model.mask_token_id)
        drop = jax.random.uniform(k_drop, (b,)) < float(m.class_dropout)
        logits = model(masked, batch["label"], drop, train=True, rng=k_net)
        loss, correct = mlm_loss(logits, tokens, masks, label_smoothing=float(m.label_smoothing),
                                 unmasked_weight=float(m.unmasked_weight))
        return loss, {"loss": loss, "correct_tokens": correct, "mask_ratio": jnp.mean(masks)}

    # -- the sampler
    def sample(self, model: ImageBert, rng, labels, **sampler):
        s = {**self.config.sample.to_dict(), **sampler}
        return generate(model, labels, rng, num_steps=int(s["num_steps"]), guidance_scale=float(s["cfg_scale"]),
                        guidance_decay=s["guidance_decay"], guidance_scale_pow=float(s["guidance_scale_pow"]),
                        randomize_temperature=float(s["randomize_temperature"]),
                        softmax_temperature_annealing=bool(s["softmax_temperature_annealing"]))


def import_maskgit(state_dict, config) -> dict:
    """A released MaskGIT generator (HF ``pytorch_model.bin``/``model.safetensors``) for a config of
    configs/maskgit_one_d_piece_*.py."""
    return params_from_torch(state_dict, MaskGIT(config).kwargs)


def load_state_dict(path):
    from tokenizers.one_d_piece import load_state_dict as load

    return load(path)


IMPORTERS = {"maskgit": import_maskgit}
