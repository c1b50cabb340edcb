"""ADM-faithful evaluation in PyTorch: FID Inception-v3, FID / sFID / IS / precision / recall, reference batches, sweeps.

Modules: inception (the TF 2015-12-05 network), features (extractor specs), featurenet (CPU demo stand-in, NOT
Inception), metrics, reference (ADM npz), sweep (evaluate + resolution / aspect-ratio sweeps), callback (training).
"""
