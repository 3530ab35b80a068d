# Mixing weights (phi, alpha, beta) and the sites' fresh norms get no weight
# decay (spec §8): a train-mode norm after the last position cancels the
# scale of its phi, so decay would only drag it toward zero.
# A config adds this file to its `_base_` list and writes
#   optim_wrapper = dict(
#       constructor='RepLOptimWrapperConstructor',
#       paramwise_cfg=dict(custom_keys={{_base_.repl_no_decay_keys}}))
# (mmengine forbids two bases that both set `optim_wrapper`). The
# constructor builds mmengine's default param groups and logs one summary
# line instead of one line per parameter. custom_keys
# match substrings of parameter names (`backbone.layer2.1.phi1_prev`,
# `backbone.layers.3.alpha`, `backbone.layer2.1.site_norm.weight`), merge
# with upstream's custom_keys and take precedence over the other paramwise
# rules. Equal to `repl_mm.core.NO_DECAY_KEYS` (tested).
repl_no_decay_keys = {
    '.phi': dict(decay_mult=0.0),
    '.alpha': dict(decay_mult=0.0),
    '.beta': dict(decay_mult=0.0),
    '.site_norm.': dict(decay_mult=0.0),
}
