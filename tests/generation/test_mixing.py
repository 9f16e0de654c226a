"""Contract of the mixing ops: what changes, what does not, determinism, errors."""

import pytest
import torch

from mvc.core.utils import MVCError
from mvc.data.prompts import caption_token_span
from mvc.generation.mixing import (
    MIXING_OPS,
    apply_mixing,
    coarse_indices,
    coarse_mix,
    fine_mix,
    list_mixing_ops,
    op_params,
    op_stages,
    parse_op,
)

B, T, D = 3, 16, 32


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def x():
    return torch.randn(B, T, D, generator=gen(123))


@pytest.fixture
def donor():
    return torch.randn(B, T, D, generator=gen(456))


def outside_window_equal(a, b, s, e):
    return torch.equal(a[:, :s], b[:, :s]) and torch.equal(a[:, e:], b[:, e:])


#################################################################################
#                                   coarse                                      #
#################################################################################

@pytest.mark.parametrize("mode", ["shuffle", "swap"])
def test_coarse_changes_at_most_k_tokens_inside_window(x, donor, mode):
    x0 = x.clone()
    k, (s, e) = 4, (2, 9)
    y = coarse_mix(x, gen(1), k=k, mode=mode, donor=donor, window=(s, e))
    assert torch.equal(x, x0)  # input untouched
    assert outside_window_equal(x, y, s, e)
    changed_tokens = (y != x).any(-1)  # (B, T)
    assert (changed_tokens.sum(1) <= k).all() and changed_tokens.any(1).all()
    assert int((y != x).sum()) <= B * k * D
    if mode == "swap":  # every changed token is the donor's vector at the same position
        assert torch.equal(y[changed_tokens], donor[changed_tokens])


def test_shuffle_keeps_the_multiset_of_window_vectors(x):
    s, e = 1, 12
    y = coarse_mix(x, gen(3), k=6, window=(s, e))
    for b in range(B):
        a = sorted(map(tuple, x[b, s:e].tolist()))
        c = sorted(map(tuple, y[b, s:e].tolist()))
        assert a == c
    assert not torch.equal(x, y)


def test_shuffle_is_never_the_identity_for_k2(x):
    # with k=2 half of all plain permutations are the identity; every seed must still change something
    for seed in range(20):
        assert not torch.equal(coarse_mix(x, gen(seed), k=2, window=(3, 8)), x)


def test_per_row_windows(x):
    wins = [(1, 3), (5, 9), (10, 16)]
    y = coarse_mix(x, gen(0), k=2, window=wins)
    for b, (s, e) in enumerate(wins):
        assert torch.equal(y[b, :s], x[b, :s]) and torch.equal(y[b, e:], x[b, e:])
        assert not torch.equal(y[b, s:e], x[b, s:e])


#################################################################################
#                          coarse on token ids (stage 'tokens')                 #
#################################################################################

V = 50  # vocabulary of the toy ids


@pytest.fixture
def ids():
    return torch.randint(V, (B, T), generator=gen(77))  # (B, T) token ids


def test_token_shuffle_keeps_window_multiset_and_leaves_other_ids(ids):
    ids0, (s, e) = ids.clone(), (2, 11)
    y = coarse_mix(ids, gen(4), k=5, window=(s, e))
    assert torch.equal(ids, ids0) and y.dtype == ids.dtype and y.shape == ids.shape
    assert outside_window_equal(ids, y, s, e)
    for b in range(B):
        assert sorted(y[b, s:e].tolist()) == sorted(ids[b, s:e].tolist())
        assert int((y[b] != ids[b]).sum()) <= 5
    assert torch.equal(coarse_mix(ids, gen(4), k=5, window=(s, e)), y)  # same seed, same ids
    assert not torch.equal(coarse_mix(ids, gen(5), k=5, window=(s, e)), y)


def test_token_swap_takes_donor_ids_at_the_same_positions(ids):
    donor_ids = ids + V  # disjoint vocabulary: every swapped id is recognisable
    y = coarse_mix(ids, gen(2), k=3, mode="swap", donor=donor_ids, window=(1, 7))
    swapped = y >= V
    assert (swapped.sum(1) == 3).all() and not swapped[:, :1].any() and not swapped[:, 7:].any()
    assert torch.equal(y[swapped], donor_ids[swapped]) and torch.equal(y[~swapped], ids[~swapped])


def test_ids_and_embeddings_share_one_index_draw(ids):
    """Shuffling ids then looking up vectors == looking up then shuffling the vectors (one helper, one draw)."""
    table = torch.randn(V, D, generator=gen(8))  # a token-embedding table
    for mode, donor in (("shuffle", None), ("swap", (ids * 7 + 3) % V)):
        a = table[coarse_mix(ids, gen(6), k=4, mode=mode, donor=donor, window=[(1, 6), (3, 9), (0, 16)])]
        b = coarse_mix(table[ids], gen(6), k=4, mode=mode, donor=None if donor is None else table[donor],
                       window=[(1, 6), (3, 9), (0, 16)])
        assert torch.equal(a, b)
    pairs = coarse_indices(gen(6), 4, [(1, 6)], "shuffle")
    pos, src = pairs[0]
    assert sorted(pos.tolist()) == sorted(src.tolist()) and not torch.equal(pos, src)


def test_staged_mixing_equals_ids_then_encoder_then_embeddings(ids):
    """stage='tokens' runs only coarse (on ids), stage='embeds' only fine; same draws as doing it by hand."""
    table = torch.randn(V, D, generator=gen(8))
    encode = lambda i: torch.cumsum(table[i], 1)  # noqa: E731  (a toy, order-sensitive "text encoder")
    p = dict(coarse_k=3, coarse_mode="shuffle", coarse_stage="tokens", fine_m=2, fine_s=3, fine_source="self")
    assert op_stages("coarse+fine", p) == ["tokens", "embeds"]
    g = gen(12)
    staged = apply_mixing(encode(apply_mixing(ids, "coarse+fine", p, g, window=(1, 9), stage="tokens")),
                          "coarse+fine", p, g, window=(1, 9), stage="embeds")
    g = gen(12)
    by_hand = fine_mix(encode(coarse_mix(ids, g, k=3, window=(1, 9))), g, m=2, s=3, source="self", window=(1, 9))
    assert torch.equal(staged, by_hand)
    assert torch.equal(apply_mixing(ids, "fine", p, gen(0), stage="tokens"), ids)  # nothing at this stage
    # the 'embeds' stage is the old behaviour: coarse runs on the output vectors
    p_old = {**p, "coarse_stage": "embeds"}
    x = encode(ids)
    assert op_stages("coarse", p_old) == ["embeds"]
    assert torch.equal(apply_mixing(x, "coarse", p_old, gen(3), window=(1, 9), stage="embeds"),
                       coarse_mix(x, gen(3), k=3, window=(1, 9)))
    assert op_params("coarse", p) == dict(coarse_mode="shuffle", coarse_k=3, coarse_stage="tokens")


@pytest.mark.parametrize("call", [
    lambda i: op_stages("fine+coarse", dict(coarse_stage="tokens")),  # ids edited after embeddings
    lambda i: op_stages("coarse", dict(coarse_stage="pixels")),
    lambda i: apply_mixing(i, "coarse", dict(coarse_k=2), gen(), stage="latent"),
    lambda i: coarse_mix(i[0], gen(), k=2),  # 1-d
    lambda i: fine_mix(i, gen(), m=2, s=1, source="self"),  # fine needs embeddings, not ids
])
def test_stage_errors_are_one_line(ids, call):
    with pytest.raises(MVCError) as e:
        call(ids)
    assert "\n" not in str(e.value)


#################################################################################
#                                    fine                                       #
#################################################################################

@pytest.mark.parametrize("source", ["donor", "self", "noise"])
@pytest.mark.parametrize("contiguous", [True, False])
def test_fine_changes_at_most_m_times_s_entries(x, donor, source, contiguous):
    x0 = x.clone()
    m, s_dims, (s, e) = 3, 5, (2, 10)
    y = fine_mix(x, gen(7), m=m, s=s_dims, source=source, contiguous=contiguous, donor=donor, window=(s, e))
    assert torch.equal(x, x0)
    assert outside_window_equal(x, y, s, e)
    diff = y != x  # (B, T, D)
    assert (diff.sum((1, 2)) <= m * s_dims).all() and diff.any((1, 2)).all()
    assert ((diff.sum(-1) > 0).sum(1) <= m).all()  # at most m token vectors touched per row
    assert (diff.sum(-1) <= s_dims).all()  # at most s dims per token
    if source == "donor":
        assert torch.equal(y[diff], donor[diff])
    if contiguous:  # the changed dims of each token lie within one run of s dims
        for b, t in (diff.sum(-1) > 0).nonzero().tolist():
            d = diff[b, t].nonzero().flatten()
            assert int(d.max() - d.min()) < s_dims


def test_fine_self_takes_values_from_other_tokens_same_dims(x):
    y = fine_mix(x, gen(11), m=2, s=4, source="self", window=(0, T))
    diff = y != x
    for b, t, d in diff.nonzero().tolist():
        others = torch.cat([x[b, :t, d], x[b, t + 1:, d]])
        assert (others == y[b, t, d]).any()


def test_fine_noise_matches_embedding_statistics():
    # a wide embedding with a large per-dimension offset: noise must follow it, not N(0, 1)
    big = torch.randn(1, 64, 16, generator=gen(1)) * 0.1 + 50.0
    y = fine_mix(big, gen(2), m=32, s=16, source="noise", window=(1, 64))
    new = y[y != big]
    assert new.numel() > 100 and abs(float(new.mean()) - 50.0) < 0.2 and float(new.std()) < 0.5


#################################################################################
#                         dispatch, determinism, errors                         #
#################################################################################

@pytest.mark.parametrize("op", ["coarse", "fine", "coarse+fine"])
@pytest.mark.parametrize("params", [dict(coarse_k=3, coarse_mode="shuffle", fine_m=2, fine_s=3, fine_source="self"),
                                    dict(coarse_k=3, coarse_mode="swap", fine_m=2, fine_s=3, fine_source="donor", fine_contiguous=False),
                                    dict(coarse_k=3, coarse_mode="shuffle", fine_m=2, fine_s=3, fine_source="noise")])
def test_same_seed_same_output_different_seeds_differ(x, donor, op, params):
    a = apply_mixing(x, op, params, gen(5), donor=donor, window=(1, 9))
    b = apply_mixing(x, op, params, gen(5), donor=donor, window=(1, 9))
    c = apply_mixing(x, op, params, gen(6), donor=donor, window=(1, 9))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, x)


def test_none_is_an_unchanged_copy(x):
    y = apply_mixing(x, "none", {}, gen(0))
    assert torch.equal(y, x) and y is not x
    y[0, 0, 0] += 1
    assert not torch.equal(y, x)


def test_composition_is_coarse_then_fine(x, donor):
    p = dict(coarse_k=3, coarse_mode="shuffle", fine_m=2, fine_s=3, fine_source="donor")
    g1, g2 = gen(9), gen(9)
    composed = apply_mixing(x, "coarse+fine", p, g1, donor=donor, window=(1, 9))
    step = fine_mix(coarse_mix(x, g2, k=3, window=(1, 9)), g2, m=2, s=3, source="donor", donor=donor, window=(1, 9))
    assert torch.equal(composed, step)


def test_registry_and_params():
    assert {"none", "coarse", "fine"} <= set(list_mixing_ops()) == set(MIXING_OPS.names())
    assert parse_op("coarse+fine") == ["coarse", "fine"]
    assert op_params("fine", dict(coarse_k=1, coarse_mode="swap", fine_m=2, fine_s=3, fine_source="self", fine_contiguous=True)) == \
        dict(fine_m=2, fine_s=3, fine_source="self", fine_contiguous=True)


@pytest.mark.parametrize("call", [
    lambda x, d: coarse_mix(x, gen(), k=0, window=(1, 5)),
    lambda x, d: coarse_mix(x, gen(), k=5, window=(1, 5)),           # k larger than the window
    lambda x, d: coarse_mix(x, gen(), k=2, window=(5, 5)),           # empty window
    lambda x, d: coarse_mix(x, gen(), k=2, window=(0, T + 1)),       # past the end
    lambda x, d: coarse_mix(x, gen(), k=2, window=(-1, 4)),
    lambda x, d: coarse_mix(x, gen(), k=2, mode="swap", window=(0, 4)),  # no donor
    lambda x, d: coarse_mix(x, gen(), k=2, mode="swap", donor=d[:, :4], window=(0, 4)),  # wrong donor shape
    lambda x, d: fine_mix(x, gen(), m=2, s=0, source="self"),
    lambda x, d: fine_mix(x, gen(), m=2, s=D + 1, source="self"),
    lambda x, d: fine_mix(x, gen(), m=9, s=2, source="self", window=(0, 8)),
    lambda x, d: fine_mix(x, gen(), m=2, s=2, source="bogus"),
    lambda x, d: apply_mixing(x, "blend", {}, gen()),
    lambda x, d: apply_mixing(x, "coarse+", {"coarse_k": 2}, gen()),
    lambda x, d: apply_mixing(x, "coarse", {}, gen()),               # missing k
    lambda x, d: coarse_mix(x, gen(), k=2, window=[(0, 4), (0, 4)]),  # 2 windows for 3 rows
])
def test_bad_arguments_are_one_line_mvc_errors(x, donor, call):
    with pytest.raises(MVCError) as e:
        call(x, donor)
    assert "\n" not in str(e.value)


#################################################################################
#                               caption token span                              #
#################################################################################

@pytest.fixture(scope="module")
def tokenizer():
    from mvc.diffusion.tokenizer import build_tiny_tokenizer

    return build_tiny_tokenizer(["trouser", "ankle", "boot"], max_length=32)


def _tokens(tokenizer, prompt):
    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length)["input_ids"]
    return tokenizer.convert_ids_to_tokens(ids)


@pytest.mark.parametrize("template", ["{caption}, a photo of class type {label}",
                                      "a photo of class type {label} with {caption}",
                                      "{label}: {caption} image"])
def test_caption_span_covers_exactly_the_caption_tokens(tokenizer, template):
    caption, label = "dark small round shape", "ankle boot"
    s, e = caption_token_span(tokenizer, template, caption, label)
    toks = _tokens(tokenizer, template.format(caption=caption, label=label))
    assert [t.replace("</w>", "") for t in toks[s:e]] == caption.split()


def test_caption_span_caption_first_starts_after_bos(tokenizer):
    s, e = caption_token_span(tokenizer, "{caption}, a photo of class type {label}", "bright large", "trouser")
    assert (s, e) == (1, 3)


def test_caption_span_truncated_and_empty(tokenizer):
    long = " ".join(["dark"] * 40)
    s, e = caption_token_span(tokenizer, "{caption}, a photo of class type {label}", long, "trouser")
    assert s == 1 and e == tokenizer.model_max_length - 1  # cut before EOS
    s, e = caption_token_span(tokenizer, "{caption}, a photo of class type {label}", "", "trouser")
    assert s == e


#################################################################################
#                                The mixing plan                                #
#################################################################################

def _ctx(windows, caption_windows=True, T=16):
    """A ClassPrompts of 3 sources with the given caption windows (token ids 0..T-1, random embeddings)."""
    from mvc.generation.mixing import ClassPrompts

    srcs = [0, 1, 2]
    return ClassPrompts(srcs, {s: f"id{s}" for s in srcs}, {s: "c" for s in srcs},
                        {s: torch.arange(T) + 100 * s for s in srcs}, {s: torch.ones(T, dtype=torch.long) for s in srcs},
                        {s: torch.randn(T, 8, generator=gen(s)) for s in srcs}, dict(zip(srcs, windows)), caption_windows)


def test_plan_draws_a_donor_of_the_same_class_never_the_source_and_is_deterministic():
    from mvc.generation.mixing import plan_mix

    ctx = _ctx([(1, 6), (1, 4), (1, 9)])
    params = {"coarse_mode": "swap", "coarse_k": 3, "coarse_stage": "tokens", "fine_m": 2, "fine_s": 2, "fine_source": "donor", "fine_contiguous": True}
    donors = set()
    for v in range(20):
        a, b = plan_mix(0, v, "coarse+fine", ctx, params, seed=7), plan_mix(0, v, "coarse+fine", ctx, params, seed=7)
        assert a.donor == b.donor != 0 and a.donor in ctx.sources
        donors.add(a.donor)
        # a token-stage swap uses only positions where both captions have tokens
        dw = ctx.windows[a.donor]
        assert a.coarse_window == (max(1, dw[0]), min(6, dw[1]))
        assert a.params["coarse_k"] == min(3, a.coarse_window[1] - a.coarse_window[0])  # the effective k is reported
        assert a.clamped == (a.params["coarse_k"] < 3)
    assert donors == {1, 2}  # both other sources are drawn


def test_plan_clamps_to_short_caption_windows_and_refuses_what_cannot_fit():
    from mvc.generation.mixing import plan_mix

    ctx = _ctx([(1, 3), (1, 3), (1, 3)])
    params = {"coarse_mode": "shuffle", "coarse_k": 5, "coarse_stage": "tokens", "fine_m": 4, "fine_s": 2, "fine_source": "self", "fine_contiguous": True}
    p = plan_mix(1, 0, "coarse+fine", ctx, params, seed=0)
    assert p.params["coarse_k"] == 2 and p.params["fine_m"] == 2 and p.clamped and p.donor is None
    fixed = _ctx([(1, 3)] * 3, caption_windows=False)  # a window the user fixed is not silently shrunk
    with pytest.raises(MVCError, match="does not fit the window"):
        plan_mix(1, 0, "coarse", fixed, params, seed=0)
    with pytest.raises(MVCError, match="empty caption"):
        plan_mix(0, 0, "coarse", _ctx([(1, 1)] * 3), params, seed=0)
    lonely = _ctx([(1, 4)] * 3)
    lonely.sources = [0]
    with pytest.raises(MVCError, match="needs a donor"):
        plan_mix(0, 0, "fine", lonely, {**params, "fine_source": "donor"}, seed=0)


def test_window_setting_is_parsed_once():
    from mvc.generation.mixing import parse_window

    assert [parse_window(w) for w in ("caption", "prompt", "all")] == ["caption", "prompt", "all"]
    assert parse_window([2, 9]) == (2, 9)
    for bad in ("everything", [1], [1, 2, 3], [True, 4], ["1", "2"]):
        with pytest.raises(MVCError, match="mixing.window"):
            parse_window(bad)


def test_mix_prompts_encodes_all_token_edits_in_one_call():
    from mvc.generation.mixing import mix_prompts

    ctx = _ctx([(1, 8)] * 3)
    calls = []

    def encode(ids, mask):
        calls.append(ids.shape)
        return ids.float()[..., None].expand(-1, -1, 8) / 1000  # (E, T, 8): a stand-in encoder

    jobs = [type("J", (), {"source": s, "variant": v, "op": op})() for s in (0, 1) for v, op in
            enumerate(["coarse", "fine", "none"])]
    params = {"coarse_mode": "shuffle", "coarse_k": 3, "coarse_stage": "tokens", "fine_m": 2, "fine_s": 2, "fine_source": "self", "fine_contiguous": True}
    emb, op_ps, clamped = mix_prompts(jobs, ctx, params, 0, encode, lambda ids: [str(i) for i in ids])
    assert emb.shape == (6, 16, 8) and clamped == 0
    assert calls == [(2, 16)]  # the two coarse jobs, in one call
    for j, e, p in zip(jobs, emb, op_ps):
        if j.op == "none":
            assert torch.equal(e, ctx.embeds[j.source])
        if j.op == "coarse":
            assert sorted(p["mixed_tokens"]) == sorted(str(i) for i in ctx.tokens[j.source][1:8].tolist())
