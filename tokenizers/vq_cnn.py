"""LlamaGen's VQ-16 CNN pieces shared by TokenFlow's pixel branch and ReTok's (GigaTok's) CNN encoder and
decoder (upstream ``vq_model.py`` ``Encoder``/``Decoder``; blocks from :mod:`tokenizers.kl_vae`).

* :class:`ConvLevel` -- ``conv_blocks[i]``: res blocks (each followed by an ``AttnBlock`` when ``attn``),
  then an optional resample: ``"down"`` (strided conv), ``"up"`` (nearest x2 + conv) or ``"d2s"``
  (ReTok's :class:`D2SUpsampler`: conv to 4C, then depth-to-space).
* :func:`mid_blocks` -- ``mid``: [res, attn, res] (``attn``) or [res, res] (GigaTok's ``use_attn=False``).
* :class:`Encoder` -- image (B, H, W, C) -> (B, H/f, W/f, z_channels), f = 2^(len(ch_mult) - 1); with
  ``attn`` the last (lowest-resolution) level and the middle attend.

Parameter names follow upstream's state_dict (``conv_in``, ``conv_blocks.i.res.j``, ``...attn.j``,
``...downsample``/``upsample``, ``mid.k``, ``norm_out``, ``conv_out``), so both converters map onto them.
``groups``: GroupNorm groups (upstream's ``Normalize()``: 32, eps 1e-6).
"""

from __future__ import annotations

import jax
from flax import nnx

from tokenizers.kl_vae import AttnBlock, Downsample, ResnetBlock, Upsample, conv, group_norm

GROUPS = 32  # LlamaGen Normalize(): GroupNorm(32, eps 1e-6)


def depth_to_space(x: jax.Array, block: int = 2) -> jax.Array:
    """(B, H, W, b*b*C) -> (B, b*H, b*W, C) in upstream's DCR order: channel index = (i*b + j)*C + c
    for output pixel (b*h + i, b*w + j) (torch ``view(B, b, b, C, H, W).permute(0, 3, 4, 1, 5, 2)``;
    not ``pixel_shuffle``)."""
    b_, h, w, c4 = x.shape
    c = c4 // (block * block)
    x = x.reshape(b_, h, w, block, block, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b_, h * block, w * block, c)


class D2SUpsampler(nnx.Module):
    """3x3 conv C -> 4C, then depth-to-space (ReTok/GigaTok ``D2SUpsampler``)."""

    def __init__(self, ch: int, rngs: nnx.Rngs):
        self.conv1 = conv(ch, 4 * ch, 3, rngs)

    def __call__(self, x):
        return depth_to_space(self.conv1(x), 2)


RESAMPLE = (None, "down", "up", "d2s")


class ConvLevel(nnx.Module):
    """Res blocks (+ an AttnBlock after each when ``attn``), then the optional ``resample``."""

    def __init__(self, in_ch, out_ch, num_blocks, *, attn: bool = False, resample: str | None = None,
                 groups: int = GROUPS, rngs: nnx.Rngs):
        if resample not in RESAMPLE:
            raise ValueError(f"resample={resample!r}: one of {RESAMPLE}")
        self.res = nnx.List([ResnetBlock(in_ch if j == 0 else out_ch, out_ch, groups, rngs) for j in range(num_blocks)])
        self.attn = nnx.List([AttnBlock(out_ch, groups, rngs) for _ in range(num_blocks)] if attn else [])
        self.downsample = Downsample(out_ch, rngs) if resample == "down" else None
        self.upsample = {"up": Upsample, "d2s": D2SUpsampler}[resample](out_ch, rngs) if resample in ("up", "d2s") \
            else None

    def __call__(self, x):
        for j, block in enumerate(self.res):
            x = block(x)
            if len(self.attn):
                x = self.attn[j](x)
        if self.downsample is not None:
            x = self.downsample(x)
        if self.upsample is not None:
            x = self.upsample(x)
        return x


def mid_blocks(ch: int, *, attn: bool, groups: int = GROUPS, rngs: nnx.Rngs) -> nnx.List:
    middle = [AttnBlock(ch, groups, rngs)] if attn else []
    return nnx.List([ResnetBlock(ch, ch, groups, rngs), *middle, ResnetBlock(ch, ch, groups, rngs)])


def run_mid(mid: nnx.List, h):
    for block in mid:
        h = block(h)
    return h


class Encoder(nnx.Module):
    """(B, H, W, C) -> (B, H/f, W/f, z_channels), f = 2^(len(ch_mult) - 1)."""

    def __init__(self, *, ch: int, ch_mult, num_res_blocks: int, z_channels: int, in_channels: int = 3,
                 attn: bool = True, norm_groups: int = GROUPS, rngs: nnx.Rngs):
        g, n = norm_groups, len(ch_mult)
        self.conv_in = conv(in_channels, ch, 3, rngs)
        levels, prev = [], ch
        for i, m in enumerate(ch_mult):
            levels.append(ConvLevel(prev, ch * m, num_res_blocks, attn=attn and i == n - 1,
                                    resample="down" if i != n - 1 else None, groups=g, rngs=rngs))
            prev = ch * m
        self.conv_blocks = nnx.List(levels)
        self.mid = mid_blocks(prev, attn=attn, groups=g, rngs=rngs)
        self.norm_out = group_norm(prev, g, rngs)
        self.conv_out = conv(prev, z_channels, 3, rngs)

    def __call__(self, x):
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = level(h)
        return self.conv_out(nnx.swish(self.norm_out(run_mid(self.mid, h))))
