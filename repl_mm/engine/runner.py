"""``RepLRunner``: mmengine's ``Runner`` that can load its own checkpoints
under torch >= 2.6 (see :mod:`.checkpoint_globals`)."""
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

from .checkpoint_globals import allow_mmengine_checkpoints


@RUNNERS.register_module()
class RepLRunner(Runner):
    """mmengine ``Runner`` whose checkpoint loading (``load_from``,
    ``resume``, and the checkpoint of ``test()``) allow-lists exactly the
    globals mmengine 0.10.7 pickles into its training checkpoints.

    ``tools/train.py`` and ``tools/test.py`` use it unless the config names
    a ``runner_type``; other tools can set ``runner_type='RepLRunner'``.
    """

    def load_checkpoint(self, *args, **kwargs):
        with allow_mmengine_checkpoints():
            return super().load_checkpoint(*args, **kwargs)
