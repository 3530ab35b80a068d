from .repl_logger_hook import RepLLoggerHook, site_summaries
from .replacement_hook import ReplacementHook
from .rng_state_hook import RNGStateHook

__all__ = [
    'RepLLoggerHook', 'ReplacementHook', 'RNGStateHook', 'site_summaries'
]
