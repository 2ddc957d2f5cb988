'''Optional imports: mamba-ssm needs its CUDA extension, so on a CPU-only machine it is absent.'''
import functools
import importlib
import types
from typing import Callable, Optional


@functools.lru_cache(maxsize=None)
def optional_class(module: str, name: str) -> Optional[type]:
    '''``module.name``, or None where it cannot be imported (mamba-ssm without its CUDA extension).'''
    try:
        return getattr(importlib.import_module(module), name, None)
    except (ImportError, OSError, RuntimeError):
        return None


def mamba_ssm_modules() -> Optional[types.SimpleNamespace]:
    '''mamba-ssm's module classes, or None where mamba-ssm cannot be imported.'''
    classes = {
        'Mamba': ('mamba_ssm.modules.mamba_simple', 'Mamba'), 'Mamba2': ('mamba_ssm.modules.mamba2', 'Mamba2'),
        'Block': ('mamba_ssm.modules.block', 'Block'), 'MixerModel': ('mamba_ssm.models.mixer_seq_simple', 'MixerModel'),
        'RMSNorm': ('mamba_ssm.ops.triton.layer_norm', 'RMSNorm'),
    }
    found = {key: optional_class(*location) for key, location in classes.items()}
    return None if None in found.values() else types.SimpleNamespace(**found)


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


@functools.lru_cache(maxsize=None)
def mamba_ssm_scan_extension() -> Optional[types.ModuleType]:
    '''mamba-ssm's CUDA extension ``selective_scan_cuda`` (``fwd``, ``bwd``), or None where it cannot be imported.'''
    try:
        import selective_scan_cuda
    except (ImportError, OSError, RuntimeError):
        return None
    return selective_scan_cuda
