"""The GPU path, measured in one run: parity, extraction, training steps, NPID, the CLI stages.

    python benchmarks/gpu_check.py [--out DIR] [--smoke] [--esc-clips N] [--gtzan-clips N]
                                   [--npid-clips N] [--workers W] [--work DIR]

On a CUDA machine (after `make gpu-check-install`, or through `make gpu-check`) it prints
  a. parity       CUDA vs CPU features of the same generated clips, stored as float16: the
                  max |difference| in log units (judged against 0.01, float16 rounding)
  b. extraction   generated ESC-50-like (5 s) and GTZAN-like (30 s, resampled) clips, end to
                  end into a store on local disk, clips/s with --device cuda and with the CPU
                  path, every core decoding (goal: >= 10,000 ESC-50-like clips/s)
  c. training     ResNet-50 fine-tune steps/s (bf16 autocast, channels_last) fed by the
                  in-memory loader, the streaming loader and a batch already on the GPU, and
                  each loader's data stall (goal < 5%)
  d. NPID         one epoch of ResNet-50 NPID over --npid-clips ESC-50-shaped clips, batch 64
                  (Hornauer's pool and batch; goal: 200 epochs in 20 minutes, < 6 s an epoch)
  e. the CLI      `audiofx finetune` and `audiofx pretrain`, 2 epochs each with --device cuda,
                  on the store made in b.: the stages run end to end
  f. the machine  torch and CUDA versions, the GPU's name, the core count
each figure beside the goal or ratio it is judged by, and writes gpu-check.json to --out.
--smoke runs every step on the CPU at tiny sizes (the suite runs it so); its figures prove only
that the script works. docs/benchmarks.md holds the figures of real runs and the command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks import extract as extract_bench  # noqa: E402
from benchmarks.train_step import measure  # noqa: E402

PARITY_LIMIT = 0.01  # float16 keeps ~3 significant digits: log-mel values of |x| < 16 round by < 0.008
ESC_GOAL_CLIPS_S = 10_000
STALL_GOAL = 0.05
NPID_EPOCH_GOAL_S = 6.0  # 200 epochs in 20 minutes
# Distinct generated clips per set; the rest are copies, so generation stays a few seconds
# however many clips are timed (decoding a copy costs what decoding the original does).
DISTINCT_CLIPS = 64


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def machine(device: torch.device) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "cores": cores(), "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    multiprocessors=props.multi_processor_count)
    return info


def parity(device: torch.device, clips: int) -> dict:
    """Max |CUDA - CPU| over the stored (float16) features of the same clips, per set."""
    from audiofx.features.melspec import compute_features

    result = {}
    for spec in extract_bench.SETS:
        config = extract_bench.feature_config(spec)
        rng = np.random.default_rng(extract_bench.SEED)
        audio = np.stack([extract_bench.synth_clip(extract_bench.CLASSES[i % 4], spec.seconds, config.sample_rate, rng)
                          for i in range(clips)])[:, None, :config.clip_samples]
        with torch.inference_mode():
            cpu = compute_features(torch.from_numpy(audio), config).half().float()
            dev = compute_features(torch.from_numpy(audio).to(device), config).half().float().cpu()
        result[spec.name] = {"clips": clips, "max_abs": float((cpu - dev).abs().max()),
                             "value_range": [float(cpu.min()), float(cpu.max())]}
    return result


def make_set(root: Path, spec: extract_bench.SetSpec, clips: int, seed: int, classes: int | None = None,
             distinct: int = DISTINCT_CLIPS) -> None:
    """`clips` WAVs in the folder layout: `distinct` generated ones, the rest copies."""
    classes = classes or extract_bench.class_count(clips)
    distinct = extract_bench.make_dataset(root / "_distinct", max(classes, min(clips, distinct)), spec.seconds,
                                          classes, seed)
    for i in range(clips):
        src = distinct[i % len(distinct)]
        dst = root / src.parent.name / f"{src.parent.name}-{i:06d}.wav"
        if not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
    shutil.rmtree(root / "_distinct")


def extraction(work: Path, clips: dict[str, int], workers: int, devices: list[str], smoke: bool, say) -> dict:
    """clips/s of extract() into a fresh local store, per set and device, after a warm-up
    (none in a smoke run, which measures nothing)."""
    result = {}
    for spec in extract_bench.SETS:
        n = clips[spec.name]
        root = work / "audio" / spec.name
        say(f"[b] {spec.name}: {n} clips of {spec.seconds:g} s (generating, not timed)")
        make_set(root, spec, n, extract_bench.SEED + extract_bench.SETS.index(spec), distinct=2 if smoke else DISTINCT_CLIPS)
        warm = work / "audio" / f"{spec.name}-warmup"
        if not smoke:  # one fold per worker, 2 classes: the warm-up starts the pool at its full size
            make_set(warm, spec, 2 * max(2, workers), extract_bench.SEED + 1000, classes=2)
        result[spec.name] = {"clips": n}
        for device in devices:
            say(f"[b] {spec.name}: extract --device {device}")
            overrides = {**spec.overrides}
            if not smoke:
                extract_bench.run_audiofx(warm, work / "stores" / f"{spec.name}-warmup",
                                          {**overrides, "folds": max(2, workers)}, workers, device)
            seconds, summary = extract_bench.run_audiofx(root, work / "stores" / f"{spec.name}-{device}", overrides,
                                                         workers, device)
            result[spec.name][device] = {"seconds": seconds, "clips_s": n / seconds, "dataset": summary.dataset}
    return result


def cli_stages(work: Path, store: Path, dataset: str, device: str, smoke: bool, say) -> dict:
    """finetune (fold 1) and pretrain (NPID), 2 epochs each, as a user runs them."""
    runs = work / "runs"
    common = ["--store", str(store), "--arch", "tiny" if smoke else "resnet18", "--device", device, "--epochs", "2",
              "--runs", str(runs), "--no-progress"]
    # smoke: 10 clips, so small batches and NPID's exact softmax (NCE's K 64 noise samples need N >> 64)
    small = ["--batch-size", "4"] if smoke else []
    commands = {
        "finetune": ["finetune", "--dataset", dataset, "--fold", "1", "--name", "gpu-finetune", *common, *small],
        "pretrain": ["pretrain", "--method", "npid", "--datasets", dataset, "--name", "gpu-pretrain", *common, *small,
                     *(["--nce-k", "0"] if smoke else [])],
    }
    result = {}
    for stage, args in commands.items():
        say(f"[e] audiofx {shlex.join(args)}")
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "audiofx", *args], capture_output=True, text=True)
        seconds = time.perf_counter() - started
        metrics = runs / stage / f"gpu-{stage}" / "metrics.jsonl"
        records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
        result[stage] = {"rc": proc.returncode, "seconds": seconds, "first_line": (proc.stdout.splitlines() or [""])[0],
                         "error": proc.stderr.strip().splitlines()[-1:] if proc.returncode else [],
                         "epochs_logged": sum(r.get("event") == "epoch" for r in records),
                         "summary": next((r for r in reversed(records) if r.get("event") == "summary"), None)}
    return result


def judged(value: float, goal: float, higher_is_better: bool) -> str:
    ok = value >= goal if higher_is_better else value <= goal
    return f"{'meets' if ok else 'MISSES'} goal"


def report(command: str, r: dict) -> list[str]:
    m, lines = r["machine"], []
    say = lines.append
    say(f"command: {command}")
    say(f"f. machine: {m.get('gpu', 'no GPU')} ({m.get('gpu_memory_gib', '-')} GiB), {m['cores']} cores, "
        f"python {m['python']}, torch {m['torch']}, CUDA {m['cuda']}, cuDNN {m['cudnn']}"
        + ("  [smoke: CPU, tiny sizes]" if r["smoke"] else ""))
    for name, p in r["parity"].items():
        say(f"a. parity {name:<10}: max |cuda - cpu| {p['max_abs']:.4f} log units over {p['clips']} clips "
            f"(limit {PARITY_LIMIT}: {p['max_abs'] / PARITY_LIMIT:.2f}x of it; values in "
            f"[{p['value_range'][0]:.1f}, {p['value_range'][1]:.1f}])")
    for name, e in r["extraction"].items():
        fast, cpu = e.get(r["device"], {}), e.get("cpu", {})
        line = f"b. extract {name:<10}: {e['clips']} clips, {fast.get('clips_s', 0):9.1f} clips/s on {r['device']}"
        if r["device"] != "cpu" and cpu:
            line += f", {cpu['clips_s']:9.1f} on cpu ({fast['clips_s'] / cpu['clips_s']:.2f}x)"
        if name == "esc-like":
            line += f"; {fast.get('clips_s', 0) / ESC_GOAL_CLIPS_S:.2f}x of the {ESC_GOAL_CLIPS_S:,} clips/s goal"
        say(line)
    t = r["training"]
    say(f"c. fine-tune {t['arch']}, batch {t['batch_size']}: steps/s in-memory {t['in_memory_steps_s']:.2f}, "
        f"streaming {t['streaming_steps_s']:.2f} ({t['threads']} threads), resident {t['resident_steps_s']:.2f}")
    say(f"   data stall: in-memory {100 * t['stall_in_memory']:.1f}%, streaming {100 * t['stall_streaming']:.1f}% "
        f"(goal < {100 * STALL_GOAL:.0f}%: {judged(t['stall_in_memory'], STALL_GOAL, False)}, "
        f"{judged(t['stall_streaming'], STALL_GOAL, False)})")
    say(f"d. NPID epoch {t['arch']} over {t['npid_clips']} clips, batch {t['batch_size']}: {t['npid_epoch_s']:.2f} s "
        f"(goal < {NPID_EPOCH_GOAL_S:g} s: {t['npid_epoch_s'] / NPID_EPOCH_GOAL_S:.2f}x of it; "
        f"200 epochs {200 * t['npid_epoch_s'] / 60:.1f} min)")
    for stage, c in r["cli"].items():
        state = "ran" if c["rc"] == 0 else f"FAILED rc {c['rc']}: {' '.join(c['error'])}"
        say(f"e. audiofx {stage:<8} 2 epochs on {r['device']}: {state} in {c['seconds']:.1f} s; {c['first_line']}")
    say("seconds per section: " + ", ".join(f"{k} {v:g}" for k, v in r["seconds"].items()))
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="where gpu-check.json goes (default: not written)")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny sizes: proves the script runs, measures nothing")
    p.add_argument("--esc-clips", type=int, help="ESC-50-like clips timed in b. (default 20000; smoke 10)")
    p.add_argument("--gtzan-clips", type=int, help="GTZAN-like clips timed in b. (default 1000; smoke 10)")
    p.add_argument("--npid-clips", type=int, help="clips of the NPID epoch in d. (default 11000; smoke 16)")
    p.add_argument("--workers", type=int, default=cores(), help="extract worker processes (default: every core)")
    p.add_argument("--work", type=Path, help="working folder on local disk (default: a temp dir, removed)")
    args = p.parse_args(argv)
    small = args.smoke
    args.esc_clips = args.esc_clips or (10 if small else 20_000)
    args.gtzan_clips = args.gtzan_clips or (10 if small else 1_000)
    args.npid_clips = args.npid_clips or (16 if small else 11_000)
    if min(args.esc_clips, args.gtzan_clips) < 2 * extract_bench.FOLDS:
        p.error(f"--esc-clips and --gtzan-clips must be at least {2 * extract_bench.FOLDS}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    if not args.smoke and not torch.cuda.is_available():
        print("error: torch sees no CUDA device here; run on a CUDA machine, or add --smoke to check the script on CPU",
              file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.smoke else "cuda")
    command = shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))
    work = args.work or Path(tempfile.mkdtemp(prefix="audiofx-gpu-check-"))
    r = {"smoke": args.smoke, "device": device.type, "machine": machine(device)}
    seconds = r["seconds"] = {}

    def timed(section: str, fn, *a, **kw):
        started = time.perf_counter()
        out = fn(*a, **kw)
        seconds[section] = round(time.perf_counter() - started, 1)
        return out

    try:
        say("[a] parity")
        r["parity"] = timed("parity", parity, device, 2 if args.smoke else 32)
        devices = ["cpu"] if args.smoke else ["cuda", "cpu"]
        r["extraction"] = timed("extraction", extraction, work,
                                {"esc-like": args.esc_clips, "gtzan-like": args.gtzan_clips},
                                args.workers, devices, args.smoke, say)
        say("[c, d] training steps and the NPID epoch")
        arch = "tiny" if args.smoke else "resnet50"
        r["training"] = timed("training", measure, arch, 16 if args.smoke else 512, 8 if args.smoke else 64,
                              2 if args.smoke else 20, device, min(8, args.workers), npid_clips=args.npid_clips)
        esc = r["extraction"]["esc-like"][device.type]
        r["cli"] = timed("cli", cli_stages, work, work / "stores" / f"esc-like-{device.type}", esc["dataset"],
                         device.type, args.smoke, say)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    lines = report(command, r)
    print("\n".join(lines))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu-check.json").write_text(json.dumps({"command": command, **r}, indent=2) + "\n")
        (args.out / "gpu-check.txt").write_text("\n".join(lines) + "\n")
    return 0 if all(c["rc"] == 0 for c in r["cli"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
