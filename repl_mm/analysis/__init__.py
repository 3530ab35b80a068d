"""Library code of the analysis tools (``tools/analysis/``): torch and
mmengine only, no task codebase imports."""
from .benchmark import METHODS, run_benchmark, run_case, saving_efficiency
from .cases import SUITE, make_case, suite_cases
from .memory import SavedTensorMeter, saved_bytes

__all__ = [
    'METHODS', 'SUITE', 'SavedTensorMeter', 'make_case', 'run_benchmark',
    'run_case', 'saved_bytes', 'saving_efficiency', 'suite_cases'
]
