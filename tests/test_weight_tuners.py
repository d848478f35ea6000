"""Weight-space tuners (W' = f(W)): identity at init, the paper's formula written out here, exact
parameter counts, peft's layers where peft has the method, and bad arguments."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError
from torch import nn
from torch.nn import functional as F

from utdsl import tuners
from utdsl.tuners.base import SiteInfo

LINEAR = (32, 16)
CONV = (8, 4, 3, 3)


def site(shape, path="w"):
    return SiteInfo(path, shape[1], shape[0], {"weight_shape": shape})


def build(name, shape=LINEAR, weight=None, sites=None, **args):
    cls = tuners.get(name)
    parsed = cls.Args(**args)
    sites = sites or [site(shape)]
    shared = cls.build_shared(parsed, sites)
    units = [cls.build(parsed, s, shared) for s in sites]
    if weight is not None:
        for unit in units:
            unit.init_from_weight(weight)
    return units, shared


def randomise(*modules, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in modules:
            for name, p in module.named_parameters():
                p.copy_(torch.rand_like(p) + 0.5 if name in ("magnitude", "boft_s") else torch.randn_like(p) * 0.3)


# -- (a) identity at init -----------------------------------------------------------------------

IDENTITY = [
    ("lora", LINEAR, {}), ("lora", CONV, {}), ("dora", LINEAR, {}), ("dora", CONV, {}),
    ("hadamard", LINEAR, {}), ("hadamard", CONV, {}), ("vera", LINEAR, {"r": 4}), ("vera", CONV, {"r": 4}),
    ("loha", LINEAR, {}), ("loha", CONV, {}), ("lokr", LINEAR, {}), ("lokr", CONV, {}),
    ("lokr", LINEAR, {"r": 1, "decompose_both": True}),
    ("oft", LINEAR, {"block_size": 4}), ("oft", CONV, {"r": 9}),
    ("oft", LINEAR, {"block_size": 4, "cayley_neumann": False}),
    ("boft", LINEAR, {"block_size": 4, "n_butterfly_factor": 2}), ("boft", CONV, {"block_num": 9}),
    ("fact_tt", LINEAR, {"r": 2}), ("fact_tk", LINEAR, {"r": 2}),
]


@pytest.mark.parametrize("name, shape, args", IDENTITY, ids=lambda v: str(v))
def test_identity_at_init(name, shape, args):
    torch.manual_seed(0)
    weight = torch.randn(shape)
    (unit,), _ = build(name, shape, weight, **args)
    out = unit(weight)
    assert out.shape == weight.shape and out.dtype == weight.dtype
    assert torch.equal(out, weight)


# -- (b) the formula, written out, and its gradients -------------------------------------------

def kron(a, b):
    return torch.einsum("ij,kl->ikjl", a, b).reshape(a.shape[0] * b.shape[0], a.shape[1] * b.shape[1])


def block_diag_rotation(blocks):
    return torch.block_diag(*blocks)


def reference(name, unit, shared, weight, args):
    p = dict(unit.named_parameters())
    flat = weight.reshape(weight.shape[0], -1)
    if name in ("lora", "dora", "hadamard"):
        s = args.get("alpha", args.get("r", 8)) / args.get("r", 8)
        delta = s * p["lora_B"] @ p["lora_A"]
        if name == "lora":
            return (flat + delta).reshape(weight.shape)
        if name == "hadamard":
            return (flat * (1 + delta)).reshape(weight.shape)
        v = flat + delta
        return (p["magnitude"][:, None] * v / torch.linalg.norm(v, dim=1).detach()[:, None]).reshape(weight.shape)
    if name == "vera":
        a, b = shared.vera_A[:, :flat.shape[1]], shared.vera_B[:flat.shape[0]]
        delta = torch.diag(p["vera_lambda_b"]) @ b @ torch.diag(p["vera_lambda_d"]) @ a
        return (flat + delta).reshape(weight.shape)
    if name == "loha":
        s = args["alpha"] / args["r"]
        delta = s * (p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"])
        return (flat + delta).reshape(weight.shape)
    if name == "lokr":
        w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
        w2 = p["lokr_w2"] if "lokr_w2" in p else p["lokr_w2_a"] @ p["lokr_w2_b"]
        return (flat + args["alpha"] / args["r"] * kron(w1, w2)).reshape(weight.shape)
    if name == "oft":
        b = unit.block_size
        blocks = []
        for vec in p["oft_R"]:
            q = torch.zeros(b, b)
            k = 0
            for i in range(b):
                for j in range(i + 1, b):
                    q = q + vec[k] * (torch.eye(b)[:, [i]] @ torch.eye(b)[[j]] - torch.eye(b)[:, [j]] @ torch.eye(b)[[i]])
                    k += 1
            if args.get("cayley_neumann", True):
                t = args.get("neumann_terms", 5)
                power = lambda n: torch.linalg.matrix_power(q, n)  # noqa: E731
                # peft: I + 2Q for 2 terms, else I + 2Q + 2Q² + 2Q³ ... + 2Q^{t-2} + Q^{max(t-1, 3)}
                r = torch.eye(b) + 2 * q if t == 2 else (
                    torch.eye(b) + 2 * q + 2 * power(2) + sum(2 * power(n) for n in range(3, t - 1))
                    + power(max(t - 1, 3)))
            else:
                r = (torch.eye(b) - q) @ torch.linalg.inv(torch.eye(b) + q)
            blocks.append(r)
        return (flat @ block_diag_rotation(blocks).T).reshape(weight.shape)
    if name == "boft":
        from peft.tuners.boft.layer import BOFTLayer          # peft's permutation, our product
        z = p["boft_R"]
        m = torch.eye(flat.shape[1])
        n_f = z.shape[0]
        for i in range(n_f):
            perm = BOFTLayer.block_butterfly_perm(None, flat.shape[1], z.shape[1] // 2 ** i, z.shape[2] // 2, n_f - 1)
            pm = BOFTLayer.perm2mat(None, perm)
            skew = 0.5 * (z[i] - z[i].transpose(1, 2))
            eye = torch.eye(z.shape[2])
            d = torch.block_diag(*[(eye - s) @ torch.linalg.inv(eye + s) for s in skew])
            m = pm @ d @ pm.T @ m
        return (p["boft_s"][:, None] * (flat @ m.T)).reshape(weight.shape)
    raise AssertionError(name)


FORMULA = [
    ("lora", LINEAR, {"r": 4, "alpha": 6.0}), ("lora", CONV, {"r": 2}),
    ("dora", LINEAR, {"r": 4, "alpha": 6.0}), ("dora", CONV, {"r": 2}),
    ("hadamard", LINEAR, {"r": 3}), ("vera", LINEAR, {"r": 4}), ("vera", CONV, {"r": 4}),
    ("loha", LINEAR, {"r": 3, "alpha": 5.0}), ("loha", CONV, {"r": 2, "alpha": 2.0}),
    ("lokr", LINEAR, {"r": 8, "alpha": 4.0}), ("lokr", LINEAR, {"r": 1, "alpha": 4.0, "decompose_both": True}),
    ("lokr", CONV, {"r": 1, "alpha": 2.0}),
    ("oft", LINEAR, {"block_size": 4}), ("oft", LINEAR, {"r": 2, "neumann_terms": 3}),
    ("oft", LINEAR, {"block_size": 4, "cayley_neumann": False}), ("oft", CONV, {"block_size": 6}),
    ("boft", LINEAR, {"block_size": 4, "n_butterfly_factor": 2}), ("boft", LINEAR, {"block_num": 2}),
    ("boft", LINEAR, {"block_size": 2, "n_butterfly_factor": 3}),
]


def check_against(unit_out, ref_out, leaves):
    assert torch.allclose(unit_out, ref_out, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(unit_out)
    got = torch.autograd.grad((unit_out * grad).sum(), leaves, retain_graph=True)
    want = torch.autograd.grad((ref_out * grad).sum(), leaves)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name, shape, args", FORMULA, ids=lambda v: str(v))
def test_formula_and_gradients(name, shape, args):
    if name == "boft":
        pytest.importorskip("peft")
    torch.manual_seed(1)
    weight = torch.randn(shape, requires_grad=True)
    (unit,), shared = build(name, shape, weight.detach(), **args)
    randomise(unit)
    check_against(unit(weight), reference(name, unit, shared, weight, args), [weight, *unit.parameters()])


# FacT: the official fact_tt.py / fact_tk.py forward code, on the rows of an identity input

D, R = 8, 2
FACT_SITES = [site((D, D), "q"), site((4 * D, D), "fc1"), site((D, 4 * D), "fc2")]


def official_fact(name, unit, shared, path, x):
    u = lambda t: t @ shared.FacTu.T                                   # noqa: E731  vit.FacTu(x)
    v = lambda t: t @ shared.FacTv.T                                   # noqa: E731  vit.FacTv(x)
    n = x.shape[0]
    if name == "fact_tt":
        core = lambda t: t @ unit.FacTs.T                              # noqa: E731  *_FacTs(x)
        if path == "q":
            return v(core(u(x))) * unit.scale
        if path == "fc1":
            return v(core(u(x)).reshape(n, 4, R)).reshape(n, 4 * D) * unit.scale
        return v(core(u(x.reshape(n, 4, D)).reshape(n, 4 * R))) * unit.scale
    c = shared.FacTc @ unit.FacTp
    if path == "q":
        return v(u(x) @ c[:, :, 0]) * unit.scale
    c = c.reshape(R, R * 4)
    if path == "fc1":
        return v((u(x) @ c).reshape(n, 4, R)).reshape(n, 4 * D) * unit.scale
    return v(u(x.reshape(n, 4, D)).reshape(n, 4 * R) @ c.t()) * unit.scale


@pytest.mark.parametrize("name", ["fact_tt", "fact_tk"])
def test_fact_matches_the_official_forward(name):
    units, shared = build(name, sites=FACT_SITES, r=R, scale=0.7)
    randomise(shared, *units)
    for unit, s in zip(units, FACT_SITES):
        weight = torch.randn(s.extras["weight_shape"], requires_grad=True)
        x = torch.eye(weight.shape[1])
        ref = weight + official_fact(name, unit, shared, s.path, x).T
        check_against(unit(weight), ref, [weight, *shared.parameters(), *unit.parameters()])


# -- (c) parameter counts -----------------------------------------------------------------------

COUNTS = [
    ("lora", {"r": 4}, 4 * 16 + 32 * 4), ("dora", {"r": 4}, 4 * 16 + 32 * 4 + 32),
    ("hadamard", {"r": 4}, 4 * 16 + 32 * 4), ("vera", {"r": 4}, 4 + 32), ("loha", {"r": 4}, 2 * (32 * 4 + 4 * 16)),
    ("lokr", {}, 4 * 4 + 8 * 4), ("lokr", {"r": 1, "decompose_both": True}, (4 + 4) + (8 + 4)),
    ("oft", {"block_size": 4}, 4 * 6), ("oft", {"r": 2}, 2 * 28),
    ("boft", {"block_size": 4, "n_butterfly_factor": 2}, 2 * 4 * 16 + 32),
]


@pytest.mark.parametrize("name, args, count", COUNTS, ids=lambda v: str(v))
def test_parameter_count(name, args, count):
    (unit,), shared = build(name, LINEAR, torch.randn(LINEAR), **args)
    assert sum(p.numel() for p in unit.parameters()) == count
    if shared is not None:
        assert sum(p.numel() for p in shared.parameters()) == 0   # VeRA's A, B are frozen buffers
        assert {n for n, b in shared.named_buffers()} == {"vera_A", "vera_B"}
        assert set(shared.state_dict()) == {"vera_A", "vera_B"}


@pytest.mark.parametrize("name, own, shared_count", [
    ("fact_tt", [R * R, 4 * R * R, 4 * R * R], 2 * R * D),
    ("fact_tk", [R, 4 * R, 4 * R], 2 * R * D + R ** 3),
])
def test_fact_counts_shared_once(name, own, shared_count):
    units, shared = build(name, sites=FACT_SITES, r=R)
    assert [sum(p.numel() for p in u.parameters()) for u in units] == own
    assert sum(p.numel() for p in shared.parameters()) == shared_count
    assert all(u._shared is shared and "_shared" not in dict(u.named_modules()) for u in units)
    assert shared.width == D and shared.columns == 9


# -- (d) peft's layers ----------------------------------------------------------------------------

class Toy(nn.Module):
    def __init__(self, conv=False):
        super().__init__()
        torch.manual_seed(3)
        self.lin = nn.Conv2d(4, 8, 3, padding=1) if conv else nn.Linear(16, 32)
        self.other = nn.Linear(32, 16)

    def forward(self, x):
        return self.lin(x)


def peft_layer(config, conv=False):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(Toy(conv), config).eval()
    return model, model.base_model.model.lin


def copy_into(unit, layer, names):
    """Random values into peft's adapter; the same values into the unit."""
    torch.manual_seed(5)
    with torch.no_grad():
        for ours, theirs in names.items():
            target = getattr(layer, theirs)["default"]
            target = target.weight if isinstance(target, nn.Module) else target
            value = torch.rand_like(target) + 0.5 if "magnitude" in theirs or theirs == "boft_s" \
                else torch.randn_like(target) * 0.3
            target.copy_(value)
            getattr(unit, ours).copy_(value.reshape(getattr(unit, ours).shape))


def assert_same_output(model, layer, unit, conv=False):
    torch.manual_seed(6)
    base = layer.get_base_layer()
    x = torch.randn(3, 4, 5, 5) if conv else torch.randn(3, 16)
    with torch.no_grad():
        weight = unit(base.weight)
        ours = F.conv2d(x, weight, base.bias, padding=1) if conv else F.linear(x, weight, base.bias)
        assert torch.allclose(ours, model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("conv", [False, True])
def test_lora_and_dora_match_peft(conv):
    peft = pytest.importorskip("peft")
    shape = CONV if conv else LINEAR
    for name, use_dora in (("lora", False), ("dora", True)):
        config = peft.LoraConfig(r=4, lora_alpha=6, target_modules=["lin"], use_dora=use_dora)
        model, layer = peft_layer(config, conv)
        (unit,), _ = build(name, shape, layer.get_base_layer().weight.detach(), r=4, alpha=6.0)
        names = {"lora_A": "lora_A", "lora_B": "lora_B"}
        if use_dora:
            names["magnitude"] = "lora_magnitude_vector"
        copy_into(unit, layer, names)
        assert_same_output(model, layer, unit, conv)


def test_vera_matches_peft_projections_and_output():
    peft = pytest.importorskip("peft")
    config = peft.VeraConfig(r=4, target_modules=["lin", "other"], projection_prng_key=7, d_initial=0.2)
    model = peft.get_peft_model(Toy(), config).eval()
    sites = [site((32, 16), "lin"), site((16, 32), "other")]
    units, shared = build("vera", sites=sites, r=4, projection_prng_key=7, d_initial=0.2)
    assert torch.equal(shared.vera_A, model.base_model.vera_A["default"])
    assert torch.equal(shared.vera_B, model.base_model.vera_B["default"])
    assert torch.equal(units[0].vera_lambda_d, model.base_model.model.lin.vera_lambda_d["default"])
    layer = model.base_model.model.lin
    copy_into(units[0], layer, {"vera_lambda_b": "vera_lambda_b", "vera_lambda_d": "vera_lambda_d"})
    assert_same_output(model, layer, units[0])


@pytest.mark.parametrize("conv", [False, True])
def test_loha_matches_peft(conv):
    peft = pytest.importorskip("peft")
    model, layer = peft_layer(peft.LoHaConfig(r=3, alpha=5, target_modules=["lin"]), conv)
    (unit,), _ = build("loha", CONV if conv else LINEAR, r=3, alpha=5.0)
    copy_into(unit, layer, {n: n for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")})
    assert_same_output(model, layer, unit, conv)


@pytest.mark.parametrize("conv, args", [
    (False, {"r": 8, "alpha": 4}), (False, {"r": 1, "alpha": 4, "decompose_both": True}),
    (False, {"r": 2, "alpha": 2, "decompose_factor": 2}), (True, {"r": 1, "alpha": 2}), (True, {"r": 8, "alpha": 2}),
])
def test_lokr_matches_peft(conv, args):
    peft = pytest.importorskip("peft")
    model, layer = peft_layer(peft.LoKrConfig(target_modules=["lin"], **args), conv)
    (unit,), _ = build("lokr", CONV if conv else LINEAR, **args)
    names = [n for n, _ in unit.named_parameters()]
    assert sorted(names) == sorted(k for k in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a",
                                               "lokr_w2_b") if "default" in getattr(layer, k))
    copy_into(unit, layer, {n: n for n in names})
    assert_same_output(model, layer, unit, conv)


def test_factorization_is_peft_s():
    pytest.importorskip("peft")
    from peft.tuners.lokr.layer import factorization as theirs

    from utdsl.tuners.lokr import factorization
    for n in range(1, 300):
        for f in (-1, 2, 3, 4, 8):
            assert factorization(n, f) == theirs(n, f)


@pytest.mark.parametrize("args", [{}, {"use_cayley_neumann": False}, {"num_cayley_neumann_terms": 3}])
def test_oft_matches_peft(args):
    peft = pytest.importorskip("peft")
    model, layer = peft_layer(peft.OFTConfig(oft_block_size=4, r=0, target_modules=["lin"], **args))
    ours = {"cayley_neumann": args.get("use_cayley_neumann", True), "neumann_terms": args.get("num_cayley_neumann_terms", 5)}
    (unit,), _ = build("oft", LINEAR, block_size=4, **ours)
    copy_into(unit, layer, {"oft_R": "oft_R"})
    assert_same_output(model, layer, unit)


def test_boft_matches_peft(monkeypatch):
    peft = pytest.importorskip("peft")
    import peft.tuners.boft.layer as boft_layer
    monkeypatch.setattr(boft_layer, "get_fbd_cuda", lambda: None)     # no CUDA extension: m = 1
    model, layer = peft_layer(peft.BOFTConfig(boft_block_size=4, target_modules=["lin"]))
    (unit,), _ = build("boft", LINEAR, block_size=4)
    copy_into(unit, layer, {"boft_R": "boft_R", "boft_s": "boft_s"})
    assert_same_output(model, layer, unit)


# -- bad arguments and sites ---------------------------------------------------------------------

@pytest.mark.parametrize("name, args", [
    ("lora", {"r": 0}), ("lora", {"alpha": -1.0}), ("lora", {"alpha": math.inf}), ("lora", {"alpha": math.nan}),
    ("lora", {"dropout": 0.1}), ("dora", {"r": -2}), ("hadamard", {"alpha": 0}), ("vera", {"r": 0}),
    ("vera", {"d_initial": math.nan}), ("vera", {"projection_prng_key": -1}), ("loha", {"alpha": math.inf}),
    ("lokr", {"r": 0}), ("lokr", {"decompose_factor": 0}), ("oft", {"block_size": 4, "r": 2}),
    ("oft", {"neumann_terms": 1}), ("oft", {"block_size": 1}), ("boft", {"block_size": 4, "block_num": 4}),
    ("boft", {"n_butterfly_factor": 0}), ("fact_tt", {"r": 0}), ("fact_tk", {"scale": math.nan}),
    ("fact_tt", {"scale": -1.0}),
])
def test_bad_arguments_are_validation_errors(name, args):
    with pytest.raises(ValidationError):
        tuners.get(name).Args(**args)


@pytest.mark.parametrize("name, args, shape", [
    ("oft", {"block_size": 5}, LINEAR), ("boft", {"block_size": 4, "n_butterfly_factor": 4}, LINEAR),
    ("boft", {"block_size": 3}, LINEAR), ("fact_tt", {"width": 5}, LINEAR), ("fact_tt", {}, CONV),
    ("fact_tk", {"width": 8}, (16, 32)),
])
def test_sites_that_do_not_fit_are_value_errors(name, args, shape):
    with pytest.raises(ValueError):
        build(name, shape, **args)


def test_every_weight_tuner_is_registered_for_the_weight_placement():
    from utdsl.tuners.weight_base import WeightTuner
    names = {"lora", "dora", "hadamard", "vera", "loha", "lokr", "oft", "boft", "fact_tt", "fact_tk"}
    for name in names:
        cls = tuners.get(name)
        assert issubclass(cls, WeightTuner) and cls.placements == cls.mergeable == frozenset({"weight"})
