"""Train-step time and peak memory of utdsl specs against full fine-tuning, a linear probe and
PEFT LoRA with the same configuration, on one model, as ratios, in one run.

    .venv/bin/python benchmarks/train_step.py                       # CPU: vit_s16, fp32, batch 8
    .venv/bin/python benchmarks/train_step.py --model vit_b16 --device cuda --precision bf16 --batch-size 64

Variants: ``full`` (every parameter trains), ``linear`` (the head only), ``lora_qkv`` (utdsl:
``attn.qkv -> parallel lowrank(r, alpha)`` + ``train head``), ``peft_lora`` (PEFT ``LoraConfig``
with the same r, alpha and target ``qkv``, the head trainable; skipped with a note when ``peft`` is
not installed: ``pip install peft``), and each library spec of ``--specs``.

A step is forward, cross-entropy, backward and an AdamW step on random images (bf16 autocast with
``--precision bf16``). Step time is the median of ``--steps`` timed steps after ``--warmup``.
Memory is the peak above what the model and the batch hold before the first step (activations,
gradients, optimizer state, workspace): ``torch.cuda.max_memory_allocated`` on CUDA, the process's
peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``) on CPU. Each variant runs in
its own process so that one's memory cannot hide another's. Inference (eval forward, no grad) is
timed for each spec compiled and merged (``utdsl.merge``) against the base model, interleaved in
the same process. The target ratio ``lora_qkv`` / ``peft_lora`` (<= 1.0x) is also measured with
both models in one process, steps interleaved, so that a busy machine slows both alike; merged
inference should be 1.00x base.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

FIXED = ("full", "linear", "lora_qkv", "peft_lora")
DEFAULT_SPECS = ("lora", "adapter", "adaptformer", "bitfit", "ssf", "ia3")


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class Memory:
    """Peak memory above a baseline, on CUDA or (Linux) CPU."""

    def __init__(self, device):
        import torch

        self.torch, self.cuda = torch, device.type == "cuda"

    def start(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
            self.base = self.torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")  # reset VmHWM to the current resident set
            self.base = _rss_kib("VmRSS") * 1024

    def peak_mib(self) -> float:
        if self.cuda:
            self.torch.cuda.synchronize()
            return (self.torch.cuda.max_memory_allocated() - self.base) / 2**20
        return (_rss_kib("VmHWM") * 1024 - self.base) / 2**20


def _build(variant: str, args, num_classes: int):
    """The model of ``variant`` (trainable parameters set) and, for specs, the compiled one."""
    import torch
    import utdsl
    from utdsl.runtime.models import create_model

    torch.manual_seed(0)
    base = create_model(args.model, num_classes=num_classes)
    if variant == "full":
        return base
    if variant == "linear":
        for name, p in base.named_parameters():
            p.requires_grad_(name.startswith("head"))
        return base
    if variant == "peft_lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=args.r, lora_alpha=args.alpha, target_modules=["qkv"], lora_dropout=0.0, bias="none")
        model = get_peft_model(base, config)
        for name, p in model.named_parameters():
            if ".head." in f".{name}" or name.endswith("head.weight") or name.endswith("head.bias"):
                p.requires_grad_(True)
        return model
    spec = (f'spec lora_qkv "LoRA on the whole fused qkv, as PEFT applies it"\n'
            f"attn.qkv -> parallel lowrank(r={args.r}, alpha={args.alpha})\ntrain head\n"
            if variant == "lora_qkv" else variant.split(":", 1)[1])
    size = args.input_size
    return utdsl.compile(spec, base, torch.zeros(2, 3, size, size), inplace=True, model_name=args.model)


def _time(fns: dict, warmup: int, steps: int, sync) -> dict[str, float]:
    """Median milliseconds of each function, calls interleaved so that load changes hit all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(steps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1000 for name, t in times.items()}


def _train_step(model, args, device, images, labels):
    import torch
    from utdsl.runtime.evaluate import autocast_for

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        with autocast_for(device, args.precision):
            logits = model(images)
        loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    model.train()
    return step, sum(p.numel() for p in params)


def _forward(model, args, device, images):
    import torch
    from utdsl.runtime.evaluate import autocast_for

    model.eval()

    @torch.no_grad()
    def forward():
        with autocast_for(device, args.precision):
            return model(images)

    return forward


def worker(variant: str, args) -> dict:
    """Measure one variant in this process; returns a JSON-able row.

    ``pair:A,B`` times the train steps of A and B interleaved in one process (no memory figure);
    spec variants also time inference of the base, the compiled and the merged model, interleaved.
    """
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    num_classes = 100
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch_size, 3, args.input_size, args.input_size, generator=generator).to(device)
    labels = torch.randint(0, num_classes, (args.batch_size,), generator=generator).to(device)
    if variant.startswith("pair:"):
        names = variant[5:].split(",")
        steps = {n: _train_step(_build(n, args, num_classes).to(device), args, device, images, labels)[0]
                 for n in names}
        return {"variant": variant, **{f"{n}_step_ms": t for n, t in _time(steps, args.warmup, args.steps, sync).items()}}
    model = _build(variant, args, num_classes).to(device)
    step, trainable = _train_step(model, args, device, images, labels)
    row = {"variant": variant, "trainable": trainable}
    memory = Memory(device)
    memory.start()
    row["step_ms"] = _time({"step": step}, args.warmup, args.steps, sync)["step"]
    row["mem_mib"] = memory.peak_mib()
    if device.type == "cuda":
        row["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    if variant.startswith("spec:") or variant == "lora_qkv":
        import utdsl

        model.zero_grad(set_to_none=True)
        fns = {"base": _forward(_build("full", args, num_classes).to(device), args, device, images),
               "infer": _forward(model, args, device, images)}
        if any(i.mergeable for i in model.meta["utdsl"].plan.insertions):
            fns["merged"] = _forward(utdsl.merge(model), args, device, images)
        times = _time(fns, args.warmup, args.steps, sync)
        row["infer_vs_base"] = times["infer"] / times["base"]
        if "merged" in times:
            row["merged_vs_base"] = times["merged"] / times["base"]
        row["base_infer_ms"] = times["base"]
    return row


def run_isolated(variant: str, argv: list[str], script: str = __file__) -> dict:
    """Run ``script``'s ``--worker variant`` in a process of its own (a clean peak RSS) and return
    the JSON it writes; an ``error`` row when it fails."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        out = handle.name
    try:
        command = [sys.executable, os.path.abspath(script), *argv, "--worker", variant, "--worker-out", out]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            return {"variant": variant, "error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
        with open(out) as handle:
            return json.load(handle)
    finally:
        os.unlink(out)


def _ratio(value, reference) -> str:
    return f"{value / reference:.2f}x" if value is not None and reference else "-"


def _fmt(value) -> str:
    return f"{value:.2f}x" if value is not None else "-"


def report(rows: list[dict], args) -> str:
    """The markdown table of ``rows`` and the target lines."""
    by = {r["variant"]: r for r in rows}
    full, peft = by.get("full", {}), by.get("peft_lora", {})
    lines = [f"train step on {args.model}, batch {args.batch_size}, {args.input_size}px, {args.device}, "
             f"{args.precision}; median of {args.steps} steps after {args.warmup}; memory = peak above model+batch",
             "",
             "| variant | trainable | step ms | vs full | vs PEFT LoRA | mem MiB | vs full | vs PEFT LoRA "
             "| infer vs base | merged infer vs base |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        if row["variant"].startswith("pair:"):
            continue
        if "error" in row:
            lines.append(f"| {row['variant']} | {row['error']} |||||||||")
            continue
        lines.append(
            f"| {row['variant']} | {row['trainable']:,} | {row['step_ms']:.1f} | {_ratio(row['step_ms'], full.get('step_ms'))} "
            f"| {_ratio(row['step_ms'], peft.get('step_ms'))} | {row['mem_mib']:.0f} "
            f"| {_ratio(row['mem_mib'], full.get('mem_mib'))} | {_ratio(row['mem_mib'], peft.get('mem_mib'))} "
            f"| {_fmt(row.get('infer_vs_base'))} | {_fmt(row.get('merged_vs_base'))} |")
    pair = by.get("pair:lora_qkv,peft_lora", {})
    if "lora_qkv_step_ms" in pair:
        ratio = pair["lora_qkv_step_ms"] / pair["peft_lora_step_ms"]
        lines.append(f"\ntarget lora_qkv step <= 1.0x PEFT LoRA (interleaved in one process): "
                     f"{pair['lora_qkv_step_ms']:.1f} / {pair['peft_lora_step_ms']:.1f} ms = {ratio:.2f}x "
                     f"{'PASS' if round(ratio, 2) <= 1.0 else 'MISS'}")
    else:
        lines.append("\nPEFT LoRA skipped: `pip install peft` to compare against it")
    merged = by.get("lora_qkv", {}).get("merged_vs_base")
    if merged is not None:
        lines.append(f"target merged inference 1.00x base (lora_qkv, interleaved): {merged:.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_s16")
    parser.add_argument("--specs", nargs="*", default=list(DEFAULT_SPECS), help="library specs or .ut files")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="auto: bf16 on CUDA")
    parser.add_argument("--r", type=int, default=8, help="LoRA rank of lora_qkv and peft_lora")
    parser.add_argument("--alpha", type=float, default=8, help="LoRA alpha of lora_qkv and peft_lora")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", dest="json_out", help="also write the rows to this JSON file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.precision == "auto":
        args.precision = "bf16" if args.device.startswith("cuda") else "fp32"
    if args.worker:
        row = worker(args.worker, args)
        with open(args.worker_out, "w") as handle:
            json.dump(row, handle)
        return
    variants = list(FIXED) + [f"spec:{s}" for s in args.specs]
    try:
        import peft  # noqa: F401
        variants.append("pair:lora_qkv,peft_lora")
    except ImportError:
        variants.remove("peft_lora")
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    passthrough += ["--device", args.device, "--precision", args.precision]
    rows = []
    for variant in variants:
        rows.append(run_isolated(variant, passthrough))
        print(f"  {variant}: {rows[-1].get('error') or 'done'}", file=sys.stderr, flush=True)
    print(report(rows, args))
    if args.json_out:
        with open(args.json_out, "w") as handle:
            json.dump({"args": vars(args), "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
