"""A small local folder in exactly the LLaVA-Video-178K Hub layout, for tests and the offline demo.

Every video is a real h264 "needle" clip (grey frames, one frame with a coloured disc, see `synthetic.py`), and
the conversations ask about the disc's colour, so a model trained on the mirror has something learnable.

    python -m modeling_memllava.mirror OUT_DIR [--bad-samples]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import tarfile
import tempfile
from collections.abc import Sequence

from .data import annotation_filenames
from .synthetic import NEEDLE_COLOURS, make_needle_video


DEFAULT_SUBSETS = ("0_30_s_academic_v0_1", "30_60_s_academic_v0_1")
COLOURS = list(NEEDLE_COLOURS)  # red, green, blue, yellow: the order of the mc options
LETTERS = "ABCD"
CAPTION_PROMPT = "<image>\nDescribe the video."
MC_PROMPT = (
    "<image>\nWhat colour is the disc that appears?\n"
    + "\n".join(f"{letter}. {colour}" for letter, colour in zip(LETTERS, COLOURS))
    + "\nAnswer with the option's letter from the given choices directly."
)
OE_PROMPT = "<image>\nWhat colour is the disc?"
# A few bytes that look like the start of an mp4 and then stop: no decoder can open it.
CORRUPT_MP4 = b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom" + b"\x00garbage, not a video\x00" * 8


def conversations_for(colour: str) -> dict[str, list[dict]]:
    """kind -> conversation (LLaVA format) about a needle video whose disc is `colour`."""
    return {
        "cap": [
            {"from": "human", "value": CAPTION_PROMPT},
            {"from": "gpt", "value": f"A grey video in which a {colour} disc flashes once."},
        ],
        "mc": [
            {"from": "human", "value": MC_PROMPT},
            {"from": "gpt", "value": LETTERS[COLOURS.index(colour)]},
        ],
        "oe": [{"from": "human", "value": OE_PROMPT}, {"from": "gpt", "value": colour}],
    }


def _atomic_write(path: str, write) -> None:
    """Write through `write(tmp_path)` to a temporary name in the same folder, then rename into place, so a
    reader never sees half a file."""
    folder, name = os.path.split(path)
    handle, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    os.close(handle)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _write_json(path: str, records: list) -> None:
    def write(tmp):
        with open(tmp, "w") as handle:
            json.dump(records, handle, indent=1)

    _atomic_write(path, write)


def _write_tar(path: str, members: list[tuple[str, bytes]]) -> None:
    """Write `(member name, bytes)` pairs as a .tar.gz, names exactly as given (even unsafe ones)."""

    def write(tmp):
        with tarfile.open(tmp, "w:gz") as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))

    _atomic_write(path, write)


def _member_name(subset: str, video: str, index: int) -> str:
    # Vary how members are named, as real archives do: plain, with a leading "./", or under the subset folder.
    return (video, f"./{video}", f"{subset}/{video}")[index % 3]


def build_local_mirror(
    root: str | os.PathLike,
    *,
    subsets: Sequence[str] = DEFAULT_SUBSETS,
    videos_per_subset: int = 8,
    archives_per_subset: int = 2,
    frames: tuple[int, int] = (16, 24),
    size: int = 64,
    bad_samples: bool = False,
    seed: int = 0,
) -> dict:
    """Write a small LLaVA-Video-178K mirror under `root` and return a summary.

    Each subset gets `videos_per_subset` needle videos (between `frames[0]` and `frames[1]` frames, `size` pixels
    square) spread round-robin over `archives_per_subset` archives, and one cap, mc and oe record per video.

    With `bad_samples`, the first subset also gets exactly four bad cases: an annotation whose video is in no
    archive ("missing_video"), a corrupt mp4 member with an annotation ("undecodable_video", counted by training),
    a record with a malformed conversation whose video exists ("malformed_conversation", counted by training;
    the reader passes it through) and a member named `../escape.mp4` ("unsafe_member", no annotation).

    Returns `{"root", "subsets", "files" (paths relative to root), "ids" ({kind: good ids}), "videos"
    ({video path: sha256 of its bytes}), "colours" ({video path: colour}), "bad_ids" ({reason: id})}`.
    """
    root = os.path.abspath(os.fspath(root))
    if archives_per_subset < 1 or videos_per_subset < 1:
        raise ValueError("videos_per_subset and archives_per_subset must be >= 1")
    rng = random.Random(seed)
    summary = {"root": root, "subsets": list(subsets), "files": [], "ids": {k: [] for k in ("cap", "mc", "oe")},
               "videos": {}, "colours": {}, "bad_ids": {}}
    with tempfile.TemporaryDirectory(prefix="memllava-mirror-") as scratch:
        for subset_index, subset in enumerate(subsets):
            folder = os.path.join(root, subset)
            os.makedirs(folder, exist_ok=True)
            records = {"cap": [], "mc": [], "oe": []}
            archives: list[list[tuple[str, bytes]]] = [[] for _ in range(archives_per_subset)]
            for i in range(videos_per_subset):
                video = f"academic_source/synthetic/{subset}_{i}.mp4"
                num_frames = rng.randint(frames[0], frames[1])
                colour = COLOURS[(i + subset_index) % len(COLOURS)]
                local = os.path.join(scratch, f"{subset}_{i}.mp4")
                make_needle_video(local, num_frames, rng.randrange(num_frames), colour, size=size,
                                  seed=seed * 1000 + subset_index * 100 + i)
                with open(local, "rb") as handle:
                    data = handle.read()
                summary["videos"][video] = hashlib.sha256(data).hexdigest()
                summary["colours"][video] = colour
                archives[i % archives_per_subset].append((_member_name(subset, video, i), data))
                for kind, conversation in conversations_for(colour).items():
                    sample_id = f"{subset}-{i}-{kind}"
                    records[kind].append({"id": sample_id, "video": video, "conversations": conversation,
                                          "data_source": "memllava_synthetic"})
                    summary["ids"][kind].append(sample_id)
            if bad_samples and subset_index == 0:
                summary["bad_ids"] = _add_bad_samples(subset, records, archives, summary)
            names = annotation_filenames(subset)
            for kind, kind_records in records.items():
                _write_json(os.path.join(folder, names[kind]), kind_records)
                summary["files"].append(f"{subset}/{names[kind]}")
            for n, members in enumerate(archives, start=1):
                name = f"{subset}_videos_{n}.tar.gz"
                _write_tar(os.path.join(folder, name), members)
                summary["files"].append(f"{subset}/{name}")
    return summary


def _add_bad_samples(subset: str, records: dict, archives: list, summary: dict) -> dict[str, str]:
    """Add the four bad cases to the first subset; return {reason: id} (the unsafe one's id is its name)."""
    good_video = records["cap"][0]["video"]
    bad = {
        "missing_video": f"{subset}-bad-missing",
        "undecodable_video": f"{subset}-bad-corrupt",
        "malformed_conversation": f"{subset}-bad-malformed",
        "unsafe_member": "../escape.mp4",
    }
    records["cap"].append({"id": bad["missing_video"], "video": f"academic_source/synthetic/{subset}_missing.mp4",
                           "conversations": conversations_for("red")["cap"], "data_source": "memllava_synthetic"})
    corrupt = f"academic_source/synthetic/{subset}_corrupt.mp4"
    archives[0].append((corrupt, CORRUPT_MP4))
    summary["videos"][corrupt] = hashlib.sha256(CORRUPT_MP4).hexdigest()
    records["cap"].append({"id": bad["undecodable_video"], "video": corrupt,
                           "conversations": conversations_for("red")["cap"], "data_source": "memllava_synthetic"})
    # The assistant speaks first: a conversation the training side cannot turn into a prompt and an answer.
    records["oe"].append({"id": bad["malformed_conversation"], "video": good_video,
                          "conversations": [{"from": "gpt", "value": "red"}, {"from": "human", "value": OE_PROMPT}],
                          "data_source": "memllava_synthetic"})
    archives[-1].append(("../escape.mp4", b"this must never be written anywhere"))
    return bad


def main(argv: Sequence[str] | None = None) -> dict:
    """Command line: `python -m modeling_memllava.mirror OUT_DIR [--bad-samples]`."""
    parser = argparse.ArgumentParser(description="Write a small local LLaVA-Video-178K mirror (Hub layout).")
    parser.add_argument("out_dir")
    parser.add_argument("--bad-samples", action="store_true", help="add the four bad cases the reports count")
    parser.add_argument("--videos-per-subset", type=int, default=8)
    parser.add_argument("--archives-per-subset", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    summary = build_local_mirror(args.out_dir, videos_per_subset=args.videos_per_subset,
                                 archives_per_subset=args.archives_per_subset, bad_samples=args.bad_samples,
                                 seed=args.seed)
    print(json.dumps({k: summary[k] for k in ("root", "subsets", "files", "bad_ids")}, indent=2))
    return summary


if __name__ == "__main__":
    main()
