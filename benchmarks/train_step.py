"""Training step rate: is the data path a bottleneck? (the data stall), and one NPID epoch.

    python benchmarks/train_step.py [--arch A] [--clips N] [--batch-size 32] [--steps S] [--device auto]
                                    [--threads T]

Defaults: ResNet-50, 512 clips, 20 steps on CUDA; ResNet-18, 128 clips, 5 steps on CPU, where
a ResNet-50 step takes seconds and the figure only shows that the data path is not the limit.

Builds (not timed) an in-memory set of ESC-50-shaped features (3x128x250 float16) on the
device and a store of as many clips (benchmarks/loader.py's, Blosc zstd as extract writes
it), then measures fine-tuning steps/s of the same model and optimizer fed
  in-memory  by InMemoryLoader (shuffled batches gathered from the resident set, cast to float32)
  streaming  by StreamingLoader from the store (T reader threads, pinned batches copied to the
             device; the mode for sets over the memory budget)
  resident   by one float32 batch already on the device, reused every step (no data path at all)
and prints each data stall = 1 - fed / resident (target: under 5%). Then it times one NPID
epoch over the in-memory set (memory bank, NCE with K 64). On CUDA the steps use bf16
autocast and channels_last, as the training stages do.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from audiofx.training.data.memory import InMemoryData, InMemoryLoader  # noqa: E402
from audiofx.training.data.streaming import StreamingLoader  # noqa: E402
from audiofx.training.models.encoders import Classifier, build_encoder  # noqa: E402
from audiofx.training.models.ssl import NPID  # noqa: E402
from audiofx.training.runtime.device import autocast, pick_device, prepare_model  # noqa: E402
from benchmarks.loader import build  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def steps_per_second(model, opt, batches, device, steps: int) -> float:
    """Run `steps` training steps on the given batches (after 3 warm-up steps)."""
    def step(x, y):
        with autocast(device):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    it = iter(batches())
    for _ in range(3):
        step(*next(it))
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step(*next(it))
    sync(device)
    return steps / (time.perf_counter() - t0)


def measure(arch: str, clips: int, batch_size: int, steps: int, device: torch.device, threads: int,
            npid_clips: int | None = None) -> dict:
    """Fine-tune steps/s fed three ways, their data stalls, and one NPID epoch over `npid_clips`
    (default: `clips`) in-memory clips. benchmarks/gpu_check.py calls this too."""
    torch.manual_seed(0)
    n, bs = clips, batch_size
    data = resident_set(n, device)
    model = prepare_model(Classifier(build_encoder(arch), 50), device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, weight_decay=1e-3)
    loader = InMemoryLoader(data, bs, shuffle=True, drop_last=True, seed=0)

    def from_loader():
        while True:
            for b in loader:
                yield b.x.to(device, non_blocking=True), b.y.to(device)

    fixed = (data.x[:bs].float(), data.y[:bs])

    def resident():
        while True:
            yield fixed

    with tempfile.TemporaryDirectory(prefix="audiofx-train-step-") as tmp:
        *_, foldset = build(Path(tmp), n, memmap=False)
        stream = StreamingLoader(foldset, bs, seed=0, threads=threads, device=device, drop_last=True)

        def from_stream():
            epoch = 0
            while True:
                stream.set_epoch(epoch)
                for b in stream:
                    yield b.x, b.y.to(device)
                epoch += 1

        fed = steps_per_second(model, opt, from_loader, device, steps)
        streamed = steps_per_second(model, opt, from_stream, device, steps)
        alone = steps_per_second(model, opt, resident, device, steps)
    del model, opt, loader

    npid_n = npid_clips or n
    pool = data if npid_n == n else resident_set(npid_n, device)
    npid = prepare_model(NPID(build_encoder(arch), npid_n, torch.Generator().manual_seed(0)), device)
    npid_opt = torch.optim.SGD(npid.parameters(), lr=0.03, momentum=0.9)
    gen = torch.Generator(device=device).manual_seed(0)
    sync(device)
    t0 = time.perf_counter()
    for b in InMemoryLoader(pool, bs, shuffle=True, drop_last=True, seed=1):
        with autocast(device):
            loss = npid(b.x.to(device), b.index.to(device), lambda x: x, gen)
        npid_opt.zero_grad(set_to_none=True)
        loss.backward()
        npid_opt.step()
        npid.after_step()
    sync(device)
    epoch_s = time.perf_counter() - t0
    return {"arch": arch, "clips": n, "batch_size": bs, "threads": threads,
            "in_memory_steps_s": fed, "streaming_steps_s": streamed, "resident_steps_s": alone,
            "stall_in_memory": max(0.0, 1 - fed / alone), "stall_streaming": max(0.0, 1 - streamed / alone),
            "npid_clips": npid_n, "npid_epoch_s": epoch_s}


def resident_set(n: int, device: torch.device) -> InMemoryData:
    """n ESC-50-shaped float16 clips already on the device, 50 classes."""
    return InMemoryData(x=torch.randn(n, 3, 128, 250, device=device).half(), y=torch.randint(0, 50, (n,), device=device),
                        index=torch.arange(n, device=device), clips=[""] * n, fold_of=[""] * n)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default=None)
    p.add_argument("--clips", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 2),
                   help="reader threads of the streaming loader (default: cores, at most 8)")
    args = p.parse_args()
    device = pick_device(args.device)
    gpu = device.type == "cuda"
    args.arch = args.arch or ("resnet50" if gpu else "resnet18")
    args.clips = args.clips or (512 if gpu else 128)
    args.steps = args.steps or (20 if gpu else 5)
    r = measure(args.arch, args.clips, args.batch_size, args.steps, device, args.threads)
    n, bs = r["clips"], r["batch_size"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"command: {shlex.join([sys.executable.rsplit('/', 1)[-1], *sys.argv])}")
    print(f"device: {name}, torch {torch.__version__}, {args.arch}, batch {bs}, {n} clips of 3x128x250")
    print(f"fine-tune steps/s fed by InMemoryLoader : {r['in_memory_steps_s']:8.2f}  ({r['in_memory_steps_s'] * bs:.0f} samples/s)")
    print(f"fine-tune steps/s fed by StreamingLoader: {r['streaming_steps_s']:8.2f}  "
          f"({r['streaming_steps_s'] * bs:.0f} samples/s, {args.threads} reader threads)")
    print(f"fine-tune steps/s on a resident batch   : {r['resident_steps_s']:8.2f}  ({r['resident_steps_s'] * bs:.0f} samples/s)")
    print(f"data stall, in memory                   : {100 * r['stall_in_memory']:7.1f}%  (target < 5%)")
    print(f"data stall, streaming                   : {100 * r['stall_streaming']:7.1f}%  (target < 5%)")
    print(f"NPID epoch over {n} clips               : {r['npid_epoch_s']:8.2f} s  ({n / r['npid_epoch_s']:.0f} samples/s)")


if __name__ == "__main__":
    main()
