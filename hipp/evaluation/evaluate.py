"""Metrics for any model the project loads: zero-shot, retrieval, grounding, costs, latency.

Every function takes a model with encode_image / encode_text, so the teacher, a gated model
and an exported pruned model are measured by the same code.
"""
from __future__ import annotations

import time

import torch

from ..data import shapes, to_input
from ..errors import HippError
from ..data.fashion_mnist import class_prompts, load_fashion_mnist, to_rgb

DATASETS = ("shapes", "fmnist")
USER_DATASETS = ("csv", "folder")  # given as csv:FILE or folder:DIR


# Prompt templates that neither training (fashion_mnist.TEMPLATES, shape captions) nor the bound
# query's ranking (class_prompts(), plain descriptions) ever use: a plan that fits the prompts rather
# than the task shows as a gap between these metrics and the usual ones.
HELDOUT_FMNIST_TEMPLATES = ("there is a {} in this picture.", "a cropped, low-resolution image of a {}.",
                            "one {}, seen from the front.", "a catalogue item: {}.")
HELDOUT_SHAPE_TEMPLATES = ("this drawing shows {}.", "a rendering with {} in it.")
VAL_IMAGES = 5000
SPLITS = ("test", "val")

def model_device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def embed_images(model, images: torch.Tensor, preprocess_cfg: dict, batch: int = 250) -> torch.Tensor:
    """uint8 images at model resolution (or already preprocessed floats) -> L2-normalised embeddings."""
    device = model_device(model)

    def prep(x):
        return (to_input(x, preprocess_cfg) if x.dtype == torch.uint8 else x).to(device)
    # computed where the model lives, returned on the CPU, where the metrics' labels are
    out = [model.encode_image(prep(images[i:i + batch]), normalize=True).cpu() for i in range(0, len(images), batch)]
    return torch.cat(out)


@torch.no_grad()
def embed_texts(model, tokenizer, texts: list[str], batch: int = 500) -> torch.Tensor:
    device = model_device(model)
    out = [model.encode_text(tokenizer(texts[i:i + batch]).to(device), normalize=True).cpu()
           for i in range(0, len(texts), batch)]
    return torch.cat(out)


def class_embeddings(model, tokenizer, prompts: dict[str, list[str]]) -> torch.Tensor:
    """Prompt ensemble: the normalised mean of each class's prompt embeddings, [C, D]."""
    flat = [p for ps in prompts.values() for p in ps]
    emb = embed_texts(model, tokenizer, flat)
    sizes = [len(ps) for ps in prompts.values()]
    means = torch.stack([chunk.mean(0) for chunk in emb.split(sizes)])
    return torch.nn.functional.normalize(means, dim=-1)


def recall_at(sim: torch.Tensor, match: torch.Tensor, k: int) -> float:
    """sim [Q, N]; match [Q, N] bool: which candidates count as correct for each query."""
    top = sim.topk(k, dim=1).indices
    return float(match.gather(1, top).any(1).float().mean())


def shape_class_embeddings(model, tokenizer, templates: tuple[str, ...] = ("{}",)) -> dict[str, torch.Tensor]:
    """Per shape attribute, [values, D]: each value's class embedding is the normalised mean of every
    single-object description with that value (a prompt ensemble), each description put in every
    template (the plain description by default)."""
    objs = shapes.single_objects()
    phrases = [t.format(o.phrase()) for o in objs for t in templates]
    emb = embed_texts(model, tokenizer, phrases)  # once, grouped per attribute
    prompt_emb = emb.view(len(objs), len(templates), -1).mean(1) if len(templates) > 1 else emb
    return {attr: torch.nn.functional.normalize(
                torch.stack([prompt_emb[[getattr(o, attr) == v for o in objs]].mean(0) for v in values]), dim=-1)
            for attr, values in shapes.ATTRIBUTES.items()}


def single_object_scenes(split: str, n: int, preprocess_cfg: dict, seed: int = 0):
    """The single-object scenes shape zero-shot is measured on (their own index range of `split`)."""
    size = preprocess_cfg["size"]
    size = size[0] if isinstance(size, (list, tuple)) else size
    return shapes.make_scenes(split, n, seed=seed, image_size=size, start=10**6, n_objects=1)


def shape_metrics(model, tokenizer, preprocess_cfg: dict, n: int = 1000, seed: int = 0,
                  items: dict | None = None, split: str = "test") -> dict[str, float]:
    """`items`, when given, receives each test scene's share of zero-shot attributes right ("shapes/zs_mean")
    and scores whose mean is the grounding mean ("shapes/ground_mean").
    `shapes/zs_heldout_prompts` is the zero-shot mean with each description wrapped in templates
    that neither training nor the bound query's ranking use (HELDOUT_SHAPE_TEMPLATES)."""
    size = preprocess_cfg["size"]
    size = size[0] if isinstance(size, (list, tuple)) else size
    m: dict[str, float] = {}
    single = single_object_scenes(split, n, preprocess_cfg, seed)
    img = embed_images(model, single.images, preprocess_cfg)
    hits, held = [], []
    classes = shape_class_embeddings(model, tokenizer)
    heldout = shape_class_embeddings(model, tokenizer, HELDOUT_SHAPE_TEMPLATES)
    for attr, cls in classes.items():
        values = shapes.ATTRIBUTES[attr]
        truth = torch.tensor([values.index(getattr(o[0], attr)) for o in single.objects])
        hits.append(((img @ cls.T).argmax(1) == truth).float())
        held.append(((img @ heldout[attr].T).argmax(1) == truth).float())
        m[f"shapes/zs_{attr}"] = float(hits[-1].mean())
    m["shapes/zs_mean"] = sum(m[f"shapes/zs_{a}"] for a in shapes.ATTRIBUTES) / len(shapes.ATTRIBUTES)
    m["shapes/zs_heldout_prompts"] = float(torch.stack(held).mean())
    if items is not None:
        items["shapes/zs_mean"] = torch.stack(hits).mean(0)
        items["shapes/zs_heldout_prompts"] = torch.stack(held).mean(0)
    # retrieval and grounding on multi-object pairs
    pairs = shapes.make_scenes(split, n, seed=seed, image_size=size)
    img = embed_images(model, pairs.images, preprocess_cfg)
    txt = embed_texts(model, tokenizer, pairs.captions)
    sim = img @ txt.T
    same = torch.tensor([[a == b for b in pairs.captions] for a in pairs.captions])  # duplicate captions count
    for k in (1, 5):
        m[f"shapes/i2t_r{k}"] = recall_at(sim, same, k)
        m[f"shapes/t2i_r{k}"] = recall_at(sim.T, same, k)
    pos = (img * txt).sum(-1)
    # each scene's share of ground_mean (its hits weighted by 1 / scenes with that kind of negative), so
    # that the per-scene scores average to ground_mean and a paired difference has a standard error
    ground = torch.zeros(len(pairs.captions))
    for kind in shapes.NEGATIVE_TYPES:
        idx = [i for i, negs in enumerate(pairs.negatives) if kind in negs]
        neg = embed_texts(model, tokenizer, [pairs.negatives[i][kind] for i in idx])
        hit = (pos[idx] > (img[idx] * neg).sum(-1)).float()
        m[f"shapes/ground_{kind}"] = float(hit.mean())
        ground[idx] += hit * len(ground) / (len(idx) * len(shapes.NEGATIVE_TYPES))
    m["shapes/ground_mean"] = sum(m[f"shapes/ground_{k}"] for k in shapes.NEGATIVE_TYPES) / len(shapes.NEGATIVE_TYPES)
    if items is not None:
        items["shapes/ground_mean"] = ground
    return m


def fmnist_metrics(model, tokenizer, preprocess_cfg: dict, limit: int | None = None,
                   items: dict | None = None, split: str = "test") -> dict[str, float]:
    """`items`, when given, receives each test image's 0 / 1 ("fmnist/acc"). `fmnist/acc_heldout_prompts`
    classifies with class prompts from templates neither training nor ranking use. The "val" split
    is the last VAL_IMAGES train images (the teacher and the controllers saw train images, so it
    serves choices between plans, not claims)."""
    size = preprocess_cfg["size"]
    size = size[0] if isinstance(size, (list, tuple)) else size
    images, labels = load_fashion_mnist("train" if split == "val" else "test")
    if split == "val":
        images, labels = images[-VAL_IMAGES:], labels[-VAL_IMAGES:]
    if limit:
        images, labels = images[:limit], labels[:limit]
    cls = class_embeddings(model, tokenizer, class_prompts())
    held = class_embeddings(model, tokenizer, class_prompts(HELDOUT_FMNIST_TEMPLATES))
    preds = []  # chunk by chunk, as before held-out prompts joined: the same products, the same numbers
    for i in range(0, len(images), 1000):
        emb = embed_images(model, to_rgb(images[i:i + 1000], size), preprocess_cfg)
        preds.append(((emb @ cls.T).argmax(1), (emb @ held.T).argmax(1)))
    hit = (torch.cat([p for p, _ in preds]) == labels).float()
    hit_held = (torch.cat([h for _, h in preds]) == labels).float()
    if items is not None:
        items["fmnist/acc"] = hit
        items["fmnist/acc_heldout_prompts"] = hit_held
    return {"fmnist/acc": float(hit.mean()), "fmnist/acc_heldout_prompts": float(hit_held.mean())}


@torch.no_grad()
def latency_ms(fn, x, repeats: int = 10, warmup: int = 2) -> float:
    """Median wall time of fn(x) in milliseconds per item of the batch."""
    for _ in range(warmup):
        fn(x)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2] * 1000.0 / len(x)


def retrieval_metrics(model, tokenizer, preprocess_cfg: dict, images: torch.Tensor, captions: list[str],
                      prefix: str = "csv") -> dict[str, float]:
    """R@1 / R@5 image-to-text and text-to-image over image-caption pairs; a repeated caption
    counts as a match for each of its images."""
    sim = embed_images(model, images, preprocess_cfg) @ embed_texts(model, tokenizer, captions).T
    same = torch.tensor([[a == b for b in captions] for a in captions])
    k5 = min(5, len(captions))
    return {f"{prefix}/i2t_r1": recall_at(sim, same, 1), f"{prefix}/t2i_r1": recall_at(sim.T, same, 1),
            f"{prefix}/i2t_r5": recall_at(sim, same, k5), f"{prefix}/t2i_r5": recall_at(sim.T, same, k5)}


def user_metrics(model, tokenizer, preprocess_cfg: dict, spec: str, allow_outside: bool = False) -> dict[str, float]:
    """csv:FILE -> retrieval R@1/R@5 both ways; folder:DIR -> zero-shot accuracy.

    `allow_outside`: a CSV may name images outside its own folder."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    from ..data.user import read_csv_pairs, read_image_folder

    kind, _, path = spec.partition(":")
    preprocess = image_transform_v2(PreprocessCfg(**preprocess_cfg), is_train=False)
    if kind == "csv":
        images, captions = read_csv_pairs(path, preprocess, allow_outside=allow_outside)
        return retrieval_metrics(model, tokenizer, preprocess_cfg, images, captions)
    images, labels, classes = read_image_folder(path, preprocess)
    cls = class_embeddings(model, tokenizer, {c: [f"a photo of a {c.replace('_', ' ')}."] for c in classes})
    pred = (embed_images(model, images, preprocess_cfg) @ cls.T).argmax(1)
    return {"folder/acc": float((pred == labels).float().mean())}


def check_datasets(datasets, allow_outside: bool = False) -> None:
    """Known names, and user data whose files are all there (CSV rows, image folders; no pixel is
    decoded): a mistake there is reported before a model is loaded."""
    from ..data.user import csv_items, folder_items

    for d in datasets:
        kind, sep, path = d.partition(":")
        if not (d in DATASETS or (kind in USER_DATASETS and sep and path)):
            raise HippError(f"unknown dataset {d!r}; choose from {', '.join(DATASETS)}, csv:FILE, folder:DIR")
        if kind == "csv":
            csv_items(path, allow_outside=allow_outside)
        elif kind == "folder":
            folder_items(path)


def evaluate(model, tokenizer, preprocess_cfg: dict, datasets=DATASETS, n: int = 1000,
             fmnist_limit: int | None = None, items: dict | None = None,
             allow_outside: bool = False, split: str = "test") -> dict[str, float]:
    """Flat `dataset/metric` floats. `items`, when given, receives per-test-item scores of the
    zero-shot metrics (tensors whose means are those metrics), for paired comparisons of two models.
    `allow_outside`: a csv:FILE may name images outside its own folder."""
    check_datasets(datasets, allow_outside)
    if split not in SPLITS:
        raise HippError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    metrics: dict[str, float] = {}
    for d in datasets:
        if d == "shapes":
            # validation scenes: val split, seed 1 (the ranking's calibration draws seed 0 of val)
            metrics.update(shape_metrics(model, tokenizer, preprocess_cfg, n=n, items=items, split=split,
                                         seed=1 if split == "val" else 0))
        elif d == "fmnist":
            metrics.update(fmnist_metrics(model, tokenizer, preprocess_cfg, limit=fmnist_limit, items=items,
                                          split=split))
        else:
            metrics.update(user_metrics(model, tokenizer, preprocess_cfg, d, allow_outside))
    return metrics


def report(model, tokenizer, preprocess_cfg: dict, datasets=DATASETS, batch: int = 32,
           allow_outside: bool = False) -> dict:
    """The eval object of the interface contract: metrics, params, flops, latency_ms."""
    from ..backends import context_length, dense_flops, image_size, num_params

    size = image_size(model)
    images = to_input(torch.randint(0, 256, (batch, 3, size, size), generator=torch.Generator().manual_seed(0),
                                    dtype=torch.uint8), preprocess_cfg)
    tokens = tokenizer(["a large red circle at the top left and a small blue square at the center"] * batch)
    assert tokens.shape[1] == context_length(model)
    flops = dense_flops(model)
    return {
        "metrics": evaluate(model, tokenizer, preprocess_cfg, datasets, allow_outside=allow_outside),
        "params": num_params(model),
        "flops": {"image": flops["flops/image"], "text": flops["flops/text"]},
        "latency_ms": {"image": latency_ms(model.encode_image, images),
                       "text": latency_ms(model.encode_text, tokens), "batch": batch},
    }
