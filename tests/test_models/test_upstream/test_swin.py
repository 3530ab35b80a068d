"""What mmdet's, mmseg's and mmpretrain's own Swin tests check, run against
``RepLSwinTransformer`` with ``replacement=dict(mode='none')``: the RepL
class must behave as upstream's wherever RepL changes nothing (argument
checks, output shapes at odd input sizes, absolute position embedding,
patch norm, frozen stages, with_cp, stochastic depth, norm_eval, old
checkpoints). Written for this project after the upstream tests, with no
pretrained downloads; where the architecture does not matter to a check,
a narrow one keeps it fast.
"""
import functools
import math

import pytest
import torch

DET_SEG = ['repl_mm.models.det_swin', 'repl_mm.models.seg_swin']


def e2e(module):
    """The module's RepLSwinTransformer in E2E mode."""
    import importlib
    cls = importlib.import_module(module).RepLSwinTransformer
    return functools.partial(cls, replacement=dict(mode='none'))


# -- mmdet and mmseg ---------------------------------------------------------


@pytest.mark.parametrize('module', DET_SEG)
def test_det_seg_argument_checks(module):
    Swin = e2e(module)
    with pytest.raises(TypeError):
        Swin(pretrained=123)  # a checkpoint path or None
    with pytest.raises(AssertionError):
        # non-overlapping patch embedding: stride == patch size
        Swin(strides=(2, 2, 2, 2), patch_size=4)
    with pytest.raises(AssertionError):
        Swin(pretrain_img_size=(224, 224, 224))
    Swin(pretrain_img_size=(224, ))


@pytest.mark.parametrize('module', DET_SEG)
def test_det_seg_swin_t_shapes_at_odd_sizes(module):
    Swin = e2e(module)
    model = Swin()  # Swin-T: 96 wide, depths 2, 2, 6, 2, window 7
    assert model.replacement_plan.indices == (4, 8)
    outs = model(torch.randn(1, 3, 112, 137))
    assert [tuple(o.shape) for o in outs] == [(1, 96, 28, 35),
                                              (1, 192, 14, 18), (1, 384, 7, 9),
                                              (1, 768, 4, 5)]
    outs = model(torch.randn(1, 3, 127, 127))  # padded to the patch size
    assert [tuple(o.shape[2:]) for o in outs] == [(32, 32), (16, 16), (8, 8),
                                                  (4, 4)]


@pytest.mark.parametrize('module', DET_SEG)
def test_det_seg_abs_pos_embed_patch_norm_frozen(module):
    Swin = e2e(module)
    narrow = dict(embed_dims=16, num_heads=(1, 2, 2, 4), window_size=2)
    x = torch.randn(1, 3, 64, 64)
    model = Swin(pretrain_img_size=64, use_abs_pos_embed=True, **narrow)
    assert torch.all(model.absolute_pos_embed == 0)
    model.init_weights()
    assert not torch.all(model.absolute_pos_embed == 0)
    model(x)
    Swin(patch_norm=False, **narrow)(x)
    model = Swin(frozen_stages=4, **narrow)
    model.train()
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize('module', DET_SEG)
def test_det_seg_blocks_take_hw_shape_with_and_without_cp(module):
    for with_cp in (False, True):
        model = e2e(module)(
            embed_dims=16,
            num_heads=(1, 2, 2, 4),
            window_size=7,
            with_cp=with_cp)
        block = model.stages[0].blocks[0]
        assert block.with_cp == with_cp
        assert block.attn.w_msa.num_heads == 1
        assert block.ffn.feedforward_channels == 64
        x = torch.randn(1, 14 * 14, 16, requires_grad=True)
        assert block(x, (14, 14)).shape == x.shape


# -- mmpretrain --------------------------------------------------------------

TINY_ARCH = dict(embed_dims=16, depths=[2, 2, 4, 2], num_heads=[1, 2, 2, 4])


def cls_swin(**kwargs):
    return e2e('repl_mm.models.cls_swin')(**kwargs)


def test_cls_arch():
    with pytest.raises(AssertionError, match='not in default archs'):
        cls_swin(arch='unknown')
    with pytest.raises(AssertionError, match='Custom arch needs'):
        cls_swin(arch=dict(embed_dims=96, num_heads=[3, 6, 12, 16]))
    model = cls_swin(arch=TINY_ARCH)
    for i, stage in enumerate(model.stages):
        assert stage.embed_dims == 16 * 2**i
        assert len(stage.blocks) == TINY_ARCH['depths'][i]
        assert stage.blocks[0].attn.w_msa.num_heads == \
            TINY_ARCH['num_heads'][i]
    assert cls_swin(arch='tiny').replacement_plan.indices == (4, 8)


def test_cls_init_weights_and_old_checkpoints(tmp_path):
    """Init changes the weights and the position embedding; a checkpoint
    saved as version 1 (``norm``, ``attn_mask``) and as the current
    version load strictly, also into another image size (the position
    embedding is resized)."""
    from mmengine.runner import load_checkpoint, save_checkpoint
    from mmpretrain.models.utils import resize_pos_embed
    cfg = dict(
        arch=TINY_ARCH,
        img_size=64,
        use_abs_pos_embed=True,
        init_cfg=[
            dict(
                type='Kaiming',
                layer='Conv2d',
                mode='fan_in',
                nonlinearity='linear')
        ])
    model = cls_swin(**cfg)
    before = model.patch_embed.projection.weight.clone()
    assert torch.all(model.absolute_pos_embed == 0)
    model.init_weights()
    assert not torch.allclose(before, model.patch_embed.projection.weight)
    assert not torch.all(model.absolute_pos_embed == 0)
    pos = model.absolute_pos_embed.detach().clone()
    current = str(tmp_path / 'v3.pth')
    save_checkpoint(model.state_dict(), current)
    model.norm = model.norm3
    del model.norm3
    model.stages[0].blocks[1].attn.register_buffer('attn_mask',
                                                   torch.zeros(4, 4, 4))
    model._version = 1
    old = str(tmp_path / 'v1.pth')
    save_checkpoint(model.state_dict(), old)
    load_checkpoint(cls_swin(**cfg), old, strict=True)
    load_checkpoint(cls_swin(**cfg), current, strict=True)
    bigger = cls_swin(**dict(cfg, img_size=96))
    load_checkpoint(bigger, current, strict=True)
    assert torch.allclose(
        bigger.absolute_pos_embed,
        resize_pos_embed(pos, (16, 16), (24, 24), 'bicubic', 0))


def test_cls_forward():
    imgs = torch.randn(1, 3, 64, 64)
    outs = cls_swin(arch=TINY_ARCH, img_size=64, window_size=2)(imgs)
    assert isinstance(outs, tuple) and len(outs) == 1
    assert outs[-1].shape == (1, 128, 2, 2)
    # a window larger than a stage's map: refused, or padded
    model = cls_swin(arch=TINY_ARCH, img_size=96, window_size=3)
    assert model(torch.randn(1, 3, 96, 96))[-1].shape == (1, 128, 3, 3)
    with pytest.raises(AssertionError, match=r'the window size \(3\)'):
        model(imgs)
    model = cls_swin(
        arch=TINY_ARCH, img_size=96, window_size=3, pad_small_map=True)
    assert model(imgs)[-1].shape == (1, 128, 2, 2)
    model = cls_swin(
        arch=TINY_ARCH, img_size=64, window_size=2, out_indices=(0, 1, 2, 3))
    outs = model(imgs)
    assert len(outs) == 4
    for stride, out in zip([1, 2, 4, 8], outs):
        assert out.shape == (1, 16 * stride, 16 // stride, 16 // stride)
    model = cls_swin(arch=TINY_ARCH, img_size=64, window_size=2, with_cp=True)
    assert all(b.with_cp for s in model.stages for b in s.blocks)
    model.init_weights()
    model.train()
    assert model(imgs)[-1].shape == (1, 128, 2, 2)
    model = cls_swin(arch=TINY_ARCH, img_size=64, window_size=2)
    for shape in [(64, 64), (96, 96), (96, 123)]:
        out = model(torch.randn(1, 3, *shape))[-1]
        assert out.shape == (1, 128, math.ceil(shape[0] / 32),
                             math.ceil(shape[1] / 32))


def test_cls_structure():
    from mmengine.utils.dl_utils.parrots_wrapper import _BatchNorm
    model = cls_swin(arch=TINY_ARCH, drop_path_rate=0.2)
    blocks = [b for s in model.stages for b in s.blocks]
    for i, block in enumerate(blocks):
        rate = 0.2 / (len(blocks) - 1) * i
        assert block.ffn.dropout_layer.drop_prob == pytest.approx(rate)
        assert block.attn.drop.drop_prob == pytest.approx(rate)
    model = cls_swin(
        arch=TINY_ARCH,
        norm_eval=True,
        norm_cfg=dict(type='BN'),
        stage_cfgs=dict(block_cfgs=dict(norm_cfg=dict(type='BN'))))
    model.init_weights()
    model.train()
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    assert bns and not any(m.training for m in bns)
    model = cls_swin(arch=TINY_ARCH, frozen_stages=0, out_indices=(0, 1, 2, 3))
    model.init_weights()
    model.train()
    assert not model.patch_embed.training
    assert not any(p.requires_grad for p in model.patch_embed.parameters())
    assert not any(p.requires_grad for p in model.stages[0].parameters())
    assert not any(p.requires_grad for p in model.norm0.parameters())
    for i in range(1, 4):
        assert all(p.requires_grad for p in model.stages[i].parameters())
        assert all(
            p.requires_grad for p in getattr(model, f'norm{i}').parameters())
