"""utdsl: a declarative language and compiler for parameter-efficient transfer learning.

    import utdsl, timm
    model = timm.create_model("vit_base_patch16_224")
    tuned = utdsl.compile("lora", model)          # a library spec, a path, or spec text
    utdsl.trainable_parameters(tuned)             # 294,912 + the head

Each stage is importable on its own: :func:`parse_spec`, ``utdsl.check.check``,
``utdsl.resolve.resolve``, ``utdsl.plan.plan``, ``utdsl.rewrite.rewrite``, ``utdsl.verify.verify``.
"""

from __future__ import annotations

__version__ = "0.1.0"

from torch import nn

from .checkpoint import load_tuners, save_tuners
from .compiler import compile, load_spec, parse_spec
from .errors import CheckpointError, DataError, ModelError, SpecError, UtdslError
from .export import export_merged, export_peft
from .merge import merge
from .peft_import import load_peft
from .tuners import SiteInfo, TunerArgs, register_tuner
from .verify import Report, verify

__all__ = [
    "__version__", "parse_spec", "load_spec", "compile", "trainable_parameters", "merge",
    "export_merged", "export_peft", "load_peft", "save_tuners", "load_tuners", "verify", "Report",
    "register_tuner", "TunerArgs", "SiteInfo",
    "UtdslError", "SpecError", "ModelError", "CheckpointError", "DataError",
]


def trainable_parameters(model: nn.Module) -> int:
    """How many parameter elements of ``model`` require grad."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
