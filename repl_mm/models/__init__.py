"""Registry backbones, one adapter per upstream codebase.

Each adapter is imported when its codebase is installed. A backbone whose
codebase is missing is registered in mmengine's root ``MODELS`` as a
builder that raises an ``ImportError`` naming the package to install, so a
config that names it fails loudly instead of with "not in registry". A
name that another installed codebase also provides (``RepLResNetV1c``:
mmseg and mmpretrain; ``RepLResNeXt``) is registered there too: a scope
whose own registry has it never reaches the root, and the error names the
scopes that do.
"""
import importlib
import importlib.util

from mmengine.registry import MODELS as ROOT_MODELS

# module -> (upstream package, pip extra, backbones it registers)
ADAPTERS = {
    'det_resnet': ('mmdet', 'det', ('RepLResNet', 'RepLResNetV1d')),
    'det_resnext': ('mmdet', 'det', ('RepLResNeXt', )),
    'seg_resnet': ('mmseg', 'seg', ('RepLResNetV1c', )),
    'seg_resnext': ('mmseg', 'seg', ('RepLResNeXt', )),
    'cls_resnet': ('mmpretrain', 'cls', ('RepLResNet', 'RepLResNet_CIFAR',
                                         'RepLResNetV1c', 'RepLResNetV1d')),
    'cls_resnext': ('mmpretrain', 'cls', ('RepLResNeXt', )),
    'cls_vit': ('mmpretrain', 'cls', ('RepLVisionTransformer', )),
    'det_swin': ('mmdet', 'det', ('RepLSwinTransformer', )),
    'seg_swin': ('mmseg', 'seg', ('RepLSwinTransformer', )),
    'cls_swin': ('mmpretrain', 'cls', ('RepLSwinTransformer', )),
    'cls_convnext': ('mmpretrain', 'cls', ('RepLConvNeXt', )),
}
PIP_NAMES = {
    'mmdet': 'mmdet',
    'mmseg': 'mmsegmentation',
    'mmpretrain': 'mmpretrain'
}

INSTALLED = {}  # backbone name -> [upstream packages that provide it]
MISSING = {}  # backbone name -> (package, extra)
for _module, (_pkg, _extra, _names) in ADAPTERS.items():
    if importlib.util.find_spec(_pkg) is None:
        for _n in _names:
            MISSING.setdefault(_n, (_pkg, _extra))
        continue
    importlib.import_module(f'{__name__}.{_module}')
    for _n in _names:
        INSTALLED.setdefault(_n, []).append(_pkg)


def _missing_builder(name, pkg, extra, installed=()):
    also = '' if not installed else (
        f"; the {name} of {' and '.join(installed)} builds under "
        f"default_scope={installed[0]!r}")

    def build(*args, **kwargs):
        raise ImportError(
            f'{name} is a repl_mm backbone for {pkg}, which is not '
            f'installed: pip install {PIP_NAMES[pkg]} (or repl_mm[{extra}])'
            f'{also}')

    build.__name__ = name
    return build


for _n, (_pkg, _extra) in MISSING.items():
    if _n not in ROOT_MODELS.module_dict:
        ROOT_MODELS.register_module(
            name=_n,
            module=_missing_builder(_n, _pkg, _extra, INSTALLED.get(_n, ())))
