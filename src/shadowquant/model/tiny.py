"""Tiny random-weight models and a tiny tokenizer of every family, for tests and dry runs.

They load through the same code paths as real checkpoints (safetensors + config + tokenizer in
a directory) and take seconds to build on a CPU.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from torch import nn

from shadowquant.errors import PipelineError
from shadowquant.model.families import FAMILIES, REGISTRY, in_decoder_layer
from shadowquant.atomic import atomic_directory
from shadowquant.model.loading import quiet_transformers

SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}

HIDDEN_SIZE = 64
INTERMEDIATE_SIZE = 128
NUM_LAYERS = 2
NUM_HEADS = 4
MAX_POSITIONS = 1024


def pydoc_texts() -> list[str]:
    """Python's own documentation topics: English prose and code, shipped with every Python."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def train_tokenizer(texts: Iterable[str] | None = None, vocab_size: int = 320):
    """A byte-level BPE tokenizer trained on `texts` (pydoc topics by default) that prepends <s>.

    The byte alphabet (256) plus 4 special tokens is the smallest vocabulary that can encode any text.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    minimum = 256 + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise PipelineError(f"tokenizer vocab_size = {vocab_size}: a byte-level BPE needs at least {minimum}")
    tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(texts) if texts is not None else pydoc_texts(), trainer)
    bos = SPECIAL_TOKENS["bos_token"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)


def _tiny_config(family: str, vocab_size: int, token_ids: dict[str, int]):
    import transformers

    common = dict(
        vocab_size=vocab_size,
        hidden_size=HIDDEN_SIZE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        max_position_embeddings=MAX_POSITIONS,
        **token_ids,
    )
    record = REGISTRY[family]
    return getattr(transformers, record.config_class)(**common, **record.tiny_config(common, INTERMEDIATE_SIZE))


def _add_outlier_channels(model: nn.Module, generator: torch.Generator) -> None:
    """Give the random model the activation outliers real LLMs have, so outlier statistics matter.

    A few residual-stream channels are scaled up in the embedding (they survive the norms as
    outlier input channels of q/k/v and the MLP input), and one output channel of every Linear
    inside the decoder layers (an outlier input channel for the next projection).
    """
    with torch.no_grad():
        embedding = model.get_input_embeddings().weight
        channels = torch.randperm(embedding.shape[1], generator=generator)[:2]
        embedding[:, channels] *= 10.0
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and in_decoder_layer(name):
                row = torch.randint(module.out_features, (1,), generator=generator)
                module.weight[row] *= 6.0


def _load_tokenizer(tokenizer_dir_or_obj):
    if tokenizer_dir_or_obj is None:
        return train_tokenizer()
    if isinstance(tokenizer_dir_or_obj, (str, os.PathLike)):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(tokenizer_dir_or_obj))
    return tokenizer_dir_or_obj


def build_tiny_model(family: str, out_dir: str | os.PathLike, tokenizer_dir_or_obj=None, seed: int = 0,
                     vocab_size: int | None = None) -> Path:
    """Write a random-weight model of `family` (safetensors, config, tokenizer) to `out_dir`; return it.

    Deterministic in `seed`. `vocab_size` defaults to the tokenizer's size (it may only be larger).
    """
    import transformers

    if family not in FAMILIES:
        raise PipelineError(f"no tiny model for family {family!r}; valid values: {', '.join(FAMILIES)}")
    tokenizer = _load_tokenizer(tokenizer_dir_or_obj)
    vocab_size = vocab_size or len(tokenizer)
    if vocab_size < len(tokenizer):
        raise PipelineError(f"vocab_size = {vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens")
    token_ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = _tiny_config(family, vocab_size, token_ids)
    quiet_transformers()
    with torch.random.fork_rng(devices=[]):  # seed the init without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _add_outlier_channels(model, torch.Generator().manual_seed(seed))
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out_dir


def write_llama_gguf(model_dir: str | os.PathLike, gguf_path: str | os.PathLike) -> Path:
    """Write a float32 GGUF (llama.cpp layout) of a llama model directory with a byte-level BPE tokenizer.

    Exists to test the GGUF import path without a multi-megabyte download.
    """
    import gguf
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    model_dir, gguf_path = Path(model_dir), Path(gguf_path)
    config = AutoConfig.from_pretrained(model_dir)
    if config.model_type != "llama":
        raise PipelineError(f"{model_dir}: write_llama_gguf needs a llama model, got {config.model_type!r}")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    state = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(shard))
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope_theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta") or config.rope_theta

    def llama_cpp_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
        # llama.cpp stores q/k rows interleaved per rotary pair; transformers undoes it on load.
        return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2) \
            .reshape(weight.shape)

    tensors = {"token_embd.weight": state["model.embed_tokens.weight"], "output_norm.weight": state["model.norm.weight"]}
    if "lm_head.weight" in state and not config.tie_word_embeddings:
        tensors["output.weight"] = state["lm_head.weight"]
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    for layer in range(config.num_hidden_layers):
        for hf_name, gguf_name in names.items():
            tensors[f"blk.{layer}.{gguf_name}.weight"] = state[f"model.layers.{layer}.{hf_name}.weight"]
    arrays = {name: tensor.float().numpy() for name, tensor in tensors.items()}
    for layer in range(config.num_hidden_layers):
        arrays[f"blk.{layer}.attn_q.weight"] = llama_cpp_permute(arrays[f"blk.{layer}.attn_q.weight"], heads)
        arrays[f"blk.{layer}.attn_k.weight"] = llama_cpp_permute(arrays[f"blk.{layer}.attn_k.weight"], kv_heads)

    vocab = tokenizer.get_vocab()
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    special = set(tokenizer.all_special_tokens)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    merges = [" ".join(pair) if isinstance(pair, list) else pair for pair in merges]

    gguf_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = gguf_path.with_name(f".{gguf_path.name}.tmp")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope_theta))
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if token in special else 1 for token in tokens])  # 3 = control, 1 = normal
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_unk_token_id(tokenizer.unk_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(True)
    for name, array in arrays.items():
        writer.add_tensor(name, np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, gguf_path)
    return gguf_path
