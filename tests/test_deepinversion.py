"""DeepInversion as the datafree package has it: the last iterate by default, the best batch as an option,
the image priors on the un-jittered batch."""

from __future__ import annotations

import torch
from helpers import tiny_runner

from dfkd_bench.losses import total_variation
from dfkd_bench.methods.deepinversion import DeepInversion


def _synthesize(method):
    method.ctx.student.eval().requires_grad_(False)
    try:
        return method.synthesize()
    finally:
        method.ctx.student.train().requires_grad_(True)


def test_defaults_follow_the_package():
    cfg = DeepInversion.Config()
    assert (cfg.g_steps, cfg.lr_g, cfg.beta1, cfg.beta2) == (1000, 0.1, 0.5, 0.99)
    assert (cfg.bn, cfg.oh, cfg.adv, cfg.adv_T, cfg.tv, cfg.l2, cfg.adv_mode) == (10.0, 1.0, 1.0, 3.0, 1e-3, 0.0, "js")
    assert cfg.keep_best is False


def test_returns_the_last_iterate_unless_asked_for_the_best(tiny_store, tmp_path):
    for keep_best in (False, True):
        runner = tiny_runner("deepinversion", tmp_path / str(keep_best), tiny_store,
                             {"method.g_steps": 12, "method.keep_best": str(keep_best)})
        method = runner.method
        before, after = [], []  # the optimized batch around every update
        step = torch.optim.Adam.step

        def spy(self, *args, **kwargs):
            before.append(self.param_groups[0]["params"][0].detach().clone())
            out = step(self, *args, **kwargs)
            after.append(self.param_groups[0]["params"][0].detach().clone())
            return out

        torch.optim.Adam.step = spy
        try:
            batch = _synthesize(method)
        finally:
            torch.optim.Adam.step = step
        curve = batch.loss_curve
        if keep_best:  # the batch whose loss was lowest, as it was when that loss was measured
            expected = before[min(range(len(curve)), key=curve.__getitem__)]
        else:  # the package's "best" aliases the optimized tensor: the final, clipped iterate
            expected = torch.maximum(torch.minimum(after[-1], method.hi), method.lo)
        assert torch.allclose(batch.images, runner.normalizer.inverse(expected).clamp(0, 1), atol=1e-6)


def test_total_variation_is_taken_on_the_unjittered_batch(tiny_store, tmp_path):
    method = tiny_runner("deepinversion", tmp_path / "run", tiny_store, {"method.g_steps": 1}).method
    x = torch.rand(2, 3, 16, 16)
    view = torch.roll(x, shifts=(3, 5), dims=(2, 3))
    y = torch.zeros(2, dtype=torch.long)
    with method.bn_stats.recording():  # the hooks are on during synthesis only
        terms = method._loss_terms(x, view, y)
    assert torch.allclose(terms["tv"], method.cfg.tv * total_variation(x))
    assert not torch.allclose(total_variation(x), total_variation(view))  # the roll's seam changes TV
