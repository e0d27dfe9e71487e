"""An independent NumPy re-implementation of the mllm phone runtime's quantized Linear, written from the
contract (docs/runtime.md), compared side by side with the PyTorch simulation (RuntimeLinear, apply_runtime)."""

import functools
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from shadowquant.runtimes.decision import LayerQuant
from shadowquant.errors import PipelineError
from shadowquant.runtimes.profiles import PROFILES, RoleSpec, SideSpec
from shadowquant.runtimes.runtime_linear import CpuCounter, RuntimeLinear, apply_runtime

F16, F32, F64 = np.float16, np.float32, np.float64
NPU = [name for name in PROFILES if name != "ideal"]
ROLES = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "gate_proj", "down_proj")  # owners before readers
PARENT = {role: "self_attn" if role in ROLES[:4] else "mlp" for role in ROLES}
SHAPE = {"q_proj": (12, 12), "k_proj": (12, 8), "v_proj": (12, 8), "o_proj": (12, 12),
         "gate_proj": (12, 20), "up_proj": (12, 20), "down_proj": (20, 12)}  # (in, out)
# The contract's sharing rule, written out here rather than read from runtime.py: role -> (owner role, side).
SHARED = {"k_proj": ("q_proj", "input"), "v_proj": ("q_proj", "input"), "gate_proj": ("up_proj", "input")}
PHONELM_NORMAL = {**SHARED, "down_proj": ("gate_proj", "output")}
# torch sums in another order: its float32 dot products stay within 5 * 2^-24 * sum|terms| of the exact sum
# (measured, n <= 40), so a rounding whose exact argument is that close to a .5 may go either way (one step).
TOL = 6 * 2.0 ** -24
SHADOW = 1  # layer 0 is a normal layer, layer 1 a shadow layer
MASK = np.array([[1] * 6, [1, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1]], dtype=bool)  # 2-D attention_mask


def name_of(layer, role):
    return f"model.layers.{layer}.{PARENT[role]}.{role}"


# ---- the reference (NumPy only) ----
def step(r, bits):  # the float32-stored range over qmax, divided in float32
    return F32(F32(r) / F32(2 ** (bits - 1) - 1))


def roundf(v):  # C roundf: halves away from zero
    return np.sign(v) * np.floor(np.abs(v) + 0.5)


def clamp(q, bits):
    return np.clip(q, -2 ** (bits - 1), 2 ** (bits - 1) - 1)


def levels(x, st, bits, rounding, fp16=False):
    inv = F32(1) / st
    if fp16:  # LLaMAQuantize's HVX path: product and + 0.5 in fp16 (es_vec is an fp16 splat), then floor
        v = x.astype(F16) * inv.astype(F16)
        return clamp((np.rint(v) if rounding == "even" else np.floor(v + F16(0.5))).astype(F64), bits)
    v = (x.astype(F32) * inv).astype(F64)  # float64 holds it exactly
    return clamp(np.rint(v) if rounding == "even" else np.floor(v + 0.5), bits)


def fake_weight(w):
    s = F32(np.abs(w).max()) / F32(127)
    return np.rint(w / s).astype(F32) * s, s


def near(v, err, fn):
    """(fn(v), the other neighbour where v lies within `err` of a .5, else fn(v) again): both are accepted there."""
    main, low = fn(v), np.floor(v)
    amb = np.abs(v - low - 0.5) < err
    return main, np.where(amb, np.where(main == low, low + 1, low), main)


def ref_normal(x, w, b, spec, r_in, r_out, bias_mode, tol):
    """Candidate outputs of a normal Linear: quantize in, exact float64 sum (+ int32 bias), requantize, dtype."""
    wq, sw = fake_weight(w)
    si, so = step(r_in, spec.input.bits), step(r_out, spec.output.bits)
    xq = levels(x, si, spec.input.bits, spec.input.rounding, spec.input.dtype == "float16").astype(F32) * si
    acc, mag = xq.astype(F64) @ wq.T.astype(F64), np.abs(xq).astype(F64) @ np.abs(wq).T.astype(F64)
    if b is not None and bias_mode == "int32":
        b_int = (np.rint(b / (si * sw)).astype(F32) * (si * sw)).astype(F64)  # step: s_in * s_w in float32
        acc, mag = acc + b_int, mag + np.abs(b_int)
    inv = F64(F32(1) / so)
    outs = []
    for q in near(acc * inv, tol * mag * inv, np.rint):
        q = clamp(q, spec.output.bits)
        if spec.output.hvx_dequantize:  # LLaMADequantize: the level in fp16, times the step (fp16 for fp16 out)
            y = (q.astype(F16) * F16(so) if spec.output.dtype == "float16" else q.astype(F16).astype(F32) * so)
        else:
            y = q.astype(F32) * so
        y = y.astype(F32) + b if b is not None and bias_mode == "float32" else y
        outs.append(y.astype(F16 if spec.output.dtype == "float16" else F32).astype(F64))
    return outs, np.zeros(1)


def ref_shadow(x, w, r_in, r_out, clip_in, clip_out, tol, valid):
    """Candidate outputs, per-element tolerance and CPU counts of the int8 NPU Linear + CPU shadow op."""
    wq, _ = fake_weight(w)
    wt, si, so = wq.T.astype(F64), step(r_in, 8), step(r_out, 8)
    xq = levels(x, si, 8, "half_up").astype(F32) * si
    inv = F64(F32(1) / so)
    qs = near(xq.astype(F64) @ wt * inv, tol * (np.abs(xq) @ np.abs(wt)) * inv, np.rint)
    r = roundf((x.astype(F32) / si).astype(F64))
    beyond = ((r > 127) | (r < -128)) & (not clip_in)
    excess = (np.where(beyond, r - clamp(r, 8), 0).astype(F32) * si).astype(F64)
    full = x.astype(F64) @ wt / F64(so)
    exact = near(full, tol * (np.abs(x).astype(F64) @ np.abs(wt)) / so + tol * np.abs(full), roundf)
    outs, limits = [], []
    for q, e in zip(qs, exact):
        q = clamp(q, 8)
        at = ((q == -128) | (q == 127)) & (not clip_out)
        out = (q.astype(F32) * so).astype(F64) + excess @ wt
        outs.append(np.where(at, (e.astype(F32) * so).astype(F64), out))
        limits.append(at & valid[..., None])
    atol = tol * (np.abs(excess) @ np.abs(wt) + np.abs(outs[0])) + 1e-6 * so
    counts = {"input_outliers": int((beyond & valid[..., None]).sum()),
              "output_outliers": (int((limits[0] & limits[1]).sum()), int((limits[0] | limits[1]).sum()))}
    return outs, atol, counts


def assert_matches(got, cands, atol, what):
    """torch equals the contract elementwise; within float32 error of a tie (cands differ) either neighbour."""
    # int16 levels near 32767 are resolved by a float32 sum only to ~0.01 of a level, so a few % lie in the
    # window; torch may take the other neighbour (one step off) on at most 1% of the elements.
    assert (cands[0] != cands[1]).mean() < 0.1, f"{what}: too many elements within float32 error of a tie"
    got = got.astype(F64)
    main, alt = (np.abs(got - c) <= atol + 1e-6 * np.abs(c) for c in cands)  # rtol 1e-6: far below one level
    if not (main | alt).all():
        i = tuple(np.argwhere(~(main | alt))[0])
        raise AssertionError(f"{what}: {(~(main | alt)).sum()} of {got.size} elements differ from the contract, "
                             f"e.g. at {i}: torch {got[i]!r}, contract {cands[0][i]!r} (or {cands[1][i]!r})")
    assert (alt & ~main).mean() <= 0.01, f"{what}: {(alt & ~main).sum()} elements one step off"


# ---- the torch side: a tiny Llama-named module tree run through apply_runtime ----
class Tiny(nn.Module):
    def __init__(self, weights, biases):
        super().__init__()
        self.model = nn.ModuleDict({"layers": nn.ModuleList([nn.ModuleDict({"self_attn": nn.Module(),
                                                                            "mlp": nn.Module()}) for _ in range(2)])})
        for name, w in weights.items():
            linear = nn.Linear(w.shape[1], w.shape[0], bias=name in biases)
            linear.weight = nn.Parameter(torch.from_numpy(w))
            linear.bias = nn.Parameter(torch.from_numpy(biases[name])) if name in biases else None
            parent, _, role = name.rpartition(".")
            setattr(self.get_submodule(parent), role, linear)

    def forward(self, input, attention_mask=None):
        return {name: self.get_submodule(name)(x) for name, x in input.items()}


@functools.cache
def simulate(profile_name):
    """Random weights, biases, float32 ranges (different per Linear) and inputs; apply_runtime's outputs."""
    profile, rng = PROFILES[profile_name], np.random.default_rng(0)
    s = SimpleNamespace(w={}, b={}, r_in={}, r_out={}, eff={}, x={}, quant={})
    for layer in range(2):
        sharing = PHONELM_NORMAL if profile_name == "phonelm-npu" and layer != SHADOW else SHARED
        for role in ROLES:
            name, (fan_in, fan_out) = name_of(layer, role), SHAPE[role]
            s.w[name] = F32(rng.normal(0, fan_in ** -0.5, (fan_out, fan_in)))
            if profile.bias != "none" and not (layer == SHADOW and role == "down_proj"):
                s.b[name] = F32(rng.normal(0, 0.3, fan_out))
            s.r_in[name] = F32(rng.uniform(0.5, 4.0))
            owner, side = sharing.get(role, (role, "input"))
            s.eff[name] = (s.r_in if side == "input" else s.r_out)[name_of(layer, owner)]
            # ~10% of the inputs beyond the range, outputs clamped beyond ~1.5 sigma; clip flags off everywhere
            s.x[name] = F32(rng.normal(0, 0.6, (3, 6, fan_in)) * s.eff[name])
            s.r_out[name] = F32(0.9 * s.eff[name] * np.sqrt((s.w[name].astype(F64) ** 2).sum(1)).mean())
            s.quant[name] = LayerQuant(float(s.r_in[name]), float(s.r_out[name]), False, False)
    model = Tiny(s.w, s.b)
    s.counter = apply_runtime(model, s.quant, list(s.quant), profile, {SHADOW})
    with torch.no_grad():
        out = model(input={n: torch.from_numpy(x) for n, x in s.x.items()},
                    attention_mask=torch.from_numpy(MASK.astype(np.int64)))
    s.out = {n: y.numpy() for n, y in out.items()}
    return s


def run_linear(x, w, r_in, r_out, clip_input, clip_output, spec, bias_mode, counter):
    """One RuntimeLinear built directly (weights fake-quantized as the contract says) run on x."""
    wq, sw = fake_weight(w)
    quant = LayerQuant(float(r_in), float(r_out), clip_input, clip_output)
    linear = RuntimeLinear(torch.from_numpy(wq), None, torch.tensor(sw), quant, float(r_in), spec, bias_mode, counter)
    with torch.no_grad():
        return linear(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("layer", [0, SHADOW], ids=["normal", "shadow"])
@pytest.mark.parametrize("profile_name", NPU)
def test_linear_matches_contract(profile_name, layer, role):
    """Each Linear apply_runtime builds (shared ranges, bias, clamps, dtype hand-off, shadow op) computes the contract."""
    s, name = simulate(profile_name), name_of(layer, role)
    spec = PROFILES[profile_name].spec(name, {SHADOW})
    assert spec.shadow == (layer == SHADOW and role == "down_proj")
    if spec.shadow:
        result = ref_shadow(s.x[name], s.w[name], s.eff[name], s.r_out[name], False, False, TOL, MASK)[:2]
    else:
        result = ref_normal(s.x[name], s.w[name], s.b.get(name), spec, s.eff[name], s.r_out[name],
                            PROFILES[profile_name].bias, TOL)
    assert_matches(s.out[name], *result, f"{profile_name} {name}")


@pytest.mark.parametrize("profile_name", NPU)
def test_counter_matches_contract(profile_name):
    """CpuCounter's MACs and outlier counts equal the contract's, positions padded by attention_mask excluded."""
    s, name = simulate(profile_name), name_of(SHADOW, "down_proj")
    fan_in, fan_out = SHAPE["down_proj"]
    args = (s.x[name], s.w[name], s.eff[name], s.r_out[name], False, False, TOL)
    want, unmasked = ref_shadow(*args, MASK)[2], ref_shadow(*args, np.ones_like(MASK))[2]
    # the padded positions hold outliers of both kinds, so counting them would show
    assert unmasked["input_outliers"] > want["input_outliers"] > 0
    assert unmasked["output_outliers"][0] > want["output_outliers"][1] > 0
    c = s.counter  # every Linear of both layers ran once on the same [3, 6] positions
    assert c.total_macs == 2 * int(MASK.sum()) * sum(i * o for i, o in SHAPE.values())
    assert c.input_outliers == want["input_outliers"]
    assert want["output_outliers"][0] <= c.output_outliers <= want["output_outliers"][1]
    assert c.shadow_macs == c.input_outliers * fan_out + c.output_outliers * fan_in


@pytest.mark.parametrize("clip_input,clip_output", [(True, True), (False, True), (True, False), (False, False)])
@pytest.mark.parametrize("profile_name", NPU)
def test_shadow_op_clip_flags(profile_name, clip_input, clip_output):
    """The shadow op corrects exactly the sides whose clip flag is off and counts exactly those outliers."""
    rng = np.random.default_rng(1)
    w, x = F32(rng.normal(0, 0.2, (24, 40))), F32(rng.standard_t(3, (5, 9, 40)))  # heavy-tailed inputs
    r_in, r_out = F32(2.5), F32(3.0)
    profile, counter = PROFILES[profile_name], CpuCounter()
    spec = profile.spec("model.layers.3.mlp.down_proj", {3})
    got = run_linear(x, w, r_in, r_out, clip_input, clip_output, spec, profile.bias, counter)
    *result, want = ref_shadow(x, w, r_in, r_out, clip_input, clip_output, TOL, np.ones(x.shape[:-1], bool))
    assert_matches(got, *result, f"{profile_name} shadow op")
    assert (want["input_outliers"] > 0) != clip_input and (want["output_outliers"][0] > 0) != clip_output
    assert counter.input_outliers == want["input_outliers"]
    assert want["output_outliers"][0] <= counter.output_outliers <= want["output_outliers"][1]
    assert counter.shadow_macs == counter.input_outliers * 24 + counter.output_outliers * 40
    assert counter.total_macs == 45 * 40 * 24


L8 = [0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, -3.5, 126.5, 127.5, -127.5, -128.5, 130.5, -130.5, 250.0, -301.5]
L16 = [0.5, 1.5, 2.5, -2.5, -3.5, 1024.5, 1025.0, 1027.0, 2047.0, -1025.0, -2047.0, 2049.0, 3001.0, 4099.0,
       32766.5, -32768.5, 40000.0]  # fp16 holds integers exactly only up to 2048


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("layer", [0, SHADOW], ids=["normal", "shadow"])
@pytest.mark.parametrize("profile_name", NPU)
def test_rounding_ties_bit_exact(profile_name, layer, role):
    """On exact .5 ties and fp16 levels past 1024 (power-of-two steps, exact sums) every quantizer matches bit for bit."""
    profile = PROFILES[profile_name]
    spec = profile.spec(name_of(layer, role), {SHADOW})
    vals = np.array(L16 if spec.input.bits == 16 else L8)
    n, st = len(vals), F32(2.0 ** (-4 if spec.input.bits == 16 else -6))
    x = np.stack([vals, -vals[::-1]]).astype(F32) * st
    # rows 0..n-1 pass level L through (2 * L at step 2u), rows n..2n-1 give L / 2 (output ties), the last fixes s_w
    w = np.zeros((2 * n + 1, n), F32)
    w[np.arange(n), np.arange(n)], w[n + np.arange(n), np.arange(n)], w[2 * n, 0] = 2, 1, 127
    w *= F32(2.0 ** -7)
    r_in = F32(st * (2 ** (spec.input.bits - 1) - 1))
    r_out = F32(2 * st * F32(2.0 ** -7) * (2 ** (spec.output.bits - 1) - 1))
    got = run_linear(x, w, r_in, r_out, False, False, spec, profile.bias, CpuCounter())
    if spec.shadow:
        result = ref_shadow(x, w, r_in, r_out, False, False, 0.0, np.ones(2, bool))[:2]
    else:
        result = ref_normal(x, w, None, spec, r_in, r_out, profile.bias, 0.0)
    assert_matches(got, *result, f"{profile_name} {name_of(layer, role)}")


def test_phonelm_rejects_bias():
    """phonelm-npu loads no bias: apply_runtime refuses a biased Linear instead of dropping the bias."""
    s = simulate("qwen-npu")
    with pytest.raises(PipelineError):
        apply_runtime(Tiny(s.w, s.b), s.quant, list(s.quant), PROFILES["phonelm-npu"], {SHADOW})


@pytest.mark.parametrize("bits", [8, 16])
def test_step_from_float32_stored_range(bits):
    """A Linear's step is float32(float32(range) / qmax), the runtime's, also for a range given as a float64."""
    spec, wrong = RoleSpec(SideSpec(bits=bits), SideSpec(bits=bits)), []
    ranges = np.random.default_rng(2).uniform(0.01, 50.0, 200)  # as the decisions (JSON) hold them: float64
    for r in ranges:
        linear = RuntimeLinear(torch.ones(1, 1), None, None, LayerQuant(r, r, True, True), r, spec, "none")
        if (F32(linear.input_step), F32(linear.output_step)) != (step(r, bits),) * 2:
            wrong.append((float(r), linear.input_step, float(step(r, bits))))
    assert not wrong, f"{len(wrong)} of {len(ranges)} steps differ, e.g. range, torch, contract: {wrong[0]}"
