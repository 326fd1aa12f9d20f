"""GPU fast path: ChaCha20 keystreams and masking on the device, and the optimised dream step.

Everything here also runs on the CPU (fp32, eager torch), which is how the tests check it.
"""
