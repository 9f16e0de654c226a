"""Textual inversion on the micro profile: only the placeholder rows learn, the embeddings load through diffusers'
own API, a resumed run equals an uninterrupted one, a finished result is reused (and one trained otherwise is
refused), the set is in the common format, and bad settings are one line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import generate_mvc
from mvc.core.config import make_config, parse_args
from mvc.core.utils import MVCError, read_jsonl, run_cli
from mvc.diffusion import textual_inversion as ti
from tests.helpers import micro_argv, torchrun_two, write_fashion_idx

ROOT = Path(__file__).resolve().parents[2]

PER_CLASS = 2


@pytest.fixture(scope="module")
def micro(tmp_path_factory, one_thread):
    """Fixture data, the micro tiny base, and one run folder in which generate_mvc.py learned the tokens (4 steps)
    and generated the textual_inversion set."""
    base = tmp_path_factory.mktemp("textinv")
    data = write_fashion_idx(base / "data")
    cache, out = base / "cache", base / "run"
    argv = lambda run, *extra: micro_argv(data, run, cache, f"--generate.per_class={PER_CLASS}",  # noqa: E731
                                          "--generate.method=textual_inversion", *extra)
    summary = generate_mvc.cli(argv(out))
    cfg = parse_args(generate_mvc.build_parser("x"), argv(out))[0]
    from mvc.data import load_splits

    info = ti.read_info(out / "textual_inversion")
    return SimpleNamespace(data=data, cache=cache, out=out, argv=argv, summary=summary, cfg=cfg, info=info,
                           labelled=load_splits(cfg.data)[0], base=info["base"])


def config(micro, run: Path, *extra: str):
    return parse_args(generate_mvc.build_parser("x"), micro.argv(run, *extra))[0]


def train(micro, run: Path, *extra: str, concepts=None) -> Path:
    """Learn (or reuse) the embeddings of the config `extra` in the run folder `run`; returns its folder."""
    return ti.ensure_embeddings(config(micro, run, *extra), micro.labelled, micro.base, 16, concepts, progress=False)


def learned(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / ti.EMBEDS_FILE))


#################################################################################
#                         Only the placeholder rows learn                       #
#################################################################################

def test_only_the_placeholder_rows_change(micro, tmp_path):
    """Training writes no weight: U-Net, VAE and text encoder stay bit-identical, the new rows keep their initial
    value (the initializer's row); the learned vectors moved away from it."""
    from mvc.diffusion.models import load_pipeline_components

    comps = load_pipeline_components(micro.base)
    before = {k: {n: p.clone() for n, p in comps[k].state_dict().items()} for k in ("unet", "vae", "text_encoder")}
    cfg = config(micro, tmp_path)
    concepts = ti.class_concepts(micro.labelled)
    record = ti.trained_on(cfg, micro.labelled, concepts, {"base": micro.base}, 16)
    ti.train_textual_inversion(cfg, comps, micro.labelled, concepts, tmp_path / "ti", record, 16, micro.base,
                               progress=False)
    for k in ("unet", "vae"):
        after = comps[k].state_dict()
        assert all(torch.equal(before[k][n], after[n]) for n in before[k]), k
    name = ti.embedding_name(comps["text_encoder"])
    after = comps["text_encoder"].state_dict()
    assert all(torch.equal(before["text_encoder"][n], after[n]) for n in before["text_encoder"] if n != name)
    old, new = before["text_encoder"][name], after[name]
    assert new.shape[0] == old.shape[0] + len(concepts) and torch.equal(new[:len(old)], old)
    tok = comps["tokenizer"]
    state = learned(tmp_path / "ti")
    for c in concepts:
        row = new[tok.convert_tokens_to_ids(c.token)]
        assert torch.equal(row, old[ti.first_token_id(tok, c.initializer)])  # the initial value, never written
        assert not torch.equal(state[c.token][0], row)  # what training learned


def test_gradients_reach_the_learned_vectors_only(micro):
    """The frozen text encoder gets no gradient; each prompt's vector does, an unused concept's does not."""
    from mvc.diffusion.models import load_pipeline_components
    from mvc.diffusion.sd_io import tokenize

    comps = load_pipeline_components(micro.base)
    te, tok = comps["text_encoder"], comps["tokenizer"]
    te.requires_grad_(False)
    ids = ti.add_placeholders(tok, te, ti.class_concepts(micro.labelled)[:3], 1)
    weight = te.get_input_embeddings().weight
    vectors = weight[ids.flatten()].detach().clone().requires_grad_(True)
    prompt_ids, _ = tokenize(tok, ["a photo of a <mvc-class-0>", "a photo of a <mvc-class-1>"])
    out = ti.encode_learned(te, ti.embedding_name(te), weight, ids.flatten(), vectors, prompt_ids)  # (2, L, D)
    out.sum().backward()
    assert (vectors.grad[:2].abs().sum(1) > 0).all() and not vectors.grad[2].any()
    assert all(p.grad is None for p in te.parameters())


#################################################################################
#                        The saved file, through diffusers                      #
#################################################################################

def test_the_embeddings_load_through_diffusers_load_textual_inversion(micro):
    from safetensors import safe_open

    from mvc.diffusion.inputs import load_base
    from mvc.diffusion.models import base_pipeline

    folder = micro.out / "textual_inversion"
    state = learned(folder)
    assert list(state) == [f"<mvc-class-{c}>" for c in range(10)]
    assert all(v.shape == (1, 16) and v.dtype == torch.float32 for v in state.values())
    with safe_open(str(folder / ti.EMBEDS_FILE), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    pipe = base_pipeline(load_base(micro.cfg, None, micro.out, source=micro.base), "img2img")
    n = len(pipe.tokenizer)
    pipe.load_textual_inversion(list(state.values()), token=list(state))  # diffusers' own API, as documented
    assert len(pipe.tokenizer) == n + 10
    rows = pipe.text_encoder.get_input_embeddings().weight
    for t, v in state.items():
        assert pipe.tokenizer.tokenize(f"a photo of a {t}")[-1] == t  # one token
        assert torch.equal(rows[pipe.tokenizer.convert_tokens_to_ids(t)], v[0])
    with pytest.raises(MVCError, match="cannot load the embeddings"):  # twice: diffusers refuses a known token
        ti.load_learned_embeds(pipe, folder / ti.EMBEDS_FILE)


def test_multi_vector_sets_equal_plain_diffusers_prompts(micro, tmp_path):
    """With 2 vectors per token, our batches (prompts expanded and encoded once per class, posteriors drawn with
    each image's generator) == StableDiffusionImg2ImgPipeline called with the text prompt after
    load_textual_inversion: the recorded prompt is what a user passes."""
    from mvc.data.synthetic import plan_jobs
    from mvc.diffusion import sd_io
    from mvc.generation.generators import make_generator

    cfg = config(micro, tmp_path, "--textual_inversion.num_vectors=2", "--textual_inversion.steps=2",
                 "--generate.num_inference_steps=4")
    gen = make_generator(cfg)
    model = gen.model_path(micro.labelled, progress=False)
    assert learned(Path(model))["<mvc-class-3>"].shape == (2, 16)
    pipe = gen.load(model, None, torch.float32)
    assert pipe.tokenizer.tokenize("a <mvc-class-3>")[-1] == "<mvc-class-3>"
    gen.begin(pipe, model, 16)
    jobs = [j for j in plan_jobs(micro.labelled, ["none"], None, 2) if j.label == 3]
    state = gen.start_class(pipe, micro.labelled, 3, jobs, None, 16)
    gens = lambda: [torch.Generator().manual_seed(7 + i) for i in range(len(jobs))]  # noqa: E731
    ours, fields = gen.render(pipe, state, jobs, 0, gens())
    assert {f["prompt"] for f in fields} == {"a photo of a <mvc-class-3>"} and {f["token"] for f in fields} == {
        "<mvc-class-3>"}
    for i, (j, g) in enumerate(zip(jobs, gens())):
        ref = pipe(prompt=fields[i]["prompt"], image=sd_io.resize(micro.labelled.load_image(j.source), 16),
                   strength=0.5, num_inference_steps=4, guidance_scale=cfg.generate.guidance_scale,
                   generator=[g]).images[0]
        assert np.abs(np.asarray(ours[i], np.int16) - np.asarray(ref, np.int16)).max() <= 1
    ids = sd_io.tokenize(pipe.tokenizer, ["a photo of a <mvc-class-3>"])[0][0].tolist()
    want = pipe.tokenizer.convert_tokens_to_ids(["<mvc-class-3>", "<mvc-class-3>_1"])
    assert ids[5:7] == want  # BOS a photo of a <t> <t>_1 EOS


#################################################################################
#                             Resume, reuse, refusal                            #
#################################################################################

def test_resume_equals_uninterrupted(micro, tmp_path, monkeypatch):
    """Killed after the checkpoint of step 2, then rerun: the same vectors and losses as 4 straight steps; so are
    2 steps, then `steps` raised to 4 (training continues)."""
    import mvc.diffusion.engine as engine

    straight = train(micro, tmp_path / "a")
    real = engine.save_checkpoint

    def crash_after(ckpt_dir, step, *args, **kw):
        real(ckpt_dir, step, *args, **kw)
        if step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(engine, "save_checkpoint", crash_after)
    with pytest.raises(KeyboardInterrupt):
        train(micro, tmp_path / "b")
    monkeypatch.setattr(engine, "save_checkpoint", real)
    assert ti.read_info(tmp_path / "b" / "textual_inversion") is None
    resumed = train(micro, tmp_path / "b")
    train(micro, tmp_path / "c", "--textual_inversion.steps=2")
    grown = train(micro, tmp_path / "c")
    ref = learned(straight)
    for other in (resumed, grown):
        assert all(torch.equal(ref[k], v) for k, v in learned(other).items())
        losses = [r["textual_inversion/loss"] for r in read_jsonl(other / "log.jsonl") if "textual_inversion/loss" in r]
        assert losses == [r["textual_inversion/loss"] for r in read_jsonl(straight / "log.jsonl")
                          if "textual_inversion/loss" in r]
        assert ti.read_info(other)["steps"] == 4
    assert [p.name for p in ti.list_checkpoints(straight / "checkpoints")] == ["checkpoint-00000002.pt",
                                                                                "checkpoint-00000004.pt"]
    assert (straight / "tb").is_dir()


def test_a_finished_result_is_reused_and_one_trained_otherwise_is_refused(micro, monkeypatch, capsys):
    folder = micro.out / "textual_inversion"
    stamp = (folder / ti.EMBEDS_FILE).stat().st_mtime_ns
    monkeypatch.setattr(ti, "train_textual_inversion", lambda *a, **k: pytest.fail("trained again"))
    assert generate_mvc.cli(micro.argv(micro.out))["made"] == 0
    assert (folder / ti.EMBEDS_FILE).stat().st_mtime_ns == stamp
    with pytest.raises(SystemExit):
        run_cli(generate_mvc.cli, micro.argv(micro.out, "--textual_inversion.lr=0.5"))
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "textual_inversion.lr (textual_inversion.lr: 0.01 -> 0.5)" in err
    assert f"delete {folder}" in err
    with pytest.raises(MVCError, match="trained for 4 steps, more than textual_inversion.steps=2"):
        train(micro, micro.out, "--textual_inversion.steps=2")


def test_other_generation_settings_keep_the_embeddings_and_the_set_refuses_them(micro):
    """`textual_inversion.prompt` is a generation setting: the embeddings are reused, the set refuses the rerun."""
    with pytest.raises(MVCError, match="other settings.*prompt_template"):
        generate_mvc.cli(micro.argv(micro.out, "--textual_inversion.prompt=an image of a {token}"))


#################################################################################
#                                The common format                              #
#################################################################################

def test_the_set_is_read_without_special_cases(micro):
    from mvc.classifier.data import prepare_data
    from mvc.classifier.outputs import describe_run
    from mvc.core.paths import RunPaths
    from mvc.data.synthetic import load_synthetic_set, read_records

    where = RunPaths.of(micro.cfg).synthetic
    assert where.name == "synthetic_textual_inversion"
    planned = PER_CLASS * 10
    assert micro.summary["method"] == "textual_inversion" and micro.summary["images"] == planned
    recs = read_records(where, micro.labelled.classes)
    assert len(recs) == planned and len(load_synthetic_set(where, micro.labelled.classes)) == planned
    settings = json.loads((where / "generation.json").read_text())["settings"]
    assert settings["embeddings"] == micro.info["embeddings_fingerprint"]
    assert settings["textual_inversion"]["steps"] == 4 and settings["prompt_template"] == "a photo of a {token}"
    ids = list(micro.labelled.ids)
    for r in recs:
        assert r["method"] == "textual_inversion" and r["token"] == f"<mvc-class-{r['label']}>"
        assert r["prompt"] == f"a photo of a {r['token']}" and r["strength"] == 0.5 and r["denoising_steps"] == 1
        assert r["source_id"] == ids[r["source_index"]] and r["base"] == micro.base
        assert r["embeddings"] == str(micro.out / "textual_inversion" / ti.EMBEDS_FILE)
    cfg = config(micro, micro.out, "--classifier.strategy=concat")
    data = prepare_data(describe_run(cfg, 0))
    assert len(data["synthetic"]) == planned and data["synthetic"].load_image(0).size == (16, 16)


#################################################################################
#                                 Concepts                                      #
#################################################################################

def test_several_concepts_per_class_are_learned_and_used(micro, tmp_path):
    """The concept list a pre-step passes: class 0 split in two tokens, one concept for the others."""
    base = ti.class_concepts(micro.labelled)
    a, b = base[0].indices
    concepts = [ti.PlaceholderConcept(0, "<c0-a>", (a,), "item"), ti.PlaceholderConcept(0, "<c0-b>", (b,), "item"),
                *base[1:]]
    folder = train(micro, tmp_path, "--textual_inversion.steps=2", concepts=concepts)
    info = ti.read_info(folder)
    assert [c["token"] for c in info["concepts"]][:3] == ["<c0-a>", "<c0-b>", "<mvc-class-1>"]
    tokens = ti.source_tokens(info["concepts"], micro.labelled.targets)
    assert tokens[a] == "<c0-a>" and tokens[b] == "<c0-b>" and tokens[2] == "<mvc-class-1>"
    assert ti.source_tokens(info["concepts"][:1], [0, 0])[1] == "<c0-a>"  # a source outside: its class's first
    with pytest.raises(MVCError, match="no concept of class 1"):
        ti.source_tokens(info["concepts"][:1], [0, 1])
    with pytest.raises(MVCError, match="trained on other concepts"):  # other concepts than the stored ones
        train(micro, tmp_path, "--textual_inversion.steps=2")


@pytest.mark.parametrize("concepts, words", [
    ([], "no concept"),
    ([ti.PlaceholderConcept(0, "<x>", (0,), "a"), ti.PlaceholderConcept(1, "<x>", (2,), "a")], "repeat"),
    ([ti.PlaceholderConcept(0, "<x y>", (0,), "a")], "without spaces"),
    ([ti.PlaceholderConcept(0, "<x>", (), "a")], "has no images"),
    ([ti.PlaceholderConcept(0, "<x>", (2,), "a")], "another class"),
    ([ti.PlaceholderConcept(0, "<x>", (99,), "a")], "outside the labelled subset"),
])
def test_bad_concepts_are_one_line(micro, concepts, words):
    with pytest.raises(MVCError, match=words) as e:
        ti.check_concepts(concepts, micro.labelled)
    assert "\n" not in str(e.value)


def test_step_draws_take_the_concepts_in_turn_and_replay():
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    d = ti.draw_concept_rows(5, 4, [2, 1, 3], 8, (4, 2, 2), 1000, g())
    assert d.concept.tolist() == [2, 0, 1, 2]  # rows 20..23 mod 3
    assert (d.image < torch.tensor([2, 1, 3])[d.concept]).all() and (d.image >= 0).all()
    assert d.template.max() < 8 and d.noise.shape == d.eps.shape == (4, 4, 2, 2)
    e = ti.draw_concept_rows(5, 4, [2, 1, 3], 8, (4, 2, 2), 1000, g())
    assert all(torch.equal(getattr(d, f), getattr(e, f)) for f in d.__dataclass_fields__)


#################################################################################
#                                 Bad settings                                  #
#################################################################################

@pytest.mark.parametrize("key, value, words", [
    ("textual_inversion.templates", ["a photo"], ["lacks {token}"]),
    ("textual_inversion.templates", [], ["at least 1"]),
    ("textual_inversion.templates", ["a {token}", "a {token}"], ["repeats"]),
    ("textual_inversion.prompt", "a {label} {token}", ["unknown placeholder", "only {token} is allowed"]),
    ("textual_inversion.prompt", "a {token!r}", ["spec or conversion"]),
    ("textual_inversion.lr", 0, ["> 0"]),
    ("textual_inversion.steps", 0, [">= 1"]),
    ("textual_inversion.num_vectors", 0, [">= 1"]),
    ("textual_inversion.batch_size", 0, [">= 1"]),
    ("textual_inversion.initializer", " ", ["give a word"]),
])
def test_bad_settings_are_one_line_errors(key, value, words):
    with pytest.raises(MVCError) as e:
        make_config(overrides={key: value})
    msg = str(e.value)
    assert key in msg and "\n" not in msg, msg
    assert all(w in msg for w in words), msg


def test_bad_settings_through_the_script_and_at_training(micro, tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_cli(generate_mvc.cli, micro.argv(tmp_path, "--generate.strength=0.05", "--generate.num_inference_steps=10"))
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "no img2img denoising step" in err
    with pytest.raises(MVCError, match="needs more than the tokenizer's 24 tokens"):  # 16 vectors do not fit
        train(micro, tmp_path, "--textual_inversion.num_vectors=16")
    with pytest.raises(MVCError, match="initializer '' has no token"):
        ti.first_token_id(micro_tokenizer(micro), "")


def micro_tokenizer(micro):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(micro.base, subfolder="tokenizer")


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_selects_textual_inversion(path):
    from mvc.core.config import load_yaml
    from mvc.core.paths import RunPaths

    cfg = make_config(load_yaml(path), {"generate.method": "textual_inversion"})
    paths = RunPaths.of(cfg)
    assert paths.synthetic.name == "synthetic_textual_inversion" and paths.textual_inversion.parent == paths.root


def test_an_sd15_structured_base_learns_and_samples(micro, tmp_path):
    """The full profile's path: a StableDiffusion folder with SD-1.5's classes (77-token CLIP text encoder), its
    tokens learned at its native 64 px and sampled by img2img."""
    from mvc.diffusion.standins import save_sd15_structured
    from mvc.generation.generate import generate_synthetic

    base = save_sd15_structured(tmp_path / "sd15")
    cfg = config(micro, tmp_path / "run", f"--model.base={base}", "--textual_inversion.steps=2",
                 "--textual_inversion.batch_size=2", "--generate.per_class=1")
    s = generate_synthetic(cfg, labelled=micro.labelled, progress=False)
    assert s["made"] == 10 and s["resolution"] == 64
    info = ti.read_info(tmp_path / "run" / "textual_inversion")
    assert info["resolution"] == 64 and info["base"] == str(base)
    assert learned(tmp_path / "run" / "textual_inversion")["<mvc-class-0>"].shape == (1, 32)


def test_clustering_based_sampling_learns_one_token_per_kept_cluster(micro, tmp_path):
    """sampling.method=clusters: the concepts are the kept clusters (their own tokens and images), learned in
    their own folder, and each image is made from a kept source with its cluster's token."""
    import re

    from mvc.data.synthetic import read_records

    extra = ("--sampling.method=clusters", "--sampling.clusters_per_class=2", "--textual_inversion.steps=2")
    summary = generate_mvc.cli(micro.argv(tmp_path, *extra))
    info = ti.read_info(tmp_path / "textual_inversion_clusters")
    assert not (tmp_path / "textual_inversion").exists()
    tokens = [c["token"] for c in info["concepts"]]
    assert tokens and all(re.fullmatch(r"<mvc-class-\d+-c\d+>", t) for t in tokens)
    by_source = {i: c["token"] for c in info["concepts"] for i in c["indices"]}
    recs = read_records(tmp_path / "synthetic_textual_inversion_clusters", micro.labelled.classes)
    assert summary["images"] == len(recs) == PER_CLASS * 10
    assert all(r["source_index"] in by_source and r["token"] == by_source[r["source_index"]] for r in recs)


#################################################################################
#                              Several processes                                #
#################################################################################

@pytest.mark.slow
def test_two_processes_learn_what_one_does_and_continue_their_run(micro, tmp_path):
    """generate_mvc.py under torchrun (2 CPU processes, gloo): each process trains its rows of every global batch,
    2 steps, then 4 (continued from the 2-process checkpoint); the vectors and the losses are the one-process
    run's (float summation order apart), and the set is made."""

    r = torchrun_two(Path(__file__).resolve(), str(micro.data), str(micro.cache), str(tmp_path), timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    folder = tmp_path / "textual_inversion"
    ref, got = learned(micro.out / "textual_inversion"), learned(folder)
    assert list(got) == list(ref)
    d = torch.cat([(ref[k] - got[k]).abs().flatten() for k in ref])
    assert d.max().item() < 1e-4, d.max().item()
    loss = lambda f: [r["textual_inversion/loss"] for r in read_jsonl(f / "log.jsonl")  # noqa: E731
                      if "textual_inversion/loss" in r]
    assert len(loss(folder)) == 4 and np.allclose(loss(folder), loss(micro.out / "textual_inversion"), rtol=1e-5)
    assert ti.read_info(folder)["steps"] == 4
    ckpts = ti.list_checkpoints(folder / "checkpoints")
    assert [torch.load(p, weights_only=True)["world_size"] for p in ckpts] == [2, 2]
    assert len(read_jsonl(tmp_path / "synthetic_textual_inversion" / "metadata.jsonl")) == PER_CLASS * 10


def _worker(data: str, cache: str, out: str) -> None:
    """torchrun worker of the test above: 2 steps (every process trains: the generator's `shared_model_path`), then
    generate_mvc.py with 4 steps, which continues them and makes the set."""
    from mvc.core.distributed import make_accelerator
    from mvc.data import load_splits
    from mvc.generation.generators import make_generator

    argv = lambda *extra: micro_argv(Path(data), Path(out), Path(cache), f"--generate.per_class={PER_CLASS}",  # noqa: E731
                                     "--generate.method=textual_inversion", *extra)
    cfg = parse_args(generate_mvc.build_parser("x"), argv("--textual_inversion.steps=2"))[0]
    acc = make_accelerator()
    make_generator(cfg).shared_model_path(load_splits(cfg.data)[0], None, False, acc.device, acc.is_main_process,
                                     acc.wait_for_everyone)
    generate_mvc.cli(argv())


if __name__ == "__main__":
    _worker(*sys.argv[1:4])
