"""Checkpoint converters' library code: start RepL from an E2E model and
export a trained RepL model as a static one (``tools/model_converters``)."""
