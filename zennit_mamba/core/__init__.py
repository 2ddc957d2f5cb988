'''How MambaLRP's rules attach to modules: the switch that turns them on and off, canonized forwards set on and
restored from instances, the explained model's ends and the boundary of a Zennit rule, the rule set the canonized
forwards compute with, the treatments of the layers beside the mixers, and what is checked of upstream code.'''
