'''The scans and fused functions the rules compute through: the selective scan and Mamba-2's SSD in PyTorch and
through mamba-ssm's kernels, the float32 Triton SSD, the rules fused with hand-written backward passes, and Mamba-2's
causal convolution as Triton kernels. Nothing here knows a model family.'''
