"""The tiny profile's tokenizer: a CLIPTokenizer whose byte-level BPE vocabulary is trained locally.

The vocabulary is trained by `train_bpe` on a small word list (plus the dataset's class names);
ties are broken by text, so the same words always give the same ids in every process.
"""

from __future__ import annotations

import functools
from typing import Iterable

# Words the tokenizer learns whole; anything else falls back to sub-word / byte tokens.
BASE_WORDS = (
    "a an the of and with on in photo image picture class type item object thing "
    "dark bright light dim pale very mid medium gray grey black white "
    "small large big tiny huge wide narrow tall short long thin thick square round "
    "smooth textured plain patterned striped detailed soft sharp flat "
    "symmetric asymmetric balanced lopsided centered left right top bottom upper lower "
    "solid hollow filled outlined edge edges shape shapes"
).split()


def train_bpe(words: Iterable[str], vocab_size: int, suffix: str = "</w>") -> tuple[list[str], list[tuple[str, str]]]:
    """Byte-level BPE trained deterministically on pre-tokenized `words`: (new tokens, merges) in merge order.

    Each step merges the most frequent adjacent pair, ties broken by the pair's text, so the same
    words always give the same vocabulary (HF's BpeTrainer breaks ties by ids that vary between
    processes, which made every tiny base, and the synthetic data after it, differ run to run).
    The last symbol of a word carries `suffix`, as CLIP's vocabulary does.
    """
    from collections import Counter

    counts = Counter(words)
    pieces = {w: [*w[:-1], w[-1] + suffix] for w in counts if w}
    pairs: Counter = Counter()
    for w, sym in pieces.items():
        for ab in zip(sym, sym[1:]):
            pairs[ab] += counts[w]
    tokens, merges = [], []
    while len(tokens) < vocab_size and pairs:
        best = min(pairs, key=lambda ab: (-pairs[ab], ab))
        merged = best[0] + best[1]
        merges.append(best)
        tokens.append(merged)
        for w, sym in pieces.items():
            if best[0] not in sym:
                continue
            i, out = 0, []
            while i < len(sym):
                if i + 1 < len(sym) and (sym[i], sym[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(sym[i])
                    i += 1
            if len(out) < len(sym):  # recount this word's pairs only
                for ab in zip(sym, sym[1:]):
                    pairs[ab] -= counts[w]
                    if pairs[ab] == 0:
                        del pairs[ab]
                for ab in zip(out, out[1:]):
                    pairs[ab] += counts[w]
                pieces[w] = out
    return tokens, merges


@functools.lru_cache(maxsize=16)
def _tiny_vocab(words: tuple[str, ...], vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The tiny tokenizer's vocabulary and merges for `words` (cached: the same words give the same vocab)."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    backend = CLIPTokenizer().backend_tokenizer  # CLIP's normalizer and pre-tokenizer (byte-level mapping)
    pieces = [p for w in words for p, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(w))]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    # every byte is a token, also in its word-final form: any text tokenizes without <unk>
    base = ["<|startoftext|>", "<|endoftext|>", *alphabet, *(ch + "</w>" for ch in alphabet)]
    tokens, merges = train_bpe(pieces, max(0, vocab_size - len(base)))
    vocab: dict[str, int] = {}
    for t in base + tokens:
        vocab.setdefault(t, len(vocab))
    return vocab, merges


def build_tiny_tokenizer(extra_words: Iterable[str] = (), max_length: int = 32, vocab_size: int = 1000):
    """A CLIPTokenizer whose byte-level BPE vocabulary is trained locally on a small word list.

    Every byte is in the vocabulary (also word-final), so any text, class names included, tokenizes
    without <unk>; the same words always give the same ids (`train_bpe` is deterministic).
    """
    from transformers import CLIPTokenizer

    words = tuple(BASE_WORDS) + tuple(w for x in extra_words for w in str(x).lower().split())
    vocab, merges = _tiny_vocab(words, vocab_size)
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=max_length)
