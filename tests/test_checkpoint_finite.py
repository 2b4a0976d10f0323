"""A checkpoint whose backbone holds NaN or inf is refused by `ssl-bench run`, naming the tensors, before any work."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from ssl_bench.backbones import create_backbone
from ssl_bench.checkpoint import load_backbone_weights, non_finite_names
from ssl_bench.cli import cli
from ssl_bench.errors import UserError

TINY = "vit_nano_patch4_32"


def test_non_finite_names_finds_nan_and_inf_but_not_large_finite_values():
    tensors = {
        "ok": torch.randn(5, 3),
        "nan": torch.tensor([1.0, float("nan")]),
        "huge": torch.full((4,), 3e38),  # an L2 norm of this overflows to inf; it is finite all the same
        "neg_inf": torch.tensor([float("-inf"), 0.0]),
        "half_inf": torch.tensor([1.0, float("inf")], dtype=torch.bfloat16),  # another dtype group
        "ints": torch.tensor([1, 2]),  # integer tensors cannot be non-finite
        "empty": torch.empty(0),
    }
    assert non_finite_names(tensors) == ["nan", "neg_inf", "half_inf"]
    assert non_finite_names({"ok": torch.zeros(3)}) == []


def _nan_checkpoint(tmp_path, names: tuple[str, ...]):
    state = {f"backbone.{k}": v.clone() for k, v in create_backbone(TINY, seed=1).model.state_dict().items()}
    for name in names:
        state[f"backbone.{name}"].view(-1)[0] = float("nan")
    path = tmp_path / "diverged.pth"
    torch.save({"teacher": state, "student": state, "epoch": 1}, path)
    return path


def test_loading_a_nan_backbone_is_refused_naming_the_tensors(tmp_path):
    path = _nan_checkpoint(tmp_path, ("blocks.0.attn.qkv.weight", "norm.bias"))
    model = create_backbone(TINY).model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError, match=r"2 of \d+ backbone tensors are not finite \(NaN or inf\): "
                                        r"blocks\.0\.attn\.qkv\.weight, norm\.bias"):
        load_backbone_weights(model, path)
    for key, value in model.state_dict().items():  # nothing was loaded
        assert torch.equal(value, before[key]), key


def test_run_refuses_a_nan_checkpoint_in_one_line_before_extraction(tmp_path):
    path = _nan_checkpoint(tmp_path, ("patch_embed.proj.weight",))
    results, cache = tmp_path / "runs.csv", tmp_path / "cache"
    out = CliRunner().invoke(cli, ["run", "--task", "knn", "--model", TINY, "--ckpt", str(path), "--data",
                                   "builtin:digits", "--workers", "0", "--results", str(results),
                                   "--cache-dir", str(cache)])
    assert out.exit_code != 0
    assert "backbone tensors are not finite" in out.output and "patch_embed.proj.weight" in out.output, out.output
    assert "Traceback" not in out.output and out.output.count("\n") == 1
    assert not results.exists() and not (cache.exists() and any(cache.rglob("*")))
