"""The CPU end-to-end demo, a layer above the commands (it drives `fit` through the LightningCLI and the library):

config.py (experiments/demo.yaml: sections, extends, ${name} fills), steps.py (each step, resumable), report.py
(timings, report.md, the console table), run.py (the order of steps; demo-scale sweeps), command.py (`python -m
nit_lightning demo`), t2i_metrics.py (the T2I demo's scores: colour read back, shape, both-correct ± standard error).
"""
