'''MambaLRP for Captum: a thin front end on :py:mod:`zennit_mamba`.'''
from .attribution import MambaLRP
from .layer import LayerMambaLRP
from .model import ExplainedLogits

__all__ = ['ExplainedLogits', 'LayerMambaLRP', 'MambaLRP']
