"""nit-lightning: native-resolution diffusion transformers (NiT) with PyTorch Lightning."""

__version__ = "0.1.0"
