"""Teacher store: train/find/load, safe loading, and import of the CMI/Fast/CSD checkpoint layout."""

from __future__ import annotations

import json
import re
from dataclasses import asdict

import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner
from helpers import SHIPPED_TEACHERS, TINY_SPEC, assert_effect, assert_user_error

from dfkd_bench.cli import cli
from dfkd_bench.data import Normalizer, evaluate, get_dataset
from dfkd_bench.errors import DfkdError
from dfkd_bench.runtime import sha256_file
from dfkd_bench.teachers import (
    TIMED_STEPS,
    TeacherTrainConfig,
    TrainProgress,
    default_train_config,
    find_teacher,
    import_teacher,
    load_state_dict,
    load_teacher,
    milestone_epochs,
    partial_path,
    teacher_paths,
    train_teacher,
)
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


# ---------------------------------------------------------------- training: resume, estimate, storage

class _Recorder(TrainProgress):
    """Records what training reports; raises KeyboardInterrupt after epoch ``stop_after`` (1-based)."""

    def __init__(self, stop_after: int | None = None):
        self.stop_after = stop_after
        self.starts, self.estimates, self.epochs, self.losses = [], [], [], []

    def start(self, start_epoch, done_steps, total_steps):
        self.starts.append((start_epoch, done_steps, total_steps))

    def estimate(self, seconds, timed_steps):
        self.estimates.append((seconds, timed_steps))

    def step(self, done, total, epoch, loss):
        self.losses.append(loss)

    def epoch(self, epoch, accuracy):
        self.epochs.append((epoch, accuracy))
        if self.stop_after is not None and epoch + 1 == self.stop_after:
            raise KeyboardInterrupt


TINY_RECIPE = dict(epochs=3, batch_size=64, lr=0.05)


def _weights(store, arch="wrn16_1"):
    return torch.load(teacher_paths(store, "tiny", arch)[0], weights_only=True)


@pytest.mark.numeric
def test_an_interrupted_training_resumes_to_the_same_weights(tmp_path):
    straight = _Recorder()
    meta = train_teacher(TINY_SPEC, "wrn16_1", TeacherTrainConfig(**TINY_RECIPE), tmp_path / "a", progress=straight)
    interrupted = _Recorder(stop_after=2)
    with pytest.raises(KeyboardInterrupt):
        train_teacher(TINY_SPEC, "wrn16_1", TeacherTrainConfig(**TINY_RECIPE), tmp_path / "b", progress=interrupted)
    partial = partial_path(tmp_path / "b", "tiny", "wrn16_1")
    assert partial.is_file() and not teacher_paths(tmp_path / "b", "tiny", "wrn16_1")[0].exists()
    resumed = _Recorder()
    meta_b = train_teacher(TINY_SPEC, "wrn16_1", TeacherTrainConfig(**TINY_RECIPE), tmp_path / "b", progress=resumed)
    steps = len(straight.losses) // 3
    assert resumed.starts == [(2, 2 * steps, 3 * steps)]  # picks up after the second epoch
    assert [e for e, _ in resumed.epochs] == [2]
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert meta_b["epoch_accuracies"] == meta["epoch_accuracies"] and meta_b["sha256"] == meta["sha256"]
    assert not partial.exists()  # removed once the teacher is stored
    assert_effect(sum(straight.losses[:steps]) / steps, sum(straight.losses[-steps:]) / steps,
                  "training loss: first epoch over last")  # it did learn


def test_a_partial_training_with_other_settings_is_not_resumed(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        train_teacher(TINY_SPEC, "wrn16_1", TeacherTrainConfig(**TINY_RECIPE), tmp_path, progress=_Recorder(1))
    partial = partial_path(tmp_path, "tiny", "wrn16_1")
    before = partial.read_bytes()
    with pytest.raises(DfkdError, match=r"other settings \(lr 0.05\).*delete the file") as info:
        train_teacher(TINY_SPEC, "wrn16_1", TeacherTrainConfig(**{**TINY_RECIPE, "lr": 0.1}), tmp_path)
    assert "\n" not in str(info.value)
    assert partial.read_bytes() == before  # the interrupted work is kept
    partial.write_bytes(before[:100])
    with pytest.raises(DfkdError, match="cannot resume the teacher training in .*delete it to start over"):
        train_teacher(TINY_SPEC, "wrn16_1", TeacherTrainConfig(**TINY_RECIPE), tmp_path)


def test_the_estimate_comes_once_from_timed_steps(tmp_path):
    recorder = _Recorder()
    train_teacher(TINY_SPEC, "wrn16_1", TeacherTrainConfig(epochs=2, batch_size=32), tmp_path, progress=recorder)
    assert len(recorder.estimates) == 1
    seconds, timed = recorder.estimates[0]
    assert seconds > 0 and timed == TIMED_STEPS


def test_half_storage_halves_the_file_and_loads_as_float32(tmp_path):
    cfg = dict(epochs=1, batch_size=64, lr=0.05)
    full = train_teacher(TINY_SPEC, "wrn16_2", TeacherTrainConfig(**cfg), tmp_path / "full")
    half = train_teacher(TINY_SPEC, "wrn16_2", TeacherTrainConfig(**cfg, half=True), tmp_path / "half")
    full_file, half_file = (teacher_paths(tmp_path / s, "tiny", "wrn16_2")[0] for s in ("full", "half"))
    assert half_file.stat().st_size < 0.6 * full_file.stat().st_size
    assert half["sha256"] == sha256_file(half_file) and half["stored_dtype"] == "float16"
    assert full["stored_dtype"] == "float32" and "--half" in half["command"]
    stored = torch.load(half_file, weights_only=True)
    assert {v.dtype for v in stored.values()} == {torch.float16, torch.int64}  # BN's step counters stay integers
    model, meta = load_teacher(TINY_SPEC, "wrn16_2", tmp_path / "half")
    assert all(p.dtype == torch.float32 for p in model.state_dict().values() if p.is_floating_point())
    images, labels = TINY_SPEC.load("test")
    measured = evaluate(model, images, labels, Normalizer(TINY_SPEC.mean, TINY_SPEC.std), torch.device("cpu"))
    assert round(measured, 2) == half["test_accuracy"]  # the sidecar scores the stored (rounded) weights


def test_recipes_differ_per_dataset_and_name_the_authors_cifar_schedule():
    fmnist, cifar10 = default_train_config("fashion-mnist"), default_train_config("cifar10")
    assert fmnist == TeacherTrainConfig() and default_train_config("tiny") == TeacherTrainConfig()
    assert (cifar10.epochs, cifar10.batch_size, cifar10.schedule) == (200, 256, "multistep")
    assert milestone_epochs(cifar10) == [120, 150, 180]  # the authors' epochs
    assert milestone_epochs(default_train_config("cifar100", epochs=20)) == [12, 15, 18]  # a shorter run decays too
    assert default_train_config("cifar10", epochs=3, lr=None).epochs == 3  # None keeps the recipe's value
    with pytest.raises(DfkdError, match="unknown teacher schedule 'cosine'"):
        default_train_config("cifar10", schedule="cosine")


def test_find_teacher_resolves_the_arch_name(tiny_store):
    assert find_teacher(TINY_SPEC, "wrn16_1", tiny_store) == teacher_paths(tiny_store, "tiny", "wrn16_1")[0]
    assert find_teacher(TINY_SPEC, "resnet34", tiny_store) is None


# ---------------------------------------------------------------- `run` trains a missing teacher

def _run_without_teacher(store, output, *extra):
    args = ["run", "--method", "deepinversion", "--dataset", "tiny", "--teacher", "wrn16_2", "--teacher-store",
            store, "--output", output, "--set", "epochs=1", "--set", "ep_steps=1", "--set", "kd_steps=1",
            "--set", "batch_size=8", "--set", "synth_batch_size=8", "--set", "method.g_steps=1", *extra]
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_run_trains_a_missing_teacher_with_the_recipe_then_runs(tmp_path):
    store = tmp_path / "store"
    result = _run_without_teacher(store, tmp_path / "out")
    assert result.exit_code == 0, (result.output, result.exception)
    notice = [line for line in result.stdout.splitlines() if line.startswith("no wrn16_2 teacher")]
    assert len(notice) == 1, result.stdout
    assert re.fullmatch(rf"no wrn16_2 teacher for tiny in {re.escape(str(store))}, training wrn16_2 on the tiny "
                        r"training set \(--no-train-teacher refuses instead\): 4 epochs, 8 steps of batch 128; "
                        r"about \d+ s on this machine \(from 1 timed step\)", notice[0]), notice[0]
    meta = json.loads(teacher_paths(store, "tiny", "wrn16_2")[1].read_text())
    assert meta["train_settings"] == json.loads(json.dumps(asdict(default_train_config("tiny"))))
    assert meta["command"].startswith("dfkd-bench teacher train --dataset tiny --arch wrn16_2 --epochs 4")
    assert meta["sha256"] == sha256_file(teacher_paths(store, "tiny", "wrn16_2")[0])
    # the student follows the teacher, and the start line says so
    run_dir = tmp_path / "out" / "tiny-wrn16_2-wrn16_1-deepinversion-quick-s0"
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "complete"
    assert "student wrn16_1 -> wrn16_1 (the paired student for a wrn16_2 teacher" in result.stdout
    # the next run finds it
    again = _run_without_teacher(store, tmp_path / "out2", "--no-train-teacher")
    assert again.exit_code == 0, again.output
    assert "training" not in again.stdout.split("deepinversion:")[0]


def test_an_interrupted_teacher_training_in_run_resumes(tmp_path, monkeypatch):
    from dfkd_bench import cli as cli_module

    store = tmp_path / "store"
    original = cli_module._TeacherProgress.epoch

    def interrupt(self, epoch, accuracy):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_module._TeacherProgress, "epoch", interrupt)
    result = _run_without_teacher(store, tmp_path / "out")
    assert result.exit_code == 130 and "interrupted" in result.stderr
    assert partial_path(store, "tiny", "wrn16_2").is_file() and not (tmp_path / "out").exists()
    monkeypatch.setattr(cli_module._TeacherProgress, "epoch", original)
    result = _run_without_teacher(store, tmp_path / "out")
    assert result.exit_code == 0, (result.output, result.exception)
    assert "resuming the interrupted teacher training after epoch 1/4" in result.stdout
    assert "teacher epoch 1/4" not in result.stdout and "teacher epoch 4/4" in result.stdout
    assert not partial_path(store, "tiny", "wrn16_2").exists()


def test_a_rank_of_a_process_group_never_trains_the_teacher(tmp_path, monkeypatch):
    # N ranks would each train it into the same store; `run --ddp` trains it before spawning instead
    from dfkd_bench.api import ensure_teacher
    from dfkd_bench.config import resolve_config

    cfg, _, _ = resolve_config("deepinversion", "quick", {}, dataset="tiny", teacher="wrn16_2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DfkdError, match="dfkd-bench teacher train"):
        ensure_teacher(cfg, tmp_path, True)
    assert not any(tmp_path.iterdir())


def test_run_with_an_arch_timm_does_not_know_stays_one_line(tmp_path):
    result = CliRunner().invoke(cli, ["run", "--method", "deepinversion", "--dataset", "tiny", "--teacher",
                                      "wrn99_9", "--teacher-store", str(tmp_path), "--output", str(tmp_path / "o")])
    assert_user_error(result, "unknown model 'wrn99_9'")
    assert not any(tmp_path.iterdir())


def test_the_multistep_schedule_divides_the_lr_at_its_milestones(tmp_path):
    cfg = TeacherTrainConfig(epochs=4, batch_size=64, lr=0.05, schedule="multistep", milestones=(0.5, 0.75))
    for stop_after, lr in ((1, 0.05), (2, 0.005), (3, 0.0005)):
        store = tmp_path / str(stop_after)
        with pytest.raises(KeyboardInterrupt):
            train_teacher(TINY_SPEC, "wrn16_1", cfg, store, progress=_Recorder(stop_after))
        state = torch.load(partial_path(store, "tiny", "wrn16_1"), weights_only=True)
        assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(lr)


SHIPPED = sorted(SHIPPED_TEACHERS.glob("*/*.json"))


@pytest.mark.parametrize("sidecar", SHIPPED, ids=[f"{p.parent.name}/{p.stem}" for p in SHIPPED])
def test_every_shipped_teacher_matches_its_sidecar_and_loads(sidecar):
    """A committed teacher is what its sidecar says: same bytes (sha256), an arch that builds for the
    dataset, every tensor loading strictly; a stale sidecar or a truncated file fails here, not in a run."""
    meta = json.loads(sidecar.read_text())
    spec = get_dataset(meta["dataset"])
    name = f"{meta['arch']}@{meta['variant']}" if meta.get("variant") else meta["arch"]  # wrn16_2@s1: its own file
    model, loaded = load_teacher(spec, name, store=sidecar.parents[1])  # hashes the file once
    assert loaded["path"].endswith(sidecar.with_suffix(".pt").name)
    assert loaded["sha256"] == meta["sha256"] and not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp16 files load as float32
    assert 50.0 < meta["test_accuracy"] <= 100.0


def test_the_shipped_store_holds_the_paper_pair_teacher():
    assert {p.stem for p in SHIPPED if p.parent.name == "fashion-mnist"} >= {"wrn16_2", "cifar_resnet34"}


# ---------------------------------------------------------------- the normalization belongs to the teacher

AUTHORS_CIFAR10 = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))  # zju-vipa/CMI registry.py:19


def test_the_cifar_datasets_default_to_the_released_teachers_normalization():
    assert (get_dataset("cifar10").mean, get_dataset("cifar10").std) == AUTHORS_CIFAR10
    assert get_dataset("cifar100").std == (0.2675, 0.2565, 0.2761)


def test_an_imported_cmi_checkpoint_is_measured_and_used_under_the_authors_normalization(cifar_root, tmp_path):
    spec = get_dataset("cifar10")
    keys = _cmi_wrn_keys(16, 1, 10, 3)
    src = tmp_path / "cifar10_wrn_40_2.pth"  # a released teacher's name on another network: a warning, below
    torch.save({"state_dict": _foreign_checkpoint(keys)}, src)
    meta = import_teacher(src, "cmi", spec, "wrn16_1", tmp_path / "store")
    assert meta["normalization"] == {"mean": list(AUTHORS_CIFAR10[0]), "std": list(AUTHORS_CIFAR10[1])}
    model, loaded = load_teacher(spec, "wrn16_1", tmp_path / "store")
    test_x, test_y = spec.load("test")
    # the authors' transform: ToTensor then Normalize(mean, std), as their evaluation does
    authors = Normalizer(*AUTHORS_CIFAR10)
    assert meta["test_accuracy"] == round(evaluate(model, test_x, test_y, authors, torch.device("cpu")), 2)
    # a run uses the recorded normalization, and says which
    from helpers import tiny_runner

    runner = tiny_runner("kd-noise", tmp_path / "run", tmp_path / "store",
                         {"dataset": "cifar10", "teacher": "wrn16_1", "student": "wrn16_1"})
    assert runner.normalizer.values == meta["normalization"]
    assert torch.equal(runner.normalizer.std.flatten(), torch.tensor(AUTHORS_CIFAR10[1]))
    summary = runner.run()
    assert summary["normalization"] == meta["normalization"]
    assert loaded["standard"]["published_accuracy"] == 94.87 and loaded["standard"]["arch"] == "wrn40_2"


def test_import_records_a_given_normalization_and_the_run_follows_it(cifar_root, tmp_path):
    spec = get_dataset("cifar10")
    torch.save({"state_dict": _foreign_checkpoint(_cmi_wrn_keys(16, 1, 10, 3))}, tmp_path / "mine.pth")
    given = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    meta = import_teacher(tmp_path / "mine.pth", "cmi", spec, "wrn16_1", tmp_path / "store", mean=given[0],
                          std=given[1])
    assert meta["normalization"] == {"mean": [0.5] * 3, "std": [0.25] * 3} and "standard" not in meta
    model, _ = load_teacher(spec, "wrn16_1", tmp_path / "store")
    test_x, test_y = spec.load("test")
    assert meta["test_accuracy"] == round(evaluate(model, test_x, test_y, Normalizer(*given), torch.device("cpu")), 2)
    with pytest.raises(DfkdError, match="--std needs 3 finite number"):
        import_teacher(tmp_path / "mine.pth", "cmi", spec, "wrn16_1", tmp_path / "s2", mean=(0.5,) * 3, std=(0.2,))
    with pytest.raises(DfkdError, match="--mean and --std go together"):
        import_teacher(tmp_path / "mine.pth", "cmi", spec, "wrn16_1", tmp_path / "s2", mean=(0.5,) * 3)


def test_a_teacher_trained_here_records_its_normalization_and_a_shipped_sidecar_falls_back(cifar_root, tmp_path):
    from dfkd_bench.teachers import teacher_normalization

    spec = get_dataset("cifar10")
    meta = train_teacher(spec, "wrn16_1", TeacherTrainConfig(epochs=1, batch_size=20, lr=0.05), tmp_path)
    assert meta["normalization"] == {"mean": list(AUTHORS_CIFAR10[0]), "std": list(AUTHORS_CIFAR10[1])}
    # the sidecars shipped with the project predate the field: their dataset's normalization, as trained
    shipped = json.loads((SHIPPED_TEACHERS / "fashion-mnist" / "wrn16_2.json").read_text())
    assert "normalization" not in shipped
    assert teacher_normalization(shipped, get_dataset("fashion-mnist")) == ((0.2860,), (0.3530,))


def test_importing_a_released_teacher_by_name_prints_the_published_accuracy_and_warns_on_a_gap(cifar_root, tmp_path):
    torch.save({"state_dict": _foreign_checkpoint(_cmi_wrn_keys(16, 1, 10, 3))}, tmp_path / "cifar10_wrn_40_2.pth")
    result = CliRunner().invoke(cli, ["teacher", "import", str(tmp_path / "cifar10_wrn_40_2.pth"), "--arch",
                                      "wrn16_1", "--dataset", "cifar10", "--store", str(tmp_path / "store")])
    assert result.exit_code == 0, result.output
    assert "normalization mean (0.4914, 0.4822, 0.4465), std (0.2023, 0.1994, 0.201)" in result.stdout
    assert "is a released teacher (wrn40_2, cifar10): 94.87% published" in result.stdout
    assert "warning: it was imported as wrn16_1 for cifar10" in result.stderr
    bad = CliRunner().invoke(cli, ["teacher", "import", str(tmp_path / "cifar10_wrn_40_2.pth"), "--arch", "wrn16_1",
                                   "--dataset", "cifar10", "--store", str(tmp_path / "s3"), "--mean", "0.5,0.5"])
    assert_user_error(bad, "--mean and --std go together")
