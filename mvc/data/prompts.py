"""Prompts: a caption joined with a class prompt, and where the caption's tokens sit in the prompt.

The prompt of an image is `prompt_template` filled with its caption and class name (the paper:
"<caption>, a photo of class type <label>"), so a caption that misses the class still names it.

DreamBooth's prompts (`mvc.diffusion.dreambooth`) are a second template, `dreambooth.instance_prompt`, filled with a
concept's rare identifier and its class name ("a photo of zqx Bag"); its class prompt is the same template
without the identifier ("a photo of Bag"), so the two differ by the identifier alone.
"""

from __future__ import annotations

import itertools
import string
from typing import Any, Iterator, Sequence

from mvc.core.registry import config_rule
from mvc.core.utils import MVCError

DEFAULT_TEMPLATE = "{caption}, a photo of class type {label}"
DEFAULT_INSTANCE_TEMPLATE = "a photo of {identifier} {label}"


def validate_template(template: str, fields: tuple[str, ...] = ("caption", "label"),
                      example: str = DEFAULT_TEMPLATE) -> str:
    """Check a prompt template: it must use each of `fields` ({caption} and {label} by default), plainly, and no
    other placeholder; errors suggest `example`."""
    if not isinstance(template, str):
        raise MVCError(f"prompt template must be text, got {template!r}")
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as e:
        raise MVCError(f"prompt template {template!r} is malformed ({e}); use e.g. {example!r}") from None
    used = [f for _, f, _, _ in parts if f is not None]
    allowed = " and ".join("{" + f + "}" for f in fields)
    extra = sorted({f for f in used if f not in fields})
    if extra:
        shown = ", ".join("{" + f + "}" for f in extra)
        raise MVCError(f"prompt template {template!r} has unknown placeholder(s) {shown}; only {allowed} "
                       f"{'is' if len(fields) == 1 else 'are'} allowed")
    fancy = [f for _, f, spec, conv in parts if f is not None and (spec or conv)]
    if fancy:
        raise MVCError(f"prompt template {template!r} formats {{{fancy[0]}}} with a spec or conversion; "
                       f"write plain {allowed}")
    missing = [f for f in fields if f not in used]
    if missing:
        shown = ", ".join("{" + f + "}" for f in missing)
        raise MVCError(f"prompt template {template!r} lacks {shown}; use e.g. {example!r}")
    return template


def make_prompt(template: str, caption: str, label_name: str) -> str:
    """The prompt of one image: `template` filled with its caption and its class name."""
    return validate_template(template).format(caption=caption.strip(), label=label_name)


def class_prompt(template: str, label_name: str) -> str:
    """The template's class prompt alone: the template without its caption and the separators beside it
    ("{caption}, a photo of class type {label}" -> "a photo of class type <label>")."""
    return " ".join(make_prompt(template, "", label_name).split()).strip(" ,;:")


def caption_token_span(tokenizer: Any, prompt_template: str, caption: str, label: str) -> tuple[int, int]:
    """[start, end) token positions of `caption` inside the tokenized prompt (BOS is position 0).

    The caption is located by its characters in the formatted prompt (wherever the template puts
    it), then mapped to tokens with the tokenizer's offsets. A caption cut off by the tokenizer's
    max length gives the part that survives; an empty one gives an empty span (start == end).
    """
    prompt = make_prompt(prompt_template, caption, label)
    caption = caption.strip()
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
        i = prompt.lower().find(caption.lower())
    if i < 0:
        raise MVCError(f"cannot find the caption {caption!r} in the prompt {prompt!r}")
    return i


#################################################################################
#                       DreamBooth: identifiers and prompts                     #
#################################################################################

RARE_LETTERS = "zqxjkvw"  # the least frequent letters of English text: their strings carry little prior meaning


def rare_identifiers() -> Iterator[str]:
    """The default DreamBooth identifiers, always in the same order: strings of distinct rare letters, the
    shortest first ("zqx", "zqj", ..., then four letters). Lowercase ASCII, so any byte-level BPE (CLIP's,
    the tiny tokenizer) encodes each without an unknown token, and no two collide after CLIP's lower-casing."""
    for n in itertools.count(3):
        for letters in itertools.permutations(RARE_LETTERS, n):
            yield "".join(letters)


def validate_identifiers(identifiers: Sequence[str]) -> list[str]:
    """Check DreamBooth identifiers: non-empty words without spaces or braces, distinct even ignoring case
    (CLIP's tokenizer lower-cases its input)."""
    seen: dict[str, str] = {}
    for ident in identifiers:
        if not isinstance(ident, str) or not ident or any(c.isspace() or c in "{}" for c in ident):
            raise MVCError(f"identifier {ident!r} must be one word without spaces or braces, e.g. 'zqx'")
        if ident.lower() in seen:
            raise MVCError(f"identifiers {seen[ident.lower()]!r} and {ident!r} are the same word to CLIP's "
                           "lower-casing tokenizer; give distinct ones")
        seen[ident.lower()] = ident
    return list(identifiers)


def validate_instance_template(template: str) -> str:
    """Check DreamBooth's instance-prompt template: it must use {identifier} and {label}, plainly, and no other."""
    return validate_template(template, ("identifier", "label"), DEFAULT_INSTANCE_TEMPLATE)


def instance_prompt(template: str, identifier: str, label_name: str) -> str:
    """A concept's prompt: the instance template filled with its identifier and class name."""
    return validate_instance_template(template).format(identifier=identifier, label=label_name)


def prior_prompt(template: str, label_name: str) -> str:
    """DreamBooth's class prompt: the instance template without its identifier
    ("a photo of {identifier} {label}" -> "a photo of <label>")."""
    return " ".join(instance_prompt(template, "", label_name).split()).strip(" ,;:")


#################################################################################
#                        Config rules (mvc.core.registry)                       #
#################################################################################

@config_rule("captions.prompt_template")
def _caption_template(cfg: Any) -> None:
    validate_template(cfg.captions.prompt_template)
