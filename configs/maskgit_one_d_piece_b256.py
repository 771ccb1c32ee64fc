"""MaskGIT on One-D-Piece-B-256 codes (turingmotors/One-D-Piece configs/training/generator/maskgit_one-d-piece_b256.yaml).

Variants: "" and demo; see configs/maskgit_common.py for the command.
"""

from configs import maskgit_common


def get_config(arg=None):
    return maskgit_common.get_config("B", arg)
