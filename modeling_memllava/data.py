"""LLaVA-Video-178K reader: raw samples (video bytes + conversation), streamed from the Hub layout.

The dataset on the Hub (`lmms-lab/LLaVA-Video-178K`) has one folder per subset holding small JSON annotation files
and ~5 GB `.tar.gz` video archives. A `.tar.gz` cannot seek, so the reader is archive-driven: it loads the JSON
annotations into an index keyed by (normalised) video path, then streams each archive once, member by member, and
emits one sample per annotation record whose video matches the member. Local folders, `file://` URLs, `hf://` URLs
and bare Hub repo ids all go through the same code: one `(fsspec filesystem, base path)` pair, resolved once.

Turning samples into model features (decoding, tokenising, skipping bad ones) happens in `training.py`.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import pickle
import posixpath
import random
import re
import shutil
import tarfile
import tempfile
import weakref
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from urllib.parse import quote

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem


logger = logging.getLogger(__name__)

KINDS = ("cap", "mc", "oe")
HUB_REPO_ID = "lmms-lab/LLaVA-Video-178K"
_ARCHIVE_RE = re.compile(r"^(?P<subset>.+)_videos_(?P<n>\d+)\.tar\.gz$")
_REPO_ID_RE = re.compile(r"^[\w.-]+/[\w.-]+$")
# Worker processes write their progress here every so many samples (and at every skip and at the end), so counts
# made inside dataloader workers reach the main process even when training stops mid-stream.
_STATE_EVERY = 256
_RUN_NUMBERS = itertools.count()  # names each run's state file uniquely within a worker process


# -- skip counting ----------------------------------------------------------------------------------------------------


class SkipCounter:
    """Counts skipped samples by reason and remembers their ids. Picklable, mergeable across processes.

    Reasons: "missing_video" and "unsafe_member" (reader side), "undecodable_video", "malformed_conversation" and
    "too_long" (training side).
    """

    def __init__(self):
        self._ids: dict[str, list[str]] = defaultdict(list)

    def skip(self, reason: str, sample_id: str) -> None:
        """Record that `sample_id` was skipped for `reason`."""
        self._ids[reason].append(str(sample_id))

    @property
    def counts(self) -> dict[str, int]:
        """reason -> number of skips."""
        return {reason: len(ids) for reason, ids in self._ids.items()}

    @property
    def ids(self) -> dict[str, list[str]]:
        """reason -> skipped ids, in the order they were skipped."""
        return {reason: list(ids) for reason, ids in self._ids.items()}

    @property
    def total(self) -> int:
        return sum(len(ids) for ids in self._ids.values())

    def merge(self, other: "SkipCounter | dict") -> "SkipCounter":
        """Add another counter's skips (a `SkipCounter` or its `as_dict()`) to this one; returns self."""
        ids = other["ids"] if isinstance(other, dict) else other._ids
        for reason, reason_ids in ids.items():
            self._ids[reason].extend(reason_ids)
        return self

    def as_dict(self) -> dict:
        return {"counts": self.counts, "ids": self.ids, "total": self.total}

    def __getstate__(self):
        return {"ids": dict(self._ids)}

    def __setstate__(self, state):
        self._ids = defaultdict(list, state["ids"])

    def __repr__(self) -> str:
        return f"SkipCounter({self.counts})"


# -- paths and filesystems --------------------------------------------------------------------------------------------


def normalise_video_path(path: str, subset: str | None = None) -> str:
    """Canonical form used to join annotation paths with archive members: forward slashes, no leading `./`
    (repeated or not) and no leading `<subset>/` (archives sometimes nest members under the subset folder)."""
    path = path.replace("\\", "/")
    while path.startswith("./"):
        path = path[2:]
    if subset and path.startswith(subset + "/"):
        path = path[len(subset) + 1 :]
    while path.startswith("./"):
        path = path[2:]
    return path


def is_unsafe_member(member: tarfile.TarInfo) -> bool:
    """True for members that must never be read: absolute paths, `..` components, links, devices, fifos.

    Directories are not unsafe (real archives contain them); the reader ignores them without counting.
    """
    name = member.name.replace("\\", "/")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return True
    if ".." in name.split("/"):
        return True
    return not member.isfile()


def annotation_filenames(subset: str) -> dict[str, str]:
    """kind -> annotation file name inside the subset folder, exactly as on the Hub.

    Captions keep the full subset name; the QA files drop its `_v0_1` suffix and put `_<kind>_v0_1_qa` instead.
    """
    stem = subset[: -len("_v0_1")] if subset.endswith("_v0_1") else subset
    return {
        "cap": f"{subset}_cap_processed.json",
        "mc": f"{stem}_mc_v0_1_qa_processed.json",
        "oe": f"{stem}_oe_v0_1_qa_processed.json",
    }


def hub_base_path(repo_id: str, revision: str | None = None) -> str:
    """The `HfFileSystem` path of a dataset repo at `revision`: `datasets/<repo_id>[@<revision>]`.

    Revisions containing `/` (branches like `feature/x`) are URL-quoted, as HfFileSystem expects; `refs/pr/N` and
    `refs/convert/...` are written as they are (HfFileSystem parses them specially).
    """
    base = f"datasets/{repo_id}"
    if revision:
        try:
            from huggingface_hub.hf_file_system import safe_revision
        except ImportError:  # older/newer layouts: quoting everything is what safe_revision does for plain names
            def safe_revision(rev):
                return quote(rev, safe="")
        base += "@" + safe_revision(revision)
    return base


def resolve_root(root: str | os.PathLike, revision: str | None = None, filesystem=None) -> tuple:
    """Resolve `root` to one `(fsspec filesystem, base path)` pair; everything after uses only `fs.ls/open`.

    - `filesystem` given: used as is, `root` is a path inside it.
    - an existing local directory: the local filesystem.
    - `hf://...`: `huggingface_hub.HfFileSystem`, with `revision` appended to the repo part (`@rev`).
    - any other URL (`file://`, `s3://`, ...): `fsspec.url_to_fs`.
    - `owner/name` that is not a local directory: a Hub dataset repo id, through `HfFileSystem`.
    """
    root = os.fspath(root)
    if filesystem is not None:
        return filesystem, root.rstrip("/")
    if os.path.isdir(root):
        return LocalFileSystem(), os.path.abspath(root)
    if root.startswith("hf://"):
        path = root[len("hf://") :].strip("/")
        parts = path.split("/")
        if parts[0] in ("datasets", "spaces", "models"):
            repo_type, repo_parts, rest = parts[0], parts[1:3], parts[3:]
        else:  # hf://owner/name is a model repo for HfFileSystem; this reader only reads datasets
            raise ValueError(f"{root}: expected hf://datasets/<owner>/<name>[@revision][/path]")
        if len(repo_parts) < 2:
            raise ValueError(f"{root}: expected hf://datasets/<owner>/<name>[@revision][/path]")
        repo = "/".join(repo_parts)
        if "@" in repo:
            repo, in_path = repo.split("@", 1)
            if revision is not None and in_path not in (revision, quote(revision, safe="")):
                raise ValueError(f"{root}: revision {in_path!r} in the URL conflicts with revision={revision!r}")
            revision = revision or in_path
        base = hub_base_path(repo, revision) if repo_type == "datasets" else f"{repo_type}/{repo}"
        return _hf_filesystem(), "/".join([base, *rest])
    if "://" in root:
        fs, path = fsspec.url_to_fs(root)
        return fs, path.rstrip("/")
    if _REPO_ID_RE.match(root):
        return _hf_filesystem(), hub_base_path(root, revision)
    raise FileNotFoundError(f"{root}: not a local directory, an fsspec URL or a Hub dataset repo id (owner/name)")


def _hf_filesystem():
    # Looked up on the module at call time so tests can monkeypatch `huggingface_hub.HfFileSystem`.
    import huggingface_hub

    return huggingface_hub.HfFileSystem()


def _protocols(fs) -> tuple:
    protocol = getattr(fs, "protocol", ())
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


# -- the reader -------------------------------------------------------------------------------------------------------


class LlavaVideo178K(torch.utils.data.IterableDataset):
    """Streams LLaVA-Video-178K samples: `{"id", "video", "video_bytes", "conversations", "data_source", "subset",
    "kind"}`, one per annotation record whose video is found in an archive.

    Args:
        root: a local folder in the Hub layout, an fsspec URL (`file://...`, `hf://datasets/<owner>/<name>`) or a
            Hub dataset repo id (`lmms-lab/LLaVA-Video-178K`).
        subsets: subset folder names, e.g. `["0_30_s_academic_v0_1"]`.
        kinds: annotation kinds to read: "cap" (captions), "mc" (multiple choice), "oe" (open-ended QA).
        revision: Hub revision (branch, tag or commit) when reading from the Hub.
        shuffle_buffer: size of the shuffle buffer in samples; 0 turns shuffling off (archive order too).
        seed: shuffling seed; combined with the epoch (`set_epoch`).
        rank, world_size: this process's place among distributed ranks.
        counter: `SkipCounter` for "unsafe_member" skips (shared with the training side).
        filesystem: an fsspec filesystem to read `root` from, instead of resolving it.

    Sharding: shards = world_size x dataloader workers, shard id = rank * num_workers + worker_id. Archives go to
    shards round-robin; with fewer archives than shards, every shard streams every archive and keeps every k-th
    member (k = number of shards). No two shards emit the same sample.

    State after iterating (this process): `matched_ids`, `unmatched_members`, `samples_emitted`, `exhausted`.
    Dataloader workers report theirs through small files that `stream_state()` merges (see `gather_counts`).
    """

    def __init__(
        self,
        root,
        *,
        subsets: Sequence[str],
        kinds: Sequence[str] = KINDS,
        revision: str | None = None,
        shuffle_buffer: int = 0,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        counter: SkipCounter | None = None,
        filesystem=None,
    ):
        if isinstance(subsets, str):
            subsets = [subsets]
        if not subsets:
            raise ValueError("subsets must name at least one subset folder")
        kinds = tuple(kinds)
        unknown = [kind for kind in kinds if kind not in KINDS]
        if unknown or not kinds:
            raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {kinds}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.root = os.fspath(root)
        self.subsets = list(subsets)
        self.kinds = kinds
        self.revision = revision
        self.shuffle_buffer = int(shuffle_buffer)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.counter = counter if counter is not None else SkipCounter()
        self.epoch = 0
        self.fs, self.base = resolve_root(self.root, revision, filesystem)
        # Fail early, with the expected names, rather than after a 5 GB download.
        self.annotation_files, self.archives = self._discover()
        self._index = None  # loaded lazily: {subset: {normalised video path: [(kind, record), ...]}}

        self.matched_ids: set[str] = set()
        self.unmatched_members = 0
        self.samples_emitted = 0
        self.exhausted = False
        self.reader_skips = SkipCounter()  # this reader's own skips (also forwarded to `counter`)
        self._creator_pid = os.getpid()
        self._state_dir = tempfile.mkdtemp(prefix="memllava-reader-")
        weakref.finalize(self, _remove_state_dir, self._state_dir, self._creator_pid)

    # -- discovery and annotations --

    def _subset_path(self, subset: str) -> str:
        return f"{self.base}/{subset}"

    def _discover(self) -> tuple[dict, list]:
        """Check every subset folder and return ({(subset, kind): path}, [(subset, n, path) sorted])."""
        annotation_files, archives = {}, []
        for subset in self.subsets:
            folder = self._subset_path(subset)
            expected = annotation_filenames(subset)
            try:
                names = {posixpath.basename(p.rstrip("/")) for p in self.fs.ls(folder, detail=False)}
            except FileNotFoundError as error:
                raise FileNotFoundError(
                    f"{folder}: subset folder not found; expected it to contain "
                    f"{[expected[k] for k in self.kinds]} and {subset}_videos_<N>.tar.gz"
                ) from error
            for kind in self.kinds:
                if expected[kind] not in names:
                    raise FileNotFoundError(f"{folder}/{expected[kind]}: {kind} annotation file not found in {folder}")
                annotation_files[(subset, kind)] = f"{folder}/{expected[kind]}"
            found = []
            for name in names:
                match = _ARCHIVE_RE.match(name)
                if match and match["subset"] == subset:
                    found.append((subset, int(match["n"]), f"{folder}/{name}"))
            if not found:
                raise FileNotFoundError(f"{folder}: no video archives named {subset}_videos_<N>.tar.gz")
            archives.extend(sorted(found))
        return annotation_files, archives

    def _load_index(self) -> dict:
        if self._index is None:
            index: dict = {subset: defaultdict(list) for subset in self.subsets}
            for (subset, kind), path in self.annotation_files.items():
                with self.fs.open(path, "rb") as handle:
                    records = json.load(handle)
                if not isinstance(records, list):
                    raise ValueError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
                for record in records:
                    video = record.get("video") if isinstance(record, dict) else None
                    if isinstance(video, str):  # records without a video stay unmatched -> "missing_video"
                        index[subset][normalise_video_path(video, subset)].append((kind, record))
            self._index = {subset: dict(paths) for subset, paths in index.items()}
        return self._index

    def annotation_ids(self) -> set[str]:
        """Ids of every annotation record in the selected subsets and kinds (for the missing-video report)."""
        ids = set()
        for path in self.annotation_files.values():
            with self.fs.open(path, "rb") as handle:
                for record in json.load(handle):
                    if isinstance(record, dict) and "id" in record:
                        ids.add(str(record["id"]))
        return ids

    # -- epochs and sharding --

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch: it seeds both the archive order and the shuffle buffer."""
        self.epoch = int(epoch)

    def _shard(self) -> tuple[int, int, int]:
        """(shard id, number of shards, worker id) for the calling process."""
        info = torch.utils.data.get_worker_info()
        num_workers, worker_id = (info.num_workers, info.id) if info is not None else (1, 0)
        return self.rank * num_workers + worker_id, self.world_size * num_workers, worker_id

    def _archive_order(self) -> list:
        archives = list(self.archives)
        if self.shuffle_buffer > 0:
            # Seeded by (seed, epoch) only, never by rank: every rank must agree on the order it shards.
            random.Random(f"archives:{self.seed}:{self.epoch}").shuffle(archives)
        return archives

    def _plan(self, shard_id: int, num_shards: int) -> tuple[list, int]:
        """(archives this shard streams, member stride): whole archives when there are enough to go round,
        otherwise every archive with every `num_shards`-th member."""
        archives = self._archive_order()
        if len(archives) >= num_shards:
            return archives[shard_id::num_shards], 1
        return archives, num_shards

    # -- streaming --

    def _members(self, archives: list, stride: int, shard_id: int, run: "_RunState") -> Iterator[dict]:
        index = self._load_index()
        open_kwargs = {"block_size": 0} if "hf" in _protocols(self.fs) else {}  # HfFileSystem: plain stream
        position = -1
        for subset, _, path in archives:
            with self.fs.open(path, "rb", **open_kwargs) as raw, tarfile.open(fileobj=raw, mode="r|gz") as tar:
                while (member := tar.next()) is not None:
                    tar.members = []  # stream mode keeps every TarInfo otherwise; archives hold thousands
                    if member.isdir():
                        continue
                    position += 1  # the same count on every shard, so member ownership never overlaps
                    if position % stride != shard_id % stride:
                        continue
                    if is_unsafe_member(member):
                        run.skip(self, "unsafe_member", member.name)
                        continue
                    records = index[subset].get(normalise_video_path(member.name, subset))
                    if not records:
                        run.unmatched(self)
                        continue
                    video_bytes = tar.extractfile(member).read()
                    for kind, record in records:
                        yield {
                            "id": str(record.get("id")),
                            "video": record["video"],
                            "video_bytes": video_bytes,
                            "conversations": record.get("conversations"),
                            "data_source": record.get("data_source"),
                            "subset": subset,
                            "kind": kind,
                        }

    def _shuffled(self, samples: Iterable[dict], shard_id: int) -> Iterator[dict]:
        if self.shuffle_buffer <= 0:
            yield from samples
            return
        rng = random.Random(f"buffer:{self.seed}:{self.epoch}:{shard_id}")
        buffer: list[dict] = []
        for sample in samples:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(sample)
                continue
            slot = rng.randrange(len(buffer))
            buffer[slot], sample = sample, buffer[slot]
            yield sample
        rng.shuffle(buffer)
        yield from buffer

    def __iter__(self) -> Iterator[dict]:
        shard_id, num_shards, worker_id = self._shard()
        in_worker = torch.utils.data.get_worker_info() is not None
        run = _RunState(self, worker_id, num_shards // self.world_size, in_worker)
        archives, stride = self._plan(shard_id, num_shards)
        for sample in self._shuffled(self._members(archives, stride, shard_id, run), shard_id):
            run.emitted(self, sample["id"])
            yield sample
        run.finish(self)

    # -- state across dataloader workers --

    def stream_state(self) -> dict:
        """This rank's progress: this process's own plus what its dataloader workers reported.

        Returns `{"matched_ids", "unmatched_members", "samples_emitted", "exhausted", "worker_skips"}`;
        `worker_skips` holds only skips made inside workers (main-process skips are already in `counter`).
        """
        state = {
            "matched_ids": set(self.matched_ids),
            "unmatched_members": self.unmatched_members,
            "samples_emitted": self.samples_emitted,
            "exhausted": self.exhausted,
            "worker_skips": SkipCounter(),
        }
        finished = defaultdict(set)  # (epoch, num_workers) -> worker ids that streamed to the end
        for name in sorted(os.listdir(self._state_dir)) if os.path.isdir(self._state_dir) else ():
            if not name.endswith(".pkl"):
                continue
            with open(os.path.join(self._state_dir, name), "rb") as handle:
                report = pickle.load(handle)
            state["matched_ids"] |= report["matched_ids"]
            state["unmatched_members"] += report["unmatched_members"]
            state["samples_emitted"] += report["samples_emitted"]
            state["worker_skips"].merge(report["skips"])
            if report["exhausted"]:
                finished[(report["epoch"], report["num_workers"])].add(report["worker_id"])
        if any(len(ids) == num_workers for (_, num_workers), ids in finished.items()):
            state["exhausted"] = True
        return state


class _RunState:
    """Progress of one `__iter__` call. In the main process it updates the reader directly; in a dataloader
    worker (whose reader is a copy the main process never sees) it also writes itself to the reader's state dir."""

    def __init__(self, reader: LlavaVideo178K, worker_id: int, num_workers: int, in_worker: bool):
        self.worker_id, self.num_workers, self.in_worker = worker_id, num_workers, in_worker
        self.epoch = reader.epoch
        self.matched_ids: set[str] = set()
        self.unmatched_members = 0
        self.samples_emitted = 0
        self.skips = SkipCounter()
        self.exhausted = False
        self.path = os.path.join(
            reader._state_dir, f"rank{reader.rank}-worker{worker_id}-pid{os.getpid()}-run{next(_RUN_NUMBERS)}.pkl"
        )

    def skip(self, reader: LlavaVideo178K, reason: str, sample_id: str) -> None:
        logger.warning("skipping %s (%s)", sample_id, reason)
        self.skips.skip(reason, sample_id)
        reader.counter.skip(reason, sample_id)
        reader.reader_skips.skip(reason, sample_id)
        self._save()

    def unmatched(self, reader: LlavaVideo178K) -> None:
        self.unmatched_members += 1
        reader.unmatched_members += 1

    def emitted(self, reader: LlavaVideo178K, sample_id: str) -> None:
        self.matched_ids.add(sample_id)
        self.samples_emitted += 1
        reader.matched_ids.add(sample_id)
        reader.samples_emitted += 1
        if self.samples_emitted % _STATE_EVERY == 0:
            self._save()

    def finish(self, reader: LlavaVideo178K) -> None:
        self.exhausted = True
        reader.exhausted = True
        self._save()

    def _save(self) -> None:
        if not self.in_worker or not os.path.isdir(os.path.dirname(self.path)):
            return
        report = {
            "epoch": self.epoch,
            "worker_id": self.worker_id,
            "num_workers": self.num_workers,
            "matched_ids": self.matched_ids,
            "unmatched_members": self.unmatched_members,
            "samples_emitted": self.samples_emitted,
            "skips": self.skips.as_dict(),
            "exhausted": self.exhausted,
        }
        tmp = self.path + ".tmp"
        with open(tmp, "wb") as handle:
            pickle.dump(report, handle)
        os.replace(tmp, self.path)


def _remove_state_dir(path: str, creator_pid: int) -> None:
    # Forked dataloader workers inherit the finaliser; only the process that made the folder removes it.
    if os.getpid() == creator_pid:
        shutil.rmtree(path, ignore_errors=True)


# -- reporting --------------------------------------------------------------------------------------------------------


def local_counts(counter: SkipCounter, reader: LlavaVideo178K | None = None) -> dict:
    """This rank's share of the report (picklable): skips, matched ids, unmatched members, emitted, exhausted."""
    skips = SkipCounter().merge(counter)
    local = {"matched_ids": set(), "unmatched_members": 0, "samples_emitted": 0, "exhausted": False}
    if reader is not None:
        state = reader.stream_state()
        skips.merge(state.pop("worker_skips"))
        if reader.counter is not counter:  # the reader's own main-process skips are not in `counter` then
            skips.merge(reader.reader_skips)
        local.update(state)
    local["skips"] = skips.as_dict()
    return local


def gather_counts(counter: SkipCounter, reader: LlavaVideo178K | None = None) -> dict:
    """Merge skip counts (and, with a reader, matched ids) from every rank; call it on every rank.

    Returns `{"skipped": {reason: distinct samples}, "skipped_total", "skipped_ids": {reason: [ids]},
    "skip_events": {reason: raw count}, "unmatched_members", "samples_emitted", "epoch_complete"}`.

    "missing_video" (annotations never matched by any rank) is only known once every rank streamed its whole
    share; otherwise it is reported as None with `"epoch_complete": False` (e.g. a run stopped by max_steps).
    """
    local = local_counts(counter, reader)
    states = [local]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        states = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(states, local)

    total = SkipCounter()
    matched: set[str] = set()
    for state in states:
        total.merge(state["skips"])
        matched |= state["matched_ids"]
    complete = reader is not None and all(state["exhausted"] for state in states)
    # A run longer than one epoch meets the same bad sample again: report distinct samples per reason (the raw
    # number of skip events stays available as "skip_events").
    report_ids = {reason: list(dict.fromkeys(ids)) for reason, ids in total.ids.items()}
    report_counts = {reason: len(ids) for reason, ids in report_ids.items()}
    if complete:
        missing = sorted(reader.annotation_ids() - matched)
        report_counts["missing_video"] = len(missing)
        report_ids["missing_video"] = missing
    else:
        report_counts["missing_video"] = None
    return {
        "skipped": report_counts,
        "skipped_total": sum(count for count in report_counts.values() if count is not None),
        "skipped_ids": report_ids,
        "skip_events": total.counts,
        "unmatched_members": sum(state["unmatched_members"] for state in states),
        "samples_emitted": sum(state["samples_emitted"] for state in states),
        "epoch_complete": complete,
    }
