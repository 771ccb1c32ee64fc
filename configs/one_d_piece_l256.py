"""One-D-Piece-L-256 (turingmotors/One-D-Piece configs/training/stage{1,2}/one-d-piece_l256.yaml).

Variants: stage1 (default) | stage2, and demo; see configs/one_d_piece_common.py for the commands.
"""

from configs import one_d_piece_common


def get_config(arg=None):
    return one_d_piece_common.get_config("L", arg)
