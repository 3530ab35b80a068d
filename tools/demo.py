"""The README's main job (for now): build E2E and RepL ResNet-50 and DeiT-S
through mmpretrain's registry, print each plan table and the parameter
counts side by side.

Usage:
    python tools/demo.py [--interval 4]
"""
import argparse

from mmengine.logging import MMLogger
from mmpretrain.registry import MODELS

import repl_mm  # noqa: F401  (registers the RepL backbones)

BACKBONES = {
    'ResNet-50': dict(type='RepLResNet', depth=50),
    'DeiT-S': dict(type='RepLVisionTransformer', arch='deit-small',
                   img_size=224, patch_size=16),
}


def count(model):
    return sum(p.numel() for p in model.parameters())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--interval', type=int, default=4)
    args = parser.parse_args()
    logger = MMLogger.get_instance('repl_mm_demo', log_level='INFO')
    rows = []
    for name, cfg in BACKBONES.items():
        # each backbone logs its plan table when built
        logger.info(f'{name}, E2E (mode=none, same plan):')
        e2e = MODELS.build(dict(cfg, replacement=dict(mode='none')))
        logger.info(f'{name}, RepL (interval={args.interval}):')
        repl = MODELS.build(dict(cfg, replacement=dict(
            interval=args.interval)))
        assert e2e.replacement_plan.indices == repl.replacement_plan.indices
        rows.append((name, count(e2e), count(repl),
                     repl.replacement_plan.indices))
    lines = ['| backbone | sites | E2E params | RepL params | ratio |',
             '|---|---|---|---|---|']
    for name, n_e2e, n_repl, idx in rows:
        lines.append(f'| {name} | {list(idx)} | {n_e2e / 1e6:.3f} M | '
                     f'{n_repl / 1e6:.3f} M | {n_repl / n_e2e:.3f} |')
    logger.info('parameter counts (backbone only):\n' + '\n'.join(lines))


if __name__ == '__main__':
    main()
