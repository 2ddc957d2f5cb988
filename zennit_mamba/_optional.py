'''Optional imports: mamba-ssm needs its CUDA extension, so on a CPU-only machine it is absent.'''
import functools
import types
from typing import Callable, Optional


@functools.lru_cache(maxsize=None)
def mamba_ssm_modules() -> Optional[types.SimpleNamespace]:
    '''mamba-ssm's module classes, or None where mamba-ssm cannot be imported.'''
    try:
        from mamba_ssm.models.mixer_seq_simple import MixerModel
        from mamba_ssm.modules.block import Block
        from mamba_ssm.modules.mamba2 import Mamba2
        from mamba_ssm.modules.mamba_simple import Mamba
        from mamba_ssm.ops.triton.layer_norm import RMSNorm
    except (ImportError, OSError, RuntimeError):
        return None
    return types.SimpleNamespace(Mamba=Mamba, Mamba2=Mamba2, Block=Block, MixerModel=MixerModel, RMSNorm=RMSNorm)


@functools.lru_cache(maxsize=None)
def mamba_ssm_selective_scan() -> Optional[Callable]:
    '''mamba-ssm's ``selective_scan_fn`` (CUDA), or None where mamba-ssm cannot be imported.'''
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except (ImportError, OSError, RuntimeError):
        return None
    return selective_scan_fn


@functools.lru_cache(maxsize=None)
def mamba_ssm_chunk_scan() -> Optional[Callable]:
    '''mamba-ssm's ``mamba_chunk_scan_combined`` (Mamba-2, CUDA/Triton), or None where it cannot be imported.'''
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except (ImportError, OSError, RuntimeError):
        return None
    return mamba_chunk_scan_combined
