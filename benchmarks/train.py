"""Training speed: compbias's ``fit`` against a plain tuned loop, and a population trained as one batched model.

    .venv/bin/python benchmarks/train.py [--arch smallcnn resnet20] [--epochs 2] [--repeats 3]

For each architecture, on the same model initialisation and the same data
(scikit-learn digits, 8x8; ``--augment`` uses them as uint8 images with
random crops and flips, the layout of decoded photos), in the same process:

``fit``
    :func:`compbias.jobs.train.fit` with its defaults (batch 64, SGD +
    Nesterov, cosine schedule, device-resident batches).
``tuned``
    The best a user would write by hand: tensors resident on the device,
    vectorised augmentation, ``torch.optim.SGD(foreach=True)``, no
    scheduler, no bookkeeping, bf16 autocast + channels_last on CUDA.

It prints images/s of each (best of ``--repeats`` timed runs, after a
warm-up), the ratio ``fit / tuned`` (target >= 0.9; on the CPU also per
second of the process's CPU time, steadier on a shared machine) and the fraction of the
device's measured matmul rate (float32 on CPU, bfloat16 on CUDA) the
training reaches (FLOPs per image from ``torch.utils.flop_counter``).

``--population N`` also trains N seeds of the smallest model one after
another and as one batched model (``torch.func.stack_module_state`` +
``vmap``), and prints the speed-up of the batched population.

``--processes K`` trains K seeds of each ``--arch`` with ``fit`` as K
processes sharing the device at once (what fractional ``gpus_per_task``
gives a study: several Ray tasks per GPU) against the same K seeds one
after another in one process, and prints the speed-up (issue 16's target:
8 ResNet-20s on one GPU >= 4x). Each process builds its model, loads the
data and trains a warm-up epoch before a barrier, so process start-up,
imports and the CUDA context are not timed.

``--synthetic N,C,S --classes K`` replaces digits by N random uint8 images
of C x S x S (split 5:1 into train and test) with K classes, e.g.
``--synthetic 10000,3,64 --classes 2 --arch resnet18 --batch 128``, the
shape of the CelebA-10k measurement in issue 16 (random pixels train at
the same speed as photos).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import os
import platform
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from compbias.jobs import build_model, load_dataset  # noqa: E402
from compbias.jobs.data import TensorImageDataset  # noqa: E402
from compbias.jobs.pipeline import EpochPlan, crop_flip  # noqa: E402
from compbias.jobs.train import fit  # noqa: E402
from compbias.jobs.vocabulary import TRAIN_DEFAULTS  # noqa: E402

BATCH = TRAIN_DEFAULTS["batch_size"]


def synthetic_bundle(spec: str, n_classes: int):
    """``N,C,S``: N uint8 images of C x S x S with random labels, augmented, in digits' bundle layout."""
    try:
        n, c, size = (int(v) for v in spec.split(","))
    except ValueError:
        raise SystemExit(f"--synthetic takes N,C,S (images, channels, side), e.g. 10000,3,64; got {spec!r}")
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, c, size, size), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, n_classes, (n,), generator=g)
    cut = n * 5 // 6
    d = load_dataset("digits")
    return dataclasses.replace(
        d, train=TensorImageDataset(images[:cut], labels[:cut], 1 / 255),
        test=TensorImageDataset(images[cut:], labels[cut:], 1 / 255), n_classes=n_classes,
        class_names=[str(k) for k in range(n_classes)], input_shape=(c, size, size), augment=True)


def bundle_for(augment: bool, synthetic: str | None = None, n_classes: int = 2):
    if synthetic:
        return synthetic_bundle(synthetic, n_classes)
    d = load_dataset("digits")
    if not augment:
        return d
    as_u8 = lambda ds: TensorImageDataset((ds.images * 15).to(torch.uint8), ds.labels, 1 / 240)  # noqa: E731
    return dataclasses.replace(d, train=as_u8(d.train), test=as_u8(d.test), augment=True)


def tuned_loop(model: nn.Module, bundle, epochs: int, device: torch.device, seed: int = 0) -> int:
    """A hand-written loop at its best: resident tensors, vectorised augmentation, nothing else. Returns images seen."""
    cuda = device.type == "cuda"
    images = bundle.train.images.to(device)
    labels = bundle.train.labels.to(device)
    scale, n, h = bundle.train.scale, len(bundle.train), bundle.input_shape[1]
    model.to(device).train()
    if cuda:
        model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4, foreach=True)
    g = torch.Generator().manual_seed(seed)
    seen = 0
    for _ in range(epochs):
        plan = EpochPlan.draw(n, h, g, bundle.augment).to(device)
        for start in range(0, n - 1, BATCH):
            idx = plan.order[start : start + BATCH]
            x = images[idx]
            if bundle.augment:
                x = crop_flip(x, plan.flip[start : start + BATCH], plan.oy[start : start + BATCH], plan.ox[start : start + BATCH])
            x = x.float() * scale
            if cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                loss = F.cross_entropy(model(x).float(), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(idx)
    if cuda:
        torch.cuda.synchronize(device)
    return seen


def timed(run) -> tuple[float, float]:
    """``(images per wall second, images per CPU second of this process)``.

    On a shared machine the CPU time is the steadier of the two: other
    processes' load lengthens the wall time, hardly this process's own work.
    """
    wall, cpu = time.perf_counter(), time.process_time()
    seen = run()
    return seen / (time.perf_counter() - wall), seen / (time.process_time() - cpu)


def matmul_rate(device: torch.device, dtype: torch.dtype, size: int = 1024, repeats: int = 20) -> float:
    """Measured FLOP/s of a square matmul (best of ``repeats``)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = math.inf
    for _ in range(repeats + 2):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t)
    return 2 * size**3 / best


def train_flops_per_image(model: nn.Module, shape, device: torch.device) -> float:
    """Forward + backward FLOPs per image (torch.utils.flop_counter on one batch)."""
    from torch.utils.flop_counter import FlopCounterMode

    m = copy.deepcopy(model).to(device).train()
    x = torch.randn(BATCH, *shape, device=device)
    with FlopCounterMode(display=False) as counter:
        m(x).sum().backward()
    return counter.get_total_flops() / BATCH


def compare(arch: str, bundle, epochs: int, repeats: int, device: torch.device, peak: float) -> dict:
    init = build_model(arch, bundle.n_classes, bundle.input_shape, seed=0)
    n = len(bundle.train)

    def run_fit():
        fit(copy.deepcopy(init), bundle, epochs=epochs, batch_size=BATCH, device=device, log=None)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return epochs * (n - n % BATCH if n % BATCH == 1 else n)

    runs = {"fit": run_fit, "tuned": lambda: tuned_loop(copy.deepcopy(init), bundle, epochs, device)}
    for run in runs.values():  # warm-up (allocator, kernels, first-call costs)
        run()
    rates = {k: (0.0, 0.0) for k in runs}
    for _ in range(repeats):  # interleaved, so load from other processes falls on both
        for k, run in runs.items():
            rates[k] = tuple(map(max, rates[k], timed(run)))
    flops = train_flops_per_image(init, bundle.input_shape, device)
    (fit_wall, fit_cpu), (tuned_wall, tuned_cpu) = rates["fit"], rates["tuned"]
    return {"arch": arch, "fit": fit_wall, "tuned": tuned_wall, "ratio": fit_wall / tuned_wall,
            "fit_cpu": fit_cpu, "tuned_cpu": tuned_cpu, "ratio_cpu": fit_cpu / tuned_cpu, "flops_per_image": flops,
            "fraction_fit": fit_wall * flops / peak, "fraction_tuned": tuned_wall * flops / peak}


def augmentation_speed(shapes=((64, 1, 8, 8), (64, 3, 32, 32), (128, 3, 64, 64))) -> list[tuple]:
    """ms per batch: crops and flips one example at a time (the loop before) vs :func:`crop_flip`, uint8 in, float out."""
    import timeit

    out = []
    for shape in shapes:
        x = torch.randint(0, 256, shape, dtype=torch.uint8)
        plan = EpochPlan.draw(shape[0], shape[2], torch.Generator().manual_seed(0), True)
        pad = (shape[2] // 8) or 1

        def one_by_one():
            f = x.float() / 255
            f = torch.where(plan.flip[:, None, None, None], f.flip(3), f)
            p = F.pad(f, (pad,) * 4)
            return torch.stack([p[i, :, oy : oy + shape[2], ox : ox + shape[3]]
                                for i, (oy, ox) in enumerate(zip(plan.oy.tolist(), plan.ox.tolist()))])

        vectorised = lambda: crop_flip(x, plan.flip, plan.oy, plan.ox).float() / 255  # noqa: E731
        assert torch.equal(one_by_one(), vectorised())
        t = [min(timeit.repeat(f, number=20, repeat=5)) / 20 for f in (one_by_one, vectorised)]
        out.append((shape, 1e3 * t[0], 1e3 * t[1]))
    return out


# ------------------------------------------------------------------ populations


def population_batched(models: list[nn.Module], bundle, epochs: int, device: torch.device) -> int:
    """N models trained at once: stacked parameters, one vmapped forward/backward per step (each model its own batch)."""
    from torch.func import functional_call, stack_module_state

    params, buffers = stack_module_state([m.to(device).train() for m in models])
    params = {k: v.detach().requires_grad_() for k, v in params.items()}
    base = copy.deepcopy(models[0]).to("meta")

    def one(p, b, x, y):
        return F.cross_entropy(functional_call(base, (p, b), (x,)), y)

    loss_all = torch.vmap(one, in_dims=(0, 0, 0, 0), randomness="different")
    opt = torch.optim.SGD(params.values(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4, foreach=True)
    images, labels = bundle.train.images.to(device), bundle.train.labels.to(device)
    n, k = len(bundle.train), len(models)
    g = torch.Generator().manual_seed(0)
    seen = 0
    for _ in range(epochs):
        orders = torch.stack([torch.randperm(n, generator=g) for _ in range(k)]).to(device)
        for start in range(0, n - 1, BATCH):
            idx = orders[:, start : start + BATCH]
            x = images[idx].float() * bundle.train.scale
            loss = loss_all(params, buffers, x, labels[idx]).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += idx.numel()
    return seen


def population(arch: str, size: int, bundle, epochs: int, repeats: int, device: torch.device) -> dict:
    inits = [build_model(arch, bundle.n_classes, bundle.input_shape, seed=s) for s in range(size)]
    one_by_one = lambda: sum(tuned_loop(copy.deepcopy(m), bundle, epochs, device, seed=s) for s, m in enumerate(inits))  # noqa: E731
    batched = lambda: population_batched([copy.deepcopy(m) for m in inits], bundle, epochs, device)  # noqa: E731
    batched()
    one_by_one()
    best = {"sequential": (0.0, 0.0), "batched": (0.0, 0.0)}
    for _ in range(repeats):
        for k, run in (("sequential", one_by_one), ("batched", batched)):
            best[k] = tuple(map(max, best[k], timed(run)))
    return {"arch": arch, "size": size, "sequential": best["sequential"][0], "batched": best["batched"][0],
            "speedup": best["batched"][0] / best["sequential"][0], "speedup_cpu": best["batched"][1] / best["sequential"][1]}


# ------------------------------------------------- several processes per device


def _fit_seeds(arch: str, bundle, seeds, epochs: int, batch: int, device: torch.device) -> int:
    """Train each seed's model with ``fit``, one after another; images seen."""
    n = len(bundle.train)
    per_epoch = n - n % batch if n % batch == 1 else n
    for seed in seeds:
        model = build_model(arch, bundle.n_classes, bundle.input_shape, seed=seed)
        fit(model, bundle, epochs=epochs, batch_size=batch, seed=seed, device=device, log=None)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return epochs * per_epoch * len(seeds)


def _process_worker(arch, data, seed, epochs, batch, device, threads, barrier, results):  # runs in a child
    torch.set_num_threads(threads)
    bundle = bundle_for(*data)
    _fit_seeds(arch, bundle, [seed], 1, batch, torch.device(device))  # warm-up: kernels, allocator, CUDA context
    barrier.wait()
    start = time.time()
    seen = _fit_seeds(arch, bundle, [seed], epochs, batch, torch.device(device))
    results.put((start, time.time(), seen))


def processes(arch: str, k: int, data: tuple, bundle, epochs: int, repeats: int, device: torch.device) -> dict:
    """K seeds as K concurrent processes on ``device`` vs one after another in this process (images/s, best of ``repeats``).

    On the CPU each of the K processes gets ``cpus // K`` torch threads (at
    least 1) and the one-after-another run all of this process's threads.
    """
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # CUDA cannot be used in a forked child
    threads = max(1, (os.cpu_count() or 1) // k) if device.type == "cpu" else torch.get_num_threads()
    _fit_seeds(arch, bundle, [0], 1, BATCH, device)  # warm-up
    sequential = concurrent = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        seen = _fit_seeds(arch, bundle, range(k), epochs, BATCH, device)
        sequential = max(sequential, seen / (time.perf_counter() - t))
        barrier, results = ctx.Barrier(k), ctx.Queue()
        procs = [ctx.Process(target=_process_worker, args=(arch, data, s, epochs, BATCH, str(device), threads, barrier, results))
                 for s in range(k)]
        for p in procs:
            p.start()
        spans = [results.get(timeout=3600) for _ in procs]
        for p in procs:
            p.join()
            if p.exitcode:
                raise SystemExit(f"a training process exited with {p.exitcode}")
        wall = max(e for _, e, _ in spans) - min(s for s, _, _ in spans)
        concurrent = max(concurrent, sum(n for _, _, n in spans) / wall)
    return {"arch": arch, "k": k, "threads": threads, "sequential": sequential, "concurrent": concurrent,
            "speedup": concurrent / sequential}


def main(argv=None) -> None:
    global BATCH
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=["smallcnn", "resnet20"])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--augment", action="store_true", help="uint8 images with random crops and flips")
    parser.add_argument("--device", default=None, help="default: CUDA when present, else CPU")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--population", type=int, default=0, help="also train this many smallcnn seeds batched vs one by one")
    parser.add_argument("--processes", type=int, default=0,
                        help="also train this many seeds of each --arch as concurrent processes on the device vs one by one")
    parser.add_argument("--synthetic", default=None, metavar="N,C,S",
                        help="N random uint8 images of C x S x S (augmented) instead of digits")
    parser.add_argument("--classes", type=int, default=2, help="classes of --synthetic data")
    parser.add_argument("--batch", type=int, default=BATCH, help="batch size (default: fit's)")
    parser.add_argument("--skip-compare", action="store_true", help="skip fit vs tuned (only --population/--processes)")
    args = parser.parse_args(argv)
    BATCH = args.batch
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    data = (args.augment, args.synthetic, args.classes)
    bundle = bundle_for(*data)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = matmul_rate(device, dtype)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, GPU {gpu}")
    print(f"device {device}; measured {dtype} matmul rate {peak / 1e9:.1f} GFLOP/s; {'synthetic' if args.synthetic else 'digits'} {len(bundle.train)} train images "
          f"{tuple(bundle.input_shape)}{' uint8 + crops/flips' if bundle.augment else ''}; batch {BATCH}; "
          f"{args.epochs} epochs; best of {args.repeats}")
    for arch in [] if args.skip_compare else args.arch:
        r = compare(arch, bundle, args.epochs, args.repeats, device, peak)
        cpu = f" (per CPU second {r['fit_cpu']:.0f} / {r['tuned_cpu']:.0f}: {r['ratio_cpu']:.2f}x)" if device.type == "cpu" else ""
        print(f"{arch:9s} fit {r['fit']:7.0f} img/s  tuned {r['tuned']:7.0f} img/s  fit/tuned {r['ratio']:.2f}x{cpu}  "
              f"{r['flops_per_image'] / 1e6:.2f} MFLOP/img: fit {100 * r['fraction_fit']:.1f}% / tuned "
              f"{100 * r['fraction_tuned']:.1f}% of the matmul rate")
    for shape, loop_ms, vec_ms in [] if args.skip_compare else augmentation_speed():
        print(f"crops+flips of a {shape} uint8 batch: one example at a time {loop_ms:.3f} ms, vectorised "
              f"{vec_ms:.3f} ms: {loop_ms / vec_ms:.1f}x")
    if args.population:
        p = population("smallcnn", args.population, bundle, args.epochs, args.repeats, device)
        print(f"population of {p['size']} smallcnn: one by one {p['sequential']:.0f} img/s, batched (vmap) "
              f"{p['batched']:.0f} img/s: {p['speedup']:.2f}x (per CPU second {p['speedup_cpu']:.2f}x)")

    for arch in args.arch if args.processes else []:
        r = processes(arch, args.processes, data, bundle, args.epochs, args.repeats, device)
        print(f"{r['k']} {arch} seeds with fit: one after another {r['sequential']:.0f} img/s, as {r['k']} processes "
              f"on {device} ({r['threads']} threads each) {r['concurrent']:.0f} img/s: {r['speedup']:.2f}x")


if __name__ == "__main__":
    main()
