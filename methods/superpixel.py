"""Re-purposing SAM into Efficient Visual Projectors: semantic superpixels as visual tokens, training-free.

Yang & Gong, "Semantic Visual Projector" (SVP), arXiv 2509.13676 (`papers/002_e0a327e574e094bb.txt`). SVP itself is
trained (its SSPE encoder and SSA aggregator); what a training-free harness can evaluate is the paper's **baseline
row of Table 3**: one token per semantic superpixel, the average of the patch embeddings it covers (sec. 4.3 eq. 2,
"coarse semantic superpixel embeddings"), through the model's own projector, with no positional embedding of its
own. The superpixel source is a parameter: `sam` (sec. 3.1: FMA-WSSS quasi-superpixels from the model's own SAM,
reusing its image embedding), `slic` (appendix Table C's comparison), `oracle` (the dataset's instances and the
background, for analysis) and `grid` (a control: one superpixel per block of patches; `cell=1` is the unpruned
model).

Semantic superpixels (`sam`), FMA-WSSS pattern `l2_nmsf_s1_rsw3` (reference/methods.md 7.2):

    points   an n x n grid over the image; SVP reuses the one SAM encoder pass (sec. 4.1), so no crop layers
    masks    SAM's three multimask outputs per point = levels sub-part / part / whole
    quality  predicted IoU + level offset (0, 0, +0.1) > 0.86; stability score (offset 1.0) >= 0.92
    NMS      box NMS at 0.7 scored by IoU + (0, 0, +1.0): whole masks win against overlapping lower levels
    regions  stock SAM small-region post-processing: holes and islands under 100 px, then NMS preferring
             unchanged masks
    RSW      rock-sand-water: accept every whole mask; a part (then sub-part) mask is kept only if its recall
             |m & c| / |m| against every accepted mask c stays below 0.3
    paint    ascending (level, predicted IoU), later over earlier: whole > part > sub-part in overlaps

Pixels no kept mask covers (FMA-WSSS leaves them unlabelled; SVP does not say): each connected region of them of
at least `min_area` pixels is a superpixel of its own, smaller ones join the nearest superpixel. Pieces under
`min_area` that painting cut off a superpixel (other than its largest piece) join the nearest one too. Every pixel
of the image belongs to exactly one superpixel.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from harness.engine import Context, VisionFeatures
from harness.method import Method, ModelInfo, register

LEVEL_IOU_OFFSET = (0.0, 0.0, 0.1)  # FMA-WSSS score_thresh_offset: sub-part, part, whole
LEVEL_NMS_OFFSET = (0.0, 0.0, 1.0)  # FMA-WSSS score_nms_offset


@register("superpixel", aliases=("svp",))
class SuperpixelProjector(Method):
    """One visual token per superpixel: the coverage-weighted mean of the CLIP patch features it covers, then the
    model's projector (SVP's Table 3 baseline: average pooling, no SSPE, no SSA).

    Tokens are in centroid raster order (rows of the patch grid holding each centroid, then x); a patch shared by
    several superpixels contributes to each by the fraction of its pixels inside it; each token records every patch
    it stands for, with that fraction as its weight. Superpixels outside CLIP's centre crop carry no patch and give
    no token. The number of tokens adapts to the image unless `count` caps it: then the smallest superpixel (by
    covered patch area) is merged into its most similar neighbour (cosine of the pooled features; neighbours share
    a patch or touch on the patch grid) until `count` are left; an image with fewer keeps its own.

    The `sam` source prompts the model's own SAM with a point grid, reusing the image embedding the mask decoder
    needs anyway; the decoder passes (exact FLOPs) and the filtering run in the "instances" latency stage, the
    pooling in "method".

    Budget mapping: `count` = the target N_avg (every LLM layer sees the same tokens), so `@75%` caps each image at a
    quarter of the patches; images with fewer superpixels stay below it and the achieved N_avg is what the table
    reports.

    Args:
        source: where the superpixels come from: sam, slic, oracle (the dataset's instances plus the background) or
            grid (blocks of cell x cell patches).
        count: at most this many tokens per image (None: as many as the source gives).
        points: SAM point-grid side (None: one point per cell of the SAM's image embedding, at most FMA-WSSS's 32:
            32 for SAM at 1024 px, 16 for the bundled 256-px SAM).
        iou_thresh: SAM predicted-IoU threshold (whole masks get +0.1).
        stability_thresh: SAM stability-score threshold.
        nms_thresh: box-NMS IoU threshold.
        rsw_thresh: rock-sand-water recall threshold.
        min_area: smallest region in image pixels (SAM's small-region post-processing; uncovered regions).
        batch: SAM point prompts per decoder batch (memory only).
        segments: SLIC's target number of segments (appendix Table C matches 40).
        compactness: SLIC compactness (scikit-image's default 10).
        cell: grid source: patches per block side (1: one patch per superpixel, the unpruned model).
    """

    stage = "pre-llm"
    position_policy = "reindex"  # a sequence of region tokens, contiguous ids like any LLaVA image block
    citation = "Yang & Gong, Semantic Visual Projector (SVP), arXiv 2509.13676, Table 3 baseline"
    keep_all = {"source": "grid", "cell": 1}
    exact_reference = False
    budget_params = ("count",)
    in_default_grid = False  # SAM's automatic mask generation: ~0.6 s a query on 2 CPU cores (results/superpixel)
    deviations = ("training-free baseline of SVP's Table 3 (average pooling through the model's own projector, CLIP "
                  "features, no SSPE/SSA); FMA-WSSS's second crop layer omitted (SVP reuses the one SAM encoder pass, "
                  "crops would need four more); SAM's outputs are given levels by their mean area over the image's "
                  "prompts (smallest = sub-part), which is SAM's own output order and also fits a SAM trained with "
                  "another order (the bundled one); the point grid scales with the SAM's embedding size; within a "
                  "level, masks are painted in order of SAM's predicted IoU (FMA-WSSS's 'confidence'); pixels no "
                  "mask covers become superpixels (regions >= min_area) or join the nearest one; pieces under "
                  "min_area that painting cut off a superpixel join their nearest neighbour; superpixels inside one "
                  "patch share one token")

    def __init__(self, source: Literal["sam", "slic", "oracle", "grid"] = "sam", count: int | None = None,
                 points: int | None = None, iou_thresh: float = 0.86, stability_thresh: float = 0.92,
                 nms_thresh: float = 0.7, rsw_thresh: float = 0.3, min_area: int = 100, batch: int = 64,
                 segments: int = 40, compactness: float = 10.0, cell: int = 1):
        if count is not None and count < 1:
            raise ValueError(f"superpixel: count must be >= 1 (or null for the adaptive count), got {count}")
        if points is not None and points < 1:
            raise ValueError(f"superpixel: points is the point-grid side and must be >= 1, got {points}")
        for name, v in (("stability_thresh", stability_thresh), ("nms_thresh", nms_thresh),
                        ("rsw_thresh", rsw_thresh)):
            if not 0.0 < v <= 1.0:
                raise ValueError(f"superpixel: {name} must be in (0, 1], got {v}")
        if not -1.0 <= iou_thresh <= 2.0:
            raise ValueError(f"superpixel: iou_thresh must be in [-1, 2] (SAM's predicted IoU), got {iou_thresh}")
        for name, v in (("min_area", min_area), ("batch", batch), ("segments", segments), ("cell", cell)):
            if v < 1:
                raise ValueError(f"superpixel: {name} must be >= 1, got {v}")
        if compactness <= 0:
            raise ValueError(f"superpixel: compactness must be > 0, got {compactness}")
        self.source, self.count, self.points = source, count, points
        self.iou_thresh, self.stability_thresh, self.nms_thresh = iou_thresh, stability_thresh, nms_thresh
        self.rsw_thresh, self.min_area, self.batch = rsw_thresh, min_area, batch
        self.segments, self.compactness, self.cell = segments, compactness, cell

    def bind(self, info: ModelInfo) -> None:
        n = info.n_image_tokens
        if self.count is not None and self.count > n:
            raise ValueError(f"superpixel: count={self.count} exceeds the model's {n} patches; use 1..{n}")
        if self.cell > min(info.grid):
            raise ValueError(f"superpixel: cell={self.cell} exceeds the {info.grid[0]}x{info.grid[1]} patch grid")

    # -- the event -----------------------------------------------------------------------------------------------
    def on_vision(self, feats: VisionFeatures, ctx: Context) -> VisionFeatures:
        if self.source == "grid":
            cover = grid_coverage(feats.grid, self.cell).to(feats.patches.device)
        else:
            labels = self.label_map(ctx)
            with ctx.overhead():
                cover = label_coverage(ctx.model, labels).to(feats.patches.device)
        with ctx.overhead():
            cover = single_patch_once(cover[cover.sum(1) > 0])  # outside CLIP's centre crop: no patch, no token
            x = feats.patches[0].float()  # (N, Dv)
            if self.count is not None and len(cover) > self.count:
                cover = merge_smallest(cover, x, feats.grid, self.count, ctx)
            cover = cover[raster_order(cover, feats.grid)]
            ctx.ledger.add_method_matmul(cover.shape[0], cover.shape[1], 2)  # the centroids
            tokens = pool(cover, x)  # (S, Dv)
            ctx.ledger.add_method_matmul(cover.shape[0], cover.shape[1], x.shape[1])
            codes = []
            for row in cover:
                patches = row.nonzero()[:, 0]
                codes.append(int(patches[0]) if len(patches) == 1 else
                             ctx.ledger.merged_token(patches.tolist(), row[patches].tolist()))
        index = torch.tensor(codes, dtype=torch.long, device=feats.patches.device)
        return VisionFeatures(patches=tokens[None].to(feats.patches.dtype), patch_index=index, grid=feats.grid,
                              cls=feats.cls, layer_input=feats.layer_input, layer=feats.layer, tower=feats.tower)

    def label_map(self, ctx: Context) -> np.ndarray:
        """(H, W) superpixel label of every image pixel, 0..S-1, from the chosen source."""
        if self.source == "oracle":
            if ctx.instances is None:
                raise ValueError("superpixel: source=oracle needs a dataset with instance annotations (refer-format, "
                                 "e.g. shapes-ref or RefCOCO); use source=sam")
            with ctx.watch("instances"):
                inst = np.asarray(ctx.instances() if callable(ctx.instances) else ctx.instances, dtype=bool)
                if not inst.size:  # an image without annotated instances: all background, one superpixel
                    return np.zeros(ctx.prepared.original_size, dtype=np.int64)
                order = np.argsort(-inst.reshape(len(inst), -1).sum(1), kind="stable")  # small objects on top
                return absorb_fragments(fill_uncovered(paint(inst[order]), self.min_area), self.min_area)
        if ctx.image is None:
            raise ValueError(f"superpixel: source={self.source} needs the image; pass it to segment()")
        from harness.model import load_image

        image = load_image(ctx.image)
        if self.source == "slic":
            from skimage.segmentation import slic

            with ctx.watch("instances"):
                return slic(np.asarray(image), n_segments=self.segments, compactness=self.compactness,
                            start_label=0, channel_axis=-1)
        emb = ctx.sam_embeddings()  # the model's own encoder pass, shared with its mask decoder
        with ctx.watch("instances"):
            masks, levels, scores = sam_masks(ctx, image, emb, self)
            keep = rock_sand_water(masks, levels, self.rsw_thresh, ctx)
            order = sorted(keep, key=lambda i: (levels[i], scores[i]))  # painted later = on top
            labels = paint(masks[order].cpu().numpy()) if order else np.full(masks.shape[1:], -1)
            return absorb_fragments(fill_uncovered(labels, self.min_area), self.min_area)

    # -- budgets -------------------------------------------------------------------------------------------------
    def image_schedule(self, info: ModelInfo) -> list[int] | None:
        if self.source != "grid":
            return None
        h, w = info.grid
        n = -(-h // self.cell) * -(-w // self.cell)
        return [min(n, self.count or n)] * info.n_layers

    def budget_n_avg(self, info: ModelInfo) -> float | None:
        """A count caps every image's tokens (images with fewer superpixels stay below it)."""
        sched = self.image_schedule(info)
        if sched is not None:
            return float(sched[0])
        return None if self.count is None else float(self.count)

    @classmethod
    def for_budget(cls, info: ModelInfo, n_avg: float, **fixed) -> SuperpixelProjector:
        """`count` = round(N_avg): a pre-LLM method's tokens are the same in every layer."""
        count = round(n_avg)
        if not 1 <= count <= info.n_image_tokens:
            raise ValueError(f"superpixel: N_avg {n_avg:.1f} is outside the reachable 1..{info.n_image_tokens}")
        return cls(**{**fixed, "count": count})


# -- semantic superpixels from SAM (FMA-WSSS) --------------------------------------------------------------------
def sam_masks(ctx: Context, image, emb: Tensor, cfg: SuperpixelProjector) -> tuple[Tensor, list[int], list[float]]:
    """SAM automatic mask generation with FMA-WSSS's level-dependent filtering, on the model's own SAM.

    Returns the kept masks (M, H, W) bool at the image size, their levels (0 sub-part, 1 part, 2 whole) and
    predicted IoUs. The decoder passes are counted as method FLOPs. Memory is bounded by `batch` prompts at image
    size plus the low-resolution logits of the candidates.
    """
    from harness.flops import Arch, point_prompt_macs

    model, prep = ctx.model, ctx.prepared
    sam, proc = model.sam, model.sam_processor
    g = sam.config.prompt_encoder_config.image_embedding_size
    side = cfg.points or min(32, g)
    size = sam.config.vision_config.image_size
    _, points, _, _ = proc.generate_crop_boxes(image, target_size=size, crop_n_layers=0, points_per_crop=side,
                                               device=emb.device)  # (1, P, 1, 2) float32 in SAM's resized frame
    pe = sam.get_image_wide_positional_embeddings().to(emb.dtype)
    n_points = points.shape[1]
    ctx.ledger.method_flops += 2 * point_prompt_macs(Arch.from_model(model), n_points)

    def batches():
        for start in range(0, n_points, cfg.batch):
            pts = points[:, start:start + cfg.batch]  # (1, B, 1, 2); the prompt encoder casts after normalising
            labels = torch.ones(pts.shape[:3], dtype=torch.long, device=emb.device)
            sparse, dense = sam.prompt_encoder(pts, labels, None, None)
            low, iou = sam.mask_decoder(image_embeddings=emb, image_positional_embeddings=pe,
                                        sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                        multimask_output=True)  # (1, B, 3, 4g, 4g), (1, B, 3)
            yield low[0].float(), iou[0].float()

    def upsample(low: Tensor) -> Tensor:
        return proc.post_process_masks([low], [prep.original_size], [prep.resized_size], binarize=False)[0]

    return select_masks(batches(), upsample, cfg)


def select_masks(batches: Iterable[tuple[Tensor, Tensor]], upsample: Callable[[Tensor], Tensor],
                 cfg: SuperpixelProjector) -> tuple[Tensor, list[int], list[float]]:
    """FMA-WSSS's `_process_batch` + `_process_crop` on one crop layer, then stock SAM's small-region step.

    `batches` gives (low-res logits (B, 3, h, w), predicted IoUs (B, 3)) for consecutive prompts; `upsample` maps
    logits to image size. The three outputs get levels by their mean area over all prompts (smallest = sub-part);
    output (p, k) is kept when IoU + level offset > iou_thresh and its stability score >= stability_thresh; then box
    NMS scored by IoU + NMS offset, and small-region post-processing. Each batch is upsampled once to score it and
    the NMS survivors once more at the end, so only `batch` prompts are ever held at image size.
    """
    from torchvision.ops import batched_nms, masks_to_boxes

    low_kept, iou_kept, out_kept, boxes = [], [], [], []
    area_sum, n_prompts, hw = torch.zeros(3, dtype=torch.float64), 0, (0, 0)
    for low, iou in batches:
        logits = upsample(low)  # (B, 3, H, W)
        hw = tuple(logits.shape[-2:])
        area = count_true((logits > 0).flatten(2))  # (B, 3)
        area_sum += area.sum(0).double().cpu()
        n_prompts += len(low)
        ok = (iou + max(LEVEL_IOU_OFFSET) > cfg.iou_thresh)  # levels are known only after the last batch
        ok &= (stability_score(logits, 0.0, 1.0) >= cfg.stability_thresh).to(iou.device)
        ok &= (area > 0).to(iou.device)
        p, k = ok.nonzero(as_tuple=True)
        low_kept.append(low[p, k])
        iou_kept.append(iou[p, k].cpu())
        out_kept.append(k.cpu())
        boxes.append(masks_to_boxes(logits[p, k] > 0).float().cpu())
        del logits
    empty = torch.zeros(0, *hw, dtype=torch.bool), [], []
    if not n_prompts:
        return empty
    level_of = torch.empty(3, dtype=torch.long)
    level_of[(area_sum / n_prompts).argsort(stable=True)] = torch.arange(3)
    levels, iou = level_of[torch.cat(out_kept)], torch.cat(iou_kept)
    ok = iou + torch.tensor(LEVEL_IOU_OFFSET)[levels] > cfg.iou_thresh
    cand = ok.nonzero()[:, 0]
    score = iou[cand] + torch.tensor(LEVEL_NMS_OFFSET)[levels[cand]]
    keep = cand[batched_nms(torch.cat(boxes)[cand], score, torch.zeros(len(cand)), cfg.nms_thresh)]
    if not len(keep):
        return empty
    low = torch.cat(low_kept)
    masks = torch.cat([upsample(low[keep[s:s + 64].to(low.device), None])[:, 0] > 0
                       for s in range(0, len(keep), 64)])
    return remove_small_regions(masks, levels[keep].tolist(), iou[keep].tolist(), cfg.min_area, cfg.nms_thresh)


def stability_score(logits: Tensor, threshold: float, offset: float) -> Tensor:
    """SAM's stability score of (..., H, W) logits: IoU of the masks thresholded at threshold +- offset (one
    contains the other)."""
    inter = count_true((logits > threshold + offset).flatten(-2)).float()
    union = count_true((logits > threshold - offset).flatten(-2)).float()
    return inter / union.clamp(min=1)


def count_true(b: Tensor) -> Tensor:
    """True entries along the last dimension (numpy's byte count on CPU is several times faster than torch's)."""
    if b.device.type == "cpu":
        return torch.from_numpy(np.count_nonzero(b.numpy(), -1))
    return torch.count_nonzero(b, -1)


def remove_small_regions(masks: Tensor, levels: list[int], conf: list[float], min_area: int,
                         nms_thresh: float) -> tuple[Tensor, list[int], list[float]]:
    """Stock SAM's `postprocess_small_regions` (min_mask_region_area): fill holes and remove islands smaller than
    `min_area` pixels (8-connected), then box NMS preferring the masks that needed no change."""
    from skimage.measure import label
    from torchvision.ops import batched_nms, masks_to_boxes

    out, unchanged = [], []
    for mask in masks.cpu().numpy():
        fixed, changed = mask, False
        for holes in (True, False):
            fixed, c = _drop_small(fixed, min_area, holes, label)
            changed |= c
        out.append(fixed)
        unchanged.append(0.0 if changed else 1.0)
    m = torch.from_numpy(np.stack(out)).to(masks.device)
    nonempty = m.flatten(1).any(1).cpu()
    idx = nonempty.nonzero()[:, 0]
    keep = batched_nms(masks_to_boxes(m[idx]).float().cpu(), torch.tensor(unchanged)[idx], torch.zeros(len(idx)),
                       nms_thresh)
    keep = idx[keep].tolist()
    return m[keep], [levels[i] for i in keep], [conf[i] for i in keep]


def _drop_small(mask: np.ndarray, min_area: int, holes: bool, label) -> tuple[np.ndarray, bool]:
    """SAM's `remove_small_regions`: holes (components of the complement) or islands under `min_area` pixels; an
    island pass that would remove everything keeps the largest island."""
    work = ~mask if holes else mask
    regions, n = label(work, connectivity=2, return_num=True)
    sizes = np.bincount(regions.ravel(), minlength=n + 1)[1:]
    small = [i + 1 for i, s in enumerate(sizes) if s < min_area]
    if not small:
        return mask, False
    if holes:
        return mask | np.isin(regions, small), True
    keep = [i + 1 for i in range(n) if i + 1 not in small] or [int(np.argmax(sizes)) + 1]
    return np.isin(regions, keep), True


def rock_sand_water(masks: Tensor, levels: list[int], thresh: float, ctx: Context | None = None,
                    chunk: int = 1 << 16) -> list[int]:
    """FMA-WSSS's rock-sand-water filter: indices of the masks kept.

    Levels are processed whole -> part -> sub-part. The first non-empty level is accepted whole; a mask of a later
    level is kept when its recall |m & c| / |m| against every accepted mask c (each on its own, not their union) is
    below `thresh`; kept masks join the accepted set before the next level. Intersections are counted `chunk`
    pixels at a time (FMA-WSSS's rock_sand_water_chunk_size plays the same role), so memory does not grow with the
    image.
    """
    flat = masks.flatten(1)  # (M, H*W) bool
    accepted: list[int] = []
    for level in (2, 1, 0):
        cand = [i for i, lv in enumerate(levels) if lv == level]
        if not cand:
            continue
        if not accepted:
            accepted = cand
            continue
        a, b = flat[cand], flat[accepted]
        inter = torch.zeros(len(cand), len(accepted), dtype=torch.float64, device=flat.device)
        for s in range(0, flat.shape[1], chunk):  # exact: a chunk's counts fit float32's integers
            inter += (a[:, s:s + chunk].float() @ b[:, s:s + chunk].float().T).double()
        if ctx is not None:
            ctx.ledger.add_method_matmul(len(cand), flat.shape[1], len(accepted))
        recall = inter / count_true(a).to(inter).clamp(min=1)[:, None]
        accepted += [i for i, r in zip(cand, recall.max(1).values.tolist(), strict=True) if r < thresh]
    return accepted


def paint(masks: np.ndarray) -> np.ndarray:
    """(H, W) label map: mask k painted as label k in order, later masks over earlier ones; -1 where none is."""
    labels = np.full(masks.shape[1:], -1, dtype=np.int64)
    for k, m in enumerate(masks):
        labels[m] = k
    return labels


def fill_uncovered(labels: np.ndarray, min_area: int) -> np.ndarray:
    """Give every pixel a superpixel: each 8-connected region of unlabelled (-1) pixels of at least `min_area` pixels
    becomes one, smaller ones take the label of the nearest labelled pixel; labels renumbered 0..S-1 in order of
    first appearance."""
    from scipy.ndimage import distance_transform_edt
    from skimage.measure import label

    out = labels.copy()
    free, n = label(out < 0, connectivity=2, return_num=True)
    sizes = np.bincount(free.ravel(), minlength=n + 1)
    nxt = out.max() + 1
    for r in range(1, n + 1):
        if sizes[r] >= min_area:
            out[free == r] = nxt
            nxt += 1
    if (out < 0).all():  # only small free regions and nothing else: the image is one superpixel
        out[:] = 0
    elif (out < 0).any():
        idx = distance_transform_edt(out < 0, return_distances=False, return_indices=True)
        out = out[tuple(idx)]
    _, first = np.unique(out.ravel(), return_index=True)
    order = out.ravel()[np.sort(first)]
    remap = np.empty(out.max() + 1, dtype=np.int64)
    remap[order] = np.arange(len(order))
    return remap[out]


def absorb_fragments(labels: np.ndarray, min_area: int) -> np.ndarray:
    """Pieces a superpixel was cut into by later masks: every 8-connected piece of a label other than its largest,
    under `min_area` pixels, takes the label of the nearest pixel outside such pieces. Each label keeps its
    largest piece, so no superpixel disappears (a small object stays one)."""
    from scipy.ndimage import distance_transform_edt
    from skimage.measure import label

    pieces, n = label(labels, background=-1, connectivity=2, return_num=True)
    sizes = np.bincount(pieces.ravel(), minlength=n + 1)
    owner = np.zeros(n + 1, dtype=np.int64)
    owner[pieces.ravel()] = labels.ravel()
    largest = {}
    for p in range(1, n + 1):
        if sizes[p] > sizes[largest.get(owner[p], 0)]:
            largest[owner[p]] = p
    drop = [p for p in range(1, n + 1) if sizes[p] < min_area and largest[owner[p]] != p]
    if not drop:
        return labels
    frag = np.isin(pieces, drop)
    idx = distance_transform_edt(frag, return_distances=False, return_indices=True)
    return labels[tuple(idx)]


# -- coverage, merging, pooling ------------------------------------------------------------------------------------
def label_coverage(model, labels: np.ndarray, chunk: int = 64) -> Tensor:
    """(S, N) fraction of each CLIP patch's pixels in each superpixel, through the CLIP processor's geometry."""
    n = int(labels.max()) + 1
    parts = [model.patch_coverage(labels[None] == np.arange(s, min(n, s + chunk))[:, None, None])
             for s in range(0, n, chunk)]
    return torch.cat(parts)


def single_patch_once(cover: Tensor) -> Tensor:
    """Superpixels that cover only part of one and the same patch would be identical tokens (the mean of one patch):
    merge their coverage into one row. Other rows are left as they are."""
    support = cover > 0
    single = support.sum(1) == 1
    if int(single.sum()) < 2:
        return cover
    key = torch.where(single, support.float().argmax(1), -1 - torch.arange(len(cover), device=cover.device))
    keys, slot = torch.unique(key, return_inverse=True)
    if len(keys) == len(cover):
        return cover
    return torch.zeros(len(keys), cover.shape[1], dtype=cover.dtype, device=cover.device).index_add_(0, slot, cover)


def grid_coverage(grid: tuple[int, int], cell: int) -> Tensor:
    """(S, N) coverage of cell x cell blocks of the patch grid (edge blocks smaller), blocks in raster order."""
    h, w = grid
    rows = torch.arange(h).repeat_interleave(w) // cell
    cols = torch.arange(w).repeat(h) // cell
    block = rows * -(-w // cell) + cols  # (N,)
    return torch.nn.functional.one_hot(block).T.float()


def raster_order(cover: Tensor, grid: tuple[int, int]) -> Tensor:
    """Superpixels sorted by the patch-grid row of their coverage-weighted centroid, then its x (then y)."""
    h, w = grid
    mass = cover.sum(1)
    ys = torch.arange(h, device=cover.device, dtype=cover.dtype).repeat_interleave(w)
    xs = torch.arange(w, device=cover.device, dtype=cover.dtype).repeat(h)
    cy, cx = ((cover @ torch.stack([ys, xs], 1)) / mass[:, None]).T
    keys = sorted(range(len(cover)), key=lambda s: (int(torch.floor(cy[s] + 0.5)), float(cx[s]), float(cy[s])))
    return torch.tensor(keys, dtype=torch.long, device=cover.device)


def pool(cover: Tensor, x: Tensor) -> Tensor:
    """SVP eq. 2: the coverage-weighted mean of the patch features, (S, N) x (N, Dv) -> (S, Dv)."""
    return (cover @ x) / cover.sum(1, keepdim=True)


def neighbours(cover: Tensor, grid: tuple[int, int]) -> Tensor:
    """(S, S) bool: superpixels that share a patch or cover 4-adjacent patches."""
    h, w = grid
    a = (cover > 0).float().view(-1, h, w)
    grown = a.clone()  # each superpixel's patches and their 4-neighbours
    grown[:, 1:] += a[:, :-1]
    grown[:, :-1] += a[:, 1:]
    grown[:, :, 1:] += a[:, :, :-1]
    grown[:, :, :-1] += a[:, :, 1:]
    adj = (grown.flatten(1) > 0).float() @ a.flatten(1).T > 0
    return adj | adj.T


def merge_smallest(cover: Tensor, x: Tensor, grid: tuple[int, int], count: int, ctx: Context) -> Tensor:
    """Merge the smallest superpixel (covered patch area) into its most similar neighbour (cosine of pooled
    features; any superpixel if it has none) until `count` are left. Returns the merged (count, N) coverage."""
    cover = cover.clone()
    alive = torch.ones(len(cover), dtype=torch.bool, device=cover.device)
    feats = torch.nn.functional.normalize(pool(cover, x), dim=1)  # (S, Dv)
    ctx.ledger.add_method_matmul(cover.shape[0], cover.shape[1], x.shape[1])
    sim = feats @ feats.T
    ctx.ledger.add_method_matmul(len(feats), feats.shape[1], len(feats))
    adj = neighbours(cover, grid)
    ctx.ledger.add_method_matmul(cover.shape[0], cover.shape[1], cover.shape[0])
    while int(alive.sum()) > count:
        mass = torch.where(alive, cover.sum(1), torch.inf)
        s = int(mass.argmin())
        cand = alive & adj[s]
        cand[s] = False
        if not bool(cand.any()):
            cand = alive.clone()
            cand[s] = False
        t = int(torch.where(cand, sim[s], -torch.inf).argmax())
        cover[t] += cover[s]
        alive[s] = False
        adj[t] |= adj[s]
        adj[:, t] |= adj[:, s]
        adj[t, t] = False
        feats[t] = torch.nn.functional.normalize(pool(cover[t:t + 1], x), dim=1)[0]
        ctx.ledger.add_method_matmul(1, cover.shape[1], x.shape[1])
        sim[t] = (feats @ feats[t:t + 1].T)[:, 0]
        sim[:, t] = sim[t]
        ctx.ledger.add_method_matmul(len(feats), feats.shape[1], 1)
    return cover[alive]
