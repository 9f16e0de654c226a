"""Clustering-based sampling (the thesis, section 5.1): learn from, and generate from, the most representative
images of each class, one visual concept (cluster) at a time.

Per class of the labelled subset: embed every image (`sampling.embedder`: the base's VAE or a timm model), run
k-means, keep the members closest to each centroid, and keep the coherent clusters (`KeptCluster`; a class never
vanishes). Generation draws its sources from the kept images, MVC fine-tuning pairs within a cluster, and
DreamBooth and textual inversion learn one identifier per cluster (`training_concepts`). The result is cached
per settings in `<run.output_dir>/clusters/<key>.json` (+ a figure). docs/clustering.md gives every step.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mvc.core import seeds
from mvc.core.paths import RunPaths
from mvc.core.registry import config_rule, publish_choices
from mvc.core.utils import MVCError, RunLogger, atomic_write_json, batched, fingerprint, image_grid

log = logging.getLogger(__name__)

METHODS = ("none", "clusters")  # sampling.method
publish_choices("sampling method", METHODS)
BASE_VAE = "base_vae"  # the embedder that is not a timm name
FORMAT = 1  # of the clusters/<key>.json file
N_INIT = 10  # k-means restarts per class (the best inertia wins)
EMBED_BATCH = 64
FIGURE_MEMBERS, THUMB = 20, 32  # members shown per cluster row of the figure, and their size in pixels


#################################################################################
#                                   Concepts                                    #
#################################################################################

@dataclass(frozen=True)
class KeptCluster:
    """One kept cluster of one class: its kept labelled positions, closest to the centroid first."""
    label: int
    cluster: int
    indices: tuple[int, ...]

    @property
    def suffix(self) -> str:
        """Tells the concepts of one class apart in names and identifier tokens: `c0`, `c1`, ..."""
        return f"c{self.cluster}"


@dataclass
class ConceptGroups:
    """The concepts of a labelled subset of `num_images` images, ordered by (label, cluster)."""
    concepts: list[KeptCluster]
    num_images: int
    key: str = ""
    _of: dict[int, KeptCluster] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        self._of = {i: c for c in self.concepts for i in c.indices}

    def kept_indices(self) -> list[int]:
        """Labelled positions of every kept image, ascending."""
        return sorted(self._of)

    def concept_of(self, index: int) -> KeptCluster | None:
        """The concept labelled image `index` belongs to (None: left out)."""
        return self._of.get(int(index))

    def group_ids(self) -> np.ndarray:
        """(num_images,) int64: the cluster id of each kept image, -1 for the others (`build_pairs(groups=)`)."""
        out = np.full(self.num_images, -1, np.int64)
        for c in self.concepts:
            out[list(c.indices)] = c.cluster
        return out

    @classmethod
    def from_record(cls, rec: dict) -> "ConceptGroups":
        """The concepts of a clusters/<key>.json record (`cluster_classes`' rows)."""
        kept: dict[tuple[int, int], list[tuple[float, int]]] = {}
        for im in rec["images"]:
            if im["kept"]:
                kept.setdefault((int(im["label"]), int(im["cluster"])), []).append((float(im["distance"]), int(im["index"])))
        concepts = [KeptCluster(label, k, tuple(i for _, i in sorted(members))) for (label, k), members in sorted(kept.items())]
        return cls(concepts, len(rec["images"]), str(rec.get("key", "")))


def training_concepts(groups: ConceptGroups | None, targets: Sequence[int]) -> list[tuple[int, str, list[int]]]:
    """What a per-concept fine-tuning (DreamBooth, textual inversion) learns: (label, name suffix, labelled
    positions), one entry per concept, in (label, cluster) order.

    With clustering-based sampling, one entry per kept cluster: suffix `c<cluster>` (to tell the concepts of
    a class apart in identifier tokens, e.g. `<Bag-c1>`), its kept images closest first. Without (`groups`
    None), one entry per class present in `targets`: suffix "" and all of its images."""
    if groups is not None:
        return [(c.label, c.suffix, list(c.indices)) for c in groups.concepts]
    t = np.asarray(targets)
    return [(int(c), "", np.flatnonzero(t == c).tolist()) for c in np.unique(t)]


#################################################################################
#                          Clustering (pure, on features)                       #
#################################################################################

def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows of (N, D) scaled to unit norm (float64; a zero row stays zero)."""
    x = np.asarray(x, dtype=np.float64)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def kmeans(features: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn k-means of (n, D) unit features: assignments (n,) int64 and unit centroids (k, D)."""
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=k, n_init=N_INIT, random_state=seed % 2**32).fit(features)
    return km.labels_.astype(np.int64), l2_normalise(km.cluster_centers_)


def n_selected(size: int, keep_fraction: float) -> int:
    """Members a cluster of `size` keeps: ceil(keep_fraction x size), at least 2 (when it has 2)."""
    return min(size, max(2, math.ceil(keep_fraction * size - 1e-9)))  # 1e-9: 0.8 x 5 is 4, not 4.000...01


def cluster_classes(features: np.ndarray, targets: Sequence[int], num_classes: int, k: int, keep_fraction: float,
                    min_coherence: float, max_spread: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Steps 2-4 of the recipe on (N, D) features: (one row per cluster, one row per image).

    A cluster row: label, cluster, size, selected, coherence / spread (of the selected members),
    coherence_all / spread_all (of every member), kept, fallback (kept only so the class does not vanish).
    An image row: index, label, cluster, distance (1 - cosine similarity to the centroid), kept."""
    x = l2_normalise(features)  # (N, D)
    targets = np.asarray(targets, dtype=np.int64)
    clusters: list[dict] = []
    images: list[dict | None] = [None] * len(targets)
    clamped, rescued = [], []
    for c in range(num_classes):
        idx = np.flatnonzero(targets == c)
        if not len(idx):
            continue
        kc = min(int(k), len(idx))
        if kc < k:
            clamped.append(f"class {c} ({len(idx)} images)")
        assign, centroids = kmeans(x[idx], kc, seeds.derive_seed(seed, "sampling.kmeans", c))
        sims = np.einsum("nd,nd->n", x[idx], centroids[assign])  # (n,) cosine similarity to its own centroid
        rows, selected = [], set()
        for j in np.unique(assign):  # a cluster k-means left empty (duplicate points) is absent
            members, s = idx[assign == j], sims[assign == j]
            order = np.argsort(-s, kind="stable")  # closest first
            sel = order[:n_selected(len(members), keep_fraction)]
            selected.update(int(i) for i in members[sel])
            coh, spread = float(s[sel].mean()), float(s[sel].std())
            rows.append({"label": c, "cluster": int(j), "size": len(members), "selected": len(sel),
                         "coherence": coh, "spread": spread, "coherence_all": float(s.mean()),
                         "spread_all": float(s.std()),
                         "kept": len(members) >= 2 and coh >= min_coherence and spread <= max_spread,
                         "fallback": False})
        if not any(r["kept"] for r in rows):  # a class never vanishes: its most coherent cluster, of 2+ if it can
            best = max(rows, key=lambda r: (r["size"] >= 2, r["coherence"]))
            best["kept"] = best["fallback"] = True
            rescued.append(f"class {c} (cluster {best['cluster']}, coherence {best['coherence']:.3f})")
        kept = {r["cluster"] for r in rows if r["kept"]}
        for i, j, s in zip(idx, assign, sims):
            images[i] = {"index": int(i), "label": c, "cluster": int(j), "distance": float(1.0 - s),
                         "kept": int(j) in kept and int(i) in selected}
        clusters.extend(rows)
    if clamped:
        log.warning("sampling.clusters_per_class=%d is more than %d class(es) have images; they get one cluster per "
                    "image: %s", k, len(clamped), ", ".join(clamped[:5]))
    if rescued:
        log.warning("no cluster of %d class(es) reaches sampling.min_coherence=%g / max_spread=%g; keeping the most "
                    "coherent one of each: %s", len(rescued), min_coherence, max_spread, ", ".join(rescued[:5]))
    return clusters, [im for im in images if im is not None]


#################################################################################
#                                   Embedding                                   #
#################################################################################

def check_embedder(name: str) -> None:
    """MVCError unless `name` is `base_vae` or a timm model name."""
    if name == BASE_VAE:
        return
    from mvc.classifier.models import check_backbone

    try:
        check_backbone(name)
    except MVCError:
        raise MVCError(f"config key sampling.embedder: unknown embedder {name!r}; give {BASE_VAE!r} or a timm model "
                       "name (e.g. efficientnet_b0)") from None


def embed_timm(name: str, pretrained: bool, dataset: Any, device: Any = None) -> np.ndarray:
    """Pooled features (N, D) of a timm model, with the preprocessing of its own data config."""
    from mvc.classifier.data import eval_loader, prepared
    from mvc.classifier.models import build_model, extract_features

    if not pretrained:
        log.warning("sampling.embedder=%s without pretrained weights: clustering on a random network's features", name)
    model, meta = build_model(name, 0, pretrained=pretrained, pretrained_key="sampling.pretrained")
    if device is not None:
        model.to(device)
    feats, _ = extract_features(model, eval_loader(prepared(dataset, meta), meta, EMBED_BATCH))
    return feats.numpy()


def embed_vae(vae: Any, dataset: Any, resolution: int, device: Any = None) -> np.ndarray:
    """Flattened VAE posterior means (N, C*h*w) of every image of `dataset` at `resolution` (`mvc.diffusion.sd_io`)."""
    from mvc.diffusion.sd_io import encode_posteriors

    vae = (vae.to(device) if device is not None else vae).eval()
    out = []
    for chunk in batched(range(len(dataset)), EMBED_BATCH):
        mean, _ = encode_posteriors(vae, [dataset.load_image(i) for i in chunk], resolution, EMBED_BATCH)
        out.append(mean.flatten(1).cpu().numpy())  # (B, C*h*w)
    return np.concatenate(out)


def embedder_identity(cfg: Any, base: str | None) -> dict:
    """What the embedding depends on beyond the images: the timm model, or the base's folder (or hub id)."""
    s = cfg.sampling
    if s.embedder != BASE_VAE:
        return {"timm": s.embedder, "pretrained": s.pretrained}
    p = Path(base).expanduser()
    if p.is_dir():
        return {"base": str(p.resolve())}
    return {"base": base, "revision": cfg.model.revision, "variant": cfg.model.variant}


def embed(cfg: Any, dataset: Any, base: str | None, device: Any = None) -> np.ndarray:
    """Step 1: the `sampling.embedder` features (N, D) of `dataset`."""
    s = cfg.sampling
    if s.embedder != BASE_VAE:
        return embed_timm(s.embedder, s.pretrained, dataset, device)
    from mvc.diffusion.models import base_resolution, load_vae

    revision = cfg.model.revision if cfg.model.base != "tiny" else None
    vae = load_vae(base, revision, cfg.model.variant if cfg.model.base != "tiny" else None)
    return embed_vae(vae, dataset, base_resolution(base, revision), device)


#################################################################################
#                              Stage entry, cache                               #
#################################################################################

def sampling_key(cfg: Any, labelled: Any, base: str | None) -> str:
    """The cache key: the `sampling` section, the embedder's identity and the labelled subset."""
    return fingerprint(FORMAT, dataclasses.asdict(cfg.sampling), embedder_identity(cfg, base), labelled.fingerprint())


def concept_groups(cfg: Any, labelled: Any, base: str | None = None, device: Any = None) -> ConceptGroups | None:
    """The concepts of `labelled` under `cfg.sampling` (None when sampling.method=none), from
    `<run.output_dir>/clusters/<key>.json` when it is there, else computed and written (with the figure).

    `base` is the base model's folder or hub id, needed by the `base_vae` embedder (the caller resolves it:
    `mvc.diffusion.inputs.sampling_groups`)."""
    s = cfg.sampling
    if s.method == "none":
        return None
    check_embedder(s.embedder)
    if s.embedder == BASE_VAE and base is None:
        raise ValueError("sampling.embedder=base_vae needs the base model's folder or hub id")
    key = sampling_key(cfg, labelled, base)
    folder = RunPaths.of(cfg).clusters
    path = folder / f"{key}.json"
    rec = _read_record(path, key, len(labelled))
    if rec is None:
        t0 = time.perf_counter()
        features = embed(cfg, labelled, base, device)
        t1 = time.perf_counter()
        clusters, images = cluster_classes(features, labelled.targets, len(labelled.classes), s.clusters_per_class,
                                           s.keep_fraction, s.min_coherence, s.max_spread, s.seed)
        t2 = time.perf_counter()
        for im in images:
            im.update(id=str(labelled.ids[im["index"]]), class_name=labelled.classes[im["label"]])
        rec = {"format": FORMAT, "key": key, "settings": dataclasses.asdict(s), "embedder": embedder_identity(cfg, base),
               "data": labelled.fingerprint(), "classes": list(labelled.classes), "feature_dim": int(features.shape[1]),
               "seconds": {"embed": round(t1 - t0, 3), "cluster": round(t2 - t1, 3)},
               "kept_images": sum(im["kept"] for im in images), "kept_clusters": sum(c["kept"] for c in clusters),
               "clusters": clusters, "images": images}
        atomic_write_json(path, rec)
        write_figure(folder, key, labelled, rec)
    log.info("clustering-based sampling (%s): %d of %d images kept, in %d of %d clusters: %s", s.embedder,
             rec["kept_images"], len(rec["images"]), rec["kept_clusters"], len(rec["clusters"]), path)
    return ConceptGroups.from_record(rec)


def _read_record(path: Path, key: str, num_images: int) -> dict | None:
    """The cached record at `path`, None when it is missing (or unreadable, or not this key's: a warning)."""
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
        ok = rec["format"] == FORMAT and rec["key"] == key and len(rec["images"]) == num_images
    except (OSError, ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        log.warning("%s is not a clusters file of these settings; clustering again", path)
        return None
    return rec


def write_figure(folder: Path, key: str, labelled: Any, rec: dict) -> None:
    """`<key>.png` (and TensorBoard): per class one row per cluster, members closest to the centroid first
    (at most FIGURE_MEMBERS), those left out faded; an empty row between classes."""
    from PIL import Image

    by_cluster: dict[tuple[int, int], list[dict]] = {}
    for im in rec["images"]:
        by_cluster.setdefault((im["label"], im["cluster"]), []).append(im)
    white = Image.new("RGB", (THUMB, THUMB), (255, 255, 255))
    rows: list[list] = []
    prev = None
    for (label, _), members in sorted(by_cluster.items()):
        if prev is not None and label != prev:
            rows.append([])
        prev = label
        row = []
        for im in sorted(members, key=lambda r: r["distance"])[:FIGURE_MEMBERS]:
            thumb = labelled.load_image(im["index"]).convert("RGB").resize((THUMB, THUMB))
            row.append(thumb if im["kept"] else Image.blend(thumb, white, 0.7))
        rows.append(row)
    logger = RunLogger(folder)
    try:
        logger.image(f"clusters/{key}", image_grid(rows), 0, path=folder / f"{key}.png")
    finally:
        logger.close()


#################################################################################
#                        Config rules (mvc.core.registry)                       #
#################################################################################

@config_rule("sampling.embedder", names_keys=True)
def _embedder(cfg: Any) -> None:
    if cfg.sampling.method != "none":  # timm is imported only when clustering is asked for
        check_embedder(cfg.sampling.embedder)
