"""Sampler benchmarks (CPU): solver overhead per step and packing throughput of the debug net."""
import time

import torch

from nit_lightning.diffusion.sampling import (
    SampleRequest,
    StackedGenerator,
    derive_seed,
    per_sample_noise,
    plan_sample_packs,
    sample,
    sample_pack,
)
from nit_lightning.generation.pipeline import NetModelFn
from nit_lightning.models import build_nit

torch.set_num_threads(1)

def timeit(fn, reps=3):
    best = 1e9
    for _ in range(reps):
        t0 = time.perf_counter(); fn(); best = min(best, time.perf_counter() - t0)
    return best

print("| what | setting | time |\n|---|---|---|")
N, D, steps = 16384, 32, 50
hw = torch.tensor([[8, 8]] * 256); y = torch.zeros(256, dtype=torch.long)
noise = per_sample_noise(range(256), hw, D)
f = lambda x, t, y, hw: -x
for dt in (torch.float64, torch.float32):
    s = timeit(lambda: sample(f, noise, y, hw, method="euler", steps=steps, dtype=dt))
    print(f"| euler overhead, v = -x | {N} tokens x {D}, {steps} steps, {str(dt)[6:]} | {1e3*s/steps:.2f} ms/step |")
s = timeit(lambda: sample(f, noise, y, hw, method="sde", steps=steps, generator=StackedGenerator(range(256), stream=1)))
print(f"| sde overhead, per-image noise | 256 images x 64 tokens, {steps} steps | {1e3*s/steps:.2f} ms/step |")
s = timeit(lambda: sample(f, noise, y, hw, method="sde", steps=steps, generator=torch.Generator().manual_seed(0)))
print(f"| sde overhead, one generator | 256 images x 64 tokens, {steps} steps | {1e3*s/steps:.2f} ms/step |")

torch.manual_seed(0)
net = build_nit("NiT-debug", in_channels=12, num_classes=10).eval()
for p in net.parameters(): p.data.normal_(0, 0.05)
def run(grids, budget, n=32):
    reqs = [SampleRequest(i, grids[i % len(grids)], i % 10, derive_seed(0, i)) for i in range(n)]
    packs = plan_sample_packs(reqs, budget, cfg=True)
    def go():
        for pack in packs:
            sample_pack(NetModelFn(net), pack, 12, method="euler", steps=10, cfg_scale=2.0, null_class=10)
    s = timeit(go, reps=1)
    return n / s, len(packs)
for grids, label in [([(16, 16)], "32x32 px (256 tokens)"), ([(16, 16), (8, 32), (12, 20)], "mixed 16x16, 8x32, 12x20 grids")]:
    for budget in (2 * max(h * w for h, w in grids), 16384):
        ips, npacks = run(grids, budget)
        print(f"| NiT-debug euler 10, CFG 2 | 32 images {label}, pack budget {budget} ({npacks} packs) | {ips:.2f} images/s |")
