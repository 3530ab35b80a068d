"""Rendering of benchmark results (repl_mm/analysis/report.py): the marks
of a timing on a loaded machine, the compiled table, the single-block
table. Results are written by hand; nothing is measured."""
import copy

from repl_mm.analysis.report import (blocks_markdown, load_note,
                                     profile_markdown, time_ratio_text,
                                     to_markdown)

LOADED = dict(before=2.4, after=3.1, max=3.1, threads=2, reliable=False)
IDLE = dict(before=1.1, after=1.9, max=1.9, threads=2, reliable=True)


def method(ratio=1.0, s_time=None):
    return dict(
        time_ratio=dict(median=ratio, q1=ratio, q3=ratio),
        flops=dict(step=1e9, synthesis_step=0.0),
        saved_bytes=2**20,
        mem_ratio=1.0,
        synthesis_kept_bytes=0,
        peak_bytes=2**20,
        peak_ratio=1.0,
        time_ms=dict(median=10.0),
        sites=[],
        S_mem=None,
        S_mem_large_batch=None,
        S_peak=None,
        S_time=s_time,
        S_flops=None,
        params=1)


def case(load=None):
    c = dict(
        name='c',
        backbone='B',
        batch_size=2,
        input_size=[8, 8],
        repeats=3,
        methods=dict(e2e=method(s_time=0.0), repl=method(1.08, 0.25)))
    if load is not None:
        c['load'] = load
    return c


def test_time_ratio_text():
    assert time_ratio_text(1.08) == '1.08 x E2E'
    assert time_ratio_text(1.08, IDLE) == '1.08 x E2E'
    assert time_ratio_text(1.08, LOADED) == \
        '1.08 x E2E (unreliable: load 3.1 > 2 threads)'
    assert load_note(dict(LOADED, threads=1)) == \
        'unreliable: load 3.1 > 1 thread'
    assert load_note(dict(LOADED, reliable=None)) == ''


def test_markdown_marks_times_of_a_loaded_machine():
    md = to_markdown(
        dict(
            cases=[case(LOADED)],
            targets=[
                dict(
                    case='c',
                    target='repl S_time >= 0.8 (aim)',
                    value=0.25,
                    met=False,
                    reliable=False)
            ]))
    lines = md.splitlines()
    assert lines[0] == '### c: B, batch 2 x 3x8x8, 3 trials'
    assert lines[2].startswith('Step times unreliable: load 3.1 > 2 '
                               'threads (load average 2.4 before, 3.1 after')
    repl = next(x for x in lines if x.startswith('| repl |'))
    assert '| 1.080 [1.080, 1.080] (unreliable) |' in repl
    assert '| 0.250 (unreliable) |' in repl
    e2e = next(x for x in lines if x.startswith('| e2e |'))
    assert 'unreliable' not in e2e  # 1 and 0 by construction
    assert '| c | repl S_time >= 0.8 (aim) | 0.250 | no (unreliable) |' in md


def test_markdown_of_an_idle_machine_or_an_old_run_has_no_mark():
    for c in (case(IDLE), case()):
        assert 'unreliable' not in to_markdown(dict(cases=[c]))


def test_compiled_table():
    c = case()
    comp = {
        m: dict(copy.deepcopy(r), compile_seconds=12.5)
        for m, r in c['methods'].items()
    }
    comp['drop'] = dict(failed='RuntimeError: a | b')
    c['compiled'] = dict(backend='inductor', methods=comp)
    md = to_markdown(dict(cases=[c]))
    assert '#### c, compiled (torch.compile, backend inductor;' in md
    assert '| repl | 12.5 | 1.0 | 1.000 | 1.0 | 1.000 | 10 | ' \
        '1.080 [1.080, 1.080] | 0.250 | - |' in md
    assert '| drop | failed: RuntimeError: a \\| b |' in md


def test_blocks_table():
    site = dict(
        time_ratio=dict(median=0.5, q1=0.4, q3=0.6),
        flops_ratio=0.25,
        bytes_ratio=0.75)
    result = dict(
        name='r20',
        backbone='RepLResNet_CIFAR',
        repeats=5,
        options=['recompute', 'no recompute'],
        load=LOADED,
        rows=[
            dict(
                index=5,
                name='layer2.1',
                shape=[2, 32, 16, 16],
                block=dict(time_ms=dict(median=1.234)),
                sites={
                    'recompute': site,
                    'no recompute': site
                })
        ])
    lines = blocks_markdown(result).splitlines()
    assert lines[0] == ('### r20: RepLResNet_CIFAR, single blocks, 5 trials '
                        '(zero_init=False)')
    assert 'the time ratios are marked' in lines[2]
    assert lines[4] == (
        '| block | shape | block fwd+bwd (ms) | site/block time (recompute) '
        '| site/block time (no recompute) | FLOPs site/block (recompute) | '
        'FLOPs site/block (no recompute) | bytes site/block (recompute) | '
        'bytes site/block (no recompute) |')
    assert lines[6] == (
        '| 5 (layer2.1) | 2x32x16x16 | 1.23 | 0.500 [0.400, 0.600] '
        '(unreliable) | 0.500 [0.400, 0.600] (unreliable) | 0.250 | 0.250 | '
        '0.750 | 0.750 |')


def test_profile_markdown():
    prof = dict(
        wall_ms=4.0,
        self_ms=2.5,
        aten_calls=40,
        shares={
            'conv/matmul': 0.5,
            'norm': 0.25,
            'other': 0.25
        },
        top=[
            dict(op='aten::mkldnn_convolution', ms=1.0, share=0.4, calls=2),
            dict(
                op='## Call CompiledFxGraph fx3a ##',
                ms=0.5,
                share=0.2,
                calls=4)
        ])
    result = dict(
        name='r20',
        options=['recompute'],
        rows=[
            dict(
                index=5,
                name='layer2.1',
                block=dict(profile=prof, time_ms=dict(median=5.0)),
                sites={
                    'recompute': dict(profile=prof, time_ms=dict(median=2.5))
                })
        ])
    lines = profile_markdown(result).splitlines()
    assert lines[0].startswith('### r20: where the time goes')
    assert lines[4] == (
        '| 5 (layer2.1) | block | 5.00 | 4.00 | 2.50 | 38% | 40 | 50% | 25% '
        '| 25% | mkldnn_convolution 40%, compiled graph 20% |')
    assert lines[5].startswith('| 5 (layer2.1) | site (recompute) | 2.50 | '
                               '4.00 | 2.50 | 38% |')
    result['rows'][0]['block'].pop('profile')
    assert profile_markdown(result) == ''
