"""Train-step time, saved activations and inference of utdsl specs against full fine-tuning, a
linear probe, PEFT LoRA and the physical limit, all interleaved in one process.

    .venv/bin/python benchmarks/train_step.py --threads 1              # CPU: vit_s16, fp32, batch 8
    .venv/bin/python benchmarks/train_step.py --model vit_b16 --device cuda --precision bf16 --batch-size 64

Variants: ``limit`` (every weight frozen but the head, the patch embedding's output requiring grad:
the frozen forward and the activation-only backward down to the first block that any method
tuning every block pays; a model without ``patch_embed`` takes the gradient of the batch instead), ``full``, ``linear`` (the head
only), ``lora_qkv`` (utdsl ``attn.qkv -> parallel lowrank(r, alpha)`` + ``train head``),
``peft_lora`` (PEFT ``LoraConfig`` with the same r, alpha and target ``qkv``; left out without
``peft``), and each library spec of ``--specs`` (``restuning_bypass``: the side chain, whose step
runs no backward through the backbone: ``--specs lora restuning_bypass`` compares it with LoRA).

``SPEC+compile`` (for each of ``--compiled``, default lora, ssf, ia3) is the spec's model through
``torch.compile`` (default mode), as ``utdsl train --compile`` runs it; ``compile s`` is its cold
compile, the wall time of its first step (forward and backward compiled; inductor compiles in
worker processes, so process CPU time would miss it).

Every variant is built once; then ``--repeats`` rounds run one step of each, in a rotated order,
so that a busy machine slows all alike. A step is forward, cross-entropy, backward and an AdamW
step (bf16 autocast with ``--precision bf16``). Times are process CPU time on CPU (robust to other
processes; use ``--threads 1`` on a shared host) and wall time on CUDA; each row gives the median
and the min-max, and its ratio to the limit as the median (min-max) of per-round ratios. ``saved
MiB`` is what autograd keeps for the backward (distinct storages, parameters, buffers and the batch
excluded: exact and repeatable); on CUDA ``peak MiB`` is the allocator's peak of one step.
Inference (eval, no grad) of each spec, unmerged and merged (``utdsl.merge``), is timed the same
way against the base model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import inference_call, interleaved, limit_model, saved_mib, spread, training_step  # noqa: E402

FIXED = ("limit", "full", "linear", "lora_qkv", "peft_lora")
DEFAULT_SPECS = ("lora", "adapter", "adaptformer", "bitfit", "ssf", "ia3", "restuning_bypass")


def build(variant: str, args, num_classes: int):
    """The model of ``variant`` with its trainable parameters set."""
    import torch
    import utdsl
    from utdsl.runtime.models import create_model

    torch.manual_seed(0)
    base = create_model(args.model, num_classes=num_classes)
    if variant == "limit":
        base.utdsl_input_grad = not limit_model(base)
        return base
    if variant in ("full", "linear"):
        for name, p in base.named_parameters():
            p.requires_grad_(variant == "full" or (variant == "linear" and name.startswith("head")))
        return base
    if variant == "peft_lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=args.r, lora_alpha=args.alpha, target_modules=["qkv"], lora_dropout=0.0, bias="none")
        model = get_peft_model(base, config)
        for name, p in model.named_parameters():
            if name.endswith(("head.weight", "head.bias")):
                p.requires_grad_(True)
        return model
    if variant.endswith("+compile"):
        return torch.compile(build(variant[:-len("+compile")], args, num_classes))
    spec = (f'spec lora_qkv "LoRA on the whole fused qkv, as PEFT applies it"\n'
            f"attn.qkv -> parallel lowrank(r={args.r}, alpha={args.alpha})\ntrain head\n"
            if variant == "lora_qkv" else variant)
    size = args.input_size
    return utdsl.compile(spec, base, torch.zeros(2, 3, size, size), inplace=True, model_name=args.model)


def train_step(model, variant: str, args, device, images, labels):
    """A closure running one training step of ``model`` (the limit: no optimizer, input grad only)."""
    return training_step(model, device, images, labels, args.precision,
                         input_grad=getattr(model, "utdsl_input_grad", False))


def _clocked(times: dict, cpu_clock: bool) -> dict[str, list[float]]:
    """One clock of :func:`common.interleaved`'s times: process CPU time, or wall time (CUDA)."""
    return {name: t["cpu" if cpu_clock else "wall"] for name, t in times.items()}


def ratios(times: dict, name: str, reference: str) -> dict | None:
    if name not in times or reference not in times:
        return None
    return spread([a / b for a, b in zip(times[name], times[reference])])


def inference(models: dict, args, device, images, sync, cpu_clock: bool) -> dict[str, dict]:
    """Per spec: unmerged and merged inference as a ratio of the base model's, interleaved."""
    import utdsl

    def forward(model):
        return inference_call(model, device, images, args.precision)

    fns = {"base": forward(build("full", args, 100).to(device))}
    for name, model in models.items():
        if name.endswith("+compile") or not hasattr(model, "meta") or "utdsl" not in model.meta:
            continue
        fns[name] = forward(model)
        if any(i.mergeable for i in model.meta["utdsl"].plan.insertions):
            fns[name + "/merged"] = forward(utdsl.merge(model))
    times = _clocked(interleaved(fns, args.warmup, args.repeats, sync), cpu_clock)
    return {name: ratios(times, name, "base") for name in fns if name != "base"}


def measure(args) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch_size, 3, args.input_size, args.input_size, generator=generator).to(device)
    labels = torch.randint(0, 100, (args.batch_size,), generator=generator).to(device)
    variants = [v for v in FIXED if v != "peft_lora" or _has_peft()] + list(args.specs) + [
        f"{spec}+compile" for spec in args.compiled]
    models, steps, rows = {}, {}, {}
    for variant in variants:
        models[variant] = build(variant, args, 100).to(device)
        step, trainable, inputs = train_step(models[variant], variant, args, device, images, labels)
        steps[variant] = step
        row = rows[variant] = {"trainable": trainable}
        start = time.perf_counter()
        step()                                     # optimizer state exists before memory is read
        if variant.endswith("+compile"):
            row["compile_s"] = time.perf_counter() - start
        row["saved_mib"] = saved_mib(models[variant], step, inputs)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            step()
            row["peak_mib"] = (torch.cuda.max_memory_allocated() - before) / 2**20
        print(f"  built {variant}", file=sys.stderr, flush=True)
    times = _clocked(interleaved(steps, args.warmup, args.repeats, sync), cpu_clock=not cuda)
    for variant in variants:
        rows[variant]["step_ms"] = spread(times[variant])
        rows[variant]["vs_limit"] = ratios(times, variant, "limit") if variant != "limit" else None
        rows[variant]["vs_full"] = ratios(times, variant, "full") if variant != "full" else None
    for variant, found in inference({v: models[v] for v in variants}, args, device, images, sync,
                                    cpu_clock=not cuda).items():
        name, _, merged = variant.partition("/")
        rows[name]["merged_infer" if merged else "infer"] = found
    return {"args": vars(args), "rows": rows}


def _has_peft() -> bool:
    try:
        import peft  # noqa: F401
        return True
    except ImportError:
        return False


def _r(value: dict | None) -> str:
    return f"{value['median']:.2f}x ({value['min']:.2f}-{value['max']:.2f})" if value else "-"


def report(result: dict) -> str:
    args, rows = result["args"], result["rows"]
    limit = rows["limit"]["saved_mib"]
    lora = rows.get("lora", {}).get("saved_mib")
    peaks = "peak_mib" in rows["limit"]
    clock = "wall" if args["device"].startswith("cuda") else "process CPU"
    lines = [f"{args['model']}, batch {args['batch_size']}, {args['input_size']}px, {args['device']}, "
             f"{args['precision']}, threads {args['threads'] or 'default'}; {clock} time, median (min-max) of "
             f"{args['repeats']} interleaved rounds after {args['warmup']}", "",
             "| variant | trainable | step ms | step vs limit | step vs full | saved MiB | saved vs limit "
             "| saved vs lora " + ("| peak MiB " if peaks else "") + "| compile s | infer vs base "
             "| merged infer vs base |",
             "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if peaks else "") + "---:|---:|---:|"]
    for name, row in rows.items():
        step = row["step_ms"]
        peak = f"| {row['peak_mib']:.0f} " if "peak_mib" in row else ""
        versus = f"{row['saved_mib'] / lora:.2f}x" if lora else "-"
        compiled = f"{row['compile_s']:.0f}" if "compile_s" in row else "-"
        lines.append(f"| {name} | {row['trainable']:,} | {step['median']:.0f} ({step['min']:.0f}-{step['max']:.0f}) "
                     f"| {_r(row['vs_limit'])} | {_r(row['vs_full'])} | {row['saved_mib']:.0f} "
                     f"| {row['saved_mib'] / limit:.2f}x | {versus} {peak}| {compiled} | {_r(row.get('infer'))} "
                     f"| {_r(row.get('merged_infer'))} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_s16")
    parser.add_argument("--specs", nargs="*", default=list(DEFAULT_SPECS), help="library specs or .ut files")
    parser.add_argument("--compiled", nargs="*", default=["lora", "ssf", "ia3"],
                        help="specs also run through torch.compile (none: --compiled)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="auto: bf16 on CUDA")
    parser.add_argument("--r", type=int, default=8, help="LoRA rank of lora_qkv and peft_lora")
    parser.add_argument("--alpha", type=float, default=8, help="LoRA alpha of lora_qkv and peft_lora")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", dest="json_out", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.precision == "auto":
        args.precision = "bf16" if args.device.startswith("cuda") else "fp32"
    result = measure(args)
    print(report(result))
    if args.json_out:
        with open(args.json_out, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
