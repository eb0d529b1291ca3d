"""An independent reference for the drift measures: Hugging Face ``output_hidden_states``
and plain float64 NumPy, written without any residual-trace code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch


def _hf_model(directory: Path, model_type: str) -> torch.nn.Module:
    from transformers import AutoModel, AutoModelForCausalLM

    if model_type == "bert":
        return AutoModel.from_pretrained(directory, attn_implementation="eager").eval()
    return AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()


def _reader_gains(model: torch.nn.Module, model_type: str) -> list[np.ndarray] | None:
    """gamma of the norm that reads each residual layer (None for post-LN BERT)."""
    if model_type == "bert":
        return None
    if model_type == "gpt2":
        blocks = [b.ln_1.weight for b in model.transformer.h] + [model.transformer.ln_f.weight]
    else:
        blocks = [b.input_layernorm.weight for b in model.model.layers] + [model.model.norm.weight]
    return [w.detach().double().numpy() for w in blocks]


def _cos_rows(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):  # all-zero rows (BERT's [PAD])
        return np.nan_to_num((rows @ x) / (np.linalg.norm(rows, axis=1) * np.linalg.norm(x)))


def _run(model: torch.nn.Module, model_type: str, ids: list[int]) -> tuple[list, list]:
    """Hidden states per layer and attentions. For decoders, Hugging Face's last hidden
    state is *after* the final norm; the residual stream's last layer is the last block's
    raw output, so take that from a forward hook on the last block."""
    last: list[torch.Tensor] = []
    handle = None
    if model_type != "bert":
        blocks = model.transformer.h if model_type == "gpt2" else model.model.layers
        handle = blocks[-1].register_forward_hook(
            lambda module, args, output: last.append(output[0] if isinstance(output, tuple) else output)
        )
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_hidden_states=True, output_attentions=True)
    states = list(out.hidden_states)
    if handle is not None:
        handle.remove()
        states[-1] = last[0]
    return [h[0].double().numpy() for h in states], [a[0].numpy() for a in out.attentions]


def reference_drift(
    directory: Path, model_type: str, texts: list[str], prepend_bos: bool
) -> pd.DataFrame:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = _hf_model(directory, model_type)
    W_E = model.get_input_embeddings().weight.detach().double().numpy()
    gains = _reader_gains(model, model_type)
    centre = model_type != "llama"
    special = set(tokenizer.all_special_ids)
    rows = []
    for text_id, text in enumerate(texts):
        ids = tokenizer(text)["input_ids"]
        if prepend_bos and ids[0] != tokenizer.bos_token_id:
            ids = [tokenizer.bos_token_id, *ids]
        states, _ = _run(model, model_type, ids)
        for layer, h in enumerate(states):
            for i, t in enumerate(ids):
                sims = _cos_rows(h[i], W_E)
                others = [sims[t_j] for t_j in ids if t_j != t]
                record = {
                    "text_id": text_id,
                    "position": i,
                    "layer": layer,
                    "token_id": t,
                    "is_special": t in special,
                    "cos_input": sims[t],
                    "cos_layer0": float(
                        h[i] @ states[0][i] / np.linalg.norm(h[i]) / np.linalg.norm(states[0][i])
                    ),
                    "baseline": np.mean(others) if others else np.nan,
                    "vocab_rank": int(np.sum(sims > sims[t]) + 1),
                    "emb_proj": float(h[i] @ W_E[t] / (W_E[t] @ W_E[t])),
                    "norm_ratio": float(np.linalg.norm(h[i]) / np.linalg.norm(W_E[t])),
                    "top_dim_share": float(np.max(h[i] ** 2) / np.sum(h[i] ** 2)),
                }
                if gains is None:
                    normed = sims
                else:
                    g = gains[layer]
                    x = h[i] - h[i].mean() if centre else h[i]
                    E = W_E - W_E.mean(axis=1, keepdims=True) if centre else W_E
                    normed = _cos_rows(g * x, E * g)
                others_n = [normed[t_j] for t_j in ids if t_j != t]
                record["cos_input_normed"] = normed[t]
                record["baseline_normed"] = np.mean(others_n) if others_n else np.nan
                record["vocab_rank_normed"] = int(np.sum(normed > normed[t]) + 1)
                rows.append(record)
    return pd.DataFrame(rows)


def hidden_states(
    directory: Path, model_type: str, ids: list[int]
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    return _run(_hf_model(directory, model_type), model_type, ids)
