"""DAVIS frames and annotations are lined up before any model work (issue 16, item 4): a missing first or middle
frame, a frame or mask of another size, and a sequence without its first mask each give one line naming the
sequence and the file, and nothing is propagated."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ssl_bench.cli import cli
from ssl_bench.davis_eval import DavisLayout, evaluate
from ssl_bench.errors import UserError
from ssl_bench.palette import read_label_png, save_label_png

from test_davis import make_davis

TINY = "vit_nano_patch4_32"


@pytest.fixture
def davis(tmp_path):
    return make_davis(tmp_path / "DAVIS")


def frame(root, seq: str, t: int):
    return root / "JPEGImages" / "480p" / seq / f"{t:05d}.jpg"


def mask(root, seq: str, t: int):
    return root / "Annotations" / "480p" / seq / f"{t:05d}.png"


def run_davis(tmp_path, root):
    out_dir = tmp_path / "runs" / "davis"
    out = CliRunner().invoke(cli, ["-q", "run", "--task", "davis", "--model", TINY, "--data-root", str(root),
                                   "--workers", "0", "--results", str(tmp_path / "runs.csv"), "-p",
                                   f"out_dir={out_dir}", "-p", "scale_size=64"])
    return out, out_dir


def one_line_error(out) -> str:
    assert out.exit_code == 1 and "Traceback" not in out.output, out.output
    (line,) = out.output.strip().splitlines()
    assert line.startswith("Error: DAVIS sequence "), line
    return line


def test_a_missing_first_frame_fails_instead_of_scoring_the_next_frames_truth(tmp_path, davis):
    frame(davis, "square", 0).unlink()
    out, out_dir = run_davis(tmp_path, davis)
    line = one_line_error(out)
    assert line == (f"Error: DAVIS sequence square: annotation {mask(davis, 'square', 0)} has no frame "
                    f"({frame(davis, 'square', 0)} is missing); every annotated frame needs its image")
    assert not out_dir.exists() and not (tmp_path / "runs.csv").exists()  # nothing propagated, no row


def test_a_missing_middle_frame_fails_before_propagation(tmp_path, davis):
    frame(davis, "pair", 2).unlink()
    out, out_dir = run_davis(tmp_path, davis)
    assert one_line_error(out) == (f"Error: DAVIS sequence pair: frame {frame(davis, 'pair', 2)} is missing "
                                   f"(1 of the numbers 00000 to 00004 have no image)")
    assert not out_dir.exists()


def test_a_later_mask_of_another_size_is_named_not_a_stack_traceback(tmp_path, davis):
    save_label_png(mask(davis, "pair", 3), np.zeros((64, 96), np.uint8))
    out, out_dir = run_davis(tmp_path, davis)
    assert one_line_error(out) == (f"Error: DAVIS sequence pair: annotation {mask(davis, 'pair', 3)} is 96x64, its "
                                   f"frame 00003.jpg is 128x64; they must match")
    assert not out_dir.exists()
    # The evaluator on its own (results already on disk) names the file as well.
    results = tmp_path / "perfect"
    for seq in ("square", "pair"):
        (results / seq).mkdir(parents=True)
        for t in range(5):
            save_label_png(results / seq / f"{t:05d}.png", np.zeros((64, 128), np.uint8))
    with pytest.raises(UserError, match=r"DAVIS sequence pair: annotation .*pair/00003.png is 96x64, the first one "
                                        r"00000.png is 128x64"):
        evaluate(DavisLayout(davis), results, ["square", "pair"])


def test_a_frame_of_another_size_and_a_first_frame_without_its_mask(davis):
    layout = DavisLayout(davis)
    frames, given = layout.check_sequence("pair")
    assert [p.name for p in frames] == [f"{t:05d}.jpg" for t in range(5)] and given == mask(davis, "pair", 0)
    with Image.open(frame(davis, "pair", 4)) as image:
        image.resize((120, 64)).save(frame(davis, "pair", 4))
    with pytest.raises(UserError, match=rf"^DAVIS sequence pair: frame {frame(davis, 'pair', 4)} is 120x64, the "
                                        rf"first frame 00000.jpg is 128x64; every frame must have one size$"):
        layout.check_sequence("pair")
    # Mask 00000 gone, frame 00000 kept: the next mask must not stand in for the first frame's.
    mask(davis, "square", 0).unlink()
    with pytest.raises(UserError, match=r"^DAVIS sequence square: the first frame .*square/00000.jpg has no annotation "
                                        r"\(the first one is 00001.png\)"):
        layout.check_sequence("square")
    assert read_label_png(mask(davis, "square", 1)).shape == (64, 128)  # nothing else was touched
