"""LLaVA-Video-178K reader and local mirror: layout, matching, safety, sharding, shuffling, reports, Hub mode.

Offline: the Hub is played by a fake `HfFileSystem` that maps repo paths onto the local mirror.
"""

import collections
import hashlib
import io
import itertools
import json
import os
import pickle
import tarfile

import huggingface_hub
import pytest
import torch
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem

from modeling_memllava.data import (
    LlavaVideo178K,
    SkipCounter,
    annotation_filenames,
    gather_counts,
    hub_base_path,
    local_counts,
    normalise_video_path,
    resolve_root,
)
from modeling_memllava.mirror import build_local_mirror, main as mirror_main


SUBSETS = ["0_30_s_academic_v0_1", "30_60_s_academic_v0_1"]
REPO = "lmms-lab/LLaVA-Video-178K"


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    """A clean mirror: 2 subsets x 6 videos in 2 archives each (4 archives)."""
    root = tmp_path_factory.mktemp("mirror")
    return build_local_mirror(root, videos_per_subset=6, archives_per_subset=2, frames=(8, 12), size=32)


@pytest.fixture(scope="module")
def bad_mirror(tmp_path_factory):
    """The same with the four bad cases."""
    root = tmp_path_factory.mktemp("bad_mirror")
    return build_local_mirror(root, videos_per_subset=4, archives_per_subset=2, frames=(8, 12), size=32,
                              bad_samples=True)


def all_good_ids(summary, kinds=("cap", "mc", "oe")):
    return {sample_id for kind in kinds for sample_id in summary["ids"][kind]}


def read(summary, **kwargs):
    kwargs.setdefault("subsets", summary["subsets"])
    return LlavaVideo178K(summary["root"], **kwargs)


def ids_of(samples):
    return [sample["id"] for sample in samples]


# -- layout ---------------------------------------------------------------------------------------------------------


def test_mirror_layout_matches_the_hub_names(mirror):
    assert annotation_filenames("0_30_s_academic_v0_1") == {
        "cap": "0_30_s_academic_v0_1_cap_processed.json",
        "mc": "0_30_s_academic_mc_v0_1_qa_processed.json",
        "oe": "0_30_s_academic_oe_v0_1_qa_processed.json",
    }
    for subset in SUBSETS:
        stem = subset[: -len("_v0_1")]
        expected = {
            f"{subset}_cap_processed.json",
            f"{stem}_mc_v0_1_qa_processed.json",
            f"{stem}_oe_v0_1_qa_processed.json",
            f"{subset}_videos_1.tar.gz",
            f"{subset}_videos_2.tar.gz",
        }
        assert set(os.listdir(os.path.join(mirror["root"], subset))) == expected  # no temp files left behind
    record = json.load(open(os.path.join(mirror["root"], SUBSETS[0], f"{SUBSETS[0]}_cap_processed.json")))[0]
    assert set(record) == {"id", "video", "conversations", "data_source"}
    assert record["video"].startswith("academic_source/")
    assert record["conversations"][0]["value"].startswith("<image>\n")


def test_mirror_cli_writes_bad_samples(tmp_path, capsys):
    summary = mirror_main([str(tmp_path / "out"), "--bad-samples", "--videos-per-subset", "1",
                           "--archives-per-subset", "1"])
    assert set(summary["bad_ids"]) == {"missing_video", "undecodable_video", "malformed_conversation", "unsafe_member"}
    assert json.loads(capsys.readouterr().out)["files"] == summary["files"]


# -- content --------------------------------------------------------------------------------------------------------


def test_every_good_sample_once_with_its_bytes_and_conversation(mirror):
    reader = read(mirror)
    samples = list(reader)
    assert sorted(ids_of(samples)) == sorted(all_good_ids(mirror))  # each exactly once
    records = {}
    for subset in SUBSETS:
        for kind, name in annotation_filenames(subset).items():
            for record in json.load(open(os.path.join(mirror["root"], subset, name))):
                records[record["id"]] = (subset, kind, record)
    for sample in samples:
        subset, kind, record = records[sample["id"]]
        assert hashlib.sha256(sample["video_bytes"]).hexdigest() == mirror["videos"][sample["video"]]
        assert (sample["subset"], sample["kind"], sample["video"]) == (subset, kind, record["video"])
        assert sample["conversations"] == record["conversations"]
        assert sample["data_source"] == record["data_source"]
    # The answers say what the video shows: the needle disc's colour.
    for sample in samples:
        colour, answer = mirror["colours"][sample["video"]], sample["conversations"][-1]["value"]
        expected = {"cap": f"A grey video in which a {colour} disc flashes once.", "oe": colour,
                    "mc": "ABCD"[["red", "green", "blue", "yellow"].index(colour)]}[sample["kind"]]
        assert answer == expected
    assert reader.exhausted and reader.unmatched_members == 0 and reader.counter.total == 0
    assert reader.matched_ids == all_good_ids(mirror) == reader.annotation_ids()


def test_kinds_filter(mirror):
    samples = list(read(mirror, kinds=("mc",)))
    assert {s["kind"] for s in samples} == {"mc"}
    assert sorted(ids_of(samples)) == sorted(mirror["ids"]["mc"])
    assert all(s["conversations"][-1]["value"] in "ABCD" for s in samples)
    with pytest.raises(ValueError, match="kinds"):
        read(mirror, kinds=("qa",))


def test_member_names_are_normalised(mirror):
    names = []
    for subset in SUBSETS:
        for n in (1, 2):
            with tarfile.open(os.path.join(mirror["root"], subset, f"{subset}_videos_{n}.tar.gz")) as tar:
                names += tar.getnames()
    # The mirror writes all three spellings, and every one of them was matched in the test above.
    assert any(name.startswith("./") for name in names)
    assert any(name.startswith(f"{SUBSETS[0]}/") or name.startswith(f"{SUBSETS[1]}/") for name in names)
    assert any(name.startswith("academic_source/") for name in names)
    assert normalise_video_path("./academic_source/a.mp4", "s_v0_1") == "academic_source/a.mp4"
    assert normalise_video_path("s_v0_1/academic_source/a.mp4", "s_v0_1") == "academic_source/a.mp4"
    assert normalise_video_path("./s_v0_1/./academic_source/a.mp4", "s_v0_1") == "academic_source/a.mp4"
    assert normalise_video_path("other/academic_source/a.mp4", "s_v0_1") == "other/academic_source/a.mp4"


# -- safety ---------------------------------------------------------------------------------------------------------


def write_subset(root, subset, records, members):
    """A one-archive subset by hand. `members`: (TarInfo, bytes or None)."""
    folder = root / subset
    folder.mkdir(parents=True)
    names = annotation_filenames(subset)
    for kind in ("cap", "mc", "oe"):
        (folder / names[kind]).write_text(json.dumps(records if kind == "cap" else []))
    with tarfile.open(folder / f"{subset}_videos_1.tar.gz", "w:gz") as tar:
        for info, payload in members:
            tar.addfile(info, io.BytesIO(payload) if payload is not None else None)


def file_info(name, payload):
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    return info, payload


def test_unsafe_members_are_rejected_counted_and_never_written(tmp_path, monkeypatch):
    subset = "0_30_s_academic_v0_1"
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # a relative extraction would land here
    link = tarfile.TarInfo("academic_source/link.mp4")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    folder = tarfile.TarInfo("academic_source")
    folder.type = tarfile.DIRTYPE
    members = [
        (folder, None),  # directories are harmless: neither counted nor read
        file_info("../x.mp4", b"escape"),
        file_info("/etc/x.mp4", b"absolute"),
        (link, None),
        file_info("academic_source/good.mp4", b"good bytes"),
    ]
    records = [
        {"id": "good", "video": "academic_source/good.mp4", "conversations": [], "data_source": "t"},
        {"id": "via-link", "video": "academic_source/link.mp4", "conversations": [], "data_source": "t"},
    ]
    write_subset(tmp_path / "root", subset, records, members)
    before = sorted(p for p in tmp_path.rglob("*"))
    counter = SkipCounter()
    reader = LlavaVideo178K(tmp_path / "root", subsets=[subset], counter=counter)
    samples = list(reader)
    assert [(s["id"], s["video_bytes"]) for s in samples] == [("good", b"good bytes")]
    assert counter.counts == {"unsafe_member": 3}
    assert sorted(counter.ids["unsafe_member"]) == sorted(["../x.mp4", "/etc/x.mp4", "academic_source/link.mp4"])
    assert sorted(p for p in tmp_path.rglob("*")) == before
    assert not os.path.exists("/etc/x.mp4")
    report = gather_counts(counter, reader)
    assert report["skipped"] == {"unsafe_member": 3, "missing_video": 1}  # the symlink's annotation is missing
    assert report["skipped_ids"]["missing_video"] == ["via-link"]


# -- reports --------------------------------------------------------------------------------------------------------


def test_missing_video_is_counted_only_when_exhausted(bad_mirror):
    counter = SkipCounter()
    reader = read(bad_mirror, counter=counter)
    stream = iter(reader)
    list(itertools.islice(stream, 3))
    partial = gather_counts(counter, reader)
    assert partial["epoch_complete"] is False and partial["skipped"]["missing_video"] is None
    assert "missing_video" not in partial["skipped_ids"]
    stream.close()

    samples = list(reader)
    expected = all_good_ids(bad_mirror) | {bad_mirror["bad_ids"]["undecodable_video"],
                                           bad_mirror["bad_ids"]["malformed_conversation"]}
    assert sorted(ids_of(samples)) == sorted(expected)  # the reader passes the downstream bad cases through
    malformed = next(s for s in samples if s["id"] == bad_mirror["bad_ids"]["malformed_conversation"])
    assert malformed["conversations"][0]["from"] == "gpt"
    report = gather_counts(counter, reader)
    assert report["epoch_complete"] is True
    assert report["skipped"] == {"unsafe_member": 1, "missing_video": 1}
    assert report["skip_events"] == {"unsafe_member": 1}
    assert report["skipped_total"] == 2
    assert report["skipped_ids"] == {"unsafe_member": ["../escape.mp4"],
                                     "missing_video": [bad_mirror["bad_ids"]["missing_video"]]}
    assert report["samples_emitted"] == 3 + len(expected)  # the 3 of the stopped stream count too
    assert report["unmatched_members"] == 0
    json.dumps(report)  # rank 0 writes it as JSON

    # A second epoch meets the same bad member again: one distinct sample, two skip events.
    reader.set_epoch(1)
    list(reader)
    report = gather_counts(counter, reader)
    assert report["skipped"] == {"unsafe_member": 1, "missing_video": 1}
    assert report["skip_events"] == {"unsafe_member": 2}


def test_gather_counts_with_torch_distributed(bad_mirror, tmp_path):
    """A real (single-process, gloo) group exercises the all_gather_object path."""
    counter = SkipCounter()
    counter.skip("too_long", "x")
    reader = read(bad_mirror, counter=counter)
    list(reader)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        report = gather_counts(counter, reader)
    finally:
        torch.distributed.destroy_process_group()
    assert report["skipped"] == {"too_long": 1, "unsafe_member": 1, "missing_video": 1}
    assert report["epoch_complete"] is True


def test_gather_counts_merges_ranks_and_needs_every_rank_exhausted(bad_mirror, monkeypatch):
    readers = [read(bad_mirror, rank=r, world_size=2) for r in range(2)]
    for reader in readers:
        list(reader)
    states = [local_counts(reader.counter, reader) for reader in readers]

    def fake_all_gather(out, obj):
        out[:] = states

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "all_gather_object", fake_all_gather)
    report = gather_counts(readers[0].counter, readers[0])
    assert report["skipped"] == {"unsafe_member": 1, "missing_video": 1}
    assert report["samples_emitted"] == sum(r.samples_emitted for r in readers)
    states[1]["exhausted"] = False  # rank 1 stopped early (max_steps): nobody can know what is missing
    report = gather_counts(readers[0].counter, readers[0])
    assert report["skipped"]["missing_video"] is None and report["epoch_complete"] is False


def test_skip_counter_merges_and_pickles():
    a, b = SkipCounter(), SkipCounter()
    a.skip("too_long", "1")
    b.skip("too_long", "2")
    b.skip("undecodable_video", 3)
    a.merge(pickle.loads(pickle.dumps(b)))
    assert a.counts == {"too_long": 2, "undecodable_video": 1} and a.total == 3
    assert a.ids == {"too_long": ["1", "2"], "undecodable_video": ["3"]}
    assert SkipCounter().merge(a.as_dict()).as_dict() == a.as_dict()


# -- sharding and shuffling -----------------------------------------------------------------------------------------


def assert_partition(shards, expected):
    flat = [sample_id for shard in shards for sample_id in shard]
    duplicates = [i for i, n in collections.Counter(flat).items() if n > 1]
    assert not duplicates, duplicates
    assert set(flat) == expected
    assert all(shards), "a shard got no data"


@pytest.mark.parametrize("world_size,subsets", [(2, SUBSETS), (3, SUBSETS), (3, SUBSETS[:1]), (5, SUBSETS)])
def test_ranks_partition_the_samples(mirror, world_size, subsets):
    # 4 archives for both subsets (>= 2, 3 shards; < 5), 2 for one subset (< 3 shards: member striding)
    expected = {i for i in all_good_ids(mirror) if i.startswith(tuple(s + "-" for s in subsets))}
    shards = [ids_of(read(mirror, subsets=subsets, rank=r, world_size=world_size)) for r in range(world_size)]
    assert_partition(shards, expected)


@pytest.mark.parametrize("subsets", [SUBSETS, SUBSETS[:1]])
def test_ranks_and_dataloader_workers_partition_the_samples(bad_mirror, subsets):
    # 2 ranks x 2 workers = 4 shards: archives == shards with both subsets, 2 archives < 4 shards with one
    expected = {i for i in all_good_ids(bad_mirror) | {bad_mirror["bad_ids"]["undecodable_video"],
                                                       bad_mirror["bad_ids"]["malformed_conversation"]}
                if i.startswith(tuple(s + "-" for s in subsets))}
    shards, reports = [], []
    for rank in range(2):
        counter = SkipCounter()
        reader = read(bad_mirror, subsets=subsets, rank=rank, world_size=2, counter=counter)
        loader = torch.utils.data.DataLoader(reader, batch_size=None, num_workers=2)
        samples = list(loader)
        assert isinstance(samples[0]["video_bytes"], bytes)
        shards.append(ids_of(samples))
        reports.append(local_counts(counter, reader))
    assert_partition(shards, expected)
    # What the workers saw reaches the main process: exhaustion, emitted counts and the unsafe member (once).
    assert all(report["exhausted"] for report in reports)
    assert sum(report["samples_emitted"] for report in reports) == len(expected)
    unsafe = [i for report in reports for i in report["skips"]["ids"].get("unsafe_member", [])]
    assert unsafe == ["../escape.mp4"]


def test_shuffle_buffer_is_deterministic_per_seed_and_epoch(mirror):
    plain = ids_of(read(mirror))
    first = ids_of(read(mirror, shuffle_buffer=8, seed=1))
    again = ids_of(read(mirror, shuffle_buffer=8, seed=1))
    reader = read(mirror, shuffle_buffer=8, seed=1)
    reader.set_epoch(1)
    next_epoch = ids_of(reader)
    other_seed = ids_of(read(mirror, shuffle_buffer=8, seed=2))
    assert first == again
    assert sorted(first) == sorted(next_epoch) == sorted(plain)
    assert first != plain and next_epoch != first and other_seed != first


def test_shuffled_shards_still_partition(mirror):
    shards = []
    for rank in range(3):
        reader = read(mirror, shuffle_buffer=4, seed=3, rank=rank, world_size=3)
        reader.set_epoch(2)
        shards.append(ids_of(reader))
    assert_partition(shards, all_good_ids(mirror))


# -- roots: errors, URLs and the Hub --------------------------------------------------------------------------------


def test_missing_subset_or_file_raises_with_the_expected_names(mirror, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"1_2_m_academic_v0_1.*1_2_m_academic_v0_1_cap_processed\.json"):
        read(mirror, subsets=["1_2_m_academic_v0_1"])
    folder = tmp_path / "0_30_s_academic_v0_1"
    folder.mkdir()
    (folder / "0_30_s_academic_v0_1_cap_processed.json").write_text("[]")
    with pytest.raises(FileNotFoundError, match="0_30_s_academic_mc_v0_1_qa_processed.json"):
        LlavaVideo178K(tmp_path, subsets=["0_30_s_academic_v0_1"])
    with pytest.raises(FileNotFoundError, match=r"_videos_<N>\.tar\.gz"):
        LlavaVideo178K(tmp_path, subsets=["0_30_s_academic_v0_1"], kinds=("cap",))


def test_file_url_root_reads_the_same(mirror):
    assert ids_of(read(mirror)) == ids_of(LlavaVideo178K("file://" + mirror["root"], subsets=SUBSETS))


def test_hub_paths_carry_the_revision():
    assert hub_base_path(REPO) == "datasets/lmms-lab/LLaVA-Video-178K"
    assert hub_base_path(REPO, "v1.0") == "datasets/lmms-lab/LLaVA-Video-178K@v1.0"
    assert hub_base_path(REPO, "feature/x") == "datasets/lmms-lab/LLaVA-Video-178K@feature%2Fx"
    assert hub_base_path(REPO, "refs/pr/3") == "datasets/lmms-lab/LLaVA-Video-178K@refs/pr/3"
    # The real HfFileSystem: constructing it and resolving our root touch no network.
    fs, base = resolve_root(REPO, revision="abc123")
    assert isinstance(fs, huggingface_hub.HfFileSystem)
    assert base == "datasets/lmms-lab/LLaVA-Video-178K@abc123"
    _, base = resolve_root(f"hf://datasets/{REPO}@main/sub", revision=None)
    assert base == "datasets/lmms-lab/LLaVA-Video-178K@main/sub"
    _, base = resolve_root(f"hf://datasets/{REPO}", revision="v2")
    assert base == "datasets/lmms-lab/LLaVA-Video-178K@v2"
    with pytest.raises(ValueError, match="conflicts"):
        resolve_root(f"hf://datasets/{REPO}@main", revision="v2")


@pytest.fixture
def fake_hub(mirror, tmp_path, monkeypatch):
    """Patch `huggingface_hub.HfFileSystem` with a local filesystem that serves the mirror at repo paths
    (`datasets/lmms-lab/LLaVA-Video-178K[@rev]/...`) and records every path it is asked for."""
    hub = tmp_path / "hub"
    (hub / "datasets" / "lmms-lab").mkdir(parents=True)
    for name in ("LLaVA-Video-178K@v1.0", "LLaVA-Video-178K"):
        os.symlink(mirror["root"], hub / "datasets" / "lmms-lab" / name)
    seen = []

    class FakeHfFileSystem(DirFileSystem):
        protocol = "hf"
        cachable = False

        def __init__(self, *args, **kwargs):
            super().__init__(path=str(hub), fs=LocalFileSystem())

        def ls(self, path, detail=True, **kwargs):
            seen.append(("ls", path))
            return super().ls(path, detail=detail, **kwargs)

        def open(self, path, mode="rb", **kwargs):
            seen.append(("open", path, kwargs.get("block_size")))
            return super().open(path, mode, **kwargs)

    monkeypatch.setattr(huggingface_hub, "HfFileSystem", FakeHfFileSystem)
    return seen


@pytest.mark.parametrize("root", [f"hf://datasets/{REPO}", REPO])
@pytest.mark.parametrize("revision", ["v1.0", None])
def test_hub_mode_yields_the_same_samples_with_the_revision(mirror, fake_hub, root, revision):
    local = {s["id"]: s["video_bytes"] for s in read(mirror)}
    reader = LlavaVideo178K(root, subsets=SUBSETS, revision=revision)
    assert type(reader.fs).__name__ == "FakeHfFileSystem"
    hub = {s["id"]: s["video_bytes"] for s in reader}
    assert hub == local
    prefix = f"datasets/{REPO}@{revision}/" if revision else f"datasets/{REPO}/"
    assert fake_hub and all(call[1].startswith(prefix) for call in fake_hub)
    archives = [call for call in fake_hub if call[0] == "open" and call[1].endswith(".tar.gz")]
    assert len(archives) == 4 and all(call[2] == 0 for call in archives)  # streamed, not block-cached
