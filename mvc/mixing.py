"""Mixing Visual Concepts: pure, batched edits of a prompt, before or after the text encoder.

- *coarse* (token level): k tokens inside a window of positions are shuffled among themselves,
  or swapped for the tokens at the same positions of a donor (another caption of the same
  class). It runs at one of two stages (`coarse_stage`):
  - 'tokens' (default): on the prompt's token ids (B x T) BEFORE the text encoder, whose
    positional embeddings and causal attention turn the new order into a new embedding;
  - 'embeds': on the encoder's output vectors (B x T x D), the literal reading of the paper.
    Stable Diffusion's cross-attention has no positions on the key/value side, so a *shuffle*
    there leaves the U-Net's output unchanged up to float rounding (no diversity); a swap
    still changes values. Kept for the ablation (docs/architecture.md, "Coarse mixing").
- *fine* (slice level): in m token vectors of the encoder's output, a slice of s dimensions is
  replaced, with values from a donor, from other tokens of the same embedding ('self'), or from
  noise with the embedding's own per-dimension statistics;
- *none*: the unmixed baseline.

Ops compose with '+' (`"coarse+fine"`: coarse, then fine on its output); with `stage=` the
dispatcher applies only the ops of one stage, so a caller edits ids, encodes, then edits
embeddings. Every function takes a `torch.Generator`, returns a new tensor and leaves its inputs
untouched. Importing this module is cheap (config validation calls `list_mixing_ops()`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from mvc.captions import make_prompt
from mvc.registry import Registry
from mvc.utils import MVCError

Window = tuple[int, int] | Sequence[tuple[int, int]] | torch.Tensor | None


STAGES = ("tokens", "embeds")  # token ids before the text encoder, its output embeddings


@dataclass(frozen=True)
class MixOp:
    """A registered op: `fn(x, params, generator, donor, window) -> x`, the params it reads, and the
    stage it runs at with these params ('tokens': (B, T) ids before the text encoder; 'embeds': its output)."""
    fn: Callable[..., torch.Tensor]
    keys: tuple[str, ...]
    needs_donor: Callable[[dict], bool]
    stage: Callable[[dict], str] = lambda params: "embeds"


MIXING_OPS: Registry[MixOp] = Registry("mixing op")


def list_mixing_ops() -> list[str]:
    """Names of the registered mixing ops (compose them with '+', e.g. 'coarse+fine')."""
    return MIXING_OPS.names()


#################################################################################
#                                  Windows                                      #
#################################################################################

def caption_token_span(tokenizer, prompt_template: str, caption: str, label: str) -> tuple[int, int]:
    """[start, end) token positions of `caption` inside the tokenized prompt (BOS is position 0).

    The caption is located by its characters in the formatted prompt (wherever the template puts
    it), then mapped to tokens with the tokenizer's offsets. A caption cut off by the tokenizer's
    max length gives the part that survives; an empty one gives an empty span (start == end).
    """
    prompt = make_prompt(prompt_template, caption, label)  # refuses a template without {caption}
    c0 = _locate_caption(prompt_template, prompt, caption, label)
    c1 = c0 + len(caption)
    max_len = int(tokenizer.model_max_length)
    try:
        enc = tokenizer(prompt, truncation=True, max_length=max_len, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
    except (NotImplementedError, TypeError, ValueError, KeyError):
        offsets = None
    if offsets is not None:
        # special tokens (BOS/EOS/padding) have empty (0, 0) offsets
        pos = [i for i, (a, b) in enumerate(offsets) if b > a and a < c1 and b > c0]
        if not pos:
            return (1, 1)
        return (min(pos), max(pos) + 1)
    # slow tokenizers: count the tokens of the text before the caption, then of the caption
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    start = 1 + len(ids(prompt[:c0].strip())) if prompt[:c0].strip() else 1
    end = min(start + len(ids(caption)), max_len - 1)
    return (min(start, end), end)


def _locate_caption(template: str, prompt: str, caption: str, label: str) -> int:
    """Character index of `caption` in `prompt` (template prefix first, else a search)."""
    prefix = template.split("{caption}", 1)[0].format(label=label)
    if prompt[len(prefix):len(prefix) + len(caption)] == caption:
        return len(prefix)
    i = prompt.find(caption)
    if i < 0:
        i = prompt.lower().find(caption.lower().strip())
    if i < 0:
        raise MVCError(f"cannot find the caption {caption!r} in the prompt {prompt!r}")
    return i


def _windows(window: Window, batch: int, length: int) -> list[tuple[int, int]]:
    """Normalise `window` (None: all T positions; one (start, end); or B of them) to B checked pairs."""
    if window is None:
        return [(0, length)] * batch
    if isinstance(window, torch.Tensor):
        window = window.tolist()
    window = list(window)
    if len(window) == 2 and all(hasattr(v, "__index__") for v in window):
        pairs = [tuple(int(v) for v in window)] * batch
    else:
        pairs = [tuple(int(v) for v in w) for w in window]
        if len(pairs) != batch or any(len(p) != 2 for p in pairs):
            raise MVCError(f"window must be (start, end) or {batch} such pairs, got {window!r}")
    for s, e in pairs:
        if not 0 <= s < e <= length:
            raise MVCError(f"window [{s}, {e}) is not a non-empty range inside the {length} token positions")
    return pairs


def _check(embeds: torch.Tensor, donor: torch.Tensor | None, need_donor: bool, ndims: tuple[int, ...] = (3,)) -> None:
    """Shape checks shared by the ops."""
    if embeds.ndim not in ndims:
        want = " or ".join({2: "token ids (B, T)", 3: "embeddings (B, T, D)"}[n] for n in ndims)
        raise MVCError(f"this mixing op needs {want}, got shape {tuple(embeds.shape)}")
    if need_donor:
        if donor is None:
            raise MVCError("this mixing op needs a donor (another caption of the same class)")
        if donor.shape != embeds.shape:
            raise MVCError(f"donor shape {tuple(donor.shape)} differs from the embeddings' {tuple(embeds.shape)}")


def _randint(n: int, generator: torch.Generator) -> int:
    """One integer in [0, n) from `generator`."""
    return int(torch.randint(n, (1,), generator=generator, device=generator.device).item())


def _choose(start: int, end: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """k distinct positions in [start, end), (k,) int64 on the CPU."""
    return torch.randperm(end - start, generator=generator, device=generator.device)[:k].cpu() + start


#################################################################################
#                                Coarse mixing                                  #
#################################################################################

def coarse_indices(generator: torch.Generator, k: int, windows: Sequence[tuple[int, int]],
                   mode: str = "shuffle") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per row, (positions, sources): k distinct positions in the row's window and, for 'shuffle', the
    positions they take their token from (a permutation of them that is not the identity when k >= 2);
    for 'swap', sources = positions (read from the donor). Both (k,) int64 on the CPU."""
    if mode not in ("shuffle", "swap"):
        raise MVCError(f"coarse mixing mode must be 'shuffle' or 'swap', got {mode!r}")
    k = int(k)
    out = []
    for s, e in windows:
        if not 1 <= k <= e - s:
            raise MVCError(f"coarse mixing k={k} must be between 1 and the window size {e - s} (window [{s}, {e}))")
        pos = _choose(s, e, k, generator)  # (k,)
        if mode == "swap":
            out.append((pos, pos))
            continue
        perm = torch.randperm(k, generator=generator, device=generator.device).cpu()
        if k >= 2 and torch.equal(perm, torch.arange(k)):
            perm = torch.roll(perm, 1 + _randint(k - 1, generator))  # never the identity
        out.append((pos, pos[perm]))
    return out


def coarse_mix(x: torch.Tensor, generator: torch.Generator, k: int, mode: str = "shuffle",
               donor: torch.Tensor | None = None, window: Window = None) -> torch.Tensor:
    """Token-level mixing of token ids (B, T) or embeddings (B, T, D): per row, k positions in the window
    are shuffled (never the identity when k >= 2) or replaced by the donor's entries at the same positions."""
    _check(x, donor, mode == "swap", ndims=(2, 3))
    out = x.clone()
    for b, (pos, src) in enumerate(coarse_indices(generator, k, _windows(window, x.shape[0], x.shape[1]), mode)):
        pos, src = pos.to(x.device), src.to(x.device)
        out[b, pos] = (donor[b, src] if mode == "swap" else x[b, src]).to(x.dtype)  # (k,) ids or (k, D) vectors
    return out


#################################################################################
#                                 Fine mixing                                   #
#################################################################################

def fine_mix(embeds: torch.Tensor, generator: torch.Generator, m: int, s: int, source: str = "donor",
             contiguous: bool = True, donor: torch.Tensor | None = None, window: Window = None) -> torch.Tensor:
    """Slice-level mixing: per row, in m token vectors of the window, s dimensions are replaced.

    `source`: 'donor' (same entries of the donor), 'self' (same dimensions of another token of the
    window, or of the sequence when the window has one token), 'noise' (Gaussian with the row's
    per-dimension mean and std over tokens 1..T-1, skipping BOS whose values are outliers in CLIP).
    The slice is contiguous or scattered, drawn anew for each of the m tokens.
    """
    if source not in ("donor", "self", "noise"):
        raise MVCError(f"fine mixing source must be 'donor', 'self' or 'noise', got {source!r}")
    _check(embeds, donor, source == "donor")
    B, T, D = embeds.shape
    wins = _windows(window, B, T)
    m, s = int(m), int(s)
    if not 1 <= s <= D:
        raise MVCError(f"fine mixing slice size s={s} must be between 1 and the embedding width {D}")
    if source == "self" and T < 2:
        raise MVCError("fine mixing source 'self' needs at least 2 token positions")
    out = embeds.clone()
    g, gdev = generator, generator.device
    for b, (w0, w1) in enumerate(wins):
        if not 1 <= m <= w1 - w0:
            raise MVCError(f"fine mixing m={m} must be between 1 and the window size {w1 - w0} (window [{w0}, {w1}))")
        if source == "noise":
            ref = embeds[b, 1:] if T > 1 else embeds[b]  # (T-1, D)
            mu, sd = ref.float().mean(0), ref.float().std(0, unbiased=False)  # (D,), (D,)
        for p in _choose(w0, w1, m, g).tolist():
            if contiguous:
                d0 = _randint(D - s + 1, g)
                dims = torch.arange(d0, d0 + s)
            else:
                dims = torch.randperm(D, generator=g, device=gdev)[:s].cpu()
            dims = dims.to(embeds.device)  # (s,)
            if source == "donor":
                vals = donor[b, p, dims]
            elif source == "self":
                lo, hi = (w0, w1) if w1 - w0 >= 2 else (0, T)
                q = lo + _randint(hi - lo - 1, g)
                q = q + 1 if q >= p else q  # any position of [lo, hi) but p
                vals = embeds[b, q, dims]
            else:
                z = torch.randn(s, generator=g, device=gdev).to(embeds.device)
                vals = mu[dims] + sd[dims] * z
            out[b, p, dims] = vals.to(embeds.dtype)
    return out


#################################################################################
#                            Registry and dispatch                              #
#################################################################################

def _need(params: dict, key: str, op: str) -> Any:
    if key not in params:
        raise MVCError(f"mixing op {op!r} needs the parameter {key!r}")
    return params[key]


def _coarse_stage(params: dict) -> str:
    """Where the coarse op runs: 'tokens' (ids before the text encoder, the default) or 'embeds' (its output)."""
    stage = params.get("coarse_stage", "tokens")
    if stage not in STAGES:
        raise MVCError(f"coarse_stage must be 'tokens' or 'embeds', got {stage!r}")
    return stage


MIXING_OPS.register("none")(MixOp(fn=lambda x, params, g, donor, window: x.clone(), keys=(),
                                  needs_donor=lambda p: False))
MIXING_OPS.register("coarse")(MixOp(
    fn=lambda x, params, g, donor, window: coarse_mix(
        x, g, k=_need(params, "k", "coarse"), mode=params.get("mode", "shuffle"), donor=donor, window=window),
    keys=("mode", "k", "coarse_stage"), needs_donor=lambda p: p.get("mode", "shuffle") == "swap", stage=_coarse_stage))
MIXING_OPS.register("fine")(MixOp(
    fn=lambda x, params, g, donor, window: fine_mix(
        x, g, m=_need(params, "m", "fine"), s=_need(params, "s", "fine"), source=params.get("source", "donor"),
        contiguous=params.get("contiguous", True), donor=donor, window=window),
    keys=("m", "s", "source", "contiguous"), needs_donor=lambda p: p.get("source", "donor") == "donor"))


def parse_op(op: str) -> list[str]:
    """'coarse+fine' -> ['coarse', 'fine'], each checked against the registry."""
    names = [n.strip() for n in str(op).split("+")]
    if not all(names):
        raise MVCError(f"malformed mixing op {op!r}; use registered names joined by '+', e.g. 'coarse+fine'")
    for n in names:
        MIXING_OPS.get(n)
    return names


def op_stages(op: str, params: dict) -> list[str]:
    """The stage ('tokens' or 'embeds') of each part of `op`; token-stage parts must come first."""
    names = parse_op(op)
    stages = [MIXING_OPS.get(n).stage(params) for n in names]
    if any(a == "embeds" and b == "tokens" for a, b in zip(stages, stages[1:])):
        raise MVCError(f"mixing op {op!r} would edit token ids after editing embeddings ({', '.join(names)} at "
                       f"{', '.join(stages)}); put coarse first or set mixing.coarse_stage=embeds")
    return stages


def op_needs_donor(op: str, params: dict) -> bool:
    """Whether `op` (possibly composite) reads a donor embedding with these params."""
    return any(MIXING_OPS.get(n).needs_donor(params) for n in parse_op(op))


def op_params(op: str, params: dict) -> dict:
    """The subset of `params` that `op` reads (for metadata)."""
    keys = [k for n in parse_op(op) for k in MIXING_OPS.get(n).keys]
    return {k: params[k] for k in keys if k in params}


def mixing_params(mixing_cfg: Any) -> dict:
    """Flat op params from a `MixingConfig` (each op reads its own keys)."""
    return {"mode": mixing_cfg.coarse_mode, "k": int(mixing_cfg.coarse_k), "coarse_stage": mixing_cfg.coarse_stage,
            "m": int(mixing_cfg.fine_m), "s": int(mixing_cfg.fine_s), "source": mixing_cfg.fine_source,
            "contiguous": bool(mixing_cfg.fine_contiguous)}


def apply_mixing(x: torch.Tensor, op: str, params: dict, generator: torch.Generator, donor: torch.Tensor | None = None,
                 window: Window = None, stage: str | None = None) -> torch.Tensor:
    """Apply `op` ('none', 'coarse', 'fine', or a '+' composition, left to right) to `x`.

    `stage=None`: every part, on whatever `x` is ((B, T, D) embeddings; coarse alone also takes (B, T) ids).
    `stage='tokens'` / `'embeds'`: only the parts of that stage, so a caller runs
    `apply_mixing(ids, stage='tokens')`, the text encoder, then `apply_mixing(embeds, stage='embeds')`
    with the same generator (the draws are then those of the unstaged call).
    """
    if stage is not None and stage not in STAGES:
        raise MVCError(f"stage must be one of {STAGES} or None, got {stage!r}")
    names = parse_op(op)
    stages = op_stages(op, params) if stage is not None else [None] * len(names)
    out = x
    for name, st in zip(names, stages):
        if stage is None or st == stage:
            out = MIXING_OPS.get(name).fn(out, params, generator, donor, window)
    return out if out is not x else x.clone()
