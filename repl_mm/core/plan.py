"""Which blocks RepL replaces, and the record of what it did (spec §1, §6).

Torch-free on purpose: a plan is a function of the backbone's block shapes
and the ``replacement=dict(...)`` options only, never of ``mode`` or
``neighbors``, so E2E (``mode='none'``), ``drop`` and ``synthesize`` of one
backbone share one plan and compare like with like.
"""
from dataclasses import asdict, dataclass, field, fields
from typing import Dict, List, Optional, Sequence, Tuple

MODES = ('synthesize', 'interpolate', 'drop', 'none', 'static')
# The trained modes a static model can be computed from.
STATIC_FROM = ('synthesize', 'interpolate')
NEIGHBORS = ('both', 'prev', 'next')
VIT_WEIGHTS = ('attn+mlp', 'attn', 'mlp', 'none')
ON_INVALID = ('shift', 'skip', 'error')


def _choice(name, value, choices):
    if value not in choices:
        raise ValueError(f'replacement option {name} must be one of '
                         f'{choices}, but got {value!r}')


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
        recompute (bool): Sites store only their input and output for
            backward and recompute their light update (pointwise chain,
            norm, activation) in backward: the memory a replaced block
            saves is kept, at the cost of re-running the cheap site
            forward. Same function and gradients either way; False stores
            the intermediates instead. Our option, not the paper's.
            Defaults to True.
        static_from (str): With ``mode='static'`` only: the mode of the
            trained model the static sites were computed from,
            ``'synthesize'`` (static computing layers) or
            ``'interpolate'`` (plain blocks with the interpolated weights).
            Defaults to ``'synthesize'``.
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
        _choice('mode', self.mode, MODES)
        _choice('static_from', self.static_from, STATIC_FROM)
        if self.mode != 'static' and self.static_from != 'synthesize':
            raise ValueError(
                'replacement option static_from applies to '
                f"mode='static' only, but got static_from="
                f'{self.static_from!r} with mode={self.mode!r}')
        _choice('on_invalid', self.on_invalid, ON_INVALID)
        _choice('neighbors', self.neighbors, NEIGHBORS)
        _choice('vit_weights', self.vit_weights, VIT_WEIGHTS)
        _choice('num_scalars', self.num_scalars, (1, 2))
        if isinstance(self.interval, bool) or not isinstance(
                self.interval, int) or self.interval < 2:
            raise ValueError('replacement option interval must be an int '
                             f'>= 2, but got {self.interval!r}')
        if isinstance(self.offset, bool) or not isinstance(
                self.offset, int) or not 0 <= self.offset < self.interval:
            raise ValueError(
                f'replacement option offset must be an int in [0, '
                f'{self.interval}) (interval={self.interval}), but got '
                f'{self.offset!r}')
        if self.indices is not None:
            idx = self.indices
            if isinstance(idx, (str, bytes)) or not isinstance(
                    idx, Sequence) or not idx or not all(
                        isinstance(i, int) and not isinstance(i, bool)
                        for i in idx):
                raise ValueError('replacement option indices must be a '
                                 'non-empty list of 1-based ints, but got '
                                 f'{idx!r}')
            if len(set(idx)) != len(idx):
                raise ValueError('replacement option indices has repeated '
                                 f'entries: {list(idx)!r}')
            object.__setattr__(self, 'indices', tuple(idx))
        for name in ('residual', 'zero_init', 'recompute'):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f'replacement option {name} must be a '
                                 f'bool, but got {getattr(self, name)!r}')
        if isinstance(self.scale, bool) or not isinstance(
                self.scale, (int, float)):
            raise ValueError('replacement option scale must be a number, '
                             f'but got {self.scale!r}')

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


class ReplacementPlan:
    """The immutable record of a replacement: options and sites.

    Args:
        config (ReplacementConfig): The options that produced it.
        num_blocks (int): Residual blocks in the backbone.
        sites (Sequence[SiteRecord]): One record per site, ascending.
        notes (Sequence[str]): Shifted or dropped candidates.
    """

    def __init__(self, config: ReplacementConfig, num_blocks: int,
                 sites: Sequence[SiteRecord], notes: Sequence[str] = ()):
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

    def diff(self, other: dict) -> List[str]:
        """Human-readable differences between this plan and ``other``
        (a :meth:`to_dict` output); empty when they describe one model."""
        mine = self.to_dict()
        out = []
        if other.get('num_blocks') != mine['num_blocks']:
            out.append(f"num_blocks: checkpoint {other.get('num_blocks')}, "
                       f"model {mine['num_blocks']}")
        theirs_mode = other.get('config', {}).get('mode')
        if theirs_mode != self.mode:
            out.append(f'mode: checkpoint {theirs_mode!r}, model '
                       f'{self.mode!r}')
        elif self.mode == 'static':
            theirs_from = other['config'].get('static_from', 'synthesize')
            if theirs_from != self._config.static_from:
                out.append(f'static_from: checkpoint {theirs_from!r}, '
                           f'model {self._config.static_from!r}')
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
        return out

    def __eq__(self, other):
        return isinstance(other, ReplacementPlan) and \
            self.to_dict() == other.to_dict()

    def __hash__(self):
        return hash(self.indices)

    def __repr__(self):
        return (f'ReplacementPlan(mode={self.mode!r}, '
                f'indices={self.indices}, num_blocks={self._num_blocks})')

    def __str__(self):
        head = ('site', 'stage', 'block', 'prev', 'next', 'sources',
                'removed', 'added')
        rows = [head]
        for s in self._sites:
            src = ' '.join(f"{k}:{'+'.join(v)}" for k, v in s.sources.items())
            rows.append((str(s.index), str(s.stage), str(s.block),
                         str(s.prev or '-'), str(s.next or '-'), src or '-',
                         f'{s.removed_params:,}', f'{s.added_params:,}'))
        widths = [max(len(r[c]) for r in rows) for c in range(len(head))]
        done = {
            'none': 'planned, all kept (E2E)',
            'drop': 'removed',
            'static': f'static (from {self._config.static_from}, '
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
