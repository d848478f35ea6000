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
timed for the base model and for each spec compiled and merged (``utdsl.merge``), as a ratio to the
base. Targets: ``lora_qkv`` step time <= 1.0x ``peft_lora``; merged inference 1.00x base.
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


def _time(fn, warmup: int, steps: int, sync) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def worker(variant: str, args) -> dict:
    """Measure one variant in this process; returns a JSON-able row."""
    import torch
    from utdsl.runtime.evaluate import autocast_for

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    num_classes = 100
    model = _build(variant, args, num_classes).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    row = {"variant": variant, "trainable": sum(p.numel() for p in params)}
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch_size, 3, args.input_size, args.input_size, generator=generator).to(device)
    labels = torch.randint(0, num_classes, (args.batch_size,), generator=generator).to(device)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    precision = args.precision

    def step() -> None:
        with autocast_for(device, precision):
            logits = model(images)
        loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    memory = Memory(device)
    model.train()
    memory.start()
    row["step_ms"] = _time(step, args.warmup, args.steps, sync)
    row["mem_mib"] = memory.peak_mib()
    if device.type == "cuda":
        row["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    optimizer.zero_grad(set_to_none=True)

    def infer(net) -> float:
        def forward():
            with autocast_for(device, precision):
                return net(images)

        net.eval()
        with torch.no_grad():
            return _time(forward, args.warmup, args.steps, sync)

    if variant == "full":
        row["infer_ms"] = infer(model)
    elif variant.startswith("spec:") or variant == "lora_qkv":
        import utdsl

        row["infer_ms"] = infer(model)
        info = model.meta["utdsl"]
        if any(i.mergeable for i in info.plan.insertions):
            row["merged_infer_ms"] = infer(utdsl.merge(model))
    return row


def _run_isolated(variant: str, argv: list[str]) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        out = handle.name
    try:
        command = [sys.executable, os.path.abspath(__file__), *argv, "--worker", variant, "--worker-out", out]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            return {"variant": variant, "error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
        with open(out) as handle:
            return json.load(handle)
    finally:
        os.unlink(out)


def _ratio(value, reference) -> str:
    return f"{value / reference:.2f}x" if value is not None and reference else "-"


def report(rows: list[dict], args) -> str:
    by = {r["variant"]: r for r in rows}
    full, peft, base_infer = by.get("full", {}), by.get("peft_lora", {}), by.get("full", {}).get("infer_ms")
    lines = [f"train step on {args.model}, batch {args.batch_size}, {args.input_size}px, {args.device}, "
             f"{args.precision}; median of {args.steps} steps after {args.warmup}; memory = peak above model+batch",
             "",
             "| variant | trainable | step ms | vs full | vs PEFT LoRA | mem MiB | vs full | vs PEFT LoRA "
             "| infer vs base | merged infer vs base |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['variant']} | {row['error']} |||||||||")
            continue
        lines.append(
            f"| {row['variant']} | {row['trainable']:,} | {row['step_ms']:.1f} | {_ratio(row['step_ms'], full.get('step_ms'))} "
            f"| {_ratio(row['step_ms'], peft.get('step_ms'))} | {row['mem_mib']:.0f} "
            f"| {_ratio(row['mem_mib'], full.get('mem_mib'))} | {_ratio(row['mem_mib'], peft.get('mem_mib'))} "
            f"| {_ratio(row.get('infer_ms'), base_infer) if row['variant'] != 'full' else '1.00x (base)'} "
            f"| {_ratio(row.get('merged_infer_ms'), base_infer)} |")
    if base_infer:
        lines.append(f"\nbase inference: {base_infer:.1f} ms a batch")
    lora = by.get("lora_qkv", {})
    if "step_ms" in lora and "step_ms" in peft:
        ratio = lora["step_ms"] / peft["step_ms"]
        lines.append(f"target lora_qkv step <= 1.0x PEFT LoRA: {ratio:.2f}x {'PASS' if ratio <= 1.0 else 'MISS'}")
    elif "peft_lora" not in by or "error" in peft:
        lines.append("PEFT LoRA column skipped: `pip install peft` to compare against it")
    if "merged_infer_ms" in lora and base_infer:
        lines.append(f"target merged inference 1.00x base: {lora['merged_infer_ms'] / base_infer:.2f}x")
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
    except ImportError:
        variants.remove("peft_lora")
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    passthrough += ["--device", args.device, "--precision", args.precision]
    rows = []
    for variant in variants:
        rows.append(_run_isolated(variant, passthrough))
        print(f"  {variant}: " + (rows[-1].get("error") or f"{rows[-1]['step_ms']:.1f} ms"), file=sys.stderr, flush=True)
    print(report(rows, args))
    if args.json_out:
        with open(args.json_out, "w") as handle:
            json.dump({"args": vars(args), "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
