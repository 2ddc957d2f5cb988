'''Doctest collection: modules of optional integrations are skipped where their library is not installed.'''
import importlib.util

collect_ignore = [] if importlib.util.find_spec('inseq') else ['captum_mamba/inseq_method.py']
