from .replacement_hook import ReplacementHook
from .rng_state_hook import RNGStateHook

__all__ = ['ReplacementHook', 'RNGStateHook']
