'''MambaLRP for Zennit: rules, canonizers and the composite that explain Mamba models with conserved relevance.'''
from .canonizers import MambaCanonizer
from .composites import MAMBA_LRP_RULES, MambaComposite
from .layers import GateProduct, SelectiveScan, SiLU, Softplus
from .mamba2 import Mamba2Core
from .model_rules import ModelRules
from .rules import DetachSelection, GradientTimesInput, HalfRule, LNRule, MixerRules, SiLUIdentity
from .scan import selective_scan
from .ssd import ssd_scan
from .support import UnsupportedModelError, check_supported
from .upstream import UpstreamChangedError

__all__ = [
    'MAMBA_LRP_RULES',
    'DetachSelection',
    'GateProduct',
    'GradientTimesInput',
    'HalfRule',
    'LNRule',
    'MambaCanonizer',
    'Mamba2Core',
    'MambaComposite',
    'MixerRules',
    'ModelRules',
    'SelectiveScan',
    'SiLU',
    'SiLUIdentity',
    'Softplus',
    'UnsupportedModelError',
    'UpstreamChangedError',
    'check_supported',
    'selective_scan',
    'ssd_scan',
]
