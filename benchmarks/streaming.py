"""Training from image files (a split too large for memory) against the same split decoded in memory.

    .venv/bin/python benchmarks/streaming.py ROOT [--kind celeba] [--target Blond_Hair] [--image-size 64]
        [--max-train 4000] [--arch smallcnn] [--repeats 2]

Loads one dataset twice with :func:`compbias.jobs.load_dataset`, ``in_memory=True``
(decoded once, the fastest a split can be read) and ``in_memory=False``
(:class:`compbias.jobs.data.FileImageDataset`: each batch decoded by the
``DataLoader``'s workers, every epoch), trains one epoch of ``--arch`` with
``fit`` on each (best of ``--repeats``, after a warm-up), and prints images/s
of both, their ratio, and the floor of the file path: decoding the same
images alone on as many processes as the loader has workers. On a machine
whose cores all train, the file path pays the decoding on top; with spare
cores (a GPU machine) the workers hide it. Nothing here is asserted.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import time

import torch

from compbias.jobs import build_model, load_dataset
from compbias.jobs.data.images import decode_images
from compbias.jobs.train import fit


def _decode(files, image_size):
    return len(decode_images(files, image_size, threads=1))


def decode_rate(files, image_size: int, workers: int) -> float:
    """Images/s of decoding ``files`` in ``workers`` processes (the file path's floor)."""
    chunks = [files[i::workers] for i in range(workers)]
    t = time.perf_counter()
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        n = sum(pool.map(_decode, chunks, [image_size] * workers))
    return n / (time.perf_counter() - t)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root")
    ap.add_argument("--kind", default="celeba")
    ap.add_argument("--target", default="Blond_Hair")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--max-train", type=int, default=4000)
    ap.add_argument("--arch", default="smallcnn")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    opts = dict(root=args.root, image_size=args.image_size, max_train=args.max_train, max_test=256)
    if args.kind == "celeba":
        opts["target"] = args.target
    t = time.perf_counter()
    mem = load_dataset(args.kind, in_memory=True, **opts)
    t_mem = time.perf_counter() - t
    disk = load_dataset(args.kind, in_memory=False, **opts)
    workers = min(4, max(0, (os.cpu_count() or 1) - 1))
    print(f"{args.kind} at {args.image_size} px, {len(mem.train)} training images, {args.arch}, batch 64, "
          f"torch {torch.get_num_threads()} threads, loader workers {workers}, {os.cpu_count()} CPUs; "
          f"decoding the splits into memory took {t_mem:.1f} s")
    rates = {}
    for name, bundle in (("in memory", mem), ("from files", disk)):
        best = 0.0
        for r in range(args.repeats + 1):
            model = build_model(args.arch, bundle.n_classes, bundle.input_shape, seed=0)
            t = time.perf_counter()
            fit(model, bundle, epochs=1, seed=r, log=None)
            if r:  # the first is a warm-up
                best = max(best, len(bundle.train) / (time.perf_counter() - t))
        rates[name] = best
        print(f"fit {name:10s} {best:8.0f} img/s")
    floor = decode_rate(disk.train.files, args.image_size, max(1, workers))
    print(f"from files / in memory: {rates['from files'] / rates['in memory']:.2f}x; decoding alone on {max(1, workers)} "
          f"process(es): {floor:.0f} img/s (the file path's ceiling); fit from files reaches "
          f"{rates['from files'] / floor:.0%} of it")


if __name__ == "__main__":
    main()
