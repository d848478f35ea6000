"""Helpers the benchmarks share: a training step and an inference closure of a model, what
autograd saves in a step, interleaved timing, peak memory, and running a variant in a process of
its own."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

__all__ = ["limit_model", "Memory", "training_step", "inference_call", "saved_mib", "interleaved", "spread",
           "per_round_ratio", "run_isolated"]


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class Memory:
    """Peak memory above a baseline: the CUDA allocator's peak, or (Linux) the process's peak
    resident set (``VmHWM``, reset through ``/proc/self/clear_refs``)."""

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


def limit_model(base) -> bool:
    """Make ``base`` the physical limit of a method that tunes every block: every weight frozen
    but the classifier, and the activation gradient flowing from the head down to the first block
    (the patch embedding's output requires grad). Returns False when the model has no
    ``patch_embed``: then the batch itself must require grad (``training_step(input_grad=True)``),
    which adds the stem's input gradient."""
    for p in base.parameters():
        p.requires_grad_(False)
    base.get_classifier().requires_grad_(True)
    if not hasattr(base, "patch_embed"):
        return False
    base.patch_embed.register_forward_hook(lambda module, inputs, output: output.detach().requires_grad_(True))
    return True


def training_step(model, device, images, labels, precision: str = "fp32", *, input_grad: bool = False):
    """(step, trainable count, inputs): ``step()`` runs forward, cross-entropy, backward and an AdamW
    step of ``model``'s trainable parameters (none: no optimizer). ``input_grad`` makes the batch
    require grad (the limit: the activation-only backward)."""
    import torch
    from utdsl.runtime.evaluate import autocast_for

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
    inputs = images.clone().requires_grad_(True) if input_grad else images

    def step() -> None:
        with autocast_for(device, precision):
            logits = model(inputs)
        torch.nn.functional.cross_entropy(logits.float(), labels).backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        inputs.grad = None

    model.train()
    return step, sum(p.numel() for p in params), inputs


def inference_call(model, device, images, precision: str = "fp32"):
    """``forward()``: an eval-mode, no-grad forward of ``model`` on ``images``."""
    import torch
    from utdsl.runtime.evaluate import autocast_for

    model.eval()

    @torch.no_grad()
    def forward():
        with autocast_for(device, precision):
            return model(images)

    return forward


def saved_mib(model, step, images) -> float:
    """MiB of the distinct storages autograd saves in one ``step()`` (parameters, buffers and the
    batch excluded): activations plus anything a method materialises. Exact and repeatable."""
    import torch

    frozen = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers(), images]}
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in frozen:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    return sum(seen.values()) / 2**20


def interleaved(fns: dict, warmup: int, repeats: int, sync=None, progress: bool = False) -> dict[str, dict[str, list[float]]]:
    """Process-CPU and wall milliseconds of each call: ``warmup`` calls each, then ``repeats``
    rounds of one call each, the order rotated every round, so a busy machine slows all alike."""
    import gc

    sync = sync or (lambda: None)
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    sync()
    gc.collect()
    times = {name: {"cpu": [], "wall": []} for name in names}
    for round_ in range(repeats):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            cpu, wall = time.process_time(), time.perf_counter()
            fns[name]()
            sync()
            times[name]["cpu"].append((time.process_time() - cpu) * 1000)
            times[name]["wall"].append((time.perf_counter() - wall) * 1000)
        if progress:
            print(f"  round {round_ + 1}/{repeats} done", file=sys.stderr, flush=True)
    return times


def spread(values: list[float]) -> dict:
    """Median and min-max."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def per_round_ratio(times: dict, a: str, b: str, clock: str = "cpu") -> dict | None:
    """Median and min-max of the per-round ratio a / b (None when either is missing)."""
    if a not in times or b not in times:
        return None
    return spread([x / y for x, y in zip(times[a][clock], times[b][clock])])


def run_isolated(variant: str, argv: list[str], script: str) -> dict:
    """Run ``script --worker VARIANT`` in a process of its own (a clean peak RSS) and return the
    JSON it writes to ``--worker-out``; an ``error`` row when it fails."""
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
