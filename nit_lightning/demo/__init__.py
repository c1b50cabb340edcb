"""The CPU end-to-end demo: synth -> prepare -> fit -> sample -> evaluate -> report (`python -m nit_lightning demo`)."""
