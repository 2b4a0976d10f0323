"""Checkpoint adapter (ssl_bench/checkpoint.py) on fabricated checkpoints of every supported format.

Every successful load is checked tensor by tensor against the weights that were written, and the load report's
format / key / matched / missing / unexpected lists are checked exactly. Refusals must raise UserError with a
message that says what was expected.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import socket
from pathlib import PurePosixPath

import pytest
import timm
import torch
from timm.layers import resample_abs_pos_embed

from ssl_bench.backbones import TINY_VIT, create_backbone
from ssl_bench.checkpoint import extract_state_dict, load_backbone_weights, map_keys, read_checkpoint
from ssl_bench.errors import UserError


# --------------------------------------------------------------------------- helpers


def vit_state(seed: int, **kwargs) -> dict[str, torch.Tensor]:
    """A random-init state dict of the tiny ViT (every tensor distinct per seed)."""
    torch.manual_seed(seed)
    model = timm.create_model(TINY_VIT, pretrained=False, num_classes=0, **kwargs)
    with torch.no_grad():  # cls_token / pos_embed start near zero and LayerNorms at 1/0: make all seeds distinct
        for param in model.parameters():
            param.add_(torch.randn_like(param))
    return {k: v.clone() for k, v in model.state_dict().items()}


def resnet_state(seed: int) -> dict[str, torch.Tensor]:
    """A torchvision-style resnet18 state dict: fc with 1000 classes, BN buffers with num_batches_tracked."""
    torch.manual_seed(seed)
    model = timm.create_model("resnet18", pretrained=False, num_classes=1000)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_()
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 2.0)
            elif name.endswith("num_batches_tracked"):
                buf.fill_(7)
    return {k: v.clone() for k, v in model.state_dict().items()}


def prefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in state.items()}


def dino_head(prefix: str, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        f"{prefix}head.mlp.0.weight": torch.randn(32, 96, generator=g),
        f"{prefix}head.mlp.0.bias": torch.randn(32, generator=g),
        f"{prefix}head.last_layer.weight_g": torch.randn(64, 1, generator=g),
        f"{prefix}head.last_layer.weight_v": torch.randn(64, 16, generator=g),
    }


def new_vit(**kwargs) -> torch.nn.Module:
    torch.manual_seed(1234)
    return timm.create_model(TINY_VIT, pretrained=False, num_classes=0, **kwargs)


def assert_weights_equal(model: torch.nn.Module, expected: dict[str, torch.Tensor], skip: tuple[str, ...] = ()) -> None:
    loaded = model.state_dict()
    assert set(loaded) == set(expected), set(loaded) ^ set(expected)
    for name, tensor in expected.items():
        if name in skip:
            continue
        assert loaded[name].shape == tensor.shape, name
        assert torch.equal(loaded[name], tensor.to(loaded[name].dtype)), f"{name} differs from the checkpoint"


def save(tmp_path, name: str, obj) -> str:
    path = tmp_path / name
    torch.save(obj, path)
    return str(path)


@pytest.fixture(scope="module")
def teacher_sd() -> dict[str, torch.Tensor]:
    return vit_state(1)


@pytest.fixture(scope="module")
def student_sd() -> dict[str, torch.Tensor]:
    return vit_state(2)


@pytest.fixture(scope="module")
def vit_keys(teacher_sd) -> list[str]:
    return sorted(teacher_sd)


@pytest.fixture()
def dino_ckpt(tmp_path, teacher_sd, student_sd) -> str:
    optimizer = {"state": {0: {"momentum_buffer": torch.zeros(3)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    return save(tmp_path, "dino.pth", {
        "student": {**prefixed(student_sd, "module.backbone."), **dino_head("module.", 5)},
        "teacher": {**prefixed(teacher_sd, "backbone."), **dino_head("", 6)},
        "optimizer": optimizer,
        "epoch": 3,
        "args": argparse.Namespace(arch="vit_small", patch_size=16, out_dim=65536, lr=0.0005, output_dir="/x"),
        "dino_loss": {"center": torch.zeros(1, 64)},
    })


def test_student_and_teacher_fixtures_differ(teacher_sd, student_sd):
    assert all(not torch.equal(teacher_sd[k], student_sd[k]) for k in teacher_sd)


# --------------------------------------------------------------------------- formats that load


def test_dino_teacher_default(dino_ckpt, teacher_sd, vit_keys, caplog):
    model = new_vit()
    with caplog.at_level(logging.INFO, logger="ssl_bench.checkpoint"):
        report = load_backbone_weights(model, dino_ckpt)
    assert_weights_equal(model, teacher_sd)
    assert (report.format, report.key) == ("dino", "teacher")
    assert report.matched == vit_keys
    assert report.missing == []
    assert sorted(report.unexpected) == sorted(dino_head("", 0))
    assert report.resized == []
    assert report.path == dino_ckpt
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "format dino [teacher]" in logged and f"matched {len(vit_keys)}" in logged and "unexpected 4" in logged


def test_dino_student_by_option(dino_ckpt, student_sd, vit_keys):
    model = new_vit()
    report = load_backbone_weights(model, dino_ckpt, key="student")
    assert_weights_equal(model, student_sd)
    assert (report.format, report.key) == ("dino", "student")
    assert report.matched == vit_keys and report.missing == []
    assert sorted(report.unexpected) == sorted(dino_head("", 0))  # module. stripped from the head keys too


def test_dino_checkpoint_with_args_namespace_reads(dino_ckpt, caplog):
    with pytest.raises(Exception):  # the Namespace is what a plain weights-only load refuses
        torch.load(dino_ckpt, map_location="cpu", weights_only=True)
    with caplog.at_level(logging.WARNING, logger="ssl_bench.checkpoint"):
        checkpoint = read_checkpoint(dino_ckpt)
    assert isinstance(checkpoint["args"], argparse.Namespace)
    assert checkpoint["args"].arch == "vit_small" and checkpoint["epoch"] == 3
    assert "full unpickling" not in caplog.text  # argparse.Namespace is allow-listed: still a weights-only load


def test_other_pickled_objects_fall_back_to_full_unpickling(tmp_path, teacher_sd, caplog):
    path = save(tmp_path, "odd.pth", {"teacher": prefixed(teacher_sd, "backbone."), "args": {"out": PurePosixPath("/x")}})
    with caplog.at_level(logging.WARNING, logger="ssl_bench.checkpoint"):
        backbone = create_backbone(TINY_VIT, path)
    assert "full unpickling" in caplog.text
    assert_weights_equal(backbone.model, teacher_sd)


def test_dino_create_backbone_teacher_and_student(dino_ckpt, teacher_sd, student_sd):
    teacher = create_backbone(TINY_VIT, dino_ckpt)
    student = create_backbone(TINY_VIT, dino_ckpt, ckpt_key="student")
    assert_weights_equal(teacher.model, teacher_sd)
    assert_weights_equal(student.model, student_sd)
    assert teacher.load_report.key == "teacher" and student.load_report.key == "student"
    assert teacher.weights_id() != student.weights_id()
    assert teacher.label != student.label and student.label.startswith("dino.pth:student")


def test_ibot_masked_embed_is_unexpected(tmp_path, teacher_sd, vit_keys):
    teacher = {**prefixed(teacher_sd, "backbone."), "backbone.masked_embed": torch.randn(96), **dino_head("", 7)}
    path = save(tmp_path, "ibot.pth", {"teacher": teacher, "student": teacher, "epoch": 1})
    model = new_vit()
    report = load_backbone_weights(model, path)
    assert_weights_equal(model, teacher_sd)
    assert report.format == "dino"
    assert report.matched == vit_keys and report.missing == []
    assert sorted(report.unexpected) == sorted(["masked_embed", *dino_head("", 0)])


@pytest.mark.parametrize("prefix", ["", "backbone.", "encoder.", "module.", "module.module.backbone."])
def test_backbone_only_file(tmp_path, teacher_sd, vit_keys, prefix):
    path = save(tmp_path, "backbone.pth", prefixed(teacher_sd, prefix))
    model = new_vit()
    report = load_backbone_weights(model, path)
    assert_weights_equal(model, teacher_sd)
    assert (report.format, report.key) == ("state_dict", None)
    assert report.matched == vit_keys and report.missing == [] and report.unexpected == []


def test_msn_target_encoder_and_encoder(tmp_path, teacher_sd, student_sd, vit_keys):
    def msn_side(sd, seed):
        g = torch.Generator().manual_seed(seed)
        fc = {"module.fc.fc1.weight": torch.randn(32, 96, generator=g), "module.fc.fc1.bias": torch.randn(32, generator=g),
              "module.fc.bn1.running_mean": torch.randn(32, generator=g), "module.fc.fc3.weight": torch.randn(16, 32, generator=g)}
        return {**prefixed(sd, "module."), **fc}

    path = save(tmp_path, "msn.pth", {
        "target_encoder": msn_side(teacher_sd, 1),
        "encoder": msn_side(student_sd, 2),
        "prototypes": torch.randn(10, 16),
        "opt": {"state": {}, "param_groups": []},
        "epoch": 2,
    })
    model = new_vit()
    report = load_backbone_weights(model, path)
    assert_weights_equal(model, teacher_sd)
    assert (report.format, report.key) == ("msn", "target_encoder")
    assert report.matched == vit_keys and report.missing == []
    assert report.unexpected == []  # the fc projection head is dropped, not loaded, not reported

    model = new_vit()
    report = load_backbone_weights(model, path, key="student")
    assert_weights_equal(model, student_sd)
    assert (report.format, report.key) == ("msn", "encoder")
    assert report.unexpected == []


def test_ssl_bench_own_format(tmp_path, teacher_sd, student_sd, vit_keys):
    head = {"head.mlp.0.weight": torch.randn(32, 96), "head.last_layer.weight": torch.randn(64, 16)}
    path = save(tmp_path, "pretrain.pth", {
        "ssl_bench": {"format_version": 1, "arch": TINY_VIT, "method": "dino"},
        "teacher": {**prefixed(teacher_sd, "backbone."), **head},
        "student": {**prefixed(student_sd, "backbone."), **head},
        "epoch": 10,
    })
    model = new_vit()
    report = load_backbone_weights(model, path)
    assert_weights_equal(model, teacher_sd)
    assert (report.format, report.key) == ("ssl-bench", "teacher")
    assert report.matched == vit_keys and report.missing == []
    assert sorted(report.unexpected) == sorted(head)

    backbone = create_backbone(None, path)  # the arch comes from the file
    assert backbone.arch == TINY_VIT
    assert backbone.input_size == 32 and backbone.patch_size == 4 and backbone.embed_dim == 96
    assert_weights_equal(backbone.model, teacher_sd)

    student = create_backbone(None, path, ckpt_key="student")
    assert_weights_equal(student.model, student_sd)
    assert student.load_report.format == "ssl-bench"


@pytest.mark.parametrize("wrapper", ["state_dict", "model", "module"])
def test_wrapped_state_dict(tmp_path, teacher_sd, vit_keys, wrapper):
    path = save(tmp_path, "wrapped.pth", {wrapper: {**teacher_sd, "head.weight": torch.randn(10, 96), "head.bias": torch.randn(10)},
                                          "epoch": 300, "optimizer": {"state": {}, "param_groups": []}})
    model = new_vit()
    report = load_backbone_weights(model, path)
    assert_weights_equal(model, teacher_sd)
    assert (report.format, report.key) == ("wrapped", wrapper)
    assert report.matched == vit_keys and report.missing == []
    assert sorted(report.unexpected) == ["head.bias", "head.weight"]


def test_dinov2_chunked_block_keys(tmp_path, teacher_sd, vit_keys):
    chunked = {}
    for key, value in teacher_sd.items():
        if key.startswith("blocks."):
            index = int(key.split(".")[1])
            key = f"blocks.{index // 2}.{index}.{key.split('.', 2)[2]}"  # depth 4, chunk size 2
        chunked[key] = value
    assert "blocks.0.1.norm1.weight" in chunked and "blocks.1.2.norm1.weight" in chunked
    path = save(tmp_path, "dinov2.pth", {"teacher": {**prefixed(chunked, "backbone."), "backbone.mask_token": torch.zeros(1, 96),
                                                     **dino_head("", 3)}})
    model = new_vit()
    report = load_backbone_weights(model, path)
    assert_weights_equal(model, teacher_sd)
    assert report.matched == vit_keys and report.missing == []
    assert sorted(report.unexpected) == sorted(["mask_token", *dino_head("", 0)])


def test_map_keys_chunked_and_plain():
    keys = {"blocks.1.norm1.weight", "blocks.0.norm1.weight"}
    out = map_keys({"backbone.blocks.0.1.norm1.weight": torch.ones(1), "blocks.0.norm1.weight": torch.zeros(1)}, keys)
    assert sorted(out) == ["blocks.0.norm1.weight", "blocks.1.norm1.weight"]
    assert torch.equal(out["blocks.1.norm1.weight"], torch.ones(1))


def test_torchvision_resnet_state_dict(tmp_path):
    source = resnet_state(3)
    path = save(tmp_path, "resnet18_tv.pth", source)
    torch.manual_seed(99)
    model = timm.create_model("resnet18", pretrained=False, num_classes=0)
    report = load_backbone_weights(model, path)
    expected = {k: v for k, v in source.items() if not k.startswith("fc.")}
    assert_weights_equal(model, expected)
    assert report.format == "state_dict"
    assert report.matched == sorted(expected) and report.missing == []
    assert sorted(report.unexpected) == ["fc.bias", "fc.weight"]


def test_resnet_without_num_batches_tracked_loads(tmp_path):
    source = {k: v for k, v in resnet_state(4).items() if not k.endswith("num_batches_tracked") and not k.startswith("fc.")}
    path = save(tmp_path, "resnet_dino.pth", {"teacher": prefixed(source, "backbone."), "student": prefixed(source, "module.backbone.")})
    backbone = create_backbone("resnet18", path)
    assert backbone.load_report.missing == [] and backbone.load_report.unexpected == []
    loaded = backbone.model.state_dict()
    for key, value in source.items():
        assert torch.equal(loaded[key], value), key


def test_pos_embed_from_other_grid_is_resampled(tmp_path):
    source = vit_state(8, img_size=48)  # 12x12 grid
    assert source["pos_embed"].shape == (1, 1 + 144, 96)
    path = save(tmp_path, "grid12.pth", {"teacher": prefixed(source, "backbone.")})
    model = new_vit()
    report = load_backbone_weights(model, path)
    assert report.resized and "pos_embed" in report.resized[0] and "(1, 145, 96)->(1, 65, 96)" in report.resized[0]
    assert report.missing == [] and report.unexpected == []
    loaded = model.state_dict()
    assert loaded["pos_embed"].shape == (1, 65, 96)
    expected = resample_abs_pos_embed(source["pos_embed"], new_size=[8, 8], old_size=[12, 12], num_prefix_tokens=1)
    assert torch.allclose(loaded["pos_embed"], expected, atol=1e-6)
    assert torch.equal(loaded["pos_embed"][:, 0], source["pos_embed"][:, 0])  # the class token is not resampled
    assert_weights_equal(model, source, skip=("pos_embed",))

    backbone = create_backbone(TINY_VIT, path)
    assert backbone.load_report.resized
    with torch.no_grad():
        assert backbone.model(torch.randn(2, 3, 32, 32)).shape == (2, 96)


# --------------------------------------------------------------------------- anchored prefix stripping


def test_anchored_stripping_does_not_mangle_inner_backbone(tmp_path, teacher_sd, vit_keys):
    decoy = torch.full_like(teacher_sd["blocks.0.attn.qkv.weight"], 7.0)
    path = save(tmp_path, "decoy.pth", {"teacher": {**prefixed(teacher_sd, "backbone."),
                                                    "head.backbone.blocks.0.attn.qkv.weight": decoy}})
    model = new_vit()
    report = load_backbone_weights(model, path)
    assert_weights_equal(model, teacher_sd)  # the decoy did not overwrite the real qkv
    assert report.matched == vit_keys
    assert report.unexpected == ["head.backbone.blocks.0.attn.qkv.weight"]


def test_map_keys_keeps_inner_prefixes():
    model_keys = {"neck.backbone.proj.weight", "cls_token", "encoder.layer.weight"}
    state = {
        "module.neck.backbone.proj.weight": torch.ones(1),
        "module.module.backbone.cls_token": torch.ones(1),
        "encoder.layer.weight": torch.ones(1),  # a model key that starts with a stripped prefix is kept as is
        "head.backbone.x": torch.ones(1),
        "head.module.encoder.y": torch.ones(1),
    }
    assert sorted(map_keys(state, model_keys)) == sorted(
        ["neck.backbone.proj.weight", "cls_token", "encoder.layer.weight", "head.backbone.x", "head.module.encoder.y"]
    )


def test_two_keys_for_one_tensor_are_refused(tmp_path, teacher_sd):
    state = {**teacher_sd, "module.cls_token": torch.zeros_like(teacher_sd["cls_token"])}
    path = save(tmp_path, "dup.pth", state)
    with pytest.raises(UserError, match=r"'cls_token' and 'module.cls_token' both map to 'cls_token'"):
        load_backbone_weights(new_vit(), path)


# --------------------------------------------------------------------------- refusals


def test_refuses_resnet_weights_for_vit(tmp_path):
    path = save(tmp_path, "resnet.pth", resnet_state(0))
    model = new_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError) as err:
        load_backbone_weights(model, path)
    message = str(err.value)
    assert "backbone tensors unloaded" in message and "cls_token" in message and "conv1.weight" in message
    assert "different architecture" in message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing half-loaded


def test_refuses_unrecognised_layout(tmp_path, teacher_sd):
    path = save(tmp_path, "foo.pth", {"foo": dict(teacher_sd), "epoch": 1})
    with pytest.raises(UserError) as err:
        load_backbone_weights(new_vit(), path)
    message = str(err.value)
    assert "unrecognised checkpoint with top-level keys foo, epoch" in message
    for fmt in ("ssl-bench", "dino", "msn", "wrapped", "state_dict"):
        assert fmt in message


def test_refuses_partial_checkpoint(tmp_path, teacher_sd):
    partial = {k: v for k, v in teacher_sd.items() if not k.startswith("blocks.3.")}
    path = save(tmp_path, "partial.pth", {"teacher": prefixed(partial, "backbone.")})
    with pytest.raises(UserError, match=r"leaves \d+ of \d+ backbone tensors unloaded: blocks\.3\."):
        load_backbone_weights(new_vit(), path)


def test_refuses_shape_mismatch_other_than_pos_embed(tmp_path, teacher_sd):
    bad = dict(teacher_sd)
    bad["blocks.0.mlp.fc1.weight"] = torch.randn(100, 96)
    path = save(tmp_path, "shape.pth", bad)
    with pytest.raises(UserError, match=r"wrong shape.*blocks\.0\.mlp\.fc1\.weight \(100, 96\) vs model \(384, 96\)"):
        load_backbone_weights(new_vit(), path)


def test_refuses_pos_embed_of_other_width(tmp_path, teacher_sd):
    bad = dict(teacher_sd)
    bad["pos_embed"] = torch.randn(1, 145, 64)
    path = save(tmp_path, "pos_width.pth", bad)
    with pytest.raises(UserError, match=r"wrong shape.*pos_embed \(1, 145, 64\) vs model \(1, 65, 96\)"):
        load_backbone_weights(new_vit(), path)


def test_refuses_non_square_pos_embed(tmp_path, teacher_sd):
    bad = dict(teacher_sd)
    bad["pos_embed"] = torch.randn(1, 1 + 50, 96)
    path = save(tmp_path, "pos_rect.pth", bad)
    with pytest.raises(UserError, match="not a square grid"):
        load_backbone_weights(new_vit(), path)


@pytest.mark.parametrize("content", [b"", b"this is not a checkpoint\n", b"\xff\xfe\x00garbage" * 10, b"\x80\x02}q\x00Xzz"])
def test_refuses_garbage_file(tmp_path, content):
    path = tmp_path / "garbage.pth"
    path.write_bytes(content)
    with pytest.raises(UserError, match="cannot read checkpoint .*garbage.pth"):
        create_backbone(TINY_VIT, path)


def test_refuses_truncated_file(tmp_path, teacher_sd):
    good = save(tmp_path, "good.pth", teacher_sd)
    data = open(good, "rb").read()
    for name, cut in (("half.pth", len(data) // 2), ("head.pth", 64)):
        (tmp_path / name).write_bytes(data[:cut])
        with pytest.raises(UserError, match=f"cannot read checkpoint .*{name}"):
            create_backbone(TINY_VIT, tmp_path / name)


def test_refuses_missing_path_and_directory(tmp_path):
    with pytest.raises(UserError, match=r"nope\.pth does not exist"):
        create_backbone(TINY_VIT, tmp_path / "nope.pth")
    with pytest.raises(UserError, match="is not a file"):
        create_backbone(TINY_VIT, tmp_path)


def test_refuses_key_the_checkpoint_lacks(tmp_path, teacher_sd):
    path = save(tmp_path, "teacher_only.pth", {"teacher": prefixed(teacher_sd, "backbone."), "epoch": 1})
    with pytest.raises(UserError, match=r"dino checkpoint has no 'student' weights \(it has teacher, epoch\)"):
        create_backbone(TINY_VIT, path, ckpt_key="student")
    msn = save(tmp_path, "msn_target_only.pth", {"target_encoder": prefixed(teacher_sd, "module.")})
    with pytest.raises(UserError, match=r"MSN checkpoint has no 'encoder' weights"):
        create_backbone(TINY_VIT, msn, ckpt_key="student")


def test_refuses_unknown_key_name(dino_ckpt):
    with pytest.raises(UserError, match=r"checkpoint key 'ema'; expected one of teacher, student"):
        create_backbone(TINY_VIT, dino_ckpt, ckpt_key="ema")


def test_refuses_student_for_single_weight_files(tmp_path, teacher_sd):
    path = save(tmp_path, "plain.pth", teacher_sd)
    with pytest.raises(UserError, match="holds a single set of weights"):
        create_backbone(TINY_VIT, path, ckpt_key="student")


def test_refuses_non_tensor_weights_entry(tmp_path):
    path = save(tmp_path, "bad_teacher.pth", {"teacher": {"backbone.cls_token": torch.zeros(1), "note": "hello"}})
    with pytest.raises(UserError, match="'teacher' is not a dict of tensors"):
        create_backbone(TINY_VIT, path)
    with pytest.raises(UserError, match="expected a dict of weights"):
        extract_state_dict([torch.zeros(1)])


def test_refuses_missing_arch_without_ssl_bench_meta(tmp_path, teacher_sd):
    path = save(tmp_path, "plain.pth", teacher_sd)
    with pytest.raises(UserError, match="--model is required"):
        create_backbone(None, path)


# --------------------------------------------------------------------------- provenance and no network


def test_sha256_label_and_weights_id_follow_the_file(tmp_path, teacher_sd, student_sd):
    path = tmp_path / "weights.pth"
    torch.save(prefixed(teacher_sd, "backbone."), path)
    first = create_backbone(TINY_VIT, path)
    assert first.ckpt_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert first.ckpt_sha256[:8] in first.label and first.label.startswith("weights.pth")
    assert first.ckpt_sha256 in first.weights_id()

    torch.save(prefixed(student_sd, "backbone."), path)
    second = create_backbone(TINY_VIT, path)
    assert second.ckpt_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert second.ckpt_sha256 != first.ckpt_sha256
    assert second.label != first.label
    assert second.weights_id() != first.weights_id()
    assert_weights_equal(second.model, student_sd)

    random_init = create_backbone(TINY_VIT)
    assert random_init.ckpt_sha256 == "" and "random init" in random_init.label


def test_no_network_during_load(dino_ckpt, teacher_sd, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    backbone = create_backbone(TINY_VIT, dino_ckpt)
    assert_weights_equal(backbone.model, teacher_sd)
    resnet = create_backbone("resnet18")
    assert resnet.ckpt_path is None


def test_mapped_and_in_memory_reads_agree_and_legacy_files_still_load(tmp_path):
    state = {"teacher": {"backbone.w": torch.arange(6.0).view(2, 3)}, "epoch": 3}
    for name, zip_format in (("new.pth", True), ("legacy.pth", False)):
        path = tmp_path / name
        torch.save(state, path, _use_new_zipfile_serialization=zip_format)
        mapped, loaded = read_checkpoint(path, mmap=True), read_checkpoint(path)
        assert mapped["epoch"] == loaded["epoch"] == 3
        assert torch.equal(mapped["teacher"]["backbone.w"], loaded["teacher"]["backbone.w"])
        mapped["teacher"]["backbone.w"] += 1  # copy-on-write: the file keeps its values
        assert torch.equal(read_checkpoint(path)["teacher"]["backbone.w"], torch.arange(6.0).view(2, 3))
