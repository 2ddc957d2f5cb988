'''MambaLRP for Zennit: the rules, the canonizer that binds them into Mamba mixers, and the composite.'''
from .canonizers import MambaCanonizer
from .composite import MambaComposite
from .hooks import ExplainedModel, ZennitRule
from .rules import (
    MAMBA_LRP_RULES, AttentionRule, DetachSelection, HalfRule, LNRule, Rule, RuleSet, SiLUIdentity,
)
from .scan import selective_scan
from .ssd import ssd_scan
from .support import FAMILIES, UnsupportedModelError, check_supported
from .upstream import UpstreamChangedError

__all__ = [
    'FAMILIES',
    'MAMBA_LRP_RULES',
    'AttentionRule',
    'DetachSelection',
    'ExplainedModel',
    'HalfRule',
    'LNRule',
    'MambaCanonizer',
    'MambaComposite',
    'Rule',
    'RuleSet',
    'SiLUIdentity',
    'UnsupportedModelError',
    'UpstreamChangedError',
    'ZennitRule',
    'check_supported',
    'selective_scan',
    'ssd_scan',
]
