"""The miniature full-profile run's two ends (tests/smoke/run.sh runs the stages in between).

    python -m tests.smoke.harness prepare DATASET WORKDIR           # prints the overrides, one per line
    python -m tests.smoke.harness summary DATASET WORKDIR OVERRIDE...  # one JSON summary; exit 1 if a check fails

`prepare` writes, under WORKDIR, fixture images in DATASET's real on-disk layout (data/), stand-ins of the hub
models (models/), a hub cache with random timm weights and accelerate's config (hf/); the overrides change scale
and sources only. `summary` checks that the generated images have the fine-tuning resolution and that every
classifier run of a comparison took the same optimizer steps. docs/scripts.md has the details.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]

DATASETS = ("cifar10", "cifar100", "caltech101", "brain_tumor", "tiny_imagenet")
CIFAR10 = "airplane automobile bird cat deer dog frog horse ship truck".split()
CIFAR100 = ("apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel "
            "can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur "
            "dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion "
            "lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree "
            "pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea "
            "seal shark shrew skunk skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table "
            "tank telephone television tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman "
            "worm").split()
CIFAR100_COARSE = 20
CALTECH = ["Faces", "Leopards", "accordion", "airplanes", "anchor", "ant"]
BRAIN = {"glioma": "gl", "meningioma": "me", "notumor": "no", "pituitary": "pi"}
# Tiny ImageNet: wnid -> its words.txt line (wnids.txt, unsorted as released, lists these in this order)
TINY_IMAGENET = {"n02124075": "Egyptian cat", "n01443537": "goldfish, Carassius auratus",
                 "n04067472": "reel", "n07873807": "pizza, pizza pie",
                 "n01629819": "European fire salamander, Salamandra salamandra",
                 "n02814533": "beach wagon, station wagon, wagon, estate car, beach waggon, station waggon, waggon"}

# Scale of the fixtures: images per class (CIFAR-100 needs 2 per class for pairs; 100 classes keep it large)
PER_CLASS = {"cifar10": (4, 2), "cifar100": (2, 1), "caltech101": (5, 0), "brain_tumor": (4, 2), "tiny_imagenet": (4, 2)}


#################################################################################
#                                Fixture data                                   #
#################################################################################

def picture(c: int, n_classes: int, h: int, w: int, rng: np.random.Generator, gray: bool = False) -> np.ndarray:
    """(h, w, 3) uint8: a class-coloured background and a bright ellipse at a random place, plus noise."""
    hue = np.array([np.sin(2 * np.pi * (c / n_classes + k / 3)) for k in range(3)]) * 0.5 + 0.5
    img = np.ones((h, w, 3)) * (40 + 120 * hue)
    yy, xx = np.mgrid[:h, :w]
    cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
    ry, rx = rng.uniform(0.15, 0.35) * h, rng.uniform(0.15, 0.35) * w
    img[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1] = 200 + 50 * hue
    img += rng.normal(0, 12, img.shape)
    if gray:
        img = img.mean(axis=2, keepdims=True).repeat(3, axis=2)
    return np.clip(img, 0, 255).astype(np.uint8)


def _pickle_py2(path: Path, obj: dict) -> None:
    """A CIFAR python batch as the originals are: a protocol-2 pickle with bytes keys (written by Python 2)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump({k.encode(): v for k, v in obj.items()}, f, protocol=2)


def _cifar_rows(labels: list[int], n_classes: int, rng: np.random.Generator) -> np.ndarray:
    """(N, 3072) uint8 rows, channel-major (R plane, G plane, B plane), as the CIFAR batches store them."""
    return np.stack([picture(c, n_classes, 32, 32, rng).transpose(2, 0, 1).reshape(-1) for c in labels])


def write_cifar10(root: Path, train: int, test: int, rng: np.random.Generator) -> list[str]:
    """cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta} (torchvision's python layout)."""
    base = root / "cifar-10-batches-py"
    _pickle_py2(base / "batches.meta", {"label_names": [c.encode() for c in CIFAR10], "num_cases_per_batch": 10000,
                                        "num_vis": 3072})
    labels = [c for c in range(10) for _ in range(train)]
    rng.shuffle(labels)
    for b, part in enumerate(np.array_split(np.array(labels), 5), start=1):
        _pickle_py2(base / f"data_batch_{b}", {
            "batch_label": f"training batch {b} of 5".encode(), "labels": [int(x) for x in part],
            "data": _cifar_rows(list(part), 10, rng), "filenames": [f"img_{b}_{i}.png".encode() for i in range(len(part))]})
    tl = [c for c in range(10) for _ in range(test)]
    _pickle_py2(base / "test_batch", {"batch_label": b"testing batch 1 of 1", "labels": tl,
                                      "data": _cifar_rows(tl, 10, rng),
                                      "filenames": [f"test_{i}.png".encode() for i in range(len(tl))]})
    return CIFAR10


def write_cifar100(root: Path, train: int, test: int, rng: np.random.Generator) -> list[str]:
    """cifar-100-python/{train, test, meta} with fine and coarse labels."""
    base = root / "cifar-100-python"
    _pickle_py2(base / "meta", {"fine_label_names": [c.encode() for c in CIFAR100],
                                "coarse_label_names": [f"superclass_{i}".encode() for i in range(CIFAR100_COARSE)]})
    for split, per in (("train", train), ("test", test)):
        fine = [c for c in range(100) for _ in range(per)]
        _pickle_py2(base / split, {"batch_label": f"{split}ing batch 1 of 1".encode(), "fine_labels": fine,
                                   "coarse_labels": [c % CIFAR100_COARSE for c in fine],
                                   "data": _cifar_rows(fine, 100, rng),
                                   "filenames": [f"{split}_{i}.png".encode() for i in range(len(fine))]})
    return CIFAR100


def write_caltech101(root: Path, per: int, _test: int, rng: np.random.Generator) -> list[str]:
    """caltech101/101_ObjectCategories/<class>/image_XXXX.jpg of varying sizes (some grey, as in the
    original), plus the BACKGROUND_Google folder the dataset ignores. The test split is drawn from these."""
    from PIL import Image

    base = root / "caltech101" / "101_ObjectCategories"
    for c, name in enumerate([*CALTECH, "BACKGROUND_Google"]):
        (base / name).mkdir(parents=True, exist_ok=True)
        for i in range(per if name != "BACKGROUND_Google" else 3):
            h, w = int(rng.integers(48, 80)), int(rng.integers(56, 96))
            arr = picture(c, len(CALTECH), h, w, rng, gray=(i == 0))
            im = Image.fromarray(arr).convert("L") if i == 0 else Image.fromarray(arr)
            im.save(base / name / f"image_{i + 1:04d}.jpg", quality=90)
    return CALTECH


def write_brain_tumor(root: Path, train: int, test: int, rng: np.random.Generator) -> list[str]:
    """brain_tumor/{Training,Testing}/<class>/{Tr,Te}-<xx>_<NNNN>.jpg, grey MRI-like JPEGs (Kaggle's layout)."""
    from PIL import Image

    for split, prefix, per in (("Training", "Tr", train), ("Testing", "Te", test)):
        for c, (name, short) in enumerate(BRAIN.items()):
            d = root / "brain_tumor" / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per):
                size = int(rng.integers(56, 80))
                Image.fromarray(picture(c, len(BRAIN), size, size, rng, gray=True)).save(
                    d / f"{prefix}-{short}_{i + 10:04d}.jpg", quality=90)
    return list(BRAIN)


def write_tiny_imagenet(root: Path, train: int, test: int, rng: np.random.Generator) -> list[str]:
    """tiny-imagenet-200/ as released: wnids.txt, words.txt (with lines of other wnids, as the original's 82,115),
    64x64 JPEGs in train/<wnid>/images/ with their <wnid>_boxes.txt, val/images/ labelled by val_annotations.txt,
    and an unlabelled test/images/. Returns the class names the dataset reads (first synonyms)."""
    from PIL import Image

    base = root / "tiny-imagenet-200"
    wnids = list(TINY_IMAGENET)
    base.mkdir(parents=True, exist_ok=True)
    (base / "wnids.txt").write_text("".join(f"{w}\n" for w in wnids))
    words = {**TINY_IMAGENET, "n00001740": "entity", "n09999999": "not a class of this set"}
    (base / "words.txt").write_text("".join(f"{w}\t{n}\n" for w, n in sorted(words.items())))
    box = lambda: "\t".join(str(int(v)) for v in (*rng.integers(0, 20, 2), *rng.integers(44, 64, 2)))  # noqa: E731
    for c, w in enumerate(wnids):
        (base / "train" / w / "images").mkdir(parents=True, exist_ok=True)
        lines = []
        for i in range(train):
            Image.fromarray(picture(c, len(wnids), 64, 64, rng)).save(base / "train" / w / "images" / f"{w}_{i}.JPEG")
            lines.append(f"{w}_{i}.JPEG\t{box()}\n")
        (base / "train" / w / f"{w}_boxes.txt").write_text("".join(lines))
    (base / "val" / "images").mkdir(parents=True, exist_ok=True)
    (base / "test" / "images").mkdir(parents=True, exist_ok=True)
    labels = [c for c in range(len(wnids)) for _ in range(test)]
    rng.shuffle(labels)
    lines = []
    for i, c in enumerate(labels):
        Image.fromarray(picture(c, len(wnids), 64, 64, rng)).save(base / "val" / "images" / f"val_{i}.JPEG")
        lines.append(f"val_{i}.JPEG\t{wnids[c]}\t{box()}\n")
    (base / "val" / "val_annotations.txt").write_text("".join(lines))
    for i in range(2):
        Image.fromarray(picture(i, 2, 64, 64, rng)).save(base / "test" / "images" / f"test_{i}.JPEG")
    return [TINY_IMAGENET[w].split(",")[0] for w in wnids]


WRITERS = {"cifar10": write_cifar10, "cifar100": write_cifar100, "caltech101": write_caltech101,
           "brain_tumor": write_brain_tumor, "tiny_imagenet": write_tiny_imagenet}


#################################################################################
#                     The model hub's cache and accelerate's config             #
#################################################################################

def seed_timm_hub_cache(hub_cache: Path, backbone: str) -> str:
    """Random weights for `backbone`'s default pretrained tag, in the hub cache's layout (refs/main ->
    snapshots/<rev>/model.safetensors), so `timm.create_model(backbone, pretrained=True)` loads them offline."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model(backbone, pretrained=False)
    repo = model.pretrained_cfg["hf_hub_id"]
    rev = "0" * 40
    folder = hub_cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(rev)
    (folder / "snapshots" / rev).mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()},
              str(folder / "snapshots" / rev / "model.safetensors"))
    return repo


def write_accelerate_config(hf_home: Path, mixed_precision: str, use_cpu: bool = True) -> Path:
    """The file `accelerate config` writes (one machine; the CPU, or one GPU), where `accelerate launch` reads
    its defaults."""
    import yaml

    path = hf_home / "accelerate" / "default_config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({
        "compute_environment": "LOCAL_MACHINE", "distributed_type": "NO", "mixed_precision": mixed_precision,
        "num_machines": 1, "num_processes": 1, "machine_rank": 0, "use_cpu": use_cpu, "dynamo_config": {},
        "debug": False, "downcast_bf16": "no", "gpu_ids": "all", "main_training_function": "main",
        "rdzv_backend": "static", "same_network": True, "tpu_env": [], "tpu_use_cluster": False,
        "tpu_use_sudo": False}))
    return path


#################################################################################
#                                    prepare                                    #
#################################################################################

def overrides(dataset: str, work: Path) -> list[str]:
    """The scale and source overrides of the miniature run (nothing else of the config changes)."""
    out = [f"--run.output_dir={work / 'out'}", f"--data.root={work / 'data'}",
           f"--model.base={work / 'models' / 'sd15-structured'}", f"--captions.model_id={work / 'models' / 'blip2-small'}",
           f"--evaluate.cache_dir={work / 'out' / 'cache' / 'reference'}",
           "--train.resolution=64", "--train.max_steps=2", "--train.batch_size=8", "--train.checkpoint_every=1",
           "--train.validation_steps=2", "--train.num_validation=2",
           "--captions.max_new_tokens=8", "--generate.num_inference_steps=2", "--generate.per_class=4",
           "--classifier.steps=3", "--classifier.batch_size=8", "--classifier.input_size=32",
           "--classifier.num_workers=0", "--evaluate.reference_epochs=1", "--evaluate.reference_input_size=32",
           "--evaluate.reference_batch_size=16", "--pipeline.seeds=[0]",
           # beside MVC's set, img2img's and DreamBooth's at SD-1.5 structure (the 64-px stand-in's native size)
           "--pipeline.generators=[mvc, img2img, dreambooth]", "--pipeline.generator_runs=[probabilistic]",
           "--dreambooth.max_steps=2", "--dreambooth.batch_size=2", "--dreambooth.num_class_images=1",
           "--dreambooth.prior_steps=2", "--dreambooth.resolution=64", "--dreambooth.checkpoint_every=1"]
    return out


def prepare(dataset: str, work: Path) -> list[str]:
    """Write the fixture data, the stand-in models, the hub cache and accelerate's config; return the overrides."""
    from mvc.core.config import build_parser, parse_args
    from mvc.diffusion.standins import save_sd15_structured, save_small_blip2
    from mvc.studies import pipeline

    rng = np.random.default_rng(0)
    train, test = PER_CLASS[dataset]
    classes = WRITERS[dataset](work / "data", train, test, rng)
    words = [w for c in classes for w in c.lower().replace("_", " ").split()]
    if not (work / "models" / "sd15-structured" / "model_index.json").is_file():
        save_sd15_structured(work / "models" / "sd15-structured", words)
        save_small_blip2(work / "models" / "blip2-small", words)
    over = overrides(dataset, work)
    cfg, _ = parse_args(build_parser("smoke_full"), ["--config", str(ROOT / "configs" / f"{dataset}.yaml"), *over])
    hf = Path(os.environ.get("HF_HOME", work / "hf"))
    for rc in pipeline.recipe_configs(cfg):
        if rc.classifier.pretrained:
            seed_timm_hub_cache(hf / "hub", rc.classifier.backbone)
    if cfg.evaluate.reference_pretrained:  # the evaluation's reference starts from hub weights too
        seed_timm_hub_cache(hf / "hub", cfg.evaluate.reference_backbone)
    write_accelerate_config(hf, os.environ.get("MVC_SMOKE_PRECISION", "no"))
    return over


#################################################################################
#                                    summary                                    #
#################################################################################

def summary(dataset: str, argv: list[str]) -> tuple[dict, list[str]]:
    """The run's summary and the failed checks (empty when all pass)."""
    import yaml
    from PIL import Image

    from mvc.core.config import build_parser, parse_args
    from mvc.core.paths import RunPaths
    from mvc.core.utils import read_jsonl
    from mvc.diffusion.models import training_info
    from mvc.studies import pipeline

    cfg, _ = parse_args(build_parser("smoke_full"), ["--config", str(ROOT / "configs" / f"{dataset}.yaml"), *argv])
    paths = RunPaths.of(cfg)
    fails: list[str] = []

    def recorded(stage: str) -> dict:
        p = paths.config_file(stage)
        return yaml.safe_load(p.read_text()) if p.is_file() else {}

    captions = json.loads((paths.captions / "summary.json").read_text()) if (paths.captions / "summary.json").is_file() \
        else {}
    if captions.get("captioner") != "blip2":
        fails.append(f"captioner {captions.get('captioner')!r}, expected the config's blip2")
    res = training_info(paths.final).get("resolution")
    sizes = sorted({Image.open(p).size for p in sorted(paths.synthetic.rglob("*.png"))[:50]})
    if not sizes:
        fails.append("no generated image")
    elif sizes != [(res, res)]:
        fails.append(f"generated images are {sizes}, the model was fine-tuned at {res} px")
    made = [r for r in read_jsonl(paths.grids / "runs.jsonl") if r.get("made")]  # the generation runs that made images
    gen = made[-1] if made else {}
    runs = []
    for rc in pipeline.recipe_configs(cfg):
        steps = set()
        for run in rc.pipeline.runs:
            strategy, augment = pipeline.split_run(run, rc.classifier.augment)
            for seed in rc.pipeline.seeds:
                p = pipeline.classifier_run_dir(rc, strategy, augment, seed) / "metrics.json"
                if not p.is_file():
                    fails.append(f"classifier run {run} ({rc.classifier.backbone}, seed {seed}) has no metrics.json")
                    continue
                m = json.loads(p.read_text())
                runs.append({"run": run, "backbone": m["backbone"], "seed": seed, "steps": m["steps"],
                             "budget_steps": m["budget_steps"], "phase_steps": m["phase_steps"],
                             "images_seen": m["images_seen"], "accuracy": round(m["last"]["accuracy"], 4)})
                steps.add(m["steps"])
                if m["steps"] != m["budget_steps"]:
                    fails.append(f"{run} ({m['backbone']}) took {m['steps']} steps of a {m['budget_steps']}-step budget")
        if len(steps) > 1:
            fails.append(f"the runs of {rc.classifier.backbone} took different optimizer steps: {sorted(steps)}")
    others = {}
    for method in cfg.pipeline.generators[1:]:  # the other generators' sets: made, at which size, by whom
        where = RunPaths.of(pipeline.generator_config(cfg, method)).synthetic
        recs = read_jsonl(where / "metadata.jsonl") if (where / "metadata.jsonl").is_file() else []
        shapes = sorted({Image.open(p).size for p in sorted(where.rglob("*.png"))[:50]})
        others[method] = {"images": len(recs), "image_size": list(shapes[0]) if len(shapes) == 1 else shapes,
                          "methods": sorted({r.get("method") for r in recs})}
        if not recs or others[method]["methods"] != [method]:
            fails.append(f"the {method} set has {len(recs)} images made by {others[method]['methods']}")
    if not paths.report.is_file():
        fails.append("no results.md")
    train, clf = recorded("train_mvc").get("train", {}), recorded("train_classifier").get("classifier", {})
    out = {
        "dataset": dataset, "config": f"configs/{dataset}.yaml",
        "captioner": {k: captions.get(k) for k in ("captioner", "device", "dtype", "images", "processes")},
        "finetune": {"base": cfg.model.base, "resolution": res, "steps": training_info(paths.final).get("steps"),
                     "mixed_precision": train.get("mixed_precision"), "grad_accum": train.get("grad_accum")},
        "generate": {"image_size": sizes[0] if len(sizes) == 1 else sizes, "images": gen.get("images"),
                     "dtype": gen.get("dtype"), "device": gen.get("device"), "processes": gen.get("world")},
        "classifier": {"mixed_precision": clf.get("mixed_precision"), "runs": runs},
        "generators": others,
        "report": str(paths.report) if paths.report.is_file() else None,
        "checks": "passed" if not fails else fails,
    }
    return out, fails


def main(argv: list[str]) -> int:
    """`prepare DATASET WORKDIR` or `summary DATASET WORKDIR OVERRIDE...`."""
    if len(argv) < 3 or argv[0] not in ("prepare", "summary") or argv[1] not in DATASETS:
        print(__doc__, file=sys.stderr)
        return 2
    cmd, dataset, work = argv[0], argv[1], Path(argv[2]).resolve()
    if cmd == "prepare":
        print("\n".join(prepare(dataset, work)))
        return 0
    out, fails = summary(dataset, argv[3:])
    print(json.dumps(out, indent=1))
    for f in fails:
        print(f"smoke_full: FAILED: {f}", file=sys.stderr)
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
