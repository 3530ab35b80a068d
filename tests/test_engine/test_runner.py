"""RepLRunner's helpers: the local rank of a process under each launcher,
and what tools/train.py and tools/test.py export from it."""
import importlib.util
import os
from argparse import Namespace
from pathlib import Path

import pytest

from repl_mm.engine.runner import infer_local_rank

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    'launcher, env, default, want',
    [
        ('pytorch', {
            'LOCAL_RANK': '3'
        }, 0, 3),  # torchrun
        ('mpi', {
            'OMPI_COMM_WORLD_LOCAL_RANK': '2'
        }, 0, 2),  # OpenMPI
        ('mpi', {
            'MPI_LOCALRANKID': '1'
        }, 0, 1),  # MPICH, Intel MPI
        ('mpi', {
            'SLURM_LOCALID': '5'
        }, 0, 5),  # MPI under srun
        ('slurm', {
            'SLURM_LOCALID': '4'
        }, 0, 4),
        ('mpi', {
            'LOCAL_RANK': '1',
            'OMPI_COMM_WORLD_LOCAL_RANK': '2'
        }, 0, 1),
        ('mpi', {
            'OMPI_COMM_WORLD_LOCAL_RANK': '2',
            'MPI_LOCALRANKID': '3'
        }, 0, 2),
        ('mpi', {}, 1, 1),  # --local-rank
        ('none', {
            'OMPI_COMM_WORLD_LOCAL_RANK': '2'
        }, 0, 0),
        ('pytorch', {
            'SLURM_LOCALID': '2'
        }, 0, 0),
        ('mpi', {
            'LOCAL_RANK': '',
            'MPI_LOCALRANKID': '1'
        }, 0, 1),
    ])
def test_infer_local_rank(launcher, env, default, want):
    assert infer_local_rank(launcher, default, env) == want


@pytest.mark.parametrize('value', ['x', '-1'])
def test_infer_local_rank_refuses_garbage(value):
    with pytest.raises(
            ValueError,
            match=rf"--launcher mpi: "
            rf"OMPI_COMM_WORLD_LOCAL_RANK='{value}'"):
        infer_local_rank('mpi', 0, {'OMPI_COMM_WORLD_LOCAL_RANK': value})


def load_tools_runner():
    spec = importlib.util.spec_from_file_location(
        '_runner', ROOT / 'tools' / '_runner.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize('var',
                         ['OMPI_COMM_WORLD_LOCAL_RANK', 'MPI_LOCALRANKID'])
def test_tools_export_the_mpi_local_rank(monkeypatch, tmp_path, var):
    """Under mpirun every rank drives its own GPU: mmengine's DDP takes
    ``device_ids=[LOCAL_RANK]``."""
    monkeypatch.setenv('LOCAL_RANK', 'unset')  # restored after the test
    monkeypatch.delenv('LOCAL_RANK')
    monkeypatch.setenv(var, '1')
    args = Namespace(
        config=str(ROOT / 'configs/demo/resnet32-repl_1xb64_15e_mnist5k.py'),
        cfg_options=None,
        launcher='mpi',
        work_dir=str(tmp_path),
        local_rank=0)
    cfg = load_tools_runner().load_config(args)
    assert os.environ['LOCAL_RANK'] == '1'
    assert cfg.launcher == 'mpi'


def test_destroy_distributed_ends_the_group(tmp_path):
    import torch.distributed as dist

    from repl_mm.engine.runner import destroy_distributed
    if dist.is_initialized():
        pytest.skip('this process already has a process group')
    dist.init_process_group(
        'gloo', init_method=f'file://{tmp_path}/store', rank=0, world_size=1)
    destroy_distributed()
    assert not dist.is_initialized()
    destroy_distributed()  # without a group: nothing to do
