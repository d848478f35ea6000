"""The weight-space library specs against PEFT's implementation of the same method, on one timm
model with the same configuration, as ratios measured side by side in one process.

    .venv/bin/python benchmarks/weight_methods.py                    # vit_small_patch16_224, batch 8, 224 px, 7 repeats
    .venv/bin/python benchmarks/weight_methods.py --quick            # smoke run: vit_tiny, 64 px, 3 repeats
    .venv/bin/python benchmarks/weight_methods.py --json weight_methods.json

Methods and their PEFT configurations (peft's defaults where the library spec follows them):

    lora_weight  LoraConfig(r=8, lora_alpha=8)            dora  LoraConfig(r=8, lora_alpha=8, use_dora=True)
    vera         VeraConfig(r=256, d_initial=0.1)         loha  LoHaConfig(r=8, alpha=8)
    lokr         LoKrConfig(r=8, alpha=8)                 oft   OFTConfig(oft_block_size=32, r=0)  (Cayley-Neumann, 5 terms)
    boft         BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=1)

PEFT cannot target chunks of a fused linear, so each method has three rows: ``utdsl qkv`` (the
library spec's rule on the whole ``attn.qkv``, its arguments unchanged), ``peft qkv``
(``target_modules=["qkv"]``) and ``utdsl spec`` (the library spec itself, q and v only; another
configuration, shown for reference). ``fact_tt`` and ``fact_tk`` have no PEFT implementation: they
are compared with utdsl's ``lora`` library spec (``parallel lowrank`` on q, v) and the limit.
Every variant also trains the classifier, as the library specs do. ``limit`` is the base model
with every weight frozen but the classifier, the activation gradient flowing from the head down to
the first block (the patch embedding's output requires grad): the forward and activation-only
backward that any method tuning every block's qkv must pay, without the weight gradients.

Before timing, each PEFT adapter gets random values, copied into the utdsl qkv units, and the two
models' logits are compared (max abs diff printed): the comparison is like with like.

A step is forward, cross-entropy, backward and an AdamW step on random images, fp32, one thread.
Times are process CPU time (``time.process_time``), robust to other processes on a shared machine;
wall time is recorded too. Variants are interleaved (``for repeat: for variant: one step``, the
order rotated each repeat) after ``--warmup`` steps each; a ratio is the median over repeats of the
per-repeat ratio, with its min-max spread. Memory: ``saved MiB`` is what autograd saves for the
backward (tensors kept from the forward, distinct storages, parameters, buffers and the batch
excluded: activations plus any materialised W' = f(W)), measured in-process and deterministic;
``peak MiB`` is the peak resident set above the model and batch over warm-up and steps, each
variant in its own process (``common.Memory``; skip with ``--no-rss``). Merged inference is an
eval forward of ``utdsl.merge(model)`` and of PEFT's ``merge_and_unload()`` against the base model,
interleaved the same way; the target is 1.00x.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Memory, limit_model, inference_call, interleaved, per_round_ratio, run_isolated, saved_mib, training_step  # noqa: E402

#: method -> (PEFT config class, its arguments, {utdsl unit parameter: peft adapter attribute} or None: same names)
PEFT_METHODS: dict[str, tuple[str, dict, dict | None]] = {
    "lora_weight": ("LoraConfig", dict(r=8, lora_alpha=8, lora_dropout=0.0), {"lora_A": "lora_A", "lora_B": "lora_B"}),
    "dora": ("LoraConfig", dict(r=8, lora_alpha=8, lora_dropout=0.0, use_dora=True),
             {"lora_A": "lora_A", "lora_B": "lora_B", "magnitude": "lora_magnitude_vector"}),
    "vera": ("VeraConfig", dict(r=256, d_initial=0.1, projection_prng_key=0, vera_dropout=0.0),
             {"vera_lambda_b": "vera_lambda_b", "vera_lambda_d": "vera_lambda_d"}),
    "loha": ("LoHaConfig", dict(r=8, alpha=8), None),
    "lokr": ("LoKrConfig", dict(r=8, alpha=8), None),
    "oft": ("OFTConfig", dict(oft_block_size=32, r=0, use_cayley_neumann=True, num_cayley_neumann_terms=5),
            {"oft_R": "oft_R"}),
    "boft": ("BOFTConfig", dict(boft_block_size=4, boft_n_butterfly_factor=1, boft_dropout=0.0),
             {"boft_R": "boft_R", "boft_s": "boft_s"}),
}
NO_PEFT = ("fact_tt", "fact_tk")
REFERENCE = "lora"          # utdsl's parallel-lowrank library spec, the reference of the FacT rows
NUM_CLASSES = 100


def variant_names(methods: list[str]) -> list[str]:
    names = ["limit"]
    for method in methods:
        names += [f"{method}/utdsl", f"{method}/peft", f"{method}/spec"] if method in PEFT_METHODS else [f"{method}/spec"]
    if any(m in NO_PEFT for m in methods):
        names.append(f"{REFERENCE}/spec")
    return names


def _qkv_spec(method: str) -> str:
    """The library spec of ``method`` with every tuner rule's selector replaced by ``attn.qkv``."""
    from utdsl.library import find_spec

    lines = []
    for line in find_spec(method).read_text().splitlines():
        if "->" in line and not line.lstrip().startswith("#"):
            line = "attn.qkv ->" + line.split("->", 1)[1]
        lines.append(line)
    return "\n".join(lines) + "\n"


def _base(args):
    import torch
    from utdsl.runtime.models import create_model

    torch.manual_seed(0)
    return create_model(args.model, num_classes=NUM_CLASSES, img_size=args.input_size)


def build(variant: str, args):
    """The model of ``variant``, its trainable parameters set."""
    import torch
    import utdsl

    base = _base(args)
    if variant == "limit":
        limit_model(base)
        return base
    method, kind = variant.split("/")
    if kind == "peft":
        import peft

        if method == "boft":
            import peft.tuners.boft.layer as boft_layer
            boft_layer.get_fbd_cuda = lambda: None   # CPU: no CUDA extension to build (peft then uses factor 1)
        config_name, config_args, _ = PEFT_METHODS[method]
        config = getattr(peft, config_name)(target_modules=["qkv"], **config_args)
        model = peft.get_peft_model(base, config)
        model.get_base_model().get_classifier().requires_grad_(True)
        return model
    spec = _qkv_spec(method) if kind == "utdsl" else method
    size = args.input_size
    return utdsl.compile(spec, base, torch.zeros(2, 3, size, size), inplace=True, model_name=args.model)


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _units(model) -> dict[str, object]:
    """site path -> the utdsl weight unit on the whole weight (``units.full``)."""
    from utdsl.placements.base import FULL

    return {i.site: model.get_submodule(i.module_name).units[FULL]
            for i in model.meta["utdsl"].plan.insertions if i.placement == "weight"}


def randomise_alike(ours, theirs, method: str, seed: int = 5) -> None:
    """Random values into every PEFT adapter; the same values into the utdsl unit of its site."""
    import torch

    names = PEFT_METHODS[method][2]
    generator = torch.Generator().manual_seed(seed)
    units = _units(ours)
    with torch.no_grad():
        for site, unit in units.items():
            layer = theirs.get_base_model().get_submodule(site)
            pairs = names or {n: n for n, _ in unit.named_parameters()}
            for mine, attribute in pairs.items():
                target = getattr(layer, attribute)["default"]
                target = target.weight if isinstance(target, torch.nn.Module) else target
                noise = torch.randn(target.shape, generator=generator)
                value = target * (1 + 0.1 * noise) if attribute in ("lora_magnitude_vector", "boft_s") else 0.02 * noise
                target.copy_(value)
                getattr(unit, mine).copy_(value.reshape(getattr(unit, mine).shape))


def forward_diff(ours, theirs, images) -> tuple[float, float]:
    """(max |logits_utdsl - logits_peft|, max |logits_peft - logits_base|) in eval mode: the
    second says the adapters' random values do move the output."""
    import torch

    ours.eval(), theirs.eval()
    with torch.no_grad():
        a, b = ours(images), theirs(images)
        with theirs.disable_adapter():
            base = theirs(images)
    ours.train(), theirs.train()
    return (a - b).abs().max().item(), (b - base).abs().max().item()


def _inputs(args):
    import torch

    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch_size, 3, args.input_size, args.input_size, generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (args.batch_size,), generator=generator)
    return images, labels


def _setup_torch(args):
    import torch

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    return torch.device("cpu")


def rss_worker(variant: str, args) -> dict:
    """Peak resident set above model and batch over warm-up and steps, this variant alone in this process."""
    device = _setup_torch(args)
    images, labels = _inputs(args)
    model = build(variant, args)
    step, _, _ = training_step(model, device, images, labels)
    memory = Memory(device)
    memory.start()
    for _ in range(args.warmup + 2):
        step()
    return {"variant": variant, "peak_mib": memory.peak_mib()}


def rss_isolated(variant: str, argv: list[str]) -> dict:
    return run_isolated(variant, argv, __file__)


def measure(args, argv: list[str]) -> dict:
    import torch
    import utdsl

    device = _setup_torch(args)
    images, labels = _inputs(args)
    variants = variant_names(args.methods)
    rows: dict[str, dict] = {}
    models, steps = {}, {}
    for variant in variants:
        models[variant] = build(variant, args)
        rows[variant] = {"variant": variant, "trainable": trainable(models[variant])}
    checks = {}
    for method in args.methods:
        if method in PEFT_METHODS:
            ours, theirs = models[f"{method}/utdsl"], models[f"{method}/peft"]
            randomise_alike(ours, theirs, method)
            diff, effect = forward_diff(ours, theirs, images)
            checks[method] = {"max_abs_diff": diff, "adapter_effect": effect,
                              "trainable_equal": rows[f"{method}/utdsl"]["trainable"] == rows[f"{method}/peft"]["trainable"]}
            print(f"forward check {method}: utdsl qkv vs peft qkv, max |diff| {diff:.2e} (adapters move logits by {effect:.2e}), "
                  f"trainable {rows[f'{method}/utdsl']['trainable']:,} vs {rows[f'{method}/peft']['trainable']:,}",
                  file=sys.stderr, flush=True)
    for variant in variants:
        steps[variant], _, _ = training_step(models[variant], device, images, labels)
        rows[variant]["saved_mib"] = saved_mib(models[variant], steps[variant], images)
    print(f"timing {len(variants)} train steps x {args.repeats} repeats", file=sys.stderr, flush=True)
    step_times = interleaved(steps, args.warmup, args.repeats, progress=True)
    for variant, t in step_times.items():
        rows[variant].update(step_ms=statistics.median(t["cpu"]), step_ms_min=min(t["cpu"]),
                             step_ms_max=max(t["cpu"]), step_wall_ms=statistics.median(t["wall"]),
                             step_times_cpu=t["cpu"], step_times_wall=t["wall"])
        method, _, kind = variant.partition("/")
        reference = f"{method}/peft" if method in PEFT_METHODS else f"{REFERENCE}/spec" if method in NO_PEFT else None
        if reference and reference != variant:
            rows[variant]["step_vs_ref"] = per_round_ratio(step_times, variant, reference)
            rows[variant]["step_vs_ref_wall"] = per_round_ratio(step_times, variant, reference, "wall")
            rows[variant]["reference"] = reference
        if variant != "limit":
            rows[variant]["step_vs_limit"] = per_round_ratio(step_times, variant, "limit")
    # merged inference against the base model, interleaved
    del steps
    merged = {"base": inference_call(_base(args).requires_grad_(False), device, images)}
    for variant in variants:
        model = models.pop(variant)
        model.zero_grad(set_to_none=True)
        if variant.endswith("/peft"):
            merged[variant] = model.merge_and_unload()
        elif variant != "limit" and any(i.mergeable for i in model.meta["utdsl"].plan.insertions):
            merged[variant] = utdsl.merge(model)
        if variant in merged:
            merged[variant] = inference_call(merged[variant], device, images)
        del model
    gc.collect()
    print(f"timing {len(merged)} merged inference forwards x {args.repeats} repeats", file=sys.stderr, flush=True)
    infer_times = interleaved(merged, args.warmup, args.repeats, progress=True)
    base_ms = statistics.median(infer_times["base"]["cpu"])
    for variant in merged:
        if variant != "base":
            rows[variant]["merged_vs_base"] = per_round_ratio(infer_times, variant, "base")
    if args.rss:
        for variant in variants:
            result = rss_isolated(variant, argv)
            rows[variant]["peak_mib"] = result.get("peak_mib")
            shown = result.get("error") or f"{result['peak_mib']:.0f} MiB"
            print(f"  peak rss {variant}: {shown}", file=sys.stderr, flush=True)
    for variant, row in rows.items():
        reference = row.get("reference")
        for key in ("saved_mib", "peak_mib"):
            if reference and row.get(key) is not None and rows[reference].get(key):
                row[f"{key}_vs_ref"] = row[key] / rows[reference][key]
    return {"args": {k: v for k, v in vars(args).items() if k not in ("worker", "worker_out")},
            "torch": torch.__version__, "peft": _peft_version(), "forward_check": checks,
            "base_infer_ms": base_ms, "rows": list(rows.values())}


def _peft_version() -> str:
    import peft

    return peft.__version__


def _r(value: dict | None) -> str:
    return f"{value['median']:.2f}x ({value['min']:.2f}-{value['max']:.2f})" if value else "-"


def _x(value: float | None) -> str:
    return f"{value:.2f}x" if value is not None else "-"


def report(result: dict) -> str:
    args = SimpleNamespace(**result["args"])
    lines = [f"{args.model}, batch {args.batch_size}, {args.input_size}px, fp32, {args.threads} thread(s), peft "
             f"{result['peft']}, torch {result['torch']}; process CPU time, median of {args.repeats} interleaved "
             f"repeats after {args.warmup} warm-up; ratios: median of per-repeat ratios (min-max); "
             f"\"vs ref\" is vs PEFT's qkv for the methods it has, vs utdsl `lora` (spec) for FacT",
             "",
             "| variant | trainable | step ms (min-max) | step vs ref | step vs limit | saved MiB | vs ref "
             "| peak MiB | vs ref | merged infer vs base |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in result["rows"]:
        peak = row.get("peak_mib")
        lines.append(
            f"| {row['variant']} | {row['trainable']:,} | {row['step_ms']:.0f} ({row['step_ms_min']:.0f}-{row['step_ms_max']:.0f}) "
            f"| {_r(row.get('step_vs_ref'))} | {_r(row.get('step_vs_limit'))} | {row['saved_mib']:.0f} "
            f"| {_x(row.get('saved_mib_vs_ref'))} | {f'{peak:.0f}' if peak is not None else '-'} "
            f"| {_x(row.get('peak_mib_vs_ref'))} | {_r(row.get('merged_vs_base'))} |")
    lines.append("")
    for method, check in result["forward_check"].items():
        lines.append(f"forward check {method}: utdsl qkv vs peft qkv, random adapter values, max |diff| "
                     f"{check['max_abs_diff']:.1e} (the adapters move the logits by up to {check['adapter_effect']:.1e}); "
                     f"trainable counts {'equal' if check['trainable_equal'] else 'DIFFER'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time is the work done)")
    parser.add_argument("--methods", nargs="*", default=[*PEFT_METHODS, *NO_PEFT])
    parser.add_argument("--quick", action="store_true", help="smoke run: vit_tiny_patch16_224, 64 px, 3 repeats, 1 warm-up")
    parser.add_argument("--rss", action=argparse.BooleanOptionalAction, default=True,
                        help="peak resident set of each variant in its own process")
    parser.add_argument("--json", dest="json_out", help="also write the results to this JSON file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.input_size, args.repeats, args.warmup = "vit_tiny_patch16_224", 64, 3, 1
    unknown = [m for m in args.methods if m not in PEFT_METHODS and m not in NO_PEFT]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {[*PEFT_METHODS, *NO_PEFT]}")
    if args.worker:
        with open(args.worker_out, "w") as handle:
            json.dump(rss_worker(args.worker, args), handle)
        return
    started = time.perf_counter()
    result = measure(args, argv)
    result["seconds"] = time.perf_counter() - started
    print(report(result))
    if args.json_out:
        with open(args.json_out, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
