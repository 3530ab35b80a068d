"""Switch RepL on in an unmodified upstream config (spec §1-§6)."""
import copy
import gc
import weakref

from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.optim import OptimWrapper, OptimWrapperDict
from mmengine.registry import HOOKS

from ...core import ReplacementConfig
from ...models.base import to_repl_backbone

META_KEY = 'repl_model'


@HOOKS.register_module()
class ReplacementHook(Hook):
    """Apply RepL to the stock backbone of a config, before anything runs.

    ``custom_hooks = [dict(type='ReplacementHook', interval=4, ...)]``: the
    keywords are exactly those of ``replacement=dict(...)`` (spec §5). The
    model's backbone (mmdet ``ResNet``, mmseg ``ResNetV1c``, mmpretrain
    ``ResNet`` / ``ResNet_CIFAR`` / ``VisionTransformer``, the three
    codebases' ``SwinTransformer``) becomes its RepL twin through the same
    surgery as the registry backbones, so both routes give the same
    parameter names, shapes and losses.

    mmengine runs hooks after it has wrapped the model for DDP and built the
    optimizer and schedulers, and ``test()`` runs ``before_run`` before
    loading the checkpoint. So, at the highest priority in ``before_run``,
    this hook edits the model, releases the old DDP wrapper and wraps the
    model again, and rebuilds the optim wrapper (with auto-scale-lr) and
    param schedulers from the config: the new parameters are optimised and
    scheduled, the removed ones are gone from the optimizer and from DDP.
    ``init_weights`` and ``load_or_resume`` then run on the RepL model.
    ``before_run`` runs again in ``test()`` or ``val()`` after ``train()``
    on the same runner: the backbone is then the one this hook converted,
    with its plan, and the hook does nothing (model, wrapper, optimizer and
    schedulers stay). A RepL backbone that this hook did not convert (the
    registry route) raises a ``ValueError``, as in one ``before_run``.
    The model is already on its device (and in its dtype) by then: every
    tensor the surgery creates is created there, on the device and in the
    dtype of the block it replaces, and a SyncBN's process group is shared
    with the site's fresh norm (spec §8), so the model stays where it was.

    Tools that never run hooks (inferencers, FLOP counters, deployment)
    need the RepL model config: every checkpoint records it in
    ``meta['repl_model']``, and ``publish_model.py`` writes the matching
    config next to the published weights.
    """

    priority = 'HIGHEST'

    def __init__(self, **replacement):
        self.replacement = ReplacementConfig.from_dict(replacement).to_dict()
        self.model_cfg = None
        # the backbone this hook converted and its plan: a second
        # ``before_run`` (``test()`` after ``train()`` on one runner) finds
        # it converted and leaves it alone
        self._converted = None
        self._plan = None

    def _is_converted(self, backbone) -> bool:
        """Whether ``backbone`` is the one this hook converted, with the
        plan it made."""
        ref = self._converted() if self._converted is not None else None
        return ref is backbone and backbone.replacement_plan == self._plan

    def before_run(self, runner) -> None:
        wrapped = is_model_wrapper(runner.model)
        model = runner.model.module if wrapped else runner.model
        backbone = getattr(model, 'backbone', None)
        if backbone is None:
            raise ValueError('ReplacementHook needs a model with a '
                             f'`backbone`, got {type(model).__name__}')
        if self._is_converted(backbone):
            # Runner.test()/val() after train(): the model, its wrapper
            # and the optimizer are already the RepL ones
            print_log(
                'ReplacementHook: the backbone is already the '
                f'{type(backbone).__name__} this hook built (sites '
                f'{list(self._plan.indices)}): model, optimizer and '
                'schedulers left as they are',
                logger='current')
            return
        # a RepL backbone from the registry or with another plan raises
        self._plan = to_repl_backbone(backbone, self.replacement)
        self._converted = weakref.ref(backbone)
        self.model_cfg = self._repl_model_cfg(runner.cfg.model, backbone)
        done = [f'{type(backbone).__name__} built from the config']
        if wrapped:
            runner.model = None  # release the old DDP wrapper first
            gc.collect()
            runner.model = runner.wrap_model(
                copy.deepcopy(runner.cfg.get('model_wrapper_cfg')), model)
            done.append('model wrapped again')
        if isinstance(runner.optim_wrapper, (OptimWrapper, OptimWrapperDict)):
            # as Runner.train() does, in its order (scale_lr refuses to run
            # once schedulers are built)
            runner.optim_wrapper = runner.build_optim_wrapper(
                copy.deepcopy(runner.cfg.optim_wrapper))
            runner.param_schedulers = copy.deepcopy(
                runner.cfg.get('param_scheduler'))
            runner.scale_lr(runner.optim_wrapper, runner.auto_scale_lr)
            done.append('optimizer rebuilt')
            if runner.param_schedulers is not None:
                runner.param_schedulers = runner.build_param_scheduler(
                    runner.param_schedulers)
                done.append('schedulers rebuilt')
        else:
            done.append('no optimizer built yet, none rebuilt')
        print_log(f"ReplacementHook: {', '.join(done)}", logger='current')

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        checkpoint.setdefault('meta', {})[META_KEY] = self.model_cfg

    @staticmethod
    def _repl_model_cfg(model_cfg, backbone) -> dict:
        """The config's model with the RepL backbone spelled out."""
        cfg = copy.deepcopy(model_cfg.to_dict(
        ) if hasattr(model_cfg, 'to_dict') else dict(model_cfg))
        cfg['backbone'] = dict(
            cfg['backbone'],
            type=type(backbone).__name__,
            replacement=backbone.replacement_plan.config.to_dict())
        return cfg
