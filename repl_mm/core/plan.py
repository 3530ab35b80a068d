"""Which blocks RepL replaces, and the record of what it did (spec §1, §6).

Torch-free on purpose: a plan is a function of the backbone's block shapes
and the ``replacement=dict(...)`` options only, never of ``mode`` or
``neighbors``, so E2E (``mode='none'``), ``drop`` and ``synthesize`` of one
backbone share one plan and compare like with like.
"""
import math
import numbers
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Dict, List, Optional, Sequence, Tuple

from .contract import BlockKind

MODES = ('synthesize', 'interpolate', 'drop', 'none', 'static')
# The trained modes a static model can be computed from.
STATIC_FROM = ('synthesize', 'interpolate')
NEIGHBORS = ('both', 'prev', 'next')
VIT_WEIGHTS = ('attn+mlp', 'attn', 'mlp', 'none')
ON_INVALID = ('shift', 'skip', 'error')


def _got(value) -> str:
    """``value`` and its type, as errors show them: ``True (bool)``."""
    return f'{value!r} ({type(value).__name__})'


def _invalid(name: str, expected: str, value) -> ValueError:
    return ValueError(f'replacement option {name} must be {expected}, but '
                      f'got {_got(value)}')


def _is_int(value) -> bool:
    """An integer that is not a bool (``True`` is an ``int`` in Python)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _choice(name, value, choices):
    if not isinstance(value, str) or value not in choices:
        raise _invalid(name, f'one of {choices}', value)


@dataclass(frozen=True)
class ReplacementConfig:
    """The options of ``replacement=dict(...)`` (spec §5), validated.

    Args:
        mode (str): ``'synthesize'`` (computing layer), ``'interpolate'``
            (supplement Algorithm 1), ``'drop'`` (identity), ``'none'``
            (plain end-to-end) or ``'static'``: inference only, each site's
            operator held as an ordinary weight computed once from a
            trained ``static_from`` model (no neighbour references, no
            synthesis; paper A.5.3; written by
            ``tools/model_converters/repl_to_static.py``). Defaults to
            ``'synthesize'``.
        interval (int): k of Eq. 2; candidates are i = offset (mod k).
            Defaults to 4.
        offset (int): Residue of the rule, ``0 <= offset < interval``.
            Defaults to 0.
        indices (list[int], optional): Explicit 1-based sites; replaces the
            interval rule. Defaults to None.
        on_invalid (str): What a candidate that does not preserve shape
            does: ``'shift'`` to the next replaceable block, ``'skip'`` or
            ``'error'``. Defaults to ``'shift'``.
        neighbors (str): ``'both'``, ``'prev'`` or ``'next'`` (Table 7).
            Defaults to ``'both'``.
        vit_weights (str): Which ViT operators are drawn from the
            neighbours (Table 6). Defaults to ``'attn+mlp'``.
        num_scalars (int): ViT mixing scalars, 2 (alpha, beta) or 1
            (beta = 1 - alpha, Table 14). Defaults to 2.
        residual (bool): CNN sites keep the skip connection. Defaults to
            True.
        zero_init (bool): A site's fresh norm starts with zero gamma, so the
            site starts as its skip path. Defaults to True.
        scale (float): Multiplier of a site's update (a buffer, not
            trained; 0 leaves the skip path). Defaults to 1.0.
        recompute (bool): Sites store only their input (and their
            activation's output) for backward and re-run their light
            update (synthesis, pointwise chain, norm, drop path) in
            backward: nothing weight-sized or intermediate is kept, so the
            memory a replaced block saves is kept, at the cost of re-running
            the cheap site forward. Same function and gradients either way
            (also over several backward passes through one graph); False
            stores the intermediates instead. Our option, not the paper's.
            Defaults to True.
        static_from (str): With ``mode='static'`` only: the mode of the
            trained model the static sites were computed from,
            ``'synthesize'`` (static computing layers) or
            ``'interpolate'`` (plain blocks with the interpolated weights).
            Defaults to ``'synthesize'``.

    Every option is checked for its type and its value; an invalid one
    raises a ``ValueError`` naming the option, the value and its type
    (``num_scalars must be an int (1 or 2), but got True (bool)``).
    Integers may be of any integral type but ``bool``; ``scale`` any finite
    real number but ``bool``; numbers are stored as plain ``int`` and
    ``float``. Which options a checkpoint's plan must match is
    :meth:`ReplacementPlan.compare`'s to decide.
    """

    mode: str = 'synthesize'
    interval: int = 4
    offset: int = 0
    indices: Optional[Tuple[int, ...]] = None
    on_invalid: str = 'shift'
    neighbors: str = 'both'
    vit_weights: str = 'attn+mlp'
    num_scalars: int = 2
    residual: bool = True
    zero_init: bool = True
    scale: float = 1.0
    recompute: bool = True
    static_from: str = 'synthesize'

    def __post_init__(self):
        # Type and value of every option (see the class docstring); plain
        # int and float are stored, so the recorded plan stays JSON.
        _choice('mode', self.mode, MODES)
        _choice('static_from', self.static_from, STATIC_FROM)
        if self.mode != 'static' and self.static_from != 'synthesize':
            raise ValueError('replacement option static_from applies to '
                             f"mode='static' only, but got static_from="
                             f'{self.static_from!r} with mode={self.mode!r}')
        _choice('on_invalid', self.on_invalid, ON_INVALID)
        _choice('neighbors', self.neighbors, NEIGHBORS)
        _choice('vit_weights', self.vit_weights, VIT_WEIGHTS)
        if not _is_int(self.num_scalars) or self.num_scalars not in (1, 2):
            raise _invalid('num_scalars', 'an int (1 or 2)', self.num_scalars)
        if not _is_int(self.interval) or self.interval < 2:
            raise _invalid('interval', 'an int >= 2', self.interval)
        if not _is_int(self.offset) or not 0 <= self.offset < self.interval:
            raise _invalid(
                'offset', f'an int in [0, {self.interval}) (interval='
                f'{self.interval})', self.offset)
        for name in ('num_scalars', 'interval', 'offset'):
            object.__setattr__(self, name, int(getattr(self, name)))
        if self.indices is not None:
            idx = self.indices
            expected = 'None or a non-empty list of 1-based ints'
            not_list = isinstance(
                idx, (str, bytes)) or not isinstance(idx, Sequence)
            if not_list or not idx:
                raise _invalid('indices', expected, idx)
            bad = [i for i in idx if not _is_int(i)]
            if bad:
                raise ValueError(
                    f'replacement option indices must be {expected}, but '
                    f'got {idx!r}: entry {_got(bad[0])} is not an int')
            if len(set(idx)) != len(idx):
                raise ValueError('replacement option indices has repeated '
                                 f'entries: {list(idx)!r}')
            object.__setattr__(self, 'indices', tuple(int(i) for i in idx))
        for name in ('residual', 'zero_init', 'recompute'):
            if not isinstance(getattr(self, name), bool):
                raise _invalid(name, 'a bool', getattr(self, name))
        if not isinstance(self.scale, numbers.Real) or isinstance(
                self.scale, bool) or not math.isfinite(self.scale):
            raise _invalid('scale', 'a finite number', self.scale)
        object.__setattr__(self, 'scale', float(self.scale))

    @classmethod
    def from_dict(cls, options: Optional[dict]) -> 'ReplacementConfig':
        """Build from a config dict, rejecting unknown keys by name."""
        if options is None:
            return cls()
        if isinstance(options, cls):
            return options
        if not isinstance(options, dict):
            raise ValueError('replacement must be a dict of options, but got '
                             f'{options!r}')
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f'unknown replacement option(s) {unknown}; '
                             f'known options are {sorted(known)}')
        return cls(**options)

    def to_dict(self) -> dict:
        d = asdict(self)
        if d['indices'] is not None:
            d['indices'] = list(d['indices'])
        return d


def select_sites(replaceable: Sequence[bool],
                 cfg: ReplacementConfig) -> Tuple[Tuple[int, ...], List[str]]:
    """Choose the 1-based sites among ``n = len(replaceable)`` blocks.

    Args:
        replaceable (Sequence[bool]): Whether block i+1 preserves shape
            (identity shortcut, stride 1, same channels in and out).
        cfg (ReplacementConfig): The options.

    Returns:
        tuple: The sorted site indices and notes (one per shifted or
        dropped candidate) for the log.

    Example:
        >>> # ResNet-50: the first block of stages 2-4 downsamples.
        >>> ok = [True] * 16
        >>> for i in (1, 4, 8, 14):
        ...     ok[i - 1] = False
        >>> select_sites(ok, ReplacementConfig())[0]
        (5, 9, 12)
    """
    n = len(replaceable)
    if cfg.indices is not None:
        for i in cfg.indices:
            if not 1 <= i < n:
                raise ValueError(
                    f'replacement option indices: {i} is out of range; '
                    f'sites are 1-based and must be < {n} (the last of the '
                    f'{n} blocks is never replaced)')
        candidates = sorted(cfg.indices)
    else:
        candidates = [i for i in range(1, n) if i % cfg.interval == cfg.offset]
    chosen, notes = [], []
    for c in candidates:
        if replaceable[c - 1] and c not in chosen:
            chosen.append(c)
            continue
        why = 'is already a site' if c in chosen else 'does not preserve shape'
        if cfg.on_invalid == 'error':
            raise ValueError(f'replacement: candidate block {c} {why} '
                             "(on_invalid='error')")
        if cfg.on_invalid == 'skip':
            notes.append(f'block {c} {why}: skipped')
            continue
        target = next((j for j in range(c + 1, n)
                       if replaceable[j - 1] and j not in chosen), None)
        if target is None:
            notes.append(f'block {c} {why} and no later block can take its '
                         'place: dropped')
        else:
            notes.append(f'block {c} {why}: shifted to {target}')
            chosen.append(target)
    if not chosen:
        raise ValueError(
            f'replacement leaves no site among {n} blocks with interval='
            f'{cfg.interval}, offset={cfg.offset}, indices={cfg.indices}, '
            f'on_invalid={cfg.on_invalid!r}')
    return tuple(sorted(chosen)), notes


def nearest_kept(i: int, n: int,
                 sites: Sequence[int]) -> Tuple[Optional[int], Optional[int]]:
    """Nearest kept (non-site) blocks before and after site ``i``."""
    prev = next((j for j in range(i - 1, 0, -1) if j not in sites), None)
    nxt = next((j for j in range(i + 1, n + 1) if j not in sites), None)
    return prev, nxt


@dataclass(frozen=True)
class SiteRecord:
    """What one site is (spec §1).

    ``sources`` maps each weight position of the replaced block (CNN: conv1,
    conv2, ...; ViT: attn, mlp) to the neighbours it is drawn from
    (``'prev'``/``'next'``) or to ``('own',)`` when the site owns it.
    """

    index: int
    stage: int
    block: int
    prev: Optional[int]
    next: Optional[int]
    sources: Dict[str, Tuple[str, ...]] = field(default_factory=dict)
    removed_params: int = 0
    added_params: int = 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d['sources'] = {k: list(v) for k, v in self.sources.items()}
        return d


# A recorded plan that lacks an option holds its default.
_CONFIG_DEFAULTS = {
    f.name: f.default
    for f in fields(ReplacementConfig) if f.default is not MISSING
}


def _site_kind(sites: Sequence[SiteRecord]) -> Optional[BlockKind]:
    """``'conv'`` when every site position is a conv (``conv1``...),
    ``'transformer'`` when none is, None when unknown (no sources, as in
    ``drop`` and ``none``, or a mix)."""
    names = {k for s in sites for k in s.sources}
    if not names:
        return None
    conv = [k.startswith('conv') for k in names]
    if all(conv):
        return BlockKind.CONV
    return None if any(conv) else BlockKind.TRANSFORMER


def _compared_options(cfg: ReplacementConfig,
                      kind: Optional[BlockKind]) -> List[str]:
    """The options that can change the function of a trained model with
    ``cfg``'s mode and sites of ``kind`` (see
    :meth:`ReplacementPlan.compare`); an unknown kind counts as both."""
    synthesized = cfg.mode == 'synthesize' or (cfg.mode == 'static' and
                                               cfg.static_from == 'synthesize')
    names = []
    if cfg.mode == 'static':
        names.append('static_from')
    if cfg.mode in ('synthesize', 'interpolate', 'static'):
        names.append('neighbors')
    if synthesized and kind != BlockKind.TRANSFORMER:
        names.append('residual')
    if synthesized and kind != BlockKind.CONV:
        names.append('vit_weights')
    if cfg.mode == 'synthesize' and kind != BlockKind.CONV:
        names.append('num_scalars')
    return names


class ReplacementPlan:
    """The immutable record of a replacement: options and sites.

    A checkpoint records :meth:`to_dict` (every option, plain types);
    loading compares it with the model's plan by :meth:`compare`, and two
    plans are equal (``==``) iff that comparison finds nothing: neither a
    difference nor a warning.

    Args:
        config (ReplacementConfig): The options that produced it.
        num_blocks (int): Residual blocks in the backbone.
        sites (Sequence[SiteRecord]): One record per site, ascending.
        notes (Sequence[str]): Shifted or dropped candidates.
    """

    def __init__(self,
                 config: ReplacementConfig,
                 num_blocks: int,
                 sites: Sequence[SiteRecord],
                 notes: Sequence[str] = ()):
        self._config = config
        self._num_blocks = num_blocks
        self._sites = tuple(sites)
        self._notes = tuple(notes)

    config = property(lambda self: self._config)
    num_blocks = property(lambda self: self._num_blocks)
    sites = property(lambda self: self._sites)
    notes = property(lambda self: self._notes)
    mode = property(lambda self: self._config.mode)

    @property
    def indices(self) -> Tuple[int, ...]:
        return tuple(s.index for s in self._sites)

    @property
    def removed_params(self) -> int:
        return sum(s.removed_params for s in self._sites)

    @property
    def added_params(self) -> int:
        return sum(s.added_params for s in self._sites)

    def to_dict(self) -> dict:
        """Plain types only (json-able): what a checkpoint records."""
        return dict(
            config=self._config.to_dict(),
            num_blocks=self._num_blocks,
            indices=list(self.indices),
            sites=[s.to_dict() for s in self._sites])

    def compare(self, other: dict) -> Tuple[List[str], List[str]]:
        """Compare this plan with a recorded one (a :meth:`to_dict`
        output, e.g. a checkpoint's), as loading does (spec §6).

        Compared, each a *difference* (loading raises):

        - ``num_blocks``, ``mode`` and, per site, its whole record (index,
          stage, block, neighbours, sources, parameter counts). The
          selection options (``interval``, ``offset``, ``indices``,
          ``on_invalid``) act only through the sites, so they are not
          compared themselves: two spellings of one set of sites match.
        - The options that change the function a trained model computes
          from its weights, wherever they can act (by ``mode``, and for
          ``residual``/``num_scalars``/``vit_weights`` by the kind of
          site, told by the sources' position names: ``conv1``... for CNN
          sites, anything else a transformer-like one):
          ``static_from`` (``mode='static'``); ``neighbors``
          (``synthesize``, ``interpolate``, ``static``); ``residual``
          (CNN, ``synthesize`` and static from ``synthesize``);
          ``vit_weights`` (transformer, ``synthesize`` and static from
          ``synthesize``); ``num_scalars`` (transformer, ``synthesize``).
          An option is compared wherever it can act, even in a plan
          where it happens not to (``neighbors`` at a site with one
          neighbour).

        A *warning* (loading logs it and goes on): ``scale`` in
        ``synthesize`` mode, a diagnostics knob (spec §5) one sets on a
        trained model on purpose.

        Not compared: ``zero_init`` (initialisation only), ``recompute``
        (same function, another evaluation order), the log notes. A
        recorded plan that lacks an option (written before the option
        existed) holds its default.

        Args:
            other (dict): A :meth:`to_dict` output.

        Returns:
            tuple[list[str], list[str]]: The differences and the warnings,
            human-readable, each empty when there is none.
        """
        mine = self.to_dict()
        out, warnings = [], []
        if other.get('num_blocks') != mine['num_blocks']:
            out.append(f"num_blocks: checkpoint {other.get('num_blocks')}, "
                       f"model {mine['num_blocks']}")
        theirs_cfg = {**_CONFIG_DEFAULTS, **(other.get('config') or {})}
        if theirs_cfg['mode'] != self.mode:
            out.append(f"mode: checkpoint {theirs_cfg['mode']!r}, model "
                       f'{self.mode!r}')
        else:
            kind = _site_kind(self._sites)
            for name in _compared_options(self._config, kind):
                theirs, ours = theirs_cfg[name], mine['config'][name]
                if theirs != ours:
                    out.append(f'{name}: checkpoint {theirs!r}, model '
                               f'{ours!r}')
            if self.mode == 'synthesize' and \
                    theirs_cfg['scale'] != mine['config']['scale']:
                warnings.append(
                    f"scale: checkpoint {theirs_cfg['scale']!r}, model "
                    f"{mine['config']['scale']!r} (a diagnostics knob: the "
                    "checkpoint loads and the sites scale their update by "
                    "the model's value)")
        theirs = {s['index']: s for s in other.get('sites', [])}
        ours = {s['index']: s for s in mine['sites']}
        for i in sorted(set(theirs) | set(ours)):
            if i not in ours:
                out.append(f'site {i}: in the checkpoint, not in the model')
            elif i not in theirs:
                out.append(f'site {i}: in the model, not in the checkpoint')
            else:
                keys = [k for k in ours[i] if ours[i][k] != theirs[i].get(k)]
                if keys:
                    out.append(f'site {i}: differs in ' + ', '.join(
                        f'{k} (checkpoint {theirs[i].get(k)}, model '
                        f'{ours[i][k]})' for k in keys))
        return out, warnings

    def diff(self, other: dict) -> List[str]:
        """The differences of :meth:`compare`: human-readable, empty when
        a checkpoint recording ``other`` (a :meth:`to_dict` output) loads
        into this plan's model."""
        return self.compare(other)[0]

    def load_warnings(self, other: dict) -> List[str]:
        """The warnings of :meth:`compare` (options that load but differ:
        ``scale``)."""
        return self.compare(other)[1]

    def __eq__(self, other):
        """Equal iff :meth:`compare` finds neither a difference nor a
        warning: the plans describe one model, computing one function of
        the same weights. Options :meth:`compare` does not look at
        (``zero_init``, ``recompute``, the selection options beyond the
        sites they select) do not take part."""
        if not isinstance(other, ReplacementPlan):
            return NotImplemented
        differences, warnings = self.compare(other.to_dict())
        return not differences and not warnings

    def __hash__(self):
        return hash((self.mode, self._num_blocks, self.indices))

    def __repr__(self):
        return (f'ReplacementPlan(mode={self.mode!r}, '
                f'indices={self.indices}, num_blocks={self._num_blocks})')

    def __str__(self):
        head = ('site', 'stage', 'block', 'prev', 'next', 'sources', 'removed',
                'added')
        rows = [head]
        for s in self._sites:
            src = ' '.join(f"{k}:{'+'.join(v)}" for k, v in s.sources.items())
            rows.append(
                (str(s.index), str(s.stage), str(s.block), str(s.prev or '-'),
                 str(s.next or '-'), src
                 or '-', f'{s.removed_params:,}', f'{s.added_params:,}'))
        widths = [max(len(r[c]) for r in rows) for c in range(len(head))]
        done = {
            'none':
            'planned, all kept (E2E)',
            'drop':
            'removed',
            'static':
            f'static (from {self._config.static_from}, '
            'inference only)'
        }.get(self.mode, 'replaced')
        lines = [
            f'RepL plan: mode={self.mode}, {len(self._sites)} of '
            f'{self._num_blocks} blocks {done}, params -'
            f'{self.removed_params:,} +{self.added_params:,}'
        ]
        for r in rows:
            lines.append('  '.join(v.ljust(w) for v, w in zip(r, widths)))
        lines += [f'note: {n}' for n in self._notes]
        return '\n'.join(lines)
