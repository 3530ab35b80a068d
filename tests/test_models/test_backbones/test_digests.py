"""State-dict keys, shapes and dtypes, plan record and plan table of every
registered backbone under each mode: pinned by digest, so a refactor of the
surgery or of an adapter cannot change what checkpoints hold.

A deliberate change of a key, shape or plan changes a digest: update the
entry with the value the failure prints, and say why in the commit.
"""
import hashlib
import json

import pytest
import torch

from .cases import CASES, IDS

OPTIONS = [
    dict(),
    dict(mode='interpolate'),
    dict(mode='drop'),
    dict(mode='none'),
    dict(mode='static'),
    dict(mode='static', static_from='interpolate'),
    dict(interval=2, neighbors='prev'),
]

DIGESTS = {
    'det-r18/0': '335e9bf62eefd8df',
    'det-r18/1': 'a21c692aac31cf17',
    'det-r18/2': 'e907d0aa6a050255',
    'det-r18/3': '97a3fcaf7b109f69',
    'det-r18/4': '77d721d2448930e8',
    'det-r18/5': 'a311d91bb68f17e9',
    'det-r18/6': 'd05e545e707a2ec3',
    'det-r50/0': 'dfc5899290887970',
    'det-r50/1': '44e6195cbbf34b16',
    'det-r50/2': '94bb8a34ec5f4c85',
    'det-r50/3': '6364334ce8e6999d',
    'det-r50/4': 'f17a83369123dd5c',
    'det-r50/5': 'f470ff042ae5c40c',
    'det-r50/6': '75deead58ca62458',
    'seg-r50v1c/0': '1482407b92cb8515',
    'seg-r50v1c/1': '08b1a351e93c52a4',
    'seg-r50v1c/2': 'bc3c43abdeb206a5',
    'seg-r50v1c/3': '8a4def5084800c94',
    'seg-r50v1c/4': '7e231f8a5c99136d',
    'seg-r50v1c/5': '8e0553811ffcf16e',
    'seg-r50v1c/6': '81d82accd47ab5ca',
    'cls-r18/0': '335e9bf62eefd8df',
    'cls-r18/1': 'a21c692aac31cf17',
    'cls-r18/2': 'e907d0aa6a050255',
    'cls-r18/3': '97a3fcaf7b109f69',
    'cls-r18/4': '77d721d2448930e8',
    'cls-r18/5': 'a311d91bb68f17e9',
    'cls-r18/6': 'd05e545e707a2ec3',
    'cls-r50/0': 'dfc5899290887970',
    'cls-r50/1': '44e6195cbbf34b16',
    'cls-r50/2': '94bb8a34ec5f4c85',
    'cls-r50/3': '6364334ce8e6999d',
    'cls-r50/4': 'f17a83369123dd5c',
    'cls-r50/5': 'f470ff042ae5c40c',
    'cls-r50/6': '75deead58ca62458',
    'cls-cifar-r18/0': '22311d5a927a3341',
    'cls-cifar-r18/1': '00a6ce76708fbc4c',
    'cls-cifar-r18/2': 'ddfc3cb9e32de187',
    'cls-cifar-r18/3': '2c2f29f9a94e3139',
    'cls-cifar-r18/4': '335cd4a9d9f9caaf',
    'cls-cifar-r18/5': '874f82d9875c1dd2',
    'cls-cifar-r18/6': '18c65b627f6756ad',
    'cls-cifar-r20/0': '888e5651170fbb1a',
    'cls-cifar-r20/1': '70d5a3b0aeee2bf6',
    'cls-cifar-r20/2': '02bb267178f7c6d6',
    'cls-cifar-r20/3': 'd616c940bc8a2dc5',
    'cls-cifar-r20/4': 'd9551e9ad4e48280',
    'cls-cifar-r20/5': 'b8ca5218c1e0805a',
    'cls-cifar-r20/6': 'e557446d5036a74f',
    'det-x50/0': 'a5f50cc2c438e55b',
    'det-x50/1': 'b63404b191e7ea5a',
    'det-x50/2': '9bc770d0f23340b7',
    'det-x50/3': '87eeea51c846ca8d',
    'det-x50/4': '8d0c0c7ea4a330c6',
    'det-x50/5': 'eec2c46169259514',
    'det-x50/6': '38df074ba977a1e8',
    'det-r50v1d/0': 'f30d68d4ce2c05d2',
    'det-r50v1d/1': '86041df837ff33bc',
    'det-r50v1d/2': 'da5fe8bce35d4001',
    'det-r50v1d/3': '2970b46b990735ad',
    'det-r50v1d/4': '13060851201e3677',
    'det-r50v1d/5': '5055278aadecacaa',
    'det-r50v1d/6': 'c1fa6c295f4083f3',
    'seg-x50/0': 'a5f50cc2c438e55b',
    'seg-x50/1': 'b63404b191e7ea5a',
    'seg-x50/2': '9bc770d0f23340b7',
    'seg-x50/3': '87eeea51c846ca8d',
    'seg-x50/4': '8d0c0c7ea4a330c6',
    'seg-x50/5': 'eec2c46169259514',
    'seg-x50/6': '38df074ba977a1e8',
    'cls-x50/0': 'a5f50cc2c438e55b',
    'cls-x50/1': 'b63404b191e7ea5a',
    'cls-x50/2': '9bc770d0f23340b7',
    'cls-x50/3': '87eeea51c846ca8d',
    'cls-x50/4': '8d0c0c7ea4a330c6',
    'cls-x50/5': 'eec2c46169259514',
    'cls-x50/6': '38df074ba977a1e8',
    'cls-r50v1c/0': 'c9484d4d4f746286',
    'cls-r50v1c/1': '45586acb24371286',
    'cls-r50v1c/2': 'af3daca8b4802288',
    'cls-r50v1c/3': 'b81dc0fb2c0d42c0',
    'cls-r50v1c/4': '5add9d7452d34062',
    'cls-r50v1c/5': '7c598e371df0681d',
    'cls-r50v1c/6': '14a26b2e9405ed5f',
    'cls-r50v1d/0': '09482f20ece24ba2',
    'cls-r50v1d/1': '3cee9f0b35d9fe40',
    'cls-r50v1d/2': '099ff9f6c1da6953',
    'cls-r50v1d/3': 'a9d9b25c5f9847bf',
    'cls-r50v1d/4': '9b40bbfdd1b54572',
    'cls-r50v1d/5': '88eddd415f8d0d44',
    'cls-r50v1d/6': '94048643fb0613f0',
    'cls-vit/0': '2bef86393efbd173',
    'cls-vit/1': '578f2e20e5438bb6',
    'cls-vit/2': 'c2d944579d11b0ee',
    'cls-vit/3': 'b82e175a78cb1545',
    'cls-vit/4': '8f3ec4788b3da50c',
    'cls-vit/5': 'a28fb2a77132127a',
    'cls-vit/6': '07dd65f59e49c397',
    'det-swin/0': 'e7a4ba93818a166c',
    'det-swin/1': '79f652c2b5464416',
    'det-swin/2': 'a04fb83c0536b56b',
    'det-swin/3': '6806b3bb97f9b56f',
    'det-swin/4': '81a81ea94ff9e2e3',
    'det-swin/5': '307abc3226514336',
    'det-swin/6': 'a304f6d57445cb3a',
    'seg-swin/0': 'e7a4ba93818a166c',
    'seg-swin/1': '79f652c2b5464416',
    'seg-swin/2': 'a04fb83c0536b56b',
    'seg-swin/3': '6806b3bb97f9b56f',
    'seg-swin/4': '81a81ea94ff9e2e3',
    'seg-swin/5': '307abc3226514336',
    'seg-swin/6': 'a304f6d57445cb3a',
    'cls-swin/0': 'e7a4ba93818a166c',
    'cls-swin/1': '79f652c2b5464416',
    'cls-swin/2': 'a04fb83c0536b56b',
    'cls-swin/3': '6806b3bb97f9b56f',
    'cls-swin/4': '81a81ea94ff9e2e3',
    'cls-swin/5': '307abc3226514336',
    'cls-swin/6': 'a304f6d57445cb3a',
    'cls-convnext/0': '04088a47bb0de0e1',
    'cls-convnext/1': '7f43911ee35ec024',
    'cls-convnext/2': '389b9405b59d4c7c',
    'cls-convnext/3': 'e51d1ac1696a3abb',
    'cls-convnext/4': 'cf319cd41c6cdb5a',
    'cls-convnext/5': '2a842f50556c1ac3',
    'cls-convnext/6': 'a5c07ed0f0a3c38f',
}


def fingerprint(model) -> str:
    plan = model.replacement_plan
    data = dict(
        keys=[(k, list(v.shape), str(v.dtype))
              for k, v in model.state_dict().items()],
        plan=plan.to_dict(),
        table=str(plan))
    text = json.dumps(data, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def test_digests_cover_the_cases():
    assert set(DIGESTS) == {
        f'{c.name}/{i}'
        for c in CASES
        for i in range(len(OPTIONS))
    }


@pytest.mark.parametrize('case', CASES, ids=IDS)
def test_keys_and_plans_are_pinned(case):
    for i, options in enumerate(OPTIONS):
        torch.manual_seed(0)
        got = fingerprint(case.build(**options))
        assert got == DIGESTS[f'{case.name}/{i}'], (options, got)
