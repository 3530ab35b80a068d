"""Checkpoint converters' library code (``tools/model_converters`` only
parses arguments): :mod:`.from_e2e` starts RepL from a trained E2E model
(the site fits themselves are :mod:`.site_fit`, torch only) and
:mod:`.to_static` exports a trained RepL model as a static one."""
