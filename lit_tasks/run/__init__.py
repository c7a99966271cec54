"""Run machinery: checkpoints, ``--ckpt_path last``, exact resume, atomic writes.

Every private Lightning / torch use lives here, behind the guarded functions of ``lightning_seams.py``.
"""
