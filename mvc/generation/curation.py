"""Curation: drop the synthetic images a classifier of the labelled subset calls confidently wrong or too easy.

The filters (`FILTERS`, `curation.filters`) set per-class thresholds from the labelled subset alone.
Cross-fitting keeps the scores honest: `curation.folds` classifiers, each trained on the other folds of the
labelled subset, score the real images of their held-out fold, and a synthetic image is scored by the classifier
that never saw its source. The evaluation-only reference never curates, and the test split is never read.
docs/evaluation.md describes each filter.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from mvc.core.registry import publish_choices
from mvc.core.utils import MVCError

log = logging.getLogger(__name__)

FILTERS = ("wrong", "easy", "semantic")
publish_choices("curation filter", FILTERS)
NEGATIVES = ("a blurry image", "an image of noise", "a distorted, corrupted picture", "a blank image")


#################################################################################
#                          Thresholds (pure functions)                          #
#################################################################################

def cosine_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine distance 1 - cos(a_i, b_i) of two (N, D) arrays: (N,)."""
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return 1.0 - (a * b).sum(axis=1)


def nearest_other_distance(feats: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Each image's cosine distance to the nearest other image of its class (N,); inf when it is alone."""
    f = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
    out = np.full(len(f), np.inf)
    for c in np.unique(targets):
        rows = np.flatnonzero(targets == c)
        if len(rows) < 2:
            continue
        d = 1.0 - f[rows] @ f[rows].T  # (n, n)
        np.fill_diagonal(d, np.inf)
        out[rows] = d.min(axis=1)
    return out


def _class_quantile(values: np.ndarray, mask: np.ndarray, q: float, fallback: float) -> float:
    """The q-quantile of `values[mask]`, `fallback` when the mask selects nothing finite."""
    v = values[mask]
    v = v[np.isfinite(v)]
    return float(np.quantile(v, q)) if len(v) else fallback


@dataclass
class Thresholds:
    """Per-class thresholds (C,) fitted on the labelled subset's out-of-fold scores."""
    wrong: np.ndarray      # drop an image assigned to class c' != its label with p(c') above wrong[c']
    easy_conf: np.ndarray  # an image of class c is confidently right with p(c) above easy_conf[c] ...
    copy_dist: np.ndarray  # ... and a near copy with a distance to its source below copy_dist[c]
    semantic: np.ndarray | None = None  # drop an image of class c whose semantic score is below semantic[c]

    def to_dict(self) -> dict:
        """JSON-ready lists."""
        return {k: (None if v is None else [float(x) for x in v]) for k, v in self.__dict__.items()}


def fit_thresholds(probs: np.ndarray, feats: np.ndarray, targets: np.ndarray, num_classes: int,
                   wrong_q: float, easy_q: float, copy_q: float, semantic: np.ndarray | None = None,
                   semantic_q: float = 0.1) -> Thresholds:
    """Per-class thresholds from out-of-fold probabilities (N, C), features (N, D) and labels (N,) of the labelled
    images (and their semantic scores (N,) when given). A class the selector never got right keeps the strictest
    wrong-threshold (1.0: nothing is dropped as confidently that class)."""
    targets = np.asarray(targets)
    pred, own = probs.argmax(1), probs[np.arange(len(probs)), targets]
    nn = nearest_other_distance(feats, targets)
    wrong = np.array([_class_quantile(own, (targets == c) & (pred == c), wrong_q, 1.0) for c in range(num_classes)])
    easy = np.array([_class_quantile(own, targets == c, easy_q, 1.0) for c in range(num_classes)])
    copy = np.array([_class_quantile(nn, targets == c, copy_q, 0.0) for c in range(num_classes)])
    sem = None
    if semantic is not None:
        sem = np.array([_class_quantile(np.asarray(semantic), targets == c, semantic_q, 0.0)
                        for c in range(num_classes)])
    return Thresholds(wrong, easy, copy, sem)


def decide(probs: np.ndarray, labels: np.ndarray, to_source: np.ndarray, th: Thresholds, filters: Sequence[str],
           semantic: np.ndarray | None = None) -> list[str | None]:
    """The reason each image (rows of probs (N, C), labels (N,), distances to their sources (N,)) is dropped, None
    when it is kept; the filters apply in the order wrong, semantic, easy."""
    out: list[str | None] = []
    for i, y in enumerate(np.asarray(labels)):
        p = probs[i]
        c = int(p.argmax())
        if "wrong" in filters and c != y and p[c] > th.wrong[c]:
            out.append("wrong")
        elif "semantic" in filters and semantic is not None and th.semantic is not None and semantic[i] < th.semantic[y]:
            out.append("semantic")
        elif "easy" in filters and c == y and p[y] > th.easy_conf[y] and to_source[i] < th.copy_dist[y]:
            out.append("easy")
        else:
            out.append(None)
    return out


#################################################################################
#                          Equal budgets (pure functions)                       #
#################################################################################

def next_targets(planned: dict[int, int], candidates: dict[int, int], kept: dict[int, int],
                 max_factor: float) -> dict[int, int]:
    """Candidates to plan per class for the next round: enough to reach `planned` at the keep rate measured so
    far (at least one more candidate), never more than planned x max_factor; a class at its count keeps its plan."""
    out = {}
    for c, n in planned.items():
        made, ok = candidates.get(c, 0), kept.get(c, 0)
        cap = int(np.ceil(n * max_factor))
        if ok >= n or made >= cap:
            out[c] = made if made else n
            continue
        rate = max(ok / made, 1.0 / max_factor) if made else 1.0
        out[c] = min(cap, max(made + 1, made + int(np.ceil((n - ok) / rate))))
    return out


def first_kept(records: Sequence[dict], planned: dict[int, int]) -> tuple[set[str], set[str]]:
    """(files kept, files dropped as surplus) of the kept records: per class the first `planned` by variant, then
    source (every source's first variant before any second one, so a class keeps its sources' spread)."""
    keep, surplus = set(), set()
    taken: dict[int, int] = {}
    order = sorted(records, key=lambda r: (int(r["label"]), int(r["variant"]), int(r["source_index"])))
    for r in order:
        c = int(r["label"])
        if taken.get(c, 0) < planned.get(c, 0):
            keep.add(r["file"])
            taken[c] = taken.get(c, 0) + 1
        else:
            surplus.add(r["file"])
    return keep, surplus


#################################################################################
#                     Selectors: cross-fitted labelled-subset classifiers        #
#################################################################################

def selector_config(cfg: Any) -> Any:
    """The classifier runs of the selectors: the `real` strategy (labelled images alone) in curation.folds folds,
    seed curation.seed, written under <run.output_dir>/curation/ (the config's classifier recipe otherwise)."""
    import copy
    import dataclasses

    from mvc.core.paths import RunPaths

    c = copy.deepcopy(cfg)
    c.run.output_dir = str(RunPaths.of(cfg).root / "curation")
    c.classifier = dataclasses.replace(c.classifier, strategy="real", kfold=cfg.curation.folds,
                                       seeds=[cfg.curation.seed], results_csv=None, val_fraction=0.0,
                                       synthetic_dir=None, run_tag=None)
    return c


def selector_runs(cfg: Any) -> list:
    """The selectors' classifier runs (`RunSpec`s), one per fold of `curation.folds`."""
    from mvc.classifier.outputs import describe_run
    from mvc.core.paths import RunPaths

    scfg = selector_config(cfg)
    paths = RunPaths.of(scfg)
    return [describe_run(scfg, cfg.curation.seed, fold, paths) for fold in range(cfg.curation.folds)]


@torch.no_grad()
def score(bundle: Any, images: Sequence, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities (N, C) and pooled features (N, D) of PIL images under a classifier bundle."""
    model = bundle.model
    device = next(model.parameters()).device
    probs, feats = [], []
    for i in range(0, len(images), batch_size):
        x = torch.stack([bundle.preprocess(im) for im in images[i:i + batch_size]]).to(device)  # (B, 3, S, S)
        f = model.forward_head(model.forward_features(x), pre_logits=True)  # (B, D)
        probs.append(torch.softmax(model.get_classifier()(f).float(), dim=1).cpu())
        feats.append(f.float().cpu())
    if not probs:
        return np.zeros((0, len(bundle.classes)), np.float32), np.zeros((0, 0), np.float32)
    return torch.cat(probs).numpy(), torch.cat(feats).numpy()


@dataclass
class Selectors:
    """The cross-fitted selectors and the labelled subset's out-of-fold scores (rows in labelled order)."""
    bundles: list          # one ClassifierBundle per fold
    fold_of: dict[str, int]  # labelled image id -> the fold that held it out
    probs: np.ndarray      # (N, C) out-of-fold probabilities
    feats: np.ndarray      # (N, D) out-of-fold features
    row_of: dict[str, int]  # labelled image id -> row


def train_selectors(cfg: Any, accelerator: Any, splits: Any = None) -> None:
    """The curation stage: train the folds' selectors that are not finished yet (classifier runs: checkpointed, an
    interrupted one resumes). They see the labelled subset only: the test split is never read for them."""
    from mvc.classifier.train import run_classifier
    from mvc.core.checkpoint import list_checkpoints

    runs = selector_runs(cfg)
    if splits is None:
        from mvc.data import load_splits

        with accelerator.main_process_first():
            splits = load_splits(cfg.data)
    for run in runs:
        if (run.run_dir / "metrics.json").is_file():
            continue
        resume = "latest" if list_checkpoints(run.ckpt_dir) else None
        run_classifier(run, accelerator, splits, resume=resume)


def load_selectors(cfg: Any, labelled: Any, device: Any = None) -> Selectors:
    """The trained selectors, and each labelled image scored by the one that held it out."""
    from mvc.classifier.data import kfold_splits
    from mvc.classifier.predict import load_classifier

    runs = selector_runs(cfg)
    folds = kfold_splits(labelled.targets, cfg.curation.folds, cfg.data.subset_seed)
    bundles, fold_of = [], {}
    probs = np.zeros((len(labelled), len(labelled.classes)), np.float32)
    feats = None
    for k, (_train, held) in enumerate(folds):
        run = runs[k].run_dir
        if not (run / "metrics.json").is_file():
            raise MVCError(f"curation selector {k} is not trained ({run}); run the curation stage first")
        b = load_classifier(run)
        if b.kind == "reference":  # never: the selectors are classifier runs of the labelled subset
            raise MVCError(f"{run} is the evaluation-only reference, which never curates")
        if device is not None:
            b.model.to(device)
        bundles.append(b)
        p, f = score(b, [labelled.load_image(int(i)) for i in held])
        feats = np.zeros((len(labelled), f.shape[1]), np.float32) if feats is None else feats
        probs[held], feats[held] = p, f
        fold_of.update({str(labelled.ids[int(i)]): k for i in held})
    return Selectors(bundles, fold_of, probs, feats, {str(i): r for r, i in enumerate(labelled.ids)})


#################################################################################
#                   Semantic filter: a CLIP-style image-text match               #
#################################################################################

def _projected(out: Any) -> torch.Tensor:
    """CLIP's projected embeddings (B, E): transformers 5 returns them as the output's pooler_output, older
    versions as the tensor itself."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


class SemanticScorer:
    """p(class prompt | image) against generic negatives, by a CLIP model (transformers' CLIPModel)."""

    def __init__(self, model: Any, tokenizer: Any, device: Any = None):
        self.model = model.eval().to(device) if device is not None else model.eval()
        self.tokenizer = tokenizer
        self.size = int(model.config.vision_config.image_size)

    @classmethod
    def from_pretrained(cls, name: str, device: Any = None) -> "SemanticScorer":
        """A hub id or local folder (offline when HF_HUB_OFFLINE is set; no remote code)."""
        from transformers import CLIPModel, CLIPTokenizer

        try:
            return cls(CLIPModel.from_pretrained(name), CLIPTokenizer.from_pretrained(name), device)
        except OSError as e:
            raise MVCError(f"curation.clip_model {name!r} cannot be loaded ({type(e).__name__}); give a local CLIP "
                           "folder, or drop 'semantic' from curation.filters") from None

    def _pixels(self, images: Sequence) -> torch.Tensor:
        """CLIP's input: RGB resized (bicubic) to its size, normalised: (B, 3, S, S)."""
        from PIL import Image

        arr = np.stack([np.asarray(im.convert("RGB").resize((self.size, self.size), Image.BICUBIC), np.float32) / 255
                        for im in images])  # (B, S, S, 3)
        x = (torch.from_numpy(arr) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
        return x.permute(0, 3, 1, 2).contiguous()

    @torch.no_grad()
    def __call__(self, images: Sequence, prompts: Sequence[str], labels: Sequence[int]) -> np.ndarray:
        """(N,) p(prompts[labels[i]] | image i) among [that prompt, *NEGATIVES] (softmax of CLIP's logits)."""
        if not len(images):
            return np.zeros(0, np.float32)
        device = next(self.model.parameters()).device
        texts = list(prompts) + list(NEGATIVES)
        tok = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(device)
        t = _projected(self.model.get_text_features(**tok))
        t = t / t.norm(dim=-1, keepdim=True)  # (P + G, E)
        i = _projected(self.model.get_image_features(pixel_values=self._pixels(images).to(device)))
        i = i / i.norm(dim=-1, keepdim=True)  # (N, E)
        logits = self.model.logit_scale.exp() * i @ t.T  # (N, P + G)
        neg = logits[:, len(prompts):]  # (N, G)
        own = logits[torch.arange(len(images)), torch.as_tensor(list(labels), device=device)][:, None]  # (N, 1)
        return torch.softmax(torch.cat([own, neg], dim=1).float(), dim=1)[:, 0].cpu().numpy()


#################################################################################
#                      The curator: one decision per synthetic image            #
#################################################################################

TARGETS_FILE = "curation_targets.json"


def read_targets(root: Path, planned: dict[int, int]) -> dict[int, int]:
    """The candidates planned per class by an earlier run of this set (never fewer than `planned`)."""
    path = Path(root) / TARGETS_FILE
    try:
        rec = json.loads(path.read_text()) if path.is_file() else {}
        saved = {int(c): int(n) for c, n in rec.items()}
    except (ValueError, TypeError, AttributeError):
        raise MVCError(f"{path} is not a curation plan; delete it (its candidates are then made again)") from None
    return {c: max(n, saved.get(c, 0)) for c, n in planned.items()}


def write_targets(root: Path, targets: dict[int, int]) -> None:
    """Record the candidates planned per class (atomically), so a resumed run starts from this plan."""
    from mvc.core.utils import atomic_write_json

    atomic_write_json(Path(root) / TARGETS_FILE, {str(c): int(n) for c, n in targets.items()})


class Curator:
    """Judges each synthetic image with the cross-fitted selectors (and a semantic scorer) against the per-class
    thresholds fitted on the labelled subset; records why an image is dropped."""

    def __init__(self, cfg: Any, labelled: Any, selectors: Selectors, semantic: SemanticScorer | None = None):
        from mvc.data.prompts import class_prompt

        cu = cfg.curation
        self.filters, self.sel, self.semantic = list(cu.filters), selectors, semantic
        self.prompts = [class_prompt(cfg.captions.prompt_template, name) for name in labelled.classes]
        real_sem = None
        if semantic is not None:
            real_sem = semantic([labelled.load_image(i) for i in range(len(labelled))], self.prompts,
                                list(labelled.targets))
        self.th = fit_thresholds(selectors.probs, selectors.feats, np.asarray(labelled.targets),
                                 len(labelled.classes), cu.wrong_quantile, cu.easy_quantile, cu.copy_quantile,
                                 real_sem, cu.semantic_quantile)

    def _scores(self, images: Sequence, jobs: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities (N, C) by the selector that never saw each image's source (all folds averaged for an image
        without a labelled source), and the cosine distance to the source (N,; inf without one)."""
        n = len(images)
        probs = np.zeros((n, self.sel.probs.shape[1]), np.float32)
        dist = np.full(n, np.inf)
        folds = [self.sel.fold_of.get(str(j.source_id)) for j in jobs]
        for k, bundle in enumerate(self.sel.bundles):
            rows = [i for i, f in enumerate(folds) if f == k]
            free = [i for i, f in enumerate(folds) if f is None]
            if rows:
                p, f = score(bundle, [images[i] for i in rows])
                probs[rows] = p
                src = self.sel.feats[[self.sel.row_of[str(jobs[i].source_id)] for i in rows]]
                dist[rows] = cosine_distance(f, src)
            if free:
                probs[free] += score(bundle, [images[i] for i in free])[0] / len(self.sel.bundles)
        return probs, dist

    def judge(self, images: Sequence, jobs: Sequence[Any], records: list[dict]) -> list[bool]:
        """Keep (True) or drop each image of a batch; its scores and, when dropped, the reason go in its record."""
        probs, dist = self._scores(images, jobs)
        labels = np.array([j.label for j in jobs])
        sem = self.semantic(images, self.prompts, labels) if self.semantic is not None else None
        reasons = decide(probs, labels, dist, self.th, self.filters, sem)
        for i, rec in enumerate(records):
            c = int(probs[i].argmax())
            rec.update({"curation": reasons[i], "selector_p_label": round(float(probs[i, labels[i]]), 5),
                        "selector_pred": c, "selector_p_pred": round(float(probs[i, c]), 5),
                        "to_source": round(float(dist[i]), 5) if np.isfinite(dist[i]) else None})
            if sem is not None:
                rec["semantic"] = round(float(sem[i]), 5)
        return [r is None for r in reasons]

    def summary(self, root: Path, classes: Sequence[str]) -> dict:
        """What was kept and dropped, by reason and class, and the thresholds (for the set's summary)."""
        from mvc.core.utils import read_jsonl

        dropped = read_jsonl(Path(root) / "rejected.jsonl")
        by = {}
        for r in dropped:
            reason = r.get("curation") or "filter"
            by.setdefault(reason, [0] * len(classes))[int(r["label"])] += 1
        return {"filters": self.filters, "dropped": by, "thresholds": self.th.to_dict()}


def build_curator(cfg: Any, labelled: Any, device: Any = None) -> Curator:
    """The curator of the config: its trained selectors, and CLIP for the semantic filter."""
    semantic = None
    if "semantic" in cfg.curation.filters:
        semantic = SemanticScorer.from_pretrained(cfg.curation.clip_model, device)
    return Curator(cfg, labelled, load_selectors(cfg, labelled, device), semantic)
