"""One tiny, seeded, random-weight Hugging Face checkpoint per architecture family.

Each :class:`Family` carries what an independent test reference needs: the Hugging Face module
paths (not TransformerLens names) of every block's raw attention and MLP outputs and of the norms
applied after them. :func:`save_family` writes a checkpoint with its tokenizer to disk.
"""

from __future__ import annotations

import functools
import json
import shutil
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from tests.helpers import TINY_MAX_PARAMS, minilm_dir, tiny_bpe_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedModel

HIDDEN = 64
LAYERS = 2
HEADS = 4
KV_HEADS = 2
HEAD_DIM = HIDDEN // HEADS
INTERMEDIATE = 128
MAX_POSITIONS = 128
#: The minilm WordPiece vocabulary shared by the encoders; [PAD] 0, [CLS] 101, [SEP] 102.
BERT_VOCAB = 30522
BERT_PAD, BERT_CLS, BERT_SEP = 0, 101, 102
#: ``<|endoftext|>`` of the tiny BPE: bos = eos = unk = pad.
BPE_SPECIAL = 0

NormSite = Literal["pre", "post", "sandwich", "output"]


@dataclass(frozen=True)
class Family:
    """Facts about one architecture family; module paths hold a ``{block}`` placeholder."""

    name: str
    model_type: str
    encoder: bool
    parallel: bool
    norm_site: NormSite
    attn_raw: str
    mlp_raw: str
    attn_after: str | None
    mlp_after: str | None
    build: Callable[[int], PreTrainedModel]

    @property
    def block(self) -> str:
        """Path template of the whole block (its input and output are the residual stream)."""
        return self.attn_raw.split("{block}")[0] + "{block}"


def family_seed(name: str) -> int:
    """A fixed seed derived from the family name."""
    return zlib.crc32(name.encode())


def _randomise_norms(model: torch.nn.Module, seed: int, unit_offset: bool) -> None:
    """Give every norm a non-trivial gain in [0.5, 2] and a small bias.

    With ``unit_offset`` (Gemma's ``x * (1 + w)``) the stored weight is shifted by -1 so that the
    applied gain, not the raw parameter, lands in [0.5, 2].
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if not (isinstance(module, torch.nn.LayerNorm) or "Norm" in type(module).__name__):
                continue
            for name, param in module.named_parameters(recurse=False):
                if name == "weight":
                    gain = 0.5 + torch.rand(param.shape, generator=generator) * 1.5
                    param.copy_(gain - 1.0 if unit_offset else gain)
                elif name == "bias":
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def _randomise_padding_rows(model: torch.nn.Module, seed: int) -> None:
    """Refill the zero-initialised ``padding_idx`` embedding rows.

    The decoders' pad id is ``<|endoftext|>`` (also bos), which must not embed to zero.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Embedding) and module.padding_idx is not None:
                row = torch.randn(module.embedding_dim, generator=generator) * 0.02
                module.weight[module.padding_idx].copy_(row)


def _build(
    name: str, model_class: str, config_class: str, settings: dict[str, Any], vocab_size: int
) -> PreTrainedModel:
    """Seed, configure (eager attention), build, randomise norms, check size, eval mode."""
    import transformers

    seed = family_seed(name)
    torch.manual_seed(seed)
    config = getattr(transformers, config_class)(
        vocab_size=vocab_size, attn_implementation="eager", **settings
    )
    model = getattr(transformers, model_class)(config)
    _randomise_padding_rows(model, seed + 1)
    _randomise_norms(model, seed + 2, unit_offset=name.startswith("gemma"))
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params < TINY_MAX_PARAMS, f"{name}: {n_params} parameters"
    return model.eval()


_DECODER_IDS = {
    "bos_token_id": BPE_SPECIAL,
    "eos_token_id": BPE_SPECIAL,
    "pad_token_id": BPE_SPECIAL,
}
_ROTARY = {
    "hidden_size": HIDDEN,
    "intermediate_size": INTERMEDIATE,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS,
    "max_position_embeddings": MAX_POSITIONS,
    **_DECODER_IDS,
}
_GQA = {**_ROTARY, "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM}
_BERT = {
    "hidden_size": HIDDEN,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS,
    "intermediate_size": INTERMEDIATE,
}

# name: (model type, model class, config class, config settings besides vocab and attention)
_SPECS: dict[str, tuple[str, str, str, dict[str, Any]]] = {
    "bert": (
        "bert",
        "BertForMaskedLM",
        "BertConfig",
        {**_BERT, "max_position_embeddings": MAX_POSITIONS, "pad_token_id": BERT_PAD},
    ),
    "roberta": (
        "roberta",
        "RobertaForMaskedLM",
        "RobertaConfig",
        {
            **_BERT,
            # positions start at pad_token_id + 1, as in the real 514 = 512 + 2
            "max_position_embeddings": MAX_POSITIONS + 2,
            "type_vocab_size": 1,
            "pad_token_id": BERT_PAD,
            "bos_token_id": BERT_CLS,
            "eos_token_id": BERT_SEP,
        },
    ),
    "gpt2": (
        "gpt2",
        "GPT2LMHeadModel",
        "GPT2Config",
        {
            "n_embd": HIDDEN,
            "n_layer": LAYERS,
            "n_head": HEADS,
            "n_inner": INTERMEDIATE,
            "n_positions": MAX_POSITIONS,
            **_DECODER_IDS,
        },
    ),
    "llama": ("llama", "LlamaForCausalLM", "LlamaConfig", _GQA),
    "pythia": (
        "gpt_neox",
        "GPTNeoXForCausalLM",
        "GPTNeoXConfig",
        {**_ROTARY, "use_parallel_residual": True},  # rotary on 25% of each head
    ),
    "gptj": (
        "gptj",
        "GPTJForCausalLM",
        "GPTJConfig",
        {
            "n_embd": HIDDEN,
            "n_layer": LAYERS,
            "n_head": HEADS,
            "n_inner": INTERMEDIATE,
            "n_positions": MAX_POSITIONS,
            "rotary_dim": HEAD_DIM // 2,
            **_DECODER_IDS,
        },
    ),
    # Phi-1/2 are multi-head; rotary on 50% of each head
    "phi": ("phi", "PhiForCausalLM", "PhiConfig", _ROTARY),
    "phi3": (
        "phi3",
        "Phi3ForCausalLM",
        "Phi3Config",
        {
            **_ROTARY,
            "num_key_value_heads": KV_HEADS,
            "original_max_position_embeddings": MAX_POSITIONS,
        },
    ),
    "qwen2": (
        "qwen2",
        "Qwen2ForCausalLM",
        "Qwen2Config",
        {**_ROTARY, "num_key_value_heads": KV_HEADS, "use_sliding_window": False},
    ),
    "qwen3": ("qwen3", "Qwen3ForCausalLM", "Qwen3Config", {**_GQA, "use_sliding_window": False}),
    "mistral": ("mistral", "MistralForCausalLM", "MistralConfig", {**_GQA, "sliding_window": None}),
    "gemma": ("gemma", "GemmaForCausalLM", "GemmaConfig", _GQA),
    # attention logit softcapping stays at its default; the sliding window (4096) exceeds
    # max positions, so sliding layers differ from full ones only by Gemma 3's rope base
    "gemma2": (
        "gemma2",
        "Gemma2ForCausalLM",
        "Gemma2Config",
        {**_GQA, "query_pre_attn_scalar": HEAD_DIM},
    ),
    "gemma3": (
        "gemma3_text",
        "Gemma3ForCausalLM",
        "Gemma3TextConfig",
        {
            **_GQA,
            "query_pre_attn_scalar": HEAD_DIM,
            "layer_types": ["sliding_attention", "full_attention"],
        },
    ),
    "olmo2": (
        "olmo2",
        "Olmo2ForCausalLM",
        "Olmo2Config",
        {**_ROTARY, "num_key_value_heads": KV_HEADS},
    ),
    "opt": (
        "opt",
        "OPTForCausalLM",
        "OPTConfig",
        {
            "hidden_size": HIDDEN,
            "word_embed_proj_dim": HIDDEN,
            "ffn_dim": INTERMEDIATE,
            "num_hidden_layers": LAYERS,
            "num_attention_heads": HEADS,
            "max_position_embeddings": MAX_POSITIONS,
            "dropout": 0.0,
            **_DECODER_IDS,
        },
    ),
}

_PARALLEL = {"pythia", "gptj", "phi"}
_SANDWICH = {"gemma2", "gemma3"}


def _paths(name: str) -> tuple[NormSite, str, str, str | None, str | None]:
    """(norm site, attn_raw, mlp_raw, attn_after, mlp_after) for one family."""
    if name in ("bert", "roberta"):
        layer = f"{name}.encoder.layer.{{block}}"
        return (
            "post",
            f"{layer}.attention.output.dense",
            f"{layer}.output.dense",
            f"{layer}.attention.output.LayerNorm",
            f"{layer}.output.LayerNorm",
        )
    if name in ("gpt2", "gptj"):
        return "pre", "transformer.h.{block}.attn", "transformer.h.{block}.mlp", None, None
    if name == "pythia":
        return "pre", "gpt_neox.layers.{block}.attention", "gpt_neox.layers.{block}.mlp", None, None
    if name == "opt":
        layer = "model.decoder.layers.{block}"
        return "pre", f"{layer}.self_attn", f"{layer}.fc2", None, None
    layer = "model.layers.{block}"
    attn, mlp = f"{layer}.self_attn", f"{layer}.mlp"
    if name in _SANDWICH or name == "olmo2":
        site: NormSite = "sandwich" if name in _SANDWICH else "output"
        return (
            site,
            attn,
            mlp,
            f"{layer}.post_attention_layernorm",
            f"{layer}.post_feedforward_layernorm",
        )
    return "pre", attn, mlp, None, None


def _family(name: str) -> Family:
    model_type, model_class, config_class, settings = _SPECS[name]
    norm_site, attn_raw, mlp_raw, attn_after, mlp_after = _paths(name)
    return Family(
        name=name,
        model_type=model_type,
        encoder=name in ("bert", "roberta"),
        parallel=name in _PARALLEL,
        norm_site=norm_site,
        attn_raw=attn_raw,
        mlp_raw=mlp_raw,
        attn_after=attn_after,
        mlp_after=mlp_after,
        build=functools.partial(_build, name, model_class, config_class, settings),
    )


FAMILIES: dict[str, Family] = {name: _family(name) for name in _SPECS}


def _save_wordpiece(target: Path, max_length: int) -> int:
    """Copy the minilm WordPiece tokenizer, capping its length at the model's positions."""
    source = minilm_dir()
    for file in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(source / file, target / file)
    config_file = target / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["model_max_length"] = max_length
    config_file.write_text(json.dumps(config, indent=2))
    return BERT_VOCAB


def _save_bpe(target: Path) -> int:
    """Save the tiny byte-level BPE with ``<|endoftext|>`` as its pad token too."""
    from transformers import PreTrainedTokenizerFast

    vocab = tiny_bpe_tokenizer(target)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(target)
    tokenizer.pad_token = "<|endoftext|>"
    tokenizer.model_max_length = MAX_POSITIONS
    assert tokenizer.pad_token_id == BPE_SPECIAL
    tokenizer.save_pretrained(target)
    return vocab


def save_family(root: Path, name: str) -> Path:
    """Write ``root/tiny-{name}``: the seeded model's weights, config and tokenizer."""
    family = FAMILIES[name]
    target = root / f"tiny-{name}"
    target.mkdir(parents=True, exist_ok=True)
    vocab = _save_wordpiece(target, MAX_POSITIONS) if family.encoder else _save_bpe(target)
    family.build(vocab).save_pretrained(target)
    return target
