"""NAYER: the noisy layer is drawn afresh every round while the generator persists, the generator is
re-initialized on the authors' schedule, the label-embedding source is recorded, embedding files load
without running code and bad ones get one line and exit code 2."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import TINY_CLASSES, TINY_CLI, assert_effect, assert_user_error, tiny_runner

from dfkd_bench.cli import cli
from dfkd_bench.config import resolve_config
from dfkd_bench.data import FASHION_MNIST_CLASSES
from dfkd_bench.errors import DfkdError
from dfkd_bench.methods.nayer import load_label_embeddings, text_embeddings, text_encoder_available
from dfkd_bench.rundir import CONFIG


def _method(tmp_path, store, **overrides):
    values = {f"method.{k}": v for k, v in overrides.items()}
    return tiny_runner("nayer", tmp_path / "run", store, {"method.g_steps": 2, **values}).method


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _rounds(method, count: int, warmup_rounds: int = 0) -> tuple[list[dict], list[dict]]:
    """Synthesize ``count`` rounds; returns the generator's state at each round's first forward and at its end."""
    starts, ends = [], []
    seen = set()

    def first_forward(module, args):
        if len(ends) not in seen:
            seen.add(len(ends))
            starts.append(_snapshot(module))

    handle = method.generator.register_forward_pre_hook(first_forward)
    for r in range(count):
        method.on_epoch_start(r, warmup=r < warmup_rounds)
        method.synthesize()
        ends.append(_snapshot(method.generator))
    handle.remove()
    return starts, ends


def _noise(state: dict) -> torch.Tensor:
    return state["noise_weight"]


def _generator_part(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.startswith("noise_")}


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_noisy_layer_is_fresh_every_round_while_the_generator_persists(tiny_store, tmp_path):
    method = _method(tmp_path, tiny_store, g_life=2)
    starts, ends = _rounds(method, 4)
    for r in (1, 2, 3):
        fresh = _noise(starts[r])
        # a new N(0, 1) draw: unrelated to the noise the last round ended with
        assert abs(fresh.mean().item()) < 0.1 and abs(fresh.std().item() - 1) < 0.1
        assert torch.corrcoef(torch.stack([fresh.flatten(), _noise(ends[r - 1]).flatten()]))[0, 1].abs() < 0.1
        assert torch.equal(starts[r]["noise_bias"], torch.zeros_like(starts[r]["noise_bias"]))
    # the generator behind it carries over from one round to the next, except at the scheduled reset (g_life=2)
    assert _same(_generator_part(starts[1]), _generator_part(ends[0]))
    assert _same(_generator_part(starts[3]), _generator_part(ends[2]))
    assert not _same(_generator_part(starts[2]), _generator_part(ends[1]))
    # a reset starts over: the generator's BatchNorm running statistics are fresh again
    assert torch.equal(starts[2]["body.body.0.running_mean"], torch.zeros_like(starts[2]["body.body.0.running_mean"]))
    assert not torch.equal(ends[1]["body.body.0.running_mean"], starts[2]["body.body.0.running_mean"])


def test_resets_follow_the_authors_schedule_across_warm_up(tiny_store, tmp_path):
    method = _method(tmp_path, tiny_store, g_steps=1, g_life=3)
    resets = []
    reinitialize = method.generator.reinitialize
    method.generator.reinitialize = lambda: (resets.append(int(method.rounds)), reinitialize())
    for r in range(10):
        method.on_epoch_start(r, warmup=r < 3)
        method.synthesize()
    # datafree/synthesis/nayer.py:154: (ep - ep_start) % g_life == 0 or ep % g_life == 0, with ep_start = 3
    assert resets == [ep for ep in range(10) if (ep - 3) % 3 == 0 or ep % 3 == 0]


@pytest.mark.numeric
def test_a_round_runs_its_loops_and_each_lowers_the_loss(tiny_store, tmp_path):
    steps = 10
    method = _method(tmp_path, tiny_store, g_steps=steps, g_loops=2, gwp_loops=3)
    student = method.ctx.student.eval()
    before = _snapshot(student)
    loop_starts = []  # the generator each time a noisy layer is drawn (each loop's start)
    reset = method.generator.reset_noisy_layer
    method.generator.reset_noisy_layer = lambda: (loop_starts.append(_snapshot(method.generator)), reset())
    method.on_epoch_start(1, warmup=False)
    batch = method.synthesize()
    # the authors' second loop runs the student in train mode: its BatchNorm running statistics move
    assert not _same(before, _snapshot(student)) and student.training
    n = method.ctx.synth_batch_size
    assert batch.images.shape == (2 * n, *method.ctx.image_shape) and batch.teacher_passes == 2 * n * steps
    first, second = batch.loss_curve[:steps], batch.loss_curve[steps:]
    # Loop 1 descends from the fresh generator: about 125 above its end, 30 times what CPU kernel paths move it.
    assert_effect(sum(first[:3]) / 3, sum(first[-3:]) / 3, "loop 1 loss: first 3 steps over last 3")
    # Loop 2 takes over loop 1's generator with a new noisy layer and optimizes both further. On the tiny
    # teacher it starts near loop 1's plateau, and its own fall (from 3 to 90 over kernel paths and step
    # counts) is no verdict; what holds on every path: it moved the generator, and ends far below the
    # round's start (by about 160).
    loop_two = loop_starts[-1]  # (a round that re-initializes the generator draws a noisy layer first)
    assert not _same(_generator_part(loop_two), _generator_part(_snapshot(method.generator)))
    assert_effect(sum(first[:3]) / 3, sum(second[-3:]) / 3, "loop 2 loss: round's first 3 steps over its last 3")
    # class-balanced targets: every run of K samples holds each class once
    first = batch.labels[:n][: n // TINY_CLASSES * TINY_CLASSES].view(-1, TINY_CLASSES)
    assert all(sorted(row.tolist()) == list(range(TINY_CLASSES)) for row in first)
    method.on_epoch_start(0, warmup=True)
    method.cfg.g_steps = 1
    student.eval()
    before = _snapshot(student)
    warmup = method.synthesize()
    assert len(warmup.images) == 3 * n and "adv" not in warmup.losses  # gwp_loops, no adversarial term
    assert _same(before, _snapshot(student)) and not student.training


def _authors_pickle(path, value) -> None:
    """As label_embedding.py writes its files: the object pickled as it is."""
    with open(path, "wb") as fh:
        pickle.dump(value, fh)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_embedding_files_load_in_every_format_and_never_run_code(tmp_path):
    emb = torch.randn(TINY_CLASSES, 6)
    _authors_pickle(tmp_path / "tensor.pickle", emb.half().requires_grad_())  # the authors' files are fp16
    _authors_pickle(tmp_path / "array.pickle", emb.numpy())
    torch.save(emb, tmp_path / "saved.pt")
    np.save(tmp_path / "array.npy", emb.numpy())
    assert torch.allclose(load_label_embeddings(tmp_path / "tensor.pickle", TINY_CLASSES), emb, atol=1e-2)
    for name in ("array.pickle", "saved.pt", "array.npy"):
        assert torch.equal(load_label_embeddings(tmp_path / name, TINY_CLASSES), emb), name
    marker = tmp_path / "code-ran"
    _authors_pickle(tmp_path / "evil.pickle", [emb, _RunsCode(marker)])
    with pytest.raises(DfkdError, match="posix.mkdir|os.mkdir|nt.mkdir"):
        load_label_embeddings(tmp_path / "evil.pickle", TINY_CLASSES)
    assert not marker.exists()


@pytest.fixture(scope="module")
def embedding_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("embeddings")
    _authors_pickle(root / "ten_classes.pickle", torch.randn(10, 8))
    _authors_pickle(root / "vector.pickle", torch.randn(8))
    _authors_pickle(root / "code.pickle", _RunsCode(root / "code-ran"))
    (root / "garbage.pickle").write_bytes(b"\x80\x04not really a pickle")
    torch.save(torch.full((TINY_CLASSES, 3), float("nan")), root / "nan.pt")
    return root


@pytest.mark.parametrize("name, fragments", [
    ("missing.pickle", ["no file", "auto, text, onehot"]),
    ("ten_classes.pickle", ["10 classes", "has 4"]),
    ("vector.pickle", ["2-D float matrix", "1-D"]),
    ("code.pickle", ["no readable label embeddings", "mkdir"]),
    ("garbage.pickle", ["no readable label embeddings"]),
    ("nan.pt", ["non-finite"]),
])
def test_a_bad_embeddings_file_is_one_line_and_exit_2(name, fragments, embedding_files, tiny_store, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["run", "--method", "nayer", *TINY_CLI, "--teacher-store", str(tiny_store),
                                      "--output", str(out), "--set",
                                      f"method.label_embeddings={embedding_files / name}"])
    assert_user_error(result, *fragments)
    assert not out.exists() and not (embedding_files / "code-ran").exists()


def _recorded_source(run_dir) -> str:
    return json.loads((run_dir / CONFIG).read_text())["method_cfg"]["label_embeddings"]


def test_the_embedding_source_is_recorded_and_used(tiny_store, tmp_path):
    emb = torch.randn(TINY_CLASSES, 5)
    torch.save(emb, tmp_path / "emb.pt")
    cases = {"file": (str(tmp_path / "emb.pt"), str(tmp_path / "emb.pt"), emb),
             "onehot": ("onehot", "onehot", torch.eye(TINY_CLASSES))}
    for case, (given, recorded, used) in cases.items():
        runner = tiny_runner("nayer", tmp_path / case, tiny_store,
                             {"method.label_embeddings": given, "method.g_steps": 1, "epochs": 1})
        runner.run()
        assert _recorded_source(tmp_path / case) == recorded
        assert torch.equal(runner.method.generator.embeddings, used)
    # auto is never what a run records: it resolves to what this machine can compute
    cfg, _, _ = resolve_config("nayer", "quick", {"method.label_embeddings": "auto"})
    assert cfg.method_cfg["label_embeddings"] == ("text" if text_encoder_available() else "onehot")


@pytest.mark.numeric
@pytest.mark.skipif(not text_encoder_available(), reason="the optional text extra is not installed")
def test_text_embeddings_are_offline_keep_the_rng_and_place_similar_names_close():
    rng = torch.random.get_rng_state()
    emb = torch.nn.functional.normalize(text_embeddings(FASHION_MNIST_CLASSES), dim=1)
    assert torch.equal(rng, torch.random.get_rng_state())
    assert emb.shape == (10, 384)
    similarity = emb @ emb.T
    shirt, tshirt, sandal, sneaker, boot = (FASHION_MNIST_CLASSES.index(c) for c in
                                            ("Shirt", "T-shirt/top", "Sandal", "Sneaker", "Ankle boot"))
    assert_effect(similarity[tshirt, shirt], similarity[tshirt, sandal], "cosine: T-shirt~Shirt over ~Sandal")
    assert_effect(similarity[sneaker, boot], similarity[sneaker, shirt], "cosine: Sneaker~Ankle boot over ~Shirt")


def test_text_embeddings_need_class_names(tiny_store, tmp_path):
    # the tiny test dataset has none: the error says what to use instead
    with pytest.raises(DfkdError, match="class names.*onehot"):
        tiny_runner("nayer", tmp_path / "run", tiny_store, {"method.label_embeddings": "text"})
