import torch

from repl_mm.core.synthesis import (apply_chain, attention_operator,
                                    collapse_kernel, fold_chain, mix_channels,
                                    mlp_operator, should_fold)


def test_collapse_kernel_sums_taps():
    w = torch.arange(2 * 1 * 2 * 2, dtype=torch.float).view(2, 1, 2, 2)
    assert collapse_kernel(w).tolist() == [[6.], [22.]]


def test_mix_channels_is_diag_phi_times_w():
    w1 = torch.ones(2, 3)
    w2 = 2 * torch.ones(2, 3)
    phi1 = torch.tensor([1., 0.])
    phi2 = torch.tensor([0.5, 3.])
    out = mix_channels([(phi1, w1), (phi2, w2)])
    assert out.tolist() == [[2.] * 3, [6.] * 3]
    assert torch.equal(out, torch.diag(phi1) @ w1 + torch.diag(phi2) @ w2)


def test_chain_fold_equals_sequential():
    torch.manual_seed(0)
    mats = [torch.randn(4, 16), torch.randn(4, 4), torch.randn(16, 4)]
    x = torch.randn(2, 16, 5, 5)
    a = apply_chain(x, mats, fold=True)
    b = apply_chain(x, mats, fold=False)
    assert torch.allclose(a, b, atol=1e-4)
    assert torch.allclose(fold_chain(mats), mats[2] @ mats[1] @ mats[0])
    # Bottleneck-shaped chains are cheaper unfolded at large maps;
    # square BasicBlock chains are cheaper folded.
    assert not should_fold(mats, 10000)
    assert should_fold([torch.randn(8, 8), torch.randn(8, 8)], 10000)


def test_vit_operators():
    d = 3
    qkv = torch.randn(3 * d, d)
    proj = torch.randn(d, d)
    assert torch.allclose(attention_operator(qkv, proj), proj @ qkv[2 * d:])
    fc1, fc2 = torch.randn(4 * d, d), torch.randn(d, 4 * d)
    assert mlp_operator(fc1, fc2).shape == (d, d)
