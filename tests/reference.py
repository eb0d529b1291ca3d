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
            lambda module, args, output: last.append(
                output[0] if isinstance(output, tuple) else output
            )
        )
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_hidden_states=True, output_attentions=True)
    states = list(out.hidden_states)
    if handle is not None:
        handle.remove()
        states[-1] = last[0]
    return [h[0].double().numpy() for h in states], [a[0].numpy() for a in out.attentions]


#: Cosine tolerance of the rank band: rows this close to the own score count as ties.
RANK_TOL = 1e-5


def _rank_band(sims: np.ndarray, own_ids: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact rank and the band [lo, hi] a float32 computation may land in (ties at 1e-5)."""
    own = sims[np.arange(len(own_ids)), own_ids][:, None]
    exact = 1 + (sims > own).sum(1)
    lo = 1 + (sims > own + RANK_TOL).sum(1)
    hi = (sims > own - RANK_TOL).sum(1)  # counts the own row itself: 1 + others
    return exact, lo, hi


def reference_drift(
    directory: Path, model_type: str, texts: list[str], prepend_bos: bool
) -> pd.DataFrame:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = _hf_model(directory, model_type)
    W_E = model.get_input_embeddings().weight.detach().double().numpy()
    E_norm = np.linalg.norm(W_E, axis=1)
    gains = _reader_gains(model, model_type)
    centre = model_type != "llama"
    E_c = W_E - W_E.mean(axis=1, keepdims=True) if centre else W_E
    special = set(tokenizer.all_special_ids)
    frames = []
    for text_id, text in enumerate(texts):
        ids = tokenizer(text)["input_ids"]
        if prepend_bos and ids[0] != tokenizer.bos_token_id:
            ids = [tokenizer.bos_token_id, *ids]
        ids_np = np.array(ids)
        differs = ids_np[:, None] != ids_np[None, :]
        states, _ = _run(model, model_type, ids)
        for layer, h in enumerate(states):
            h_norm = np.linalg.norm(h, axis=1)
            with np.errstate(invalid="ignore", divide="ignore"):
                sims = np.nan_to_num((h @ W_E.T) / np.outer(h_norm, E_norm))
            if gains is None:
                normed = sims
            else:
                g = gains[layer]
                x = (h - h.mean(axis=1, keepdims=True) if centre else h) * g
                rows = E_c * g
                normed = (x @ rows.T) / np.outer(
                    np.linalg.norm(x, axis=1), np.linalg.norm(rows, axis=1)
                )
            frame = {
                "text_id": text_id,
                "position": np.arange(len(ids)),
                "layer": layer,
                "token_id": ids_np,
                "is_special": [t in special for t in ids],
                "cos_layer0": (h * states[0]).sum(1) / h_norm / np.linalg.norm(states[0], axis=1),
                "emb_proj": (h * W_E[ids_np]).sum(1) / (W_E[ids_np] ** 2).sum(1),
                "norm_ratio": h_norm / E_norm[ids_np],
                "top_dim_share": (h**2).max(1) / (h**2).sum(1),
            }
            for suffix, scores in (("", sims), ("_normed", normed)):
                at_tokens = scores[:, ids_np]  # [position i, position j] = cos(h_i, W_E[t_j])
                count = differs.sum(1)
                with np.errstate(invalid="ignore"):
                    frame[f"baseline{suffix}"] = np.where(
                        count > 0, (at_tokens * differs).sum(1) / np.maximum(count, 1), np.nan
                    )
                frame[f"cos_input{suffix}"] = np.diag(at_tokens)
                exact, lo, hi = _rank_band(scores, ids)
                frame[f"vocab_rank{suffix}"] = exact
                frame[f"vocab_rank{suffix}_lo"] = lo
                frame[f"vocab_rank{suffix}_hi"] = hi
            frames.append(pd.DataFrame(frame))
    return pd.concat(frames, ignore_index=True)


def hidden_states(
    directory: Path, model_type: str, ids: list[int]
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    return _run(_hf_model(directory, model_type), model_type, ids)
