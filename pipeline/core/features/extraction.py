"""Extraction: runs the frozen backbone once over every indexed image and caches its features in HDF5.

Every image gets the three feature sets of pipeline/core/models/pooling.py (`avg`, `max`, `pre_logits`), from one forward
pass, so any head's pooling can be chosen later without running the backbone again.

How it runs (docs/extraction.md has the measurements):

- Input: DataLoader workers hand over uint8 pixels, or JPEG bytes that nvjpeg decodes on the GPU
  (`extract.decode`, see pipeline/core/features/loader.py; the JPEG decoders: pipeline/core/features/jpeg_decoders.py);
  normalisation happens on the device. The network runs in channels_last (1.3x faster on CPU, the layout tensor
  cores want on GPU), bf16 autocast with `extract.precision: bf16`. On a CPU, freed memory stays in the heap
  during the run (`retained_heap`): 2.3x faster, no kernel page faults.
- Overlap: the device-to-host copy of a batch's features is asynchronous and is waited for only after the next
  batch has been queued, so the GPU never idles while the host writes.
- Checkpoints: rows are grouped into checkpoints of `extract.checkpoint_rows`; each finished checkpoint is written as
  its own small file in `<out>.partial/` (write, then rename). A killed run resumes from the checkpoints it finished.
- Output: the final file is assembled from the checkpoints into preallocated datasets with full-width chunks, in a
  temporary file renamed into place at the end, so `<out>` is either absent, the previous file, or complete.
  Memory stays flat in the number of images: one batch and at most two checkpoints are ever held.
- torchrun: each rank takes a contiguous share of the checkpoints still to do; global rank 0 assembles the one file.
  The ranks share work through files: on several nodes, every node must see the index, the images and `<out>`'s
  folder at the same paths (checked before any image is read: pipeline/core/features/nodes.py).

With `views=True` the same machinery writes the augmented views file instead (`extract.views` seeded views of each
train image as its rows; pipeline/core/features/views.py).

The file depends only on the index, the backbone and `extract.precision` / `dtype` / `decode`: batch size, workers,
thread count, checkpoint size, number of processes and interruptions leave its bytes unchanged (same machine, no
timestamps, fixed row order and attribute order).
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np
import torch
from tqdm import tqdm

from pipeline.core.data.index import IMAGE_SIZES_KEY, ImageLimits, image_limits, read_index
from pipeline.core.data.preprocess import Preprocess
from pipeline.core.features.jpeg_decoders import JPEG_ROUTES, choose_jpeg_decoder, decoder_version
from pipeline.core.features.loader import DeviceInput, ExtractDataset, make_loader, pad_rows
from pipeline.core.features.nodes import check_nodes_share_files, check_same_choice
from pipeline.core.features.resume import (
    CheckpointWriter,
    assemble,
    check_space_for_extraction,
    checkpoint_spans,
    completed_spans,
    discard_damaged,
    partial_dir,
    prepare_partial,
)
from pipeline.core.features.store import FeatureStore, ShardWriter
from pipeline.core.features.store_space import evict, store_root
from pipeline.core.features.views import VIEW_KEYS, ViewAugment, view_rows, view_settings
from pipeline.core.models.architectures import architecture_data_cfg
from pipeline.core.models.backbone import build_backbone
from pipeline.core.models.feature_sets import FEATURE_SETS
from pipeline.core.models.pooling import FeatureNet
from pipeline.core.models.preprocessing import resolve_image_size
from pipeline.infra.artifacts import sha256_file
from pipeline.infra.config import BackboneConfig, ExtractConfig, to_dict
from pipeline.infra.distributed import process_group
from pipeline.infra.errors import PipelineError
from pipeline.infra.locks import exclusive_output
from pipeline.infra.runtime import dist_info, progress_disabled, resolve_device, retained_heap, set_deterministic

log = logging.getLogger(__name__)

# Ranks wait at barriers for the slowest rank's share of work (at most one checkpoint more than the others) and,
# at start, for rank 0 to load weights; generous, since a timeout kills the whole run.
BARRIER_TIMEOUT = datetime.timedelta(hours=2)


class ExtractError(PipelineError, ValueError):
    """The index or a partial extraction cannot be used as it is; the message says what to do."""


def library_versions(jpeg_decoder: str | None = None) -> dict[str, str]:
    """The versions recorded in the file; TorchCodec's only when it decoded (the `pil` file's bytes stay as they were;
    torchvision's, whose decoder the JPEG route may use, is always there)."""
    import PIL
    import timm
    import torchvision

    versions = {"torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__,
                "h5py": h5py.__version__, "numpy": np.__version__, "pillow": PIL.__version__}
    if jpeg_decoder == "torchcodec":
        versions["torchcodec"] = decoder_version("torchcodec")
    return versions


def share(items: Sequence, rank: int, world_size: int) -> list:
    """This rank's contiguous slice of `items`; slice sizes differ by at most one."""
    base, extra = divmod(len(items), world_size)
    start = rank * base + min(rank, extra)
    return list(items[start:start + base + (1 if rank < extra else 0)])


def _check_index(rows: list[dict], index_dir: Path) -> None:
    if not rows:
        raise ExtractError(f"the index in {index_dir} is empty; nothing to extract (check data.source and rerun "
                           "prepare)")
    seen: set[str] = set()
    for i, row in enumerate(rows):
        if int(row["id"]) != i:
            raise ExtractError(f"{index_dir}/index.csv is not in id order at row {i}; rerun prepare")
        if row["split"] in seen and rows[i - 1]["split"] != row["split"]:
            raise ExtractError(f"{index_dir}/index.csv is not sorted by split at row {i}; rerun prepare")
        seen.add(row["split"])


def forward_pooled(net: FeatureNet, x: torch.Tensor, bf16: bool) -> dict[str, torch.Tensor]:
    """The feature sets (avg, max, pre_logits) of a normalised batch, in fp32.

    Small batches are padded (pipeline.loader.MIN_FORWARD_ROWS) so every row's bits are those of a full batch.
    Average and max pooling run in fp32 even under bf16 autocast, so only the network, not the average, is rounded to
    bf16; `pre_logits` is the model's own head path (norms, token pick, attention pooling) under the same autocast.
    """
    rows = len(x)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        fmap = net(pad_rows(x))
        pre = net.feature_sets(fmap, ("pre_logits",))["pre_logits"]
    out = net.feature_sets(fmap.float(), ("avg", "max"))
    out["pre_logits"] = pre.float()
    return {k: out[k][:rows] for k in FEATURE_SETS}


@dataclass
class _InFlight:
    """A batch's features on their way to the host (asynchronous from a GPU, already there on a CPU)."""

    ids: np.ndarray
    arrays: dict[str, torch.Tensor]
    event: torch.cuda.Event | None

    @classmethod
    def start(cls, ids: np.ndarray, arrays: dict[str, torch.Tensor]) -> "_InFlight":
        # non_blocking device-to-host copies land in pinned memory; the event says when they are complete
        event = None
        if arrays["avg"].device.type == "cuda":
            arrays = {k: v.to("cpu", non_blocking=True) for k, v in arrays.items()}
            event = torch.cuda.Event()
            event.record()
        return cls(ids, arrays, event)

    def finish(self, writer: CheckpointWriter, rows: list[dict], shards: ShardWriter | None = None) -> int:
        """Waits for the copy, hands the rows to the checkpoint writer (and the store); returns the number of rows."""
        if self.event is not None:
            self.event.synchronize()
        arrays = {k: v.numpy() for k, v in self.arrays.items()}
        writer.add(self.ids, arrays)
        if shards is not None:
            keep = [j for j, i in enumerate(self.ids) if storable(rows[i]["sha256"])]
            shards.add([rows[self.ids[j]]["sha256"] for j in keep], {k: v[keep] for k, v in arrays.items()})
        return len(self.ids)


class _Reuse:
    """The rows of the checkpoints to do that the feature store already holds, handed to the checkpoint writer span by
    span, just before the first newly computed row of that span (so only a span or two are ever half filled)."""

    def __init__(self, store: FeatureStore, rows: list[dict], todo: Sequence[tuple[int, int]],
                 writer: CheckpointWriter):
        self.store, self.rows, self.writer = store, rows, writer
        self.spans = sorted(todo)
        # decided once, before any new row enters the store; copies of one image (duplicates anywhere in the index)
        # are all read from its one stored row, or all computed
        self.by_span = {s: [i for i in range(*s) if storable(rows[i]["sha256"]) and rows[i]["sha256"] in store.rows]
                        for s in self.spans}
        reused = {i for ids in self.by_span.values() for i in ids}
        self.compute = [i for s in self.spans for i in range(*s) if i not in reused]
        self.next = 0
        self.reused = 0
        self.damaged: list[int] = []

    def fill_up_to(self, last_id: int) -> None:
        """Hands over the stored rows of every span that starts at or before row `last_id`."""
        while self.next < len(self.spans) and self.spans[self.next][0] <= last_id:
            ids = np.array(self.by_span[self.spans[self.next]], dtype=np.int64)
            self.next += 1
            if not len(ids):
                continue
            arrays, ok = self.store.read([self.rows[i]["sha256"] for i in ids], self.writer.widths,
                                         self.writer.dtype.name)
            self.writer.add(ids[ok], {k: v[ok] for k, v in arrays.items()})
            self.reused += int(ok.sum())
            self.damaged += ids[~ok].tolist()


class _Clock:
    """When an extraction's milestones happen, for the summary's time split (issue 27: on an H200 ~6 s of each run
    was fixed cost, and one total could not say where it went).

    Three parts that sum to the wall time of :func:`extract_features`: up to the first batch's features on the host
    (backbone build and weights, device and JPEG decoder set-up, checkpoint plan, DataLoader worker start-up, first
    decode and forward), the batches after the first (the steady rate), and after the last batch (store write-back,
    HDF5 assembly from the checkpoints, rename, eviction).
    """

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first: float | None = None  # when the first batch's features were on the host
        self.last: float | None = None  # when the last one's were
        self.first_rows = 0
        self.rows = 0

    def batch_done(self, rows: int) -> None:
        """Notes that a batch of `rows` rows has reached the host (and the checkpoint writer)."""
        now = time.perf_counter()
        if self.first is None:
            self.first, self.first_rows = now, rows
        self.last = now
        self.rows += rows

    def split(self) -> dict:
        """The time split up to now: wall_s = first_batch_s + steady_s + after_last_batch_s. The batch parts are
        None when no row ran through the backbone (all resumed or reused); then after_last_batch_s is the wall time
        after setting up."""
        end = time.perf_counter()
        if self.first is None or self.last is None:
            return {"wall_s": end - self.start, "first_batch_s": None, "steady_s": None, "steady_rows": 0,
                    "steady_img_per_s": None, "after_last_batch_s": None}
        steady_s, steady_rows = self.last - self.first, self.rows - self.first_rows
        return {"wall_s": end - self.start, "first_batch_s": self.first - self.start, "steady_s": steady_s,
                "steady_rows": steady_rows,
                "steady_img_per_s": steady_rows / steady_s if steady_rows and steady_s > 0 else None,
                "after_last_batch_s": end - self.last}


@dataclass(frozen=True)
class _Images:
    """The indexed images of one extraction: where they are, the index rows, and the limits prepare vetted them
    under (recorded in classes.json), which every reader applies again."""

    root: Path
    rows: list[dict]
    limits: ImageLimits
    augment: ViewAugment | None = None  # a views file's rows: each image under its seeded augmentation


def _run_backbone(net: FeatureNet, pre: Preprocess, images: _Images, ids: list[int],
                  writer: CheckpointWriter, cfg: ExtractConfig, device: torch.device, reuse: _Reuse | None,
                  shards: ShardWriter | None, jpeg_decoder: str | None, clock: _Clock | None = None) -> int:
    """Runs the rows `ids` (in index order) through the backbone into the checkpoint writer (and the store);
    `jpeg_decoder`: the JPEG route's decoder (:func:`choose_jpeg_decoder`), None for `decode: pil`; `clock` notes
    when each batch reaches the host."""
    if not ids:
        return 0
    rows = images.rows
    seeds = None if images.augment is None else [rows[i]["view_seed"] for i in ids]
    dataset = ExtractDataset(images.root, [rows[i]["path"] for i in ids], ids, pre, cfg.decode,
                             defer_jpeg=device.type == "cuda", limits=images.limits, jpeg_decoder=jpeg_decoder,
                             augment=images.augment, view_seeds=seeds)
    loader = make_loader(dataset, cfg.batch_size, cfg.workers, device)
    to_input = DeviceInput(pre, device, jpeg_decoder)
    pending: _InFlight | None = None
    with torch.inference_mode(), tqdm(total=len(ids), desc="extract", unit="img", disable=progress_disabled()) as bar:
        for batch in loader:
            if reuse is not None:
                reuse.fill_up_to(int(batch.ids.max()))
            current = _InFlight.start(batch.ids.numpy(), forward_pooled(net, to_input(batch), cfg.precision == "bf16"))
            if pending is not None:  # the previous batch's copy has had this batch's queueing time to land
                bar.update(_finish(pending, writer, rows, shards, clock))
            pending = current
            if clock is not None and clock.first is None:
                # the very first batch is waited for at once, so the clock sees when its features are on the host
                # (a GPU's forward is asynchronous); one batch less of overlap, the same rows in the same order
                bar.update(_finish(pending, writer, rows, shards, clock))
                pending = None
        if pending is not None:
            bar.update(_finish(pending, writer, rows, shards, clock))
    return len(ids)


def _finish(batch: _InFlight, writer: CheckpointWriter, rows: list[dict], shards: ShardWriter | None,
            clock: _Clock | None) -> int:
    """:meth:`_InFlight.finish`, noted on the clock; returns the number of rows."""
    done = batch.finish(writer, rows, shards)
    if clock is not None:
        clock.batch_done(done)
    return done


def storable(digest: str) -> bool:
    """Whether a row's content hash can key the store: a SHA-256 in hex. An index written without hashes (an empty
    column) would otherwise make every row the same image."""
    return len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)


def _run_rows(net: FeatureNet, pre: Preprocess, images: _Images, todo: Sequence[tuple[int, int]],
              writer: CheckpointWriter, cfg: ExtractConfig, device: torch.device,
              store: FeatureStore | None = None, jpeg_decoder: str | None = None,
              clock: _Clock | None = None) -> tuple[int, int]:
    """Extracts the rows of the checkpoints `todo`, taking what the store holds from it; returns (rows run through
    the backbone, rows reused from the store)."""
    if store is None:
        ran = _run_backbone(net, pre, images, [i for s in todo for i in range(*s)], writer, cfg, device, None, None,
                            jpeg_decoder, clock)
        writer.check_complete()
        return ran, 0
    reuse = _Reuse(store, images.rows, todo, writer)
    shards = ShardWriter(store, cfg.checkpoint_rows, cfg.dtype)
    ran = _run_backbone(net, pre, images, reuse.compute, writer, cfg, device, reuse, shards, jpeg_decoder, clock)
    reuse.fill_up_to(len(images.rows))  # the spans after the last new row
    if reuse.damaged:  # rows whose stored copy failed its digest: computed again, never trusted
        ran += _run_backbone(net, pre, images, reuse.damaged, writer, cfg, device, None, shards, jpeg_decoder, clock)
    shards.flush()
    writer.check_complete()
    return ran, reuse.reused


def _open_store(cfg: ExtractConfig, index_dir: Path, fingerprint: dict, is_main: bool) -> FeatureStore | None:
    """The feature store for this extraction's settings (None when `extract.store` is null; `auto`: beside the
    index folder, shared by every extraction of that index).

    Its key leaves out what does not change a row's bits: the index (rows outlive index changes), the classes and
    the checkpoint size; and the augmented views' settings, which their rows' digests hold (so a views file shares
    the plain file's store, and K = 8 reuses the views of K = 4)."""
    if cfg.store is None:
        return None
    key = {k: v for k, v in fingerprint.items()
           if k not in ("index_sha256", "classes", "checkpoint_rows", *VIEW_KEYS)}
    store = FeatureStore.open(store_root(cfg.store, index_dir), key)
    if is_main:
        log.info("extract: feature store %s holds %d rows for these settings", store.folder, len(store.rows))
    return store


def extract_features(index_dir: Path, out: Path, backbone: BackboneConfig, cfg: ExtractConfig,
                     views: bool = False) -> dict:
    """Writes the features file for every row of the index (resuming a partial run); returns a summary.

    `views`: write the augmented views file instead (`cfg.views` seeded views of each train image, through PIL;
    pipeline/core/features/views.py), with the same checkpoints, store and torchrun sharing.

    Under torchrun every rank calls this; each extracts its share and rank 0 writes `out`. `backbone.image_size:
    auto` is resolved from the index's train image sizes; the summary's `backbone_config` holds the size used. The
    summary's time split (`wall_s` = `first_batch_s` + `steady_s` + `after_last_batch_s`, and `steady_img_per_s`)
    says how much of a run is fixed cost (see :class:`_Clock`); `seconds` and `img_per_s` start after the backbone
    is built, as before.

    Raises:
        OutputLockedError: another run is writing `out` (rank 0 holds the output's lock for the whole run, so a
            second run stops before touching the checkpoints the first one is writing and assembling).
    """
    clock = _Clock()  # started before the lock: waiting for it is part of the fixed cost a caller sees
    lock = exclusive_output(out) if dist_info().is_main else contextlib.nullcontext()
    with lock:
        return _extract(Path(index_dir), Path(out), backbone, cfg, clock, views)


def _file_attrs(net: FeatureNet, pre: Preprocess, weights_sha: str, backbone: BackboneConfig, cfg: ExtractConfig,
                index_dir: Path, classes: list[str], jpeg_decoder: str | None = None) -> dict:
    """The features file's attributes: its fingerprint (what the stale-features check compares) and what readers
    need (feature sets, widths, layout, the architecture's own preprocessing config).

    With `decode: jpeg`, `jpeg_decoder` records which decoder made the pixels (TorchCodec or torchvision: nvJPEG
    through either is not known to give the same bytes), and so keys checkpoints and store rows apart; `torchcodec`
    and `torchvision` name it in `decode` already, and their files keep the attributes they had.
    """
    chosen = {"jpeg_decoder": jpeg_decoder} if cfg.decode == "jpeg" else {}
    return {
        **chosen,
        "backbone": backbone.name, "weights": backbone.weights, "weights_sha256": weights_sha,
        "preprocess": json.dumps(pre.to_dict(), sort_keys=True), "precision": cfg.precision,
        "dtype": cfg.dtype, "decode": cfg.decode, "index_sha256": sha256_file(index_dir / "index.csv"),
        "classes": json.dumps(classes), "num_features": net.num_features,
        "versions": json.dumps(library_versions(jpeg_decoder), sort_keys=True), "pooling_order": "avg,max",
        # what the heads' `pooling: auto` and the readers need: datasets, their widths, the map's layout
        "feature_sets": ",".join(FEATURE_SETS), "pre_logits_features": net.widths["pre_logits"],
        "feature_layout": net.layout, "num_prefix_tokens": net.prefix_tokens,
        # the architecture's own preprocessing config: checks of this file rebuild the expected preprocessing
        # from it instead of importing timm (pipeline.core.features.staleness.recorded_data_cfg)
        "data_cfg": json.dumps(architecture_data_cfg(backbone.name), sort_keys=True),
    }


@dataclass(frozen=True)
class _Plan:
    """Which checkpoints exist, which are done (a resumed run), and which this rank computes."""

    partial: Path
    spans: list[tuple[int, int]]
    mine: list[tuple[int, int]]
    resumed: int


def _plan(out: Path, n_rows: int, fingerprint: dict, cfg: ExtractConfig, widths: dict[str, int], source: Path,
          barrier) -> _Plan:
    """Prepares the resume folder (rank 0), checks that every rank shares it, the index and the images (several
    nodes), lists finished checkpoints, shares the rest out between ranks, and checks the disk before any image is
    read."""
    info = dist_info()
    spans = checkpoint_spans(n_rows, cfg.checkpoint_rows)
    partial = partial_dir(out)
    if info.is_main:
        prepare_partial(partial, fingerprint)
        discard_damaged(partial, spans)  # a damaged checkpoint is recomputed, never merged
        for stale in out.parent.glob(f".{out.name}.*.tmp"):  # from a run killed while writing the file
            stale.unlink(missing_ok=True)
    barrier()
    check_nodes_share_files(partial, fingerprint["index_sha256"], source)
    done = completed_spans(partial, spans)
    todo = [s for s in spans if s not in done]
    mine = share(todo, info.rank, info.world_size)
    barrier()  # every rank has listed the checkpoints before any rank writes a new one
    resumed = sum(stop - start for start, stop in done)
    if info.is_main:  # before any image is read: a disk that fills later may crash h5py without a message
        check_space_for_extraction(out, n_rows - resumed, n_rows, widths, cfg.dtype)
    if done and info.is_main:
        log.info("extract: resuming from %s: %d of %d rows already extracted, %d to go", partial, resumed, n_rows,
                 n_rows - resumed)
    return _Plan(partial, spans, mine, resumed)


def _extract(index_dir: Path, out: Path, backbone: BackboneConfig, cfg: ExtractConfig, clock: _Clock,
             views: bool) -> dict:
    """:func:`extract_features` under the output's lock: resolve the size, build the network, plan the checkpoints,
    run (or reuse) the rows, assemble the file, and return the summary."""
    rows, meta = read_index(index_dir)
    _check_index(rows, index_dir)
    if views:
        if cfg.decode != "pil" and dist_info().is_main:
            log.info("extract: augmented views are decoded with PIL (the augmentation is PIL's); extract.decode: %s "
                     "applies to the plain view", cfg.decode)
        cfg = dataclasses.replace(cfg, decode="pil")
        rows = view_rows(rows, cfg)
        if not rows:
            raise ExtractError(f"extract.views: {cfg.views} but the index in {index_dir} has no train images to "
                               "augment")
    info = dist_info()
    backbone, size_reason = resolve_image_size(backbone, meta.get(IMAGE_SIZES_KEY))
    if info.is_main:
        log.info("extract: image size %d px (%s)", backbone.image_size, size_reason)
    set_deterministic()
    device = resolve_device(cfg.device)
    images = _Images(Path(meta["source"]), rows, image_limits(meta))
    with process_group(device, BARRIER_TIMEOUT) as (_, barrier):
        jpeg_decoder = None
        if cfg.decode in JPEG_ROUTES:  # every rank probes its own device; all must decode alike
            jpeg_decoder = check_same_choice("JPEG decoder", choose_jpeg_decoder(cfg.decode, device))
        net, pre, weights_sha = build_backbone(backbone)
        net = net.to(device, memory_format=torch.channels_last).eval()
        for p in net.parameters():
            p.requires_grad_(False)
        attrs = _file_attrs(net, pre, weights_sha, backbone, cfg, index_dir, meta["classes"], jpeg_decoder)
        if views:
            attrs.update({k: v for k, v in view_settings(cfg).items() if v is not None})  # HDF5 has no None
            images = dataclasses.replace(images, augment=ViewAugment.from_config(pre, cfg))
        # Checkpoints from another checkpoint size or device type (CPU and GPU agree only to ~1e-5) are not reused.
        fingerprint = {**attrs, "checkpoint_rows": cfg.checkpoint_rows, "device_type": device.type}
        t0 = time.perf_counter()
        plan = _plan(out, len(rows), fingerprint, cfg, net.widths, images.root, barrier)
        writer = CheckpointWriter(plan.partial, plan.spans, net.widths, cfg.dtype)
        store = _open_store(cfg, index_dir, fingerprint, info.is_main)
        with retained_heap(enabled=device.type == "cpu"):  # on a GPU the activations are not in host memory
            extracted, reused = _run_rows(net, pre, images, plan.mine, writer, cfg, device, store, jpeg_decoder,
                                          clock)
        if store is not None:
            log.info("extract: %d rows reused from the feature store %s, %d run through the backbone%s", reused,
                     store.folder, extracted, f" (rank {info.rank})" if info.world_size > 1 else "")
        barrier()  # all checkpoints are on disk
        if info.is_main:
            assemble(out, plan.partial, plan.spans, rows, attrs, net.widths, cfg.dtype)
            shutil.rmtree(plan.partial, ignore_errors=True)
            if store is not None:  # the other settings, least recently used first, down to extract.store_max_gb
                evict(store.folder.parent, cfg.store_max_gb, keep=store.folder)
        seconds = time.perf_counter() - t0
    return {"rows": len(rows), "rows_extracted": extracted, "rows_resumed": plan.resumed, "rows_reused": reused,
            "seconds": seconds, **clock.split(),
            "img_per_s": extracted / seconds if seconds > 0 else 0.0, "device": str(device),
            "rank": info.rank, "world_size": info.world_size, "num_features": net.num_features, "widths": net.widths,
            "preprocess": pre.to_dict(), "weights_sha256": weights_sha, "backbone_config": to_dict(backbone),
            "image_size_reason": size_reason,
            "extract_config": to_dict(cfg)}
