"""The small-image zoo: every model is a timm model with timm's feature API."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import timm
import torch

from dfkd_bench.config import resolve_config
from dfkd_bench.errors import DfkdError, UnknownNameError
from dfkd_bench.zoo import (
    DEFAULT_STUDENT,
    ZOO,
    check_model_input,
    create_model,
    feature_dims,
    paper_student,
    resolve_model_name,
    stage_modules,
)


def test_zoo_lists_every_model_the_module_registers_into_timm():
    # the parametrized tests below iterate over ZOO, so ZOO must not miss a registered model
    assert sorted(timm.list_models(module="zoo")) == sorted(ZOO)


@pytest.mark.parametrize("name", ZOO)
@pytest.mark.parametrize("in_chans,size,num_classes", [(1, 28, 7), (3, 32, 10)], ids=["1x28", "3x32"])
def test_zoo_model_builds_and_exposes_the_feature_api(name, in_chans, size, num_classes):
    model = timm.create_model(name, num_classes=num_classes, in_chans=in_chans).eval()
    x = torch.randn(2, in_chans, size, size)
    with torch.no_grad():
        feats = model.forward_features(x)
        pooled = model.forward_head(feats, pre_logits=True)
        logits = model.forward_head(feats)
        direct = model(x)
    assert feats.ndim == 4 and feats.shape[:2] == (2, model.num_features)
    assert pooled.shape == (2, model.num_features)
    assert logits.shape == (2, num_classes)
    torch.testing.assert_close(direct, logits)
    assert torch.isfinite(logits).all()
    assert feature_dims(model, in_chans, size) == (tuple(feats.shape[1:]), model.num_features)


@pytest.mark.parametrize("name", ZOO)
def test_zoo_model_takes_a_new_classifier(name):
    model = timm.create_model(name, num_classes=10, in_chans=1)
    model.reset_classifier(3)
    with torch.no_grad():
        assert model.eval()(torch.zeros(2, 1, 28, 28)).shape == (2, 3)
    assert model.get_classifier().out_features == 3


def test_resolve_model_name_maps_plain_names_by_image_size():
    assert resolve_model_name("resnet34", 28) == "cifar_resnet34"
    assert resolve_model_name("resnet34", 32) == "cifar_resnet34"
    assert resolve_model_name("resnet34", 224) == "resnet34"
    assert resolve_model_name("timm:resnet34", 28) == "resnet34"
    assert resolve_model_name("timm:resnet34", 224) == "resnet34"
    assert resolve_model_name("vgg11", 28) == "cifar_vgg11_bn"
    assert resolve_model_name("wrn40_2", 28) == "wrn40_2"


def test_create_model_records_the_resolved_name_and_checks_the_shape():
    model = create_model("resnet18", num_classes=10, in_chans=1, image_size=28)
    assert model.dfkd_name == "cifar_resnet18"
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)  # small-image stem
    assert model.training  # the shape check leaves the mode alone


def test_unknown_model_name_suggests_a_close_match():
    with pytest.raises(UnknownNameError) as info:
        resolve_model_name("wrn16-1", 28)
    message = str(info.value)
    assert message.startswith("unknown model 'wrn16-1'")
    assert "did you mean" in message and "'wrn16_1'" in message
    with pytest.raises(UnknownNameError):
        create_model("timm:no_such_model_at_all", 10, 1, 28)


def test_unknown_model_suggestions_are_distinct():
    with pytest.raises(UnknownNameError) as info:
        resolve_model_name("wrnn16_1", 28)
    suggested = re.search(r"did you mean (.*?)\?", str(info.value)).group(1).split(", ")
    assert len(suggested) == len(set(suggested))


def test_timm_model_with_a_fixed_input_size_is_rejected_in_one_line():
    with pytest.raises(DfkdError) as info:
        create_model("vit_tiny_patch16_224", num_classes=10, in_chans=1, image_size=28)
    assert not isinstance(info.value, UnknownNameError)
    message = str(info.value)
    assert message.startswith("model 'vit_tiny_patch16_224' cannot take 1x28x28 images")
    assert "\n" not in message


def test_check_model_input_rejects_wrong_logit_shape_and_keeps_training_mode():
    model = timm.create_model("wrn16_1", num_classes=10, in_chans=1).train()
    check_model_input(model, "wrn16_1", 1, 28, 10)
    with pytest.raises(DfkdError, match=r"logits of shape \(2, 10\), expected \(2, 7\)"):
        check_model_input(model, "wrn16_1", 1, 28, 7)
    with pytest.raises(DfkdError, match="cannot take 3x28x28"):
        check_model_input(model, "wrn16_1", 3, 28, 10)
    assert model.training


def test_importing_the_package_registers_the_zoo_in_a_fresh_interpreter():
    code = ("import sys, dfkd_bench, timm\n"
            "assert 'dfkd_bench.cli' not in sys.modules and 'dfkd_bench.engine' not in sys.modules\n"
            "print(' '.join(timm.list_models('wrn*')))\n"
            "model = timm.create_model('wrn16_1', num_classes=10, in_chans=1)\n"
            "print(type(model).__name__, model.num_classes, model.conv1.in_channels)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    listed, built = proc.stdout.strip().splitlines()
    assert set(listed.split()) == {name for name in ZOO if name.startswith("wrn")}
    assert built == "WideResNet 10 1"


@pytest.mark.parametrize("teacher,student", [
    ("resnet34", "resnet18"), ("cifar_resnet34", "resnet18"), ("vgg11", "resnet18"), ("vgg11_bn", "resnet18"),
    ("cifar_vgg11_bn", "resnet18"), ("wrn40_2", "wrn16_1"), ("wrn16_2", "wrn16_1"),
    ("wrn16_1", None), ("timm:resnet34", None), ("resnet18", None),
])
def test_paper_student_follows_the_teacher_under_any_of_its_names(teacher, student):
    assert paper_student(teacher) == student


@pytest.mark.parametrize("fields,overrides,expected", [
    ({"teacher": "resnet34"}, {}, "resnet18"),
    ({"teacher": "vgg11"}, {}, "resnet18"),
    ({"teacher": "wrn40_2"}, {}, "wrn16_1"),
    ({"teacher": "wrn40_2", "student": "wrn40_1"}, {}, "wrn40_1"),  # the other pair is one flag away
    ({"teacher": "resnet34"}, {"student": "wrn16_2"}, "wrn16_2"),  # --set student= wins too
    ({"teacher": "wrn16_1"}, {}, DEFAULT_STUDENT),
    ({}, {}, "wrn16_1"),  # the default teacher, wrn16_2, pairs with wrn16_1
])
def test_the_run_config_takes_the_teachers_paper_student(fields, overrides, expected):
    cfg, _, _ = resolve_config("deepinversion", "quick", overrides, **fields)
    assert cfg.student == expected


@pytest.mark.parametrize("name,stages", [("wrn16_1", 3), ("cifar_resnet18", 4), ("cifar_vgg8_bn", 5),
                                         ("resnet10t", 5)])  # timm counts its stem
def test_stage_modules_give_maps_shallow_to_deep(name, stages):
    model = timm.create_model(name, num_classes=10, in_chans=1).eval()
    maps = []
    handles = [m.register_forward_hook(lambda _m, _i, out: maps.append(out)) for m in stage_modules(model)]
    with torch.no_grad():
        model(torch.randn(2, 1, 32, 32))
    for h in handles:
        h.remove()
    assert len(maps) == stages
    sizes = [m.shape[-1] for m in maps]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]  # resolution falls with depth
    if name == "wrn16_1":  # the last stage comes before the final BN-ReLU: it can be negative
        assert maps[-1].min() < 0 and model.forward_features(torch.randn(2, 1, 32, 32)).min() >= 0
