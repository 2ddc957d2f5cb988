'''The mixer computations that several families share (Mamba-1's and Mamba-2's), each operation through the rule
set, and what every canonized mixer does around its computation (padding, caches, time blocks, recomputation).'''
