"""Measuring images, ADM-faithful in PyTorch: FID / sFID / IS / precision / recall against reference batches.

inception.py (the TF 2015-12-05 FID network), extractors.py (feature-extractor specs), classifiers.py (training and scoring them), featurenet.py (the CPU demo's
stand-in classifiers, NOT Inception), metrics.py, reference.py (ADM npz read / build), evaluate.py (a sample set or
freshly generated images vs a reference), sweep.py (resolution / aspect-ratio sweeps: sample, evaluate, tabulate).
Text-to-image: clip_score.py (CLIP score from a local CLIP folder), sample_prompts.py (a sample folder's
prompts.jsonl), coco.py (the COCO-2014 zero-shot prompts).
"""
