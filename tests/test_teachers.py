"""Teacher store: train/find/load, safe loading, and import of the CMI/Fast/CSD checkpoint layout."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from conftest import TINY_SPEC

from dfkd_bench.errors import DfkdError
from dfkd_bench.teachers import import_teacher, load_state_dict, load_teacher, teacher_paths
from dfkd_bench.zoo import create_model


def _cmi_wrn_keys(depth: int, widen: int, num_classes: int, in_chans: int) -> dict[str, tuple[int, ...]]:
    """Key names and shapes of a WRN in the CMI/Fast/CSD code's layout, written out by hand."""
    n = (depth - 4) // 6
    widths = [16, 16 * widen, 32 * widen, 64 * widen]
    keys: dict[str, tuple[int, ...]] = {"conv1.weight": (16, in_chans, 3, 3)}

    def bn(prefix: str, c: int) -> None:
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            keys[f"{prefix}.{leaf}"] = (c,)
        keys[f"{prefix}.num_batches_tracked"] = ()

    for g in range(3):
        for i in range(n):
            cin = widths[g] if i == 0 else widths[g + 1]
            cout = widths[g + 1]
            p = f"block{g + 1}.layer.{i}"
            bn(f"{p}.bn1", cin)
            keys[f"{p}.conv1.weight"] = (cout, cin, 3, 3)
            bn(f"{p}.bn2", cout)
            keys[f"{p}.conv2.weight"] = (cout, cout, 3, 3)
            if cin != cout:
                keys[f"{p}.convShortcut.weight"] = (cout, cin, 1, 1)
    bn("bn1", widths[3])
    keys["fc.weight"] = (num_classes, widths[3])
    keys["fc.bias"] = (num_classes,)
    return keys


def _foreign_checkpoint(keys: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    state = {}
    for k, shape in keys.items():
        if k.endswith("num_batches_tracked"):
            state[k] = torch.tensor(7)
        elif k.endswith("running_var"):
            state[k] = torch.rand(shape, generator=g) + 0.5
        else:
            state[k] = torch.randn(shape, generator=g) * 0.1
    return state


def test_import_cmi_wrn_maps_every_tensor(tmp_path):
    keys = _cmi_wrn_keys(16, 1, TINY_SPEC.num_classes, TINY_SPEC.channels)
    foreign = _foreign_checkpoint(keys)
    src = tmp_path / "wrn16_1_cmi.pth"
    torch.save({"state_dict": foreign, "best_acc": 0.5, "epoch": 3}, src)
    meta = import_teacher(src, "cmi", TINY_SPEC, "wrn16_1", tmp_path / "store")
    assert meta["import_format"] == "cmi" and meta["test_accuracy"] is not None
    model, loaded = load_teacher(TINY_SPEC, "wrn16_1", tmp_path / "store")
    own = model.state_dict()
    # the final BN and a shortcut conv land where the zoo keeps them, with the same values
    assert torch.equal(own["bn_final.running_var"], foreign["bn1.running_var"])
    assert torch.equal(own["block2.0.project.weight"], foreign["block2.layer.0.convShortcut.weight"])
    assert torch.equal(own["block3.1.conv2.weight"], foreign["block3.layer.1.conv2.weight"])
    assert loaded["sha256"] == json.loads(teacher_paths(tmp_path / "store", "tiny", "wrn16_1")[1].read_text())["sha256"]


def test_import_rejects_checkpoint_of_other_arch_or_classes(tmp_path):
    src = tmp_path / "wrn.pth"
    torch.save({"state_dict": _foreign_checkpoint(_cmi_wrn_keys(16, 2, TINY_SPEC.num_classes, 3))}, src)
    with pytest.raises(DfkdError, match="not a 'wrn16_1' checkpoint"):
        import_teacher(src, "cmi", TINY_SPEC, "wrn16_1", tmp_path / "store")
    torch.save({"state_dict": _foreign_checkpoint(_cmi_wrn_keys(16, 1, 10, 3))}, src)
    with pytest.raises(DfkdError, match="classes"):
        import_teacher(src, "cmi", TINY_SPEC, "wrn16_1", tmp_path / "store")
    torch.save({"state_dict": _foreign_checkpoint(_cmi_wrn_keys(16, 1, 4, 3))}, src)
    with pytest.raises(DfkdError, match="missing"):
        import_teacher(src, "cmi", TINY_SPEC, "wrn40_1", tmp_path / "store")


def test_import_cmi_resnet_and_vgg_layouts(tmp_path):
    for arch, rename in (("cifar_resnet18", lambda k: k.replace("fc.", "linear.")), ("cifar_vgg8_bn", None)):
        model = create_model(arch, TINY_SPEC.num_classes, 3, 16)
        own = model.state_dict()
        if rename is None:
            # their VGG: stage i keeps (conv, bn, relu) triples in block{i}; the classifier is `classifier`
            convs = [n for n, m in model.features.named_modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
            stage_of, stage, seen = {}, 0, 0
            for idx, m in enumerate(model.features):
                if isinstance(m, nn.MaxPool2d):
                    stage, seen = stage + 1, 0
                elif isinstance(m, (nn.Conv2d, nn.BatchNorm2d)):
                    stage_of[str(idx)] = f"block{stage}.{seen}"
                    seen += 2 if isinstance(m, nn.BatchNorm2d) else 1
            assert len(stage_of) == len(convs)
            foreign = {}
            for k, v in own.items():
                parts = k.split(".")
                if parts[0] == "features":
                    foreign[f"{stage_of[parts[1]]}.{parts[2]}"] = v.clone()
                else:
                    foreign[k.replace("fc.", "classifier.")] = v.clone()
        else:
            foreign = {rename(k): v.clone() for k, v in own.items()}
        src = tmp_path / f"{arch}.pth"
        torch.save({"state_dict": foreign}, src)
        import_teacher(src, "cmi", TINY_SPEC, arch, tmp_path / "store")
        loaded, _ = load_teacher(TINY_SPEC, arch, tmp_path / "store")
        for k, v in own.items():
            assert torch.equal(loaded.state_dict()[k], v), k


class NotATensor:
    """An object that only unpickles by running code from this module."""


def test_load_refuses_pickled_code_and_garbage(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(1), "obj": NotATensor()}, evil)
    with pytest.raises(DfkdError, match="pickled code"):
        load_state_dict(evil)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(DfkdError, match="not a readable checkpoint"):
        load_state_dict(garbage)
    truncated = tmp_path / "truncated.pt"
    torch.save({"w": torch.zeros(1000)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(DfkdError, match="not a readable checkpoint"):
        load_state_dict(truncated)


def test_missing_teacher_names_the_command(tmp_path):
    with pytest.raises(DfkdError, match="dfkd-bench teacher train --dataset tiny --arch wrn16_2"):
        load_teacher(TINY_SPEC, "wrn16_2", tmp_path)


def test_tampered_teacher_fails_its_hash(tiny_store, tmp_path):
    import shutil

    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)
    ckpt, _ = teacher_paths(store, "tiny", "wrn16_1")
    state = torch.load(ckpt, weights_only=True)
    state["fc.bias"] += 1
    torch.save(state, ckpt)
    with pytest.raises(DfkdError, match="sha256"):
        load_teacher(TINY_SPEC, "wrn16_1", store)
