"""Mixing Visual Concepts: pure, batched edits of a prompt, before or after the text encoder; the mixing plan.

- *coarse*: `coarse_k` tokens of a window shuffled, or swapped in from a donor caption of the same class, on
  the token ids (`coarse_stage='tokens'`, the default) or on the encoder's output ('embeds');
- *fine*: in `fine_m` token vectors of the encoder's output, a slice of `fine_s` dimensions replaced;
- *none*: the unmixed baseline. Ops (`MIXING_OPS`) compose with '+'.
Every function takes a `torch.Generator`, returns a new tensor and leaves its inputs untouched. The plan:
`ClassPrompts` (per class, once), `plan_mix` (one image's draw), `mix_prompts` (one batch).
docs/mixing.md explains each op, why the coarse op runs on token ids, and the plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from mvc.core import seeds
from mvc.core.registry import Registry, config_rule, publish_choices
from mvc.core.utils import MVCError
from mvc.data.prompts import caption_token_span, make_prompt

Window = tuple[int, int] | Sequence[tuple[int, int]] | torch.Tensor | None


STAGES = ("tokens", "embeds")  # token ids before the text encoder, its output embeddings
COARSE_MODES = ("shuffle", "swap")  # permute tokens of the window / take them from a donor
FINE_SOURCES = ("donor", "self", "noise")  # where a fine slice's new values come from
publish_choices("mixing stage", STAGES)
publish_choices("coarse mode", COARSE_MODES)
publish_choices("fine source", FINE_SOURCES)


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
    if mode not in COARSE_MODES:
        raise MVCError(f"coarse mixing mode must be one of {', '.join(COARSE_MODES)}, got {mode!r}")
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
    if source not in FINE_SOURCES:
        raise MVCError(f"fine mixing source must be one of {', '.join(FINE_SOURCES)}, got {source!r}")
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
        x, g, k=_need(params, "coarse_k", "coarse"), mode=params.get("coarse_mode", "shuffle"), donor=donor,
        window=window),
    keys=("coarse_mode", "coarse_k", "coarse_stage"), needs_donor=lambda p: p.get("coarse_mode", "shuffle") == "swap",
    stage=_coarse_stage))
MIXING_OPS.register("fine")(MixOp(
    fn=lambda x, params, g, donor, window: fine_mix(
        x, g, m=_need(params, "fine_m", "fine"), s=_need(params, "fine_s", "fine"),
        source=params.get("fine_source", "donor"), contiguous=params.get("fine_contiguous", True), donor=donor,
        window=window),
    keys=("fine_m", "fine_s", "fine_source", "fine_contiguous"),
    needs_donor=lambda p: p.get("fine_source", "donor") == "donor"))


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
    """The op params of a `MixingConfig`, under their config names (each op reads its own keys)."""
    return {"coarse_mode": mixing_cfg.coarse_mode, "coarse_k": int(mixing_cfg.coarse_k),
            "coarse_stage": mixing_cfg.coarse_stage, "fine_m": int(mixing_cfg.fine_m), "fine_s": int(mixing_cfg.fine_s),
            "fine_source": mixing_cfg.fine_source, "fine_contiguous": bool(mixing_cfg.fine_contiguous)}


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


#################################################################################
#                       The mixing plan of a synthetic set                      #
#################################################################################

# per-source spans: the caption's tokens; every prompt token but BOS/EOS; every position but BOS (padding too)
WINDOW_MODES = ("caption", "prompt", "all")


def parse_window(window: Any) -> tuple[int, int] | str:
    """mixing.window: 'caption' / 'prompt' (per-source spans), or a checked fixed [start, end)."""
    if window in WINDOW_MODES:
        return window
    if (isinstance(window, (list, tuple)) and len(window) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in window)):
        return int(window[0]), int(window[1])
    raise MVCError(f"mixing.window must be one of {', '.join(WINDOW_MODES)} or [start, end), got {window!r}")


@dataclass
class ClassPrompts:
    """Per class, computed once: each source's prompt as token ids (T,), mask (T,), embedding (T, D) and
    the window of positions mixing may touch (its caption's tokens, or the fixed `mixing.window`)."""
    sources: list[int]
    ids: dict[int, str]
    captions: dict[int, str]
    tokens: dict[int, torch.Tensor]
    masks: dict[int, torch.Tensor]
    embeds: dict[int, torch.Tensor]
    windows: dict[int, tuple[int, int]]
    caption_windows: bool

    @classmethod
    def build(cls, sources: Sequence[int], ids: Sequence[str], captions: Sequence[str], class_name: str,
              template: str, window: tuple[int, int] | str, tokenizer: Any,
              encode_ids: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> "ClassPrompts":
        """Tokenize and encode each distinct prompt of the class once; `ids`/`captions` align with `sources`.

        `window`: 'caption' (each caption's token span), 'prompt' (each prompt's tokens but BOS and EOS),
        'all' (every position but BOS, padding included) or a fixed (start, end).
        """
        from mvc.diffusion.sd_io import tokenize

        sources = [int(s) for s in sources]
        prompts = {s: make_prompt(template, c, class_name) for s, c in zip(sources, captions)}
        uniq = sorted(set(prompts.values()))
        tok, mask = tokenize(tokenizer, uniq)  # (U, T), (U, T)
        emb = encode_ids(tok, mask)  # (U, T, D)
        row = {s: uniq.index(prompts[s]) for s in sources}
        T = int(emb.shape[1])
        if window == "caption":
            windows = {s: caption_token_span(tokenizer, template, c, class_name) for s, c in zip(sources, captions)}
        elif window == "prompt":  # BOS at 0; the prompt's last token before EOS at mask.sum() - 2
            windows = {s: (1, max(1, int(mask[row[s]].sum()) - 1)) for s in sources}
        elif window == "all":
            windows = {s: (1, T) for s in sources}
        else:
            if not 0 <= window[0] < window[1] <= T:
                raise MVCError(f"mixing.window {list(window)} is not a non-empty range inside the {T} token positions")
            windows = {s: tuple(window) for s in sources}
        return cls(sources, dict(zip(sources, map(str, ids))), dict(zip(sources, captions)),
                   {s: tok[row[s]] for s in sources}, {s: mask[row[s]] for s in sources},
                   {s: emb[row[s]] for s in sources}, windows, window in WINDOW_MODES)


@dataclass
class MixPlan:
    """One image's mixing draw: its generator, params (coarse_k / fine_m fitted to the windows), windows and donor."""
    gen: torch.Generator
    params: dict
    stages: list[str]
    window: tuple[int, int]  # the source's window (fine, and coarse at the 'embeds' stage)
    coarse_window: tuple[int, int]  # where coarse runs at the 'tokens' stage
    donor: int | None
    clamped: bool  # coarse_k or fine_m was lowered to fit a short caption window


def plan_mix(source: int, variant: int, op: str, ctx: ClassPrompts, params: dict, seed: int) -> MixPlan:
    """Draw the donor and fit coarse_k / fine_m to the windows of one image (the first draws of its mixing generator)."""
    mg = seeds.generator(seed, "generate.mixing", source, variant)  # apart from the diffusion noise
    names, stages, p = parse_op(op), op_stages(op, params), dict(params)
    w = ctx.windows[source]
    donor = None
    if op_needs_donor(op, p):
        others = [s for s in ctx.sources if s != source]
        if not others:
            raise MVCError(f"source {ctx.ids[source]!r} is alone in its class, but {op!r} mixing needs a donor: "
                           "set mixing.coarse_mode=shuffle and mixing.fine_source=self (or noise)")
        donor = others[_randint(len(others), mg)]
    if w[1] <= w[0] and op != "none":
        raise MVCError(f"source {ctx.ids[source]!r} has an empty caption; set mixing.window=[start, end) to mix it")
    wc = w
    if "tokens" in stages and p.get("coarse_mode") == "swap" and ctx.caption_windows:
        # a donor token id past the end of the donor's caption would be template text or EOS/padding:
        # swap only where both captions have tokens (same class, same template: the same start)
        dw = ctx.windows[donor]
        wc = (max(w[0], dw[0]), min(w[1], dw[1]))
        if wc[1] <= wc[0]:
            raise MVCError(f"source {ctx.ids[source]!r} and its donor {ctx.ids[donor]!r} share no caption token "
                           f"positions; use mixing.coarse_mode=shuffle or a fixed mixing.window")
    T = int(ctx.embeds[source].shape[0])
    for key, name, win in (("coarse_k", "coarse", wc), ("fine_m", "fine", w)):
        # a size no window can hold, or larger than a window the user fixed, is an error, not a clamp
        if name in names and (p[key] > T or (not ctx.caption_windows and p[key] > win[1] - win[0])):
            raise MVCError(f"{name} mixing: mixing.{key}={p[key]} does not fit the window {list(win)} of "
                           f"{win[1] - win[0]} token positions (the embedding has {T}); lower mixing.{key} or widen "
                           "mixing.window")
    clamped = False
    if "coarse" in names and p["coarse_k"] > wc[1] - wc[0]:
        p["coarse_k"], clamped = wc[1] - wc[0], True
    if "fine" in names and p["fine_m"] > w[1] - w[0]:
        p["fine_m"], clamped = w[1] - w[0], True
    return MixPlan(mg, p, stages, w, wc, donor, clamped)


def mix_prompts(jobs: Sequence[Any], ctx: ClassPrompts, params: dict, seed: int,
                encode_ids: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                ids_to_tokens: Callable[[list[int]], list[str]]) -> tuple[torch.Tensor, list[dict], int]:
    """Mixed prompt embeddings (B, T, D) of images of one class (each with .source, .variant, .op), the
    `op_params` of each (what was drawn), and how many had coarse_k / fine_m lowered.

    Token-stage parts (coarse with coarse_stage='tokens') edit each source's token ids, then ONE
    `encode_ids` call encodes every edited prompt of the batch; embedding-stage parts (fine; coarse at
    'embeds') then edit the embeddings. Unedited prompts reuse the class's cached embeddings.
    """
    plans = [plan_mix(j.source, j.variant, j.op, ctx, params, seed) for j in jobs]
    embeds = [ctx.embeds[j.source][None] for j in jobs]  # each (1, T, D)
    edited: dict[int, torch.Tensor] = {}  # job position -> its edited token ids (1, T)
    for i, (j, pl) in enumerate(zip(jobs, plans)):
        if "tokens" in pl.stages:
            donor = ctx.tokens[pl.donor][None] if pl.donor is not None else None
            edited[i] = apply_mixing(ctx.tokens[j.source][None], j.op, pl.params, pl.gen, donor=donor,
                                     window=pl.coarse_window, stage="tokens")
    if edited:
        rows = list(edited)
        enc = encode_ids(torch.cat([edited[i] for i in rows]), torch.stack([ctx.masks[jobs[i].source] for i in rows]))
        for n, i in enumerate(rows):
            embeds[i] = enc[n:n + 1]
    out = []
    for i, (j, pl) in enumerate(zip(jobs, plans)):
        if "embeds" in pl.stages:
            donor = ctx.embeds[pl.donor][None] if pl.donor is not None else None
            embeds[i] = apply_mixing(embeds[i], j.op, pl.params, pl.gen, donor=donor, window=pl.window, stage="embeds")
        op_p = {**op_params(j.op, pl.params), "window": list(pl.window)}
        if i in edited:
            op_p["coarse_window"] = list(pl.coarse_window)
            w0, w1 = pl.window
            op_p["mixed_tokens"] = ids_to_tokens(edited[i][0, w0:w1].tolist())  # the caption now
        if pl.donor is not None:
            op_p["donor_index"], op_p["donor_id"] = pl.donor, ctx.ids[pl.donor]
        out.append(op_p)
    return torch.cat(embeds), out, sum(pl.clamped for pl in plans)


def check_donors(class_sizes: Sequence[int], class_names: Sequence[str], ops: Sequence[str], params: dict) -> None:
    """Refuse, before any work, donor mixing for a class with a single labelled image (no other caption)."""
    needs = any(op_needs_donor(op, params) for op in ops)
    for n, name in zip(class_sizes, class_names):
        if needs and int(n) == 1:
            raise MVCError(f"class {name!r} has one labelled image, but donor mixing needs two: "
                           f"set mixing.coarse_mode=shuffle and mixing.fine_source=self (or noise)")


#################################################################################
#                        Config rules (mvc.core.registry)                       #
#################################################################################

@config_rule("mixing.window")
def _window(cfg: Any) -> None:
    parse_window(cfg.mixing.window)


@config_rule("mixing.ops")
def _ops(cfg: Any) -> None:
    for op in cfg.mixing.ops:
        op_stages(op, mixing_params(cfg.mixing))
