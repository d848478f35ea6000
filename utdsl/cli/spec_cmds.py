"""Commands that read specs and models without training: check, inspect, compile, list."""

from __future__ import annotations

from collections import OrderedDict
from typing import List, Optional

import typer
from rich.table import Table

from ..errors import UtdslError
from ..values import parse_assignments, parse_model_args
from ..selectors import generalize
from . import console, err_console

__all__ = ["register", "parse_sets"]

SPEC_ARG = typer.Argument(..., help="A .ut file or a library spec name (see `utdsl list`).")
SET_OPT = typer.Option(None, "--set", "-s", help="Override a `let` binding: --set r=16 (repeatable).")
MODEL_OPT = typer.Option("vit_b16", "--model", "-m", help="A timm model name or alias (vit_b16, vit_s16, vit_t16).")
MODEL_ARG_OPT = typer.Option(None, "--model-arg", help="timm.create_model argument: --model-arg depth=6 (repeatable).")


def shorten(text: str, most: int = 80) -> str:
    """``text`` cut to ``most`` characters with an ellipsis (names in one-line summaries)."""
    return text if len(text) <= most else text[: most - 3] + "..."


def parse_sets(values: list[str] | None) -> dict[str, str]:
    """``--set r=16 --set alpha=32`` -> ``{"r": "16", "alpha": "32"}``."""
    return parse_assignments(values, "--set")


def check_cmd(spec: str = SPEC_ARG, sets: Optional[List[str]] = SET_OPT) -> None:
    """Check a spec's syntax and arguments without a model."""
    from ..compiler import load_spec

    checked = load_spec(spec, parse_sets(sets))
    lets = ", ".join(f"{shorten(k)}={shorten(repr(v))}" for k, v in list(checked.bindings.items())[:20])
    if len(checked.bindings) > 20:
        lets += f", ... ({len(checked.bindings) - 20} more)"
    # console.out: no wrapping, which rich does in time quadratic in a word's length
    console.out(f"ok: {shorten(checked.name or spec)}: {len(checked.rules)} rules, "
                f"{len(checked.param_rules)} train/freeze" + (f"; {lets}" if lets else ""), highlight=False)


def inspect_cmd(model: str = MODEL_OPT, model_args: Optional[List[str]] = MODEL_ARG_OPT,
                select: Optional[str] = typer.Option(None, "--select", help="Show only modules a selector matches."),
                all_paths: bool = typer.Option(False, "--all", help="One row per module instead of per pattern.")) -> None:
    """List a model's module paths and kinds, to write selectors."""
    from ..roles import role_paths
    from ..runtime.models import create_model
    from ..selectors import matches

    net = create_model(model, device="meta", **parse_model_args(model_args))
    selector = _selector(select) if select else None
    roles = role_paths(net)
    rows: "OrderedDict[tuple[str, str], list]" = OrderedDict()
    for path, module in net.named_modules():
        if not path or (selector is not None and not matches(selector, path, roles)):
            continue
        key = (path if all_paths else generalize(path), type(module).__name__)
        own = sum(p.numel() for p in module.parameters(recurse=False))
        entry = rows.setdefault(key, [0, own, not any(True for _ in module.children())])
        entry[0] += 1
    table = Table(title=f"{model}: {len(rows)} {'modules' if all_paths else 'module patterns'}")
    for column in ("path", "kind", "count", "own params", "leaf"):
        table.add_column(column, justify="right" if column in ("count", "own params") else "left")
    for (path, kind), (count, own, leaf) in rows.items():
        table.add_row(path, kind, str(count), f"{own:,}", "yes" if leaf else "")
    console.print(table)


def compile_cmd(spec: str = SPEC_ARG, model: str = MODEL_OPT, sets: Optional[List[str]] = SET_OPT,
                as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
                emit: Optional[str] = typer.Option(None, "--emit", help="'code': print the compiled forward "
                                                   "alone on stdout (the plan goes to stderr)."),
                num_classes: Optional[int] = typer.Option(None, "--num-classes", help="Classifier size."),
                model_args: Optional[List[str]] = MODEL_ARG_OPT,
                verify: bool = typer.Option(False, "--verify", help="Build real weights and check identity at init."),
                yes: bool = typer.Option(False, "--yes", "-y", help="With --verify: build tuners of unusual size "
                                         "without asking.")) -> None:
    """Compile a spec into a model and print the plan: sites, tuners, parameters."""
    from ..compiler import compile, load_spec
    from ..runtime.models import create_model
    from ..verify import verify as run_verify

    checked = load_spec(spec, parse_sets(sets))
    if emit not in (None, "code"):
        raise UtdslError(f"--emit takes 'code', got '{emit}'")
    options = parse_model_args(model_args)
    net = create_model(model, num_classes=num_classes, device="meta", **options).eval()
    tuned = compile(checked, net, model_name=model)
    the_plan = tuned.meta["utdsl"].plan
    if verify:  # real weights: the plan (from the meta device) is checked before anything is allocated
        from ..runtime.budget import refuse_large_tuners

        refuse_large_tuners(the_plan.tuner_params, yes, 4, "to build in fp32")
        net = create_model(model, num_classes=num_classes, **options).eval()
        tuned = compile(checked, net, model_name=model)
    for warning in the_plan.warnings:
        err_console.print(warning.render(), markup=False, highlight=False, soft_wrap=True)
    # with --emit code, stdout holds the code alone (``> file`` is Python) and the plan goes to
    # stderr; console.out never wraps, so JSON and code survive any terminal width
    plan_console = err_console if emit == "code" else console
    if as_json:
        plan_console.out(the_plan.to_json(), highlight=False)
    else:
        plan_console.print(plan_table(the_plan, f"{checked.name or spec} on {model}"))
        plan_console.print(plan_summary(the_plan), markup=False, soft_wrap=True)
    if emit == "code":
        console.out(tuned.code, highlight=False)
    if verify:
        from ..compiler import default_example_input

        report = run_verify(net, tuned, default_example_input(net, batch=1))
        for line in report.lines():
            plan_console.print(line, markup=False, soft_wrap=True)
        if not report.ok:
            raise UtdslError("verification failed: " + "; ".join(report.lines()))


def plan_table(the_plan, title: str) -> Table:
    """The plan as a table, one row per (site pattern, placement, tuner, sizes)."""
    from .. import placements

    rows: "OrderedDict[tuple, list[int]]" = OrderedDict()
    for ins in the_plan.insertions:
        site = generalize(ins.site) + (str(ins.chunks) if ins.chunks else "")
        placement = placements.get(ins.placement)
        label = placement.label(ins) if placement is not None else ins.placement
        key = (site, label, ins.tuner, f"{ins.info.in_features}→{ins.info.out_features}", ins.params)
        rows.setdefault(key, [0])[0] += 1
    table = Table(title=title)
    for column in ("site", "placement", "tuner", "in→out", "sites", "params"):
        table.add_column(column, justify="right" if column in ("sites", "params") else "left")
    for (site, placement, tuner, dims, params), (count,) in rows.items():
        table.add_row(site, placement, tuner, dims, str(count), f"{params * count:,}")
    if the_plan.shared_params:
        table.add_row("(shared by a rule's sites)", "", "", "", "", f"{the_plan.shared_params:,}")
    return table


def plan_summary(the_plan) -> str:
    total = the_plan.base_params + the_plan.tuner_params
    return (f"tuner params {the_plan.tuner_params:,} + trained base params {the_plan.trained_params:,} "
            f"= trainable {the_plan.trainable_params:,} of {total:,} "
            f"({100.0 * the_plan.trainable_params / max(total, 1):.3f}%)")


def list_cmd(model: str = typer.Option("vit_b16", "--model", "-m", help="Model to count parameters on.")) -> None:
    """Every spec of the method library, its description and its trainable parameters."""
    from ..compiler import compile, load_spec
    from ..library import library_specs
    from ..runtime.models import create_model

    net = create_model(model, device="meta")
    head = {name for name, _ in net.named_parameters() if name.startswith("head")}
    table = Table(title=f"method library (trainable params on {model}, head excluded)")
    for column in ("spec", "description", "params"):
        table.add_column(column, justify="right" if column == "params" else "left")
    for path in library_specs():
        checked = load_spec(path)
        try:
            tuned = compile(checked, net, model_name=model)
            params = sum(p.numel() for n, p in tuned.named_parameters() if p.requires_grad and n not in head)
            count = f"{params:,}"
        except UtdslError as error:
            count = f"n/a ({error.diagnostics[0].message[:40]})"
        table.add_row(path.stem, checked.description, count)
    console.print(table)


def _selector(text: str):
    from ..parse import parse

    spec = parse(f"train {text}")
    return spec.param_rules[0].selector


def register(app: typer.Typer) -> None:
    app.command("check")(check_cmd)
    app.command("inspect")(inspect_cmd)
    app.command("compile")(compile_cmd)
    app.command("list")(list_cmd)
