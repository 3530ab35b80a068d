"""Library code of the analysis tools (``tools/analysis/``): torch and
mmengine only, no task codebase imports."""
from .memory import SavedTensorMeter, saved_bytes

__all__ = ['SavedTensorMeter', 'saved_bytes']
