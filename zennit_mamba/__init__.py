'''MambaLRP for Zennit: the rules, the canonizer that binds them into Mamba mixers, and the composite.'''
from zennit_mamba.canonizers import MambaCanonizer
from zennit_mamba.composite import MambaComposite
from zennit_mamba.core.hooks import ExplainedModel, ZennitRule
from zennit_mamba.core.ruleset import RuleSet
from zennit_mamba.rules import (MAMBA_LRP_RULES, AttentionRule, DetachSelection, HalfRule, HeldGate, LNRule, Rule,
                                 SiLUIdentity)
from zennit_mamba.kernels.scan import selective_scan
from zennit_mamba.kernels.ssd import ssd_scan
from zennit_mamba.support import FAMILIES, UnsupportedModelError, check_supported
from zennit_mamba.core.upstream import UpstreamChangedError

__all__ = [
    'FAMILIES',
    'MAMBA_LRP_RULES',
    'AttentionRule',
    'DetachSelection',
    'ExplainedModel',
    'HalfRule',
    'HeldGate',
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
