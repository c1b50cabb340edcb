"""From a checkpoint to images: the one layer that every sampler user calls downward.

pipeline.py (load_pipeline: net + codec + provenance from a Lightning ckpt or official safetensors), settings.py
(SamplerSettings and the one sweep-file schema), images.py (generate: requests -> packs -> sampler -> uint8 images),
sample_set.py (the resumable PNG + ADM-npz folder that `sample` and the sweeps write).
"""
