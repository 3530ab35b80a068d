"""Publish a training checkpoint, model-zoo style.

Keeps the weights (``state_dict``; with ``EMAHook`` these are already the
averaged ones) and the plain-type part of ``meta`` (plus the RepL plan of
each backbone, decoded, under ``meta['replacement_plans']``); drops the
optimizer, schedulers, message hub, RNG state and EMA copy; names the file
``{out stem}-{sha256[:8]}.pth``. The result loads with
``torch.load(weights_only=True)`` and no allow-list.

Usage:
    python tools/model_converters/publish_model.py IN_FILE OUT_FILE
"""
import argparse
import hashlib
import os

import torch

from repl_mm.engine import allow_mmengine_checkpoints
from repl_mm.models.base import PLAN_KEY, decode_plan

PLAIN = (str, int, float, bool, type(None))


def plain(value):
    """``value`` with everything that is not a plain type removed (numpy
    scalars become Python numbers), or ``None`` if nothing is left."""
    if isinstance(value, PLAIN):
        return value
    if hasattr(value, 'item') and getattr(value, 'ndim', None) == 0:
        return value.item()  # numpy scalar / 0-d array
    if isinstance(value, (list, tuple)):
        items = [plain(v) for v in value]
        return type(value)(v for v in items if v is not None)
    if isinstance(value, dict):
        out = {str(k): plain(v) for k, v in value.items()}
        return {k: v for k, v in out.items() if v is not None}
    return None


def publish(in_file: str, out_file: str) -> str:
    """Write the published checkpoint; return its final path."""
    if not out_file.endswith('.pth'):
        raise ValueError(f'OUT_FILE must end with .pth, but got {out_file!r}')
    with allow_mmengine_checkpoints():
        ckpt = torch.load(in_file, map_location='cpu', weights_only=True)
    state = ckpt.get('state_dict', ckpt)
    if not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f'{in_file}: state_dict holds non-tensor values')
    meta = plain(ckpt.get('meta', {})) or {}
    plans = {
        k[:-len(PLAN_KEY)].rstrip('.') or '<root>': decode_plan(v)
        for k, v in state.items() if k.endswith(PLAN_KEY)
    }
    if plans:
        meta['replacement_plans'] = plans
    out = dict(state_dict=dict(state), meta=meta)
    torch.save(out, out_file)
    with open(out_file, 'rb') as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    final = f'{out_file[:-4]}-{sha[:8]}.pth'
    os.replace(out_file, final)
    return final


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('in_file', help='input checkpoint filename')
    parser.add_argument('out_file', help='output checkpoint filename (.pth)')
    args = parser.parse_args()
    print(publish(args.in_file, args.out_file))


if __name__ == '__main__':
    main()
