"""Publish a training checkpoint, model-zoo style.

Keeps the weights (``state_dict``; with ``EMAHook`` these are already the
averaged ones) and the plain-type part of ``meta`` (plus the RepL plan of
each backbone, decoded, under ``meta['replacement_plans']``); drops the
optimizer, schedulers, message hub, RNG state and EMA copy; names the file
``{out stem}-{sha256[:8]}.pth``. The result loads with
``torch.load(weights_only=True)`` and no allow-list.

It also writes the training config beside it (``{same name}.py``). For a
run that switched RepL on with ``ReplacementHook``, that config names the
RepL backbone instead (from ``meta['repl_model']``) and drops the hook, so
tools that never run hooks (inferencers, FLOP counters) build the model
the weights belong to.

Usage:
    python tools/model_converters/publish_model.py IN_FILE OUT_FILE
"""
import argparse
import hashlib
import os

import torch
from mmengine.config import Config

from repl_mm.apis import read_checkpoint
from repl_mm.engine.hooks.replacement_hook import META_KEY
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
    if not os.path.isfile(in_file):
        raise FileNotFoundError(f'IN_FILE: no checkpoint at {in_file!r}')
    if not out_file.endswith('.pth'):
        raise ValueError(f'OUT_FILE must end with .pth, but got {out_file!r}')
    ckpt = read_checkpoint(in_file)
    state = ckpt.get('state_dict', ckpt)
    if not isinstance(state, dict) or not all(
            torch.is_tensor(v) for v in state.values()):
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
    if 'cfg' in meta:
        model_config(meta).dump(final[:-4] + '.py')
    return final


def model_config(meta: dict) -> Config:
    """The training config of a checkpoint, with the RepL backbone spelled
    out and ``ReplacementHook`` dropped when the run used the hook."""
    cfg = Config.fromstring(meta['cfg'], '.py')
    if META_KEY in meta:
        cfg.model = meta[META_KEY]
        cfg.custom_hooks = [
            h for h in cfg.get('custom_hooks', [])
            if h.get('type') != 'ReplacementHook'
        ]
        imports = list(cfg.get('custom_imports', {}).get('imports', []))
        cfg.custom_imports = dict(
            imports=imports + ['repl_mm'] * ('repl_mm' not in imports),
            allow_failed_imports=False)
    return cfg


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('in_file', help='input checkpoint filename')
    parser.add_argument('out_file', help='output checkpoint filename (.pth)')
    args = parser.parse_args()
    final = publish(args.in_file, args.out_file)
    print(final)


if __name__ == '__main__':
    main()
