'''MambaLRP for Captum: a thin front end on :py:mod:`zennit_mamba`.'''
from .attribution import MambaLRP
from .layer import LayerMambaLRP

__all__ = ['LayerMambaLRP', 'MambaLRP']
