"""The commands of `python -m nit_lightning`: each file turns argv into settings and makes one library call.

common.py (one flag style, user errors as one line), lightning.py (fit / validate / test / predict: the LightningCLI),
synth, prepare, sample, reference, evaluate, coco_prompts, sweep, featurenet, tinyae, tinytext. Nothing in the library
imports from here;
the demo (nit_lightning/demo/) is a layer above, built on these commands.
"""
