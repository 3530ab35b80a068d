"""One way in: build models, load checkpoints and build dataloaders from
mmdet, mmseg and mmpretrain configs.

Every tool and library helper of ``repl_mm`` builds its models, reads its
checkpoints and builds its dataloaders through these functions (the shape
of ``mmpretrain.apis.init_model``):

- :data:`SCOPES` and :func:`scope_of`: the codebases a config may name in
  ``default_scope``;
- :func:`build_model`: a model config built in a scope's registry, with
  the RepL modules registered;
- :func:`init_model`: a config (path or ``Config``) and optionally a
  checkpoint to a model in eval mode on a device, including the RepL model
  a ``ReplacementHook`` run records in ``meta['repl_model']``;
- :func:`read_checkpoint` and :func:`load_checkpoint_state`: a training or
  published checkpoint through the one allow-listed loader
  (:func:`repl_mm.engine.load_mmengine_checkpoint`), with errors naming the
  file;
- :func:`build_dataloader`: a config's train, val or test dataloader;
- :func:`repl_backbones` and :func:`check_output`: the RepL backbones of a
  model, and the output-path guard of the tools that write files.

``repl_mm.engine`` imports :data:`SCOPES` from here, so this module imports
``repl_mm``'s engine, models and datasets inside the functions that use
them, never at import time.
"""
import copy
import importlib
import os
import os.path as osp
import pickle
from typing import Dict, Optional, Union

from mmengine.config import Config
from torch import nn

from .core import iter_repl_backbones

#: The codebases a config may name in ``default_scope``.
SCOPES = ('mmdet', 'mmseg', 'mmpretrain')
#: The dataloaders of a config, as ``{split}_dataloader``.
SPLITS = ('train', 'val', 'test')

ConfigLike = Union[str, os.PathLike, Config]


def scope_of(cfg: Config) -> str:
    """The config's ``default_scope``, one of :data:`SCOPES`.

    Args:
        cfg (Config): The config.

    Returns:
        str: The scope.

    Raises:
        ValueError: If the config names no supported scope.

    Example:
        >>> scope_of(Config(dict(default_scope='mmseg')))
        'mmseg'
    """
    scope = cfg.get('default_scope', None)
    if scope not in SCOPES:
        raise ValueError(f'default_scope must be one of {SCOPES}, but the '
                         f'config has {scope!r}')
    return scope


def build_model(model_cfg: dict, scope: str) -> nn.Module:
    """Build ``model_cfg`` with the ``MODELS`` registry of ``scope``.

    The RepL backbones are registered first; the config is deep-copied.
    The model is returned as built: train mode (torch's default), weights
    as the constructors leave them (``init_weights`` not called: a
    checkpoint or the caller fills them).

    Args:
        model_cfg (dict): A model config (``cfg.model``).
        scope (str): One of :data:`SCOPES`.

    Returns:
        nn.Module: The model.

    Raises:
        ValueError: If ``scope`` is not one of :data:`SCOPES`.

    Example:
        >>> import torch
        >>> model = build_model(dict(
        ...     type='ImageClassifier',
        ...     backbone=dict(type='ResNet_CIFAR', depth=18, stem_channels=8,
        ...                   base_channels=8),
        ...     neck=dict(type='GlobalAveragePooling'),
        ...     head=dict(type='LinearClsHead', num_classes=10,
        ...               in_channels=64)), 'mmpretrain')
        >>> model(torch.rand(2, 3, 32, 32), mode='tensor').shape
        torch.Size([2, 10])
    """
    from mmengine.registry import DefaultScope

    from . import models  # noqa: F401  (registers the RepL backbones)
    if scope not in SCOPES:
        raise ValueError(f'scope must be one of {SCOPES}, but got {scope!r}')
    registry = importlib.import_module(f'{scope}.registry').MODELS
    with DefaultScope.overwrite_default_scope(scope):
        return registry.build(copy.deepcopy(model_cfg))


def read_checkpoint(path: str, map_location='cpu') -> dict:
    """The whole checkpoint file (``state_dict``, ``meta``, ...) as a dict,
    loaded with exactly the globals mmengine's training checkpoints need
    (:func:`repl_mm.engine.load_mmengine_checkpoint`).

    Args:
        path (str): A training checkpoint, a published one or a plain
            ``torch.save`` of a state dict.
        map_location: As in ``torch.load``. Defaults to ``'cpu'``.

    Returns:
        dict: The checkpoint.

    Raises:
        FileNotFoundError: If there is no file at ``path``.
        ValueError: If the file is not a checkpoint that loads (corrupt,
            not a dict, or pickling a global outside the allow-list),
            naming the file.
    """
    from .engine.checkpoint_globals import load_mmengine_checkpoint
    if not osp.isfile(path):
        raise FileNotFoundError(f'no checkpoint at {path!r}')
    try:
        ckpt = load_mmengine_checkpoint(path, map_location)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise ValueError(f'checkpoint {path!r} cannot be loaded: {e}') from e
    if not isinstance(ckpt, dict):
        raise ValueError(f'checkpoint {path!r} holds a '
                         f'{type(ckpt).__name__}, not a dict')
    return ckpt


def load_checkpoint_state(path: str, map_location='cpu') -> dict:
    """The state dict of a training or published checkpoint (its
    ``state_dict``, or the file itself when it is a bare state dict).

    Args:
        path (str): The checkpoint file.
        map_location: As in ``torch.load``. Defaults to ``'cpu'``.

    Returns:
        dict: Parameter and buffer names -> tensors.

    Raises:
        FileNotFoundError: If there is no file at ``path``.
        ValueError: If the file does not load or holds no state dict,
            naming the file.

    Example:
        >>> import tempfile
        >>> import torch
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = osp.join(tmp, 'lin.pth')
        ...     torch.save(dict(state_dict=nn.Linear(2, 3).state_dict(),
        ...                     meta=dict(epoch=1)), path)
        ...     sorted(load_checkpoint_state(path))
        ['bias', 'weight']
    """
    ckpt = read_checkpoint(path, map_location)
    state = ckpt.get('state_dict', ckpt)
    if not isinstance(state, dict):
        raise ValueError(f'checkpoint {path!r}: its state_dict is a '
                         f'{type(state).__name__}, not a dict')
    return state


def _config(config: ConfigLike, cfg_options: Optional[dict]) -> Config:
    """``config`` as a Config of its own (a path loaded, a Config
    deep-copied), with ``cfg_options`` merged in."""
    if isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        if not osp.isfile(path):
            raise FileNotFoundError(f'config {path!r} does not exist')
        cfg = Config.fromfile(path)
    elif isinstance(config, Config):
        cfg = copy.deepcopy(config)
    else:
        raise TypeError('config must be a file path or a Config, but got '
                        f'{type(config).__name__}')
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    return cfg


def _uses_replacement_hook(cfg: Config) -> bool:
    hooks = cfg.get('custom_hooks', None) or []
    return any(
        str(h.get('type', '')).split('.')[-1] == 'ReplacementHook'
        for h in hooks)


def init_model(config: ConfigLike,
               checkpoint: Optional[str] = None,
               device='cpu',
               cfg_options: Optional[dict] = None) -> nn.Module:
    """Build the model of a config and load a checkpoint into it.

    As mmpretrain's ``init_model``: the config is a path or a ``Config``
    (deep-copied, ``cfg_options`` merged in); the top-level
    ``data_preprocessor`` goes into the model config unless it has its
    own (what mmengine's ``Runner`` does); the model is built in the
    registry of the config's ``default_scope`` (:func:`build_model`); the
    checkpoint is loaded on the CPU, strictly; ``model.cfg`` is the
    config. Without a checkpoint the weights are the constructors' (no
    ``init_weights``, as upstream).

    A config that switches RepL on with ``ReplacementHook`` describes the
    upstream model; its runs record the RepL model in the checkpoint's
    ``meta['repl_model']``, and that model is built instead.

    Args:
        config (str | PathLike | Config): The config.
        checkpoint (str, optional): A training or published checkpoint of
            the model. Defaults to None.
        device (str | torch.device): Where the model goes. Defaults to
            ``'cpu'``.
        cfg_options (dict, optional): Overrides merged into the config.

    Returns:
        nn.Module: The model, in eval mode, on ``device``.

    Raises:
        FileNotFoundError: If the config or the checkpoint file is
            missing.
        ValueError: If ``default_scope`` is not supported, or the
            checkpoint does not load or does not fit the model (keys,
            shapes or RepL plan), naming the file.

    Example:
        >>> cfg = Config(dict(default_scope='mmpretrain', model=dict(
        ...     type='ImageClassifier',
        ...     backbone=dict(type='ResNet_CIFAR', depth=18, stem_channels=8,
        ...                   base_channels=8),
        ...     neck=dict(type='GlobalAveragePooling'),
        ...     head=dict(type='LinearClsHead', num_classes=10,
        ...               in_channels=64))))
        >>> model = init_model(cfg)
        >>> model.training, model.cfg.default_scope
        (False, 'mmpretrain')
        >>> import tempfile
        >>> import torch
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = osp.join(tmp, 'r18.pth')
        ...     torch.save(dict(state_dict=model.state_dict()), path)
        ...     loaded = init_model(cfg, path)
        >>> torch.equal(loaded.head.fc.weight, model.head.fc.weight)
        True
    """
    from mmengine.runner.checkpoint import _load_checkpoint_to_model

    from .engine.hooks.replacement_hook import META_KEY
    cfg = _config(config, cfg_options)
    scope = scope_of(cfg)
    model_cfg = cfg.model
    ckpt, recorded = None, None
    hook = _uses_replacement_hook(cfg)
    if checkpoint is not None:
        ckpt = read_checkpoint(checkpoint)
        meta = ckpt.get('meta', None)
        recorded = meta.get(META_KEY) if isinstance(meta, dict) else None
        if hook and recorded:
            model_cfg = recorded
    model_cfg = copy.deepcopy(model_cfg)
    if cfg.get('data_preprocessor', None) is not None:
        model_cfg.setdefault('data_preprocessor',
                             copy.deepcopy(cfg.data_preprocessor))
    model = build_model(model_cfg, scope)
    if ckpt is not None:
        what = (f'config {cfg.filename!r}'
                if isinstance(cfg.filename, str) else 'the config')
        try:
            _load_checkpoint_to_model(model, ckpt, strict=True)
        except (RuntimeError, ValueError) as e:
            hint = ''
            if hook and not recorded:
                hint = (' (the config switches RepL on with '
                        "ReplacementHook, but the checkpoint has no meta"
                        "['repl_model'] naming the RepL model)")
            raise ValueError(
                f'checkpoint {checkpoint!r} does not fit the model of '
                f'{what} (its state dict does not match the model){hint}: '
                f'{e}') from e
    model.cfg = cfg
    return model.to(device).eval()


def build_dataloader(cfg: Config,
                     split: str,
                     seed: Optional[int] = None,
                     **overrides):
    """The config's ``{split}_dataloader``, built as mmengine's ``Runner``
    builds it, in the config's ``default_scope``.

    Args:
        cfg (Config): The config.
        split (str): ``'train'``, ``'val'`` or ``'test'``.
        seed (int, optional): Seed of the sampler and workers (as
            ``Runner.build_dataloader``). Defaults to None.
        **overrides: Keys of the dataloader config to replace, e.g.
            ``batch_size=8`` or ``num_workers=0, persistent_workers=False``.

    Returns:
        torch.utils.data.DataLoader: The dataloader.

    Raises:
        ValueError: If ``split`` is not one of :data:`SPLITS`, the config
            has no such dataloader, or its scope is not supported.
    """
    from mmengine.registry import DefaultScope
    from mmengine.runner import Runner

    from . import datasets  # noqa: F401  (registers CIFARFormat)
    if split not in SPLITS:
        raise ValueError(f'split must be one of {SPLITS}, but got {split!r}')
    key = f'{split}_dataloader'
    loader = cfg.get(key, None)
    if not loader:
        raise ValueError(f'the config has no {key} (split={split!r})')
    scope = scope_of(cfg)
    loader = copy.deepcopy(loader)
    loader = loader.to_dict() if hasattr(loader, 'to_dict') else dict(loader)
    loader.update(overrides)
    with DefaultScope.overwrite_default_scope(scope):
        return Runner.build_dataloader(loader, seed=seed)


def repl_backbones(model: nn.Module) -> Dict[str, nn.Module]:
    """Module name -> RepL backbone, for every one in ``model`` (the root
    itself is named ``''``): :func:`repl_mm.core.iter_repl_backbones`."""
    return dict(iter_repl_backbones(model))


def _same_file(a: str, b: str) -> bool:
    """Whether the paths ``a`` and ``b`` name one file (links followed;
    a path that does not exist is compared by its real path)."""
    try:
        return osp.samefile(a, b)
    except OSError:
        return osp.realpath(a) == osp.realpath(b)


def check_output(option: str,
                 path: str,
                 inputs: Dict[str, str],
                 force: bool = False) -> None:
    """Refuse to write ``path`` over an input or, unless ``force``, over
    any existing file. Tools run it before any work, so a refused run
    costs nothing.

    Args:
        option (str): The option that names ``path`` (for the message).
        path (str): The file to be written.
        inputs (dict[str, str]): Option name -> input path (configs,
            checkpoints) that must never be overwritten; values that are
            not strings (a ``Config`` object) are skipped.
        force (bool): Allow overwriting an existing file that is not an
            input. Defaults to False.

    Raises:
        ValueError: If ``path`` is an input or a directory.
        FileExistsError: If ``path`` exists and ``force`` is False.
    """
    for name, src in inputs.items():
        if isinstance(src, str) and _same_file(path, src):
            raise ValueError(f'{option} {path!r} is the input {name} '
                             f'{src!r}: refusing to overwrite it (choose '
                             'another output path)')
    if osp.isdir(path):
        raise ValueError(f'{option} {path!r} is a directory, expected a '
                         'file path')
    if osp.exists(path) and not force:
        raise FileExistsError(f'{option} {path!r} already exists: pass '
                              'force=True (--force) to overwrite it')


__all__ = [
    'SCOPES', 'SPLITS', 'build_dataloader', 'build_model', 'check_output',
    'init_model', 'load_checkpoint_state', 'read_checkpoint', 'repl_backbones',
    'scope_of'
]
