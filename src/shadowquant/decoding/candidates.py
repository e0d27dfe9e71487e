"""The CPU decoding model of the phone bundle: float weights of the model (the transformed variant the
NPU prefill model came from, or another source with the same KV cache), stored as mllm's CPU backend
reads them, and its quality measured from the stored blocks; the bundle's decoding model is the
candidate chosen by that measurement (`bundle.decode`).

mllm's NPU demos prefill with the int8 QNN model and decode token by token with a second, CPU model
(examples/demo_qwen_npu.cpp loads `--decoding-model`, a `*-Q40.mllm`). That file comes from mllm's
quantizer (tools/quantizer/QuantWriter.cpp, getQuantizationTypeFor): a name containing
'embed_tokens' or 'word_embeddings' is Q4_0, a name containing one of FP32_MARKERS stays float32,
everything else is Q4_0; a model without `lm_head.weight` gets one copied from the embedding. That
is recipe `q4_0` here. Every CPU op of mllm's decoding model takes its weight's dtype from the file,
so other recipes mix Q4_0 (code 2) and Q8_0 (code 8) per tensor (RECIPES); norms and biases stay
float32 in all of them.

A candidate is `<source>:<recipe>` (CANDIDATES). Sources (SOURCES): `prefill`, the float weights of
the variant the prefill model was exported from (both halves of a generation see the same residual
stream), and `unrotated`, a float state without the residual rotation but with the prefill's V basis
(the KV cache the prefill writes is the decoding model's), from shadowquant.decoding.weights
(`unrotated_state`, the one place that calls it).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from shadowquant.atomic import write_json
from shadowquant.errors import PipelineError
from shadowquant.export.mllm import DTYPE_FLOAT32, DTYPE_NAMES, DTYPE_Q4_0, DTYPE_Q8_0, read_mllm, write_mllm_v1_encoded
from shadowquant.decoding.q4_0 import check_q4_0_shape, q4_0_nbytes, quantize_q4_0
from shadowquant.decoding.q8_0 import check_q8_0_shape, q8_0_nbytes, quantize_q8_0
from shadowquant.runtimes.profiles import QKV_ROLES, layer_index, layer_role

log = logging.getLogger(__name__)

Q4_0_MARKERS = ("embed_tokens", "word_embeddings")
# QuantWriter's fp32_layers: substrings whose tensors stay float32.
FP32_MARKERS = ("norm", "rope", "bias", "rotary_emb", "_GN", "class_embedding", "embeddings", "logit_scale",
                "modality_preprocessors", "modality_heads", "modality_postprocessors", "pre_transformer_layer",
                "pos_embed.inv_freq", "ln_q", "patch_embed.proj")
EMBEDDING = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"


def decode_dtype(name: str) -> int:
    """The dtype code mllm's quantizer gives tensor `name` in a Q4_0 model."""
    if any(marker in name for marker in Q4_0_MARKERS):
        return DTYPE_Q4_0
    if any(marker in name for marker in FP32_MARKERS):
        return DTYPE_FLOAT32
    return DTYPE_Q4_0


def decode_tensors(state: dict[str, torch.Tensor], qkv_bias: bool = True) -> dict[str, torch.Tensor]:
    """The float tensors of the decoding model: the state, plus lm_head copied from a tied embedding, plus
    (`qkv_bias`) a zero bias beside every q/k/v weight that has none: mllm's CPU Qwen model
    (QWenForCausalLM, modeling_qwen.hpp) builds q/k/v with bias whatever the model, and loads it
    (runtimes.profiles.decode_loaded_tensors); without one it adds uninitialised memory. A real bias is kept."""
    tensors = {name: tensor for name, tensor in state.items() if tensor.is_floating_point()}
    if LM_HEAD not in tensors:
        if EMBEDDING not in tensors:
            raise PipelineError(f"the model has neither {LM_HEAD} nor {EMBEDDING}; the decoding model needs a head")
        tensors[LM_HEAD] = tensors[EMBEDDING]
    if qkv_bias:
        for name in list(tensors):
            layer, _, kind = name.rpartition(".")
            if kind == "weight" and layer_role(layer) in QKV_ROLES and f"{layer}.bias" not in tensors:
                tensors[f"{layer}.bias"] = torch.zeros(tensors[name].shape[0], dtype=torch.float32)
    return tensors


# How one tensor is stored: float32; Q4_0 with mllm's reference encoder; Q4_0 with the blocks chosen by
# the importance of each input channel (imatrix.py; the reference encoder where no importance is known);
# Q8_0. The first is what the file's dtype code says, the second how the blocks were chosen.
F32, Q4, Q4I, Q8 = "float32", "q4_0", "q4_0i", "q8_0"
ENCODING_DTYPE = {F32: DTYPE_FLOAT32, Q4: DTYPE_Q4_0, Q4I: DTYPE_Q4_0, Q8: DTYPE_Q8_0}
# The dtypes a decoding model's weights may have in the bundle (the inspector accepts these).
DECODE_WEIGHT_DTYPES = (DTYPE_Q4_0, DTYPE_Q8_0)

# A recipe: a base for the weights ('q4_0': mllm's reference Q4_0 encoder, 'q4_0i': importance-weighted Q4_0,
# 'q8_0'), then the parts stored Q8_0 instead (Q8_PARTS), joined by '-'.
RECIPES = {
    "q4_0": "mllm's quantizer: every weight Q4_0 (reference encoder), the embedding and the head too",
    "q4_0-head8": "Q4_0 body; embedding and head Q8_0",
    "q4_0i-head8": "importance-weighted (imatrix) Q4_0 body; embedding and head Q8_0",
    "q4_0i-down8-head8": "imatrix Q4_0 body with every down_proj Q8_0; embedding and head Q8_0",
    "q4_0i-ends8-head8": "imatrix Q4_0 body with the first and the last layer Q8_0; embedding and head Q8_0",
    "q4_0i-v8-lm8": "imatrix Q4_0 body with every v_proj Q8_0; embedding Q4_0, head Q8_0",
    "q4_0i-v8-ends8-lm8": "imatrix Q4_0 body with every v_proj and the first and the last layer Q8_0; "
                          "embedding Q4_0, head Q8_0",
    "q4_0i-vo8-ends8-lm8": "imatrix Q4_0 body with every v_proj and o_proj and the first and the last layer "
                           "Q8_0; embedding Q4_0, head Q8_0",
    "q8_0": "every weight Q8_0",
}
# What a recipe's part stores as Q8_0: a test on (tensor name, its Linear's role, its layer, the layer count).
# v_proj and o_proj hold the prefill's V basis (a per-head rotation and v -> o smoothing that the shared KV
# cache imposes on the decoding model), which costs 4-bit weights more than the rest of a layer.
Q8_PARTS = {
    "head8": lambda name, role, layer, layers: is_head(name),
    "lm8": lambda name, role, layer, layers: name == LM_HEAD,
    "v8": lambda name, role, layer, layers: role == "v_proj",
    "vo8": lambda name, role, layer, layers: role in ("v_proj", "o_proj"),
    "down8": lambda name, role, layer, layers: role == "down_proj",
    "ends8": lambda name, role, layer, layers: layer in (0, layers - 1),
}
SOURCES = {
    "prefill": "the float weights of the transform variant the prefill model was exported from",
    "unrotated": "the float weights without the residual rotation, with the prefill's V basis (same KV cache)",
}
CANDIDATES = tuple(f"{source}:{recipe}" for source in SOURCES for recipe in RECIPES)


def parse_candidate(name: str) -> tuple[str, str]:
    """(source, recipe) of a candidate name `<source>:<recipe>`."""
    source, _, recipe = str(name).partition(":")
    if source not in SOURCES or recipe not in RECIPES:
        raise PipelineError(f"unknown decoding candidate {name!r}; valid candidates: {', '.join(CANDIDATES)}")
    return source, recipe


def is_head(name: str) -> bool:
    """The embedding or the output head (one matrix of vocabulary rows)."""
    return name == LM_HEAD or any(marker in name for marker in Q4_0_MARKERS)


def tensor_encoding(recipe: str, name: str, num_layers: int) -> str:
    """How `recipe` stores tensor `name` (F32, Q4, Q4I or Q8) in a model of `num_layers` decoder layers.
    A name mllm's quantizer keeps float32 (norms, biases: decode_dtype) stays float32 in every recipe; the
    embedding, a table of rows rather than a matmul, takes the reference Q4_0 encoder under base q4_0i."""
    if recipe not in RECIPES:
        raise PipelineError(f"unknown decoding recipe {recipe!r}; valid recipes: {', '.join(RECIPES)}")
    if decode_dtype(name) == DTYPE_FLOAT32:
        return F32
    base, *parts = recipe.split("-")
    role, layer = layer_role(name.rpartition(".")[0]), layer_index(name)
    if base == "q8_0" or any(Q8_PARTS[part](name, role, layer, num_layers) for part in parts):
        return Q8
    return Q4I if base == "q4_0i" and not is_head(name) else Q4


def num_layers_of(names) -> int:
    """Decoder layers of a model from its tensor names (model.layers.<i>.*)."""
    indices = [layer_index(name) for name in names]
    return max((i for i in indices if i is not None), default=-1) + 1


def recipe_plan(tensors: dict[str, torch.Tensor], recipe: str = "q4_0") -> list[tuple[str, str, int, int]]:
    """(name, encoding, dtype code, byte size) of every tensor under `recipe`, in the state's order.
    A tensor whose rows are not whole blocks of 32 is refused for Q4_0 and Q8_0."""
    layers = num_layers_of(tensors)
    plan = []
    for name, tensor in tensors.items():
        encoding = tensor_encoding(recipe, name, layers)
        code = ENCODING_DTYPE[encoding]
        if code == DTYPE_Q4_0:
            check_q4_0_shape(name, tuple(tensor.shape))
            size = q4_0_nbytes(tensor.numel())
        elif code == DTYPE_Q8_0:
            check_q8_0_shape(name, tuple(tensor.shape))
            size = q8_0_nbytes(tensor.numel())
        else:
            size = 4 * tensor.numel()
        plan.append((name, encoding, code, size))
    return plan


def _encoded(tensor: torch.Tensor, encoding: str, importance: np.ndarray | None = None) -> bytes:
    values = tensor.detach().to("cpu", torch.float32).contiguous().numpy()
    if encoding == Q4:
        return quantize_q4_0(values)
    if encoding == Q4I:
        from shadowquant.decoding.imatrix import quantize_q4_0_imatrix

        return quantize_q4_0_imatrix(values.reshape(values.shape[0], -1), importance)
    if encoding == Q8:
        return quantize_q8_0(values)
    return values.astype("<f4").tobytes()


def write_decode_model(state: dict[str, torch.Tensor], out_path: str | Path, qkv_bias: bool = True,
                       recipe: str = "q4_0", importance: dict[str, np.ndarray] | None = None) -> dict:
    """Write the decoding model under `recipe` (RECIPES); returns the tensor count, the bytes per dtype and
    {name: dtype name}. `qkv_bias`: write zero q/k/v biases where the model has none (mllm's CPU Qwen model
    loads them; PhoneLM's ignores them). `importance`: {Linear name: mean squared input per column}
    (imatrix.collect_importance) for the imatrix-encoded weights; without it they take the reference
    encoder."""
    tensors = decode_tensors(state, qkv_bias)
    plan = recipe_plan(tensors, recipe)
    encodings = {name: encoding for name, encoding, _, _ in plan}
    importance = importance or {}

    def encode(name):
        return _encoded(tensors[name], encodings[name], importance.get(name.removesuffix(".weight")))

    write_mllm_v1_encoded(out_path, [(name, code, size) for name, _, code, size in plan], encode)
    by_dtype: dict[str, int] = {}
    counts: dict[str, int] = {}
    for _, _, code, size in plan:
        by_dtype[DTYPE_NAMES[code]] = by_dtype.get(DTYPE_NAMES[code], 0) + size
        counts[DTYPE_NAMES[code]] = counts.get(DTYPE_NAMES[code], 0) + 1
    return {"tensors": len(plan), "recipe": recipe, "bytes_by_dtype": by_dtype, "tensors_by_dtype": counts,
            "q4_0_bytes": by_dtype.get(DTYPE_NAMES[DTYPE_Q4_0], 0),
            "float32_bytes": by_dtype.get(DTYPE_NAMES[DTYPE_FLOAT32], 0),
            "q4_0_tensors": counts.get(DTYPE_NAMES[DTYPE_Q4_0], 0),
            "dtypes": {name: DTYPE_NAMES[code] for name, _, code, _ in plan},
            "encodings": {name: encoding for name, encoding, _, _ in plan}}


def dtype_mix(dtypes: dict[str, str]) -> str:
    """'q4_0+q8_0' for the dtypes of a decoding model's weights (float32 norms and biases not counted)."""
    order = [DTYPE_NAMES[c] for c in (DTYPE_Q4_0, DTYPE_Q8_0)]
    used = {d for name, d in dtypes.items() if d != DTYPE_NAMES[DTYPE_FLOAT32]}
    return "+".join([d for d in order if d in used] + sorted(used - set(order))) or DTYPE_NAMES[DTYPE_FLOAT32]


def file_dtype_of(stored):
    """`dtype_of(name)` for runtimes.profiles.decode_loaded_tensors from a decoding file as written: the file's own
    dtype where it stores the name (so a Q4_0 / Q8_0 mix is checked with its sizes), else the dtype
    mllm's quantizer gives the name."""
    def dtype_of(name: str) -> int:
        return stored.entry(name).dtype if name in stored else decode_dtype(name)
    return dtype_of


def decode_dtype_issues(stored) -> list[tuple[str, str]]:
    """(name, what) of every tensor of a decoding file with a dtype the bundle does not write there: norms and
    biases must be float32 (mllm's quantizer keeps them so), every other tensor Q4_0 or Q8_0."""
    issues = []
    for entry in stored.entries:
        if decode_dtype(entry.name) == DTYPE_FLOAT32:
            if entry.dtype != DTYPE_FLOAT32:
                issues.append((entry.name, f"{entry.dtype_name}, expected float32"))
        elif entry.dtype not in DECODE_WEIGHT_DTYPES:
            issues.append((entry.name, f"{entry.dtype_name}, expected "
                                       f"{' or '.join(DTYPE_NAMES[c] for c in DECODE_WEIGHT_DTYPES)}"))
    return issues


def decode_dtype_problems(stored, label: str) -> list[str]:
    """decode_dtype_issues as one line each, prefixed by `label` (the file)."""
    return [f"{label}: {name} is {what}" for name, what in decode_dtype_issues(stored)]


@torch.no_grad()
def load_decode_weights(model: torch.nn.Module, decode_path: str | Path) -> list[str]:
    """Replace every weight of `model` the decoding file stores with the file's values (Q4_0 decoded);
    returns the names replaced. A tied head is untied first: the file stores the embedding and lm_head as
    two tensors, which a recipe may encode differently (mllm's CPU model reads each from its own)."""
    stored = read_mllm(decode_path)
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and embedding is not None and head.weight is embedding.weight:
        head.weight = torch.nn.Parameter(embedding.weight.detach().clone(), requires_grad=False)
    params = dict(model.named_parameters(remove_duplicate=False))
    replaced = []
    for name in stored.names:
        if name not in params:
            continue
        param = params[name]
        values = stored.read(name)
        if values.size != param.numel():
            raise PipelineError(f"{decode_path}: {name} holds {values.size} values, the model's has {param.numel()}")
        param.copy_(torch.from_numpy(np.ascontiguousarray(values)).reshape(param.shape).to(param.dtype))
        replaced.append(name)
    missing = [name for name in params if name not in stored]
    if missing:
        raise PipelineError(f"{decode_path}: has no {missing[0]} (and {len(missing) - 1} more) of the model")
    return replaced


def uses_importance(recipe: str) -> bool:
    """Whether `recipe` stores some weight as importance-weighted Q4_0 (and needs calibration statistics)."""
    return recipe.startswith("q4_0i")


def unrotated_state(original: torch.nn.Module, prefill: torch.nn.Module, family: str) -> dict[str, torch.Tensor]:
    """The float state of source `unrotated`: the original model's residual stream with the prefill model's
    K/V basis (shadowquant.decoding.weights.decoding_state_dict; original.state_dict() names). The one
    place the decoding candidates call it."""
    from shadowquant.decoding.weights import decoding_state_dict

    return decoding_state_dict(original, prefill, family, dtype=torch.float32)


def _calibration_sequences(tokenizer, calibration, num_samples: int, seq_len: int) -> list[torch.Tensor]:
    from shadowquant.inputs.corpus import read_jsonl_texts
    from shadowquant.calibrate.profiling import tokenize_samples

    texts = read_jsonl_texts(calibration)[:num_samples]
    if not texts:
        raise PipelineError(f"{calibration}: no calibration records for the importance of the imatrix recipes")
    return [torch.tensor(ids) for ids in tokenize_samples(tokenizer, texts, seq_len)]


def evaluate_decode_candidate(candidate: str, prefill_manifest, samples, baseline, float_json, out_model, out_json,
                              seq_len: int, original_manifest=None, calibration=None, imatrix_samples: int = 16,
                              calibration_seq_len: int = 256, batch_size: int = 4, device: str = "auto",
                              dtype: str = "auto", num_resamples: int = 1000, qkv_bias: bool = True) -> dict:
    """Write decoding candidate `candidate` (`<source>:<recipe>`) to `out_model`, read it back and evaluate it:
    the source's float model with every weight decoded from the file, run as mllm's CPU backend computes
    (cpu_numerics: Q8_0 activation blocks at every Q4_0 / Q8_0 matmul, K/V in float16), on the held-out
    records, paired with the float model of the prefill variant (perplexity, exact KL to its logits, top-1
    agreement, bootstrap intervals). `original_manifest`: the fetched model (source `unrotated`);
    `calibration`, `imatrix_samples`, `calibration_seq_len`: the records whose activations give the
    importance of the imatrix recipes."""
    import copy
    import time

    from shadowquant.decoding.cpu_numerics import formats_from_dtypes, mllm_cpu_numerics
    from shadowquant.decoding.imatrix import collect_importance
    from shadowquant.evaluate.metrics import evaluate, output_head, per_record, result_from_per_record, summarize
    from shadowquant.model.loading import load_model_from_manifest
    from shadowquant.evaluate.sweep import evaluation_sequences, json_number, read_point_json

    source, recipe = parse_candidate(candidate)
    start = time.time()
    model, tokenizer, family = load_model_from_manifest(prefill_manifest, device, dtype)
    # KL needs the float logits: the prefill variant's float head, kept before the file's head replaces it.
    float_head = copy.deepcopy(output_head(model))
    manifest = prefill_manifest
    if source == "unrotated":
        if original_manifest is None:
            raise PipelineError(f"decoding candidate {candidate}: source 'unrotated' needs the fetched model's manifest")
        original, _, _ = load_model_from_manifest(original_manifest, device, dtype)
        with torch.no_grad():
            original.load_state_dict(unrotated_state(original, model, family))
        model, manifest = original, original_manifest
    state = {name: tensor.detach().to("cpu", copy=True) for name, tensor in model.state_dict().items()}
    importance, calibration_tokens = None, 0
    if uses_importance(recipe):
        if calibration is None:
            raise PipelineError(f"decoding candidate {candidate}: recipe {recipe} needs calibration records")
        calib = _calibration_sequences(tokenizer, calibration, imatrix_samples, calibration_seq_len)
        calibration_tokens = sum(len(ids) for ids in calib)
        importance = collect_importance(model, calib, batch_size=batch_size)
        log.info("importance of %d Linears from %d calibration records (%d tokens)", len(importance), len(calib),
                 calibration_tokens)
    summary = write_decode_model(state, out_model, qkv_bias=qkv_bias, recipe=recipe, importance=importance)
    del state
    stored = read_mllm(out_model)
    replaced = load_decode_weights(model, out_model)
    log.info("%s: %d tensors written (%s), %d taken back from %s", candidate, summary["tensors"],
             dtype_mix(summary["dtypes"]), len(replaced), out_model)
    formats = formats_from_dtypes(model, {entry.name: entry.dtype for entry in stored.entries})
    sequences = evaluation_sequences(tokenizer, samples, seq_len)
    float_result = result_from_per_record(read_point_json(float_json)["per_record"], source=str(float_json))
    with mllm_cpu_numerics(model, formats, kv_float16=True):
        result = evaluate(model, sequences, batch_size=batch_size, baseline=baseline, float_head=float_head,
                          desc=candidate)
    metrics = {k: json_number(v) for k, v in summarize(result, float_result, num_resamples=num_resamples).items()}
    out = {"candidate": candidate, "source": source, "recipe": recipe, "recipe_description": RECIPES[recipe],
           "source_description": SOURCES[source], "manifest": str(manifest), "prefill_manifest": str(prefill_manifest),
           "file_bytes": Path(out_model).stat().st_size, "dtype_mix": dtype_mix(summary["dtypes"]),
           "bytes_by_dtype": summary["bytes_by_dtype"], "tensors_by_dtype": summary["tensors_by_dtype"],
           "dtypes": summary["dtypes"], "imatrix_samples": imatrix_samples if importance is not None else 0,
           "imatrix_tokens": calibration_tokens,
           "numerics": "mllm CPU: Q8_0 activation blocks at every Q4_0/Q8_0 matmul, K/V float16",
           "seconds": round(time.time() - start, 1), **metrics, "per_record": per_record(result)}
    write_json(out_json, out)
    log.info("%s: perplexity %.4f (%+.2f %%), KL %.4f, agreement %.4f, %.1f MB", candidate, metrics["perplexity"],
             100 * (metrics["perplexity_increase"] or 0.0), metrics["kl"] or 0.0, metrics["agreement"] or 0.0,
             out["file_bytes"] / 1e6)
    return out


# ------------------------------------------------------------------------------- the choice

CANDIDATE_COLUMNS = ("candidate", "source", "recipe", "dtype_mix", "file_bytes", "perplexity", "perplexity_ci_low",
                     "perplexity_ci_high", "perplexity_increase", "perplexity_increase_ci_low",
                     "perplexity_increase_ci_high", "kl", "kl_ci_low", "kl_ci_high", "agreement", "agreement_ci_low",
                     "agreement_ci_high", "num_samples", "num_tokens", "within_budget", "chosen")


def choose_candidate(rows: list[dict], choice: str = "auto", budget: float = 0.10) -> tuple[str, str]:
    """(candidate, why) among evaluated `rows` (candidate, file_bytes, perplexity_increase): `auto` takes the
    smallest file whose perplexity increase over float is within `budget` (the lower increase on a tie),
    and when none is, the most accurate one (lowest increase); another `choice` names the candidate."""
    if not rows:
        raise PipelineError("no decoding candidate was evaluated")
    by_name = {row["candidate"]: row for row in rows}
    if choice != "auto":
        if choice not in by_name:
            raise PipelineError(f"bundle.decode.choice {choice!r} was not evaluated; evaluated: {', '.join(by_name)}")
        row = by_name[choice]
        within = "within" if row["perplexity_increase"] <= budget else "not within"
        return choice, (f"named by bundle.decode.choice; its perplexity increase {row['perplexity_increase']:+.1%} is "
                        f"{within} the budget of {budget:+.1%}")
    within = [row for row in rows if row["perplexity_increase"] <= budget]
    if within:
        row = min(within, key=lambda r: (r["file_bytes"], r["perplexity_increase"]))
        return row["candidate"], (f"the smallest file ({row['file_bytes'] / 1e6:.1f} MB) whose perplexity increase over "
                                  f"float ({row['perplexity_increase']:+.1%}) is within the budget of {budget:+.1%}; "
                                  f"{len(within)} of {len(rows)} candidates are within it")
    row = min(rows, key=lambda r: (r["perplexity_increase"], r["file_bytes"]))
    return row["candidate"], (f"no candidate is within the budget of {budget:+.1%} (the lowest perplexity increase is "
                              f"{row['perplexity_increase']:+.1%}): took the most accurate one")


def choose_decode_model(candidate_jsons, candidate_models, candidates, out_csv, out_html, out_choice, out_decode,
                        choice: str = "auto", budget: float = 0.10) -> dict:
    """The table of the evaluated decoding candidates, the choice (`choose_candidate`) and the chosen file copied
    to `out_decode` (the bundle's decoding model). `candidate_jsons` / `candidate_models`: in `candidates`' order."""
    import csv
    import io
    import shutil

    from shadowquant.atomic import atomic_path, write_text
    from shadowquant.jsonfile import read_json_object
    from shadowquant.report.plots import write_table_html

    candidates = list(candidates)
    if not (len(candidates) == len(candidate_jsons) == len(candidate_models)):
        raise PipelineError(f"{len(candidates)} candidates, {len(candidate_jsons)} results, "
                            f"{len(candidate_models)} files")
    results = []
    for name, path in zip(candidates, candidate_jsons):
        data = read_json_object(path, "decoding candidate result", "delete it and re-run the bundle")
        if data.get("candidate") != name or data.get("perplexity_increase") is None:
            raise PipelineError(f"{path}: not the evaluation of decoding candidate {name}; delete it and re-run")
        results.append(data)
    chosen, why = choose_candidate(results, choice, budget)
    index = candidates.index(chosen)
    with atomic_path(out_decode) as tmp:
        shutil.copyfile(candidate_models[index], tmp)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CANDIDATE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for data in results:
        row = {key: data.get(key) for key in CANDIDATE_COLUMNS}
        row.update(within_budget=data["perplexity_increase"] <= budget, chosen=data["candidate"] == chosen)
        writer.writerow(row)
    write_text(out_csv, buffer.getvalue())
    write_table_html(out_csv, out_html, f"Decoding model candidates (budget {budget:+.0%} perplexity over float; "
                                        f"chosen: {chosen})", float_digits=5)
    picked = results[index]
    out = {"chosen": chosen, "why": why, "choice": choice, "budget": budget, "file": str(out_decode),
           "file_bytes": Path(out_decode).stat().st_size, "source": picked["source"], "recipe": picked["recipe"],
           "recipe_description": picked["recipe_description"], "source_description": picked["source_description"],
           "manifest": picked["manifest"], "prefill_manifest": picked["prefill_manifest"],
           "dtype_mix": picked["dtype_mix"], "tensors_by_dtype": picked["tensors_by_dtype"],
           "bytes_by_dtype": picked["bytes_by_dtype"], "numerics": picked.get("numerics"),
           "metrics": {k: v for k, v in picked.items() if k in _METRIC_KEYS},
           "per_record": picked["per_record"], "dtypes": picked["dtypes"],
           "candidates": [{k: data.get(k) for k in CANDIDATE_COLUMNS if k not in ("within_budget", "chosen")}
                          for data in results]}
    write_json(out_choice, out)
    log.info("decoding model: %s (%s)", chosen, why)
    return out


_METRIC_KEYS = {"perplexity", "perplexity_ci_low", "perplexity_ci_high", "perplexity_increase",
                "perplexity_increase_ci_low", "perplexity_increase_ci_high", "kl", "kl_ci_low", "kl_ci_high",
                "agreement", "agreement_ci_low", "agreement_ci_high", "accuracy", "accuracy_ci_low", "accuracy_ci_high",
                "ci_level", "num_resamples", "num_samples", "num_tokens", "point"}
