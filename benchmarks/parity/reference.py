"""The authors' side: their synthesizer classes, imported from a checkout, run in their loop order.

Their ``datafree_kd.py`` parses ``sys.argv`` at import, so its ``main_worker`` and ``train``
cannot be imported; :func:`run_reference` follows them step by step instead, citing the lines
X
TensorBoard, checkpoints and sample grids are left out: they do not touch the math. The
evaluation is dfkd-bench's own, so both sides are scored by the same code.

Each run is its own process, because all four repositories ship a package named ``datafree``:

    python -m benchmarks.parity.reference JOB.json RESULT.json
"""

from __future__ import annotations

import hashlib
import importlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import PIL
import torch
import torch.nn.functional as F

from dfkd_bench.data import Normalizer, evaluate, get_dataset
from dfkd_bench.errors import DfkdError
from dfkd_bench.runtime import atomic_write_json, seed_everything, versions
from dfkd_bench.teachers import load_teacher
from dfkd_bench.zoo import create_model

from . import shims
from .protocols import ONLINE, REFERENCES, REPOS

DEVICE = "cpu"


def checkout_identity(checkout: Path, sources: Callable[[Path], list[Path]] | None = None) -> dict[str, Any]:
    """Which code ran: the repository, its git commit when the checkout is a git work tree, and a
    sha256 over its sources (which also identifies an unpacked archive): ``sources(checkout)``, by default
    the ``datafree`` package's ``.py`` files."""
    checkout = Path(checkout).resolve()
    repo = shims.detect_repo(checkout)
    try:
        commit = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    digest = hashlib.sha256()
    files = sources(checkout) if sources is not None else list((checkout / "datafree").rglob("*.py"))
    for path in sorted(files):
        digest.update(str(path.relative_to(checkout)).encode())
        digest.update(path.read_bytes())
    return {"repo": repo, "github": REPOS[repo], "path": str(checkout), "commit": commit,
            "sources_sha256": digest.hexdigest()}


def check_supported(method: str, repo: str, proto: dict[str, Any]) -> None:
    """Refuse a protocol the authors' code cannot express (it would silently run something else)."""
    if repo not in REFERENCES[method]:
        wanted = " or ".join(REPOS[r] for r in REFERENCES[method])
        raise DfkdError(f"method '{method}' runs from a checkout of {wanted}, not {REPOS[repo]}")
    if proto["warmup"] and method not in ("fast", "fast_meta", "nayer", "cpnet"):
        raise DfkdError(f"only Fast's and NAYER's synthesizers know a warm-up (their adversarial term waits "
                        f"for it); set warmup 0 for '{method}'")
    if proto.get("augment", True) != (method not in ONLINE):
        raise DfkdError("their pool loaders always crop + flip, and their online synthesizers' samples never are: "
                        f"augment must be {str(method not in ONLINE).lower()} for '{method}'")
    if proto["momentum"] != 0.9:
        raise DfkdError("their student SGD hard-codes momentum 0.9 (datafree_kd.py: SGD(..., momentum=0.9))")
    if proto["loss"] != {"csd": "csd", "adadfkd": "adadfkd"}.get(method, "kl"):
        raise DfkdError(f"their loop pairs '{method}' with its own loss only, not '{proto['loss']}'")
    if method == "adadfkd":
        check_adadfkd(proto)
    if method == "csd" and proto["ce"] != 1.0:
        raise DfkdError("CSD's student loss hard-codes the CE weight 1 (CSD datafree_kd.py:437)")
    if "lr_z" in proto and method in ("csd", "cmi") and proto["lr_z"] != proto["lr_g"]:
        raise DfkdError(f"{method}'s synthesizer optimizes z at lr_g (one Adam lr); lr_z must equal lr_g")


def check_adadfkd(proto: dict[str, Any]) -> None:
    """What AdaDFKD's code cannot run or our side cannot express."""
    if proto["hard"] > 0 and proto["N_neg"] % proto["synth_batch_size"]:
        raise DfkdError(f"AdaDFKD's queue asserts that the batch divides its size (_utils.py:677): N_neg "
                        f"{proto['N_neg']} is not a multiple of synth_batch_size {proto['synth_batch_size']}")
    if proto["curr_option"] not in ("curr_log", "curr_hard", "curr_soft"):
        raise DfkdError(f"curr_option must be curr_log, curr_hard or curr_soft, not '{proto['curr_option']}' (with "
                        "'none' their student loss drops s_nce, datafree_kd.py:790-801; ours has no such mode)")
    if proto["base"] not in ("kl", "l1", "l2"):
        raise DfkdError(f"AdaDFKD's --loss is kl, l1 or l2 (datafree_kd.py:552-557), not '{proto['base']}'")
    if proto["lr_min"] != 0:
        raise DfkdError("AdaDFKD's schedule anneals to 0 (CosineAnnealingLR(T_max=epochs), datafree_kd.py:612)")


def train_transform(spec) -> Callable:
    """The dataset's train transform their loaders apply to pool PNGs: as their registry.py builds it
    for CIFAR-10 (RandomCrop(size, padding=4), RandomHorizontalFlip, ToTensor, Normalize), at our size."""
    import torchvision.transforms as T

    return T.Compose([T.RandomCrop(spec.image_size, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize(spec.mean, spec.std)])


def build_synthesizer(datafree, method: str, teacher, student, spec, p: dict[str, Any], normalizer, transform,
                      pool_dir: Path):
    """Their synthesizer for ``method`` with the arguments their datafree_kd.py passes (protocol values
    where the protocol has the flag)."""
    img_size = spec.image_shape
    common = dict(num_classes=spec.num_classes, img_size=img_size, synthesis_batch_size=p["synth_batch_size"],
                  sample_batch_size=p["batch_size"], save_dir=str(pool_dir), transform=transform,
                  normalizer=normalizer, device=DEVICE)
    if method == "deepinversion":  # CMI: 248-254, Fast: 257-263, CSD: 259-265
        return datafree.synthesis.DeepInvSyntheiszer(
            teacher=teacher, student=student, iterations=p["g_steps"], lr_g=p["lr_g"],
            adv=p["adv"], bn=p["bn"], oh=p["oh"], tv=p["tv"], l2=p["l2"], **common)
    if method == "adadfkd":  # AdaDFKD datafree_kd.py:559-599
        # l.561: the depth-2 (script l.17) DCGAN generator, ngf 64, no --cond; l.373-378 call a wrn* teacher's generator
        # 'wider' with its widen factor (neither changes the network, generator.py:249-256). nc and img_size are ours.
        wide = p["teacher"].startswith("wrn")
        generator = datafree.models.generator.DCGAN_Generator_CIFAR10(
            nz=p["nz"], ngf=64, nc=spec.channels, img_size=spec.image_size, d=2, cond=False,
            type="wider" if wide else "normal", widen_factor=int(p["teacher"].split("_")[-1]) if wide else 1)
        # l.568-599, img_size an int as their l.364-371; memory False (--memory is never set); mu 0.5 (argparse
        # default, l.130), mode 'memory' and neg 0.0 (script l.33, 37): stored and never read
        return datafree.synthesis.AdaSynthesizer(
            teacher=teacher, student=student, G_list=[generator], nz=p["nz"], num_classes=spec.num_classes,
            img_size=spec.image_size, iterations=p["g_steps"], lr_g=p["lr_g"],
            synthesis_batch_size=p["synth_batch_size"], sample_batch_size=p["batch_size"], save_dir=str(pool_dir),
            transform=transform, normalizer=normalizer, device=DEVICE, lmda_ent=p["lmda_ent"], adv=p["adv"],
            oh=p["oh"], act=p["act"], adv_type=p["adv_type"], bn=p["bn"], T=p["T"], memory=False, hard=p["hard"],
            tau=p["tau"], mu=0.5, mode="memory", neg=0.0, n_neg=p["N_neg"], distributed=False, k=p["length"])
    if method in ONLINE:  # CMI: 255-264, a 64-channel LargeGenerator and the package's online synthesizer
        generator = datafree.models.generator.LargeGenerator(nz=p["nz"], ngf=64, img_size=spec.image_size,
                                                             nc=spec.channels)
        return datafree.synthesis.GenerativeSynthesizer(
            teacher=teacher, student=student, generator=generator, nz=p["nz"], img_size=img_size,
            iterations=p["g_steps"], lr_g=p["lr_g"], synthesis_batch_size=p["synth_batch_size"],
            sample_batch_size=p["batch_size"], adv=p["adv"], bn=p["bn"], oh=p["oh"],
            act=0.0,  # the DFQ script's --act 0
            balance=p["balance"], criterion=datafree.criterions.KLDiv(), normalizer=normalizer, device=DEVICE)
    if method == "nayer":  # NAYER: 282-300
        embeddings = label_embeddings(p["label_embeddings"], spec.num_classes)
        # le_size is the embeddings' width: datafree_kd.py leaves it at the default 512 of CLIP's embeddings
        generator = datafree.models.generator.NLGenerator(
            ngf=p["ngf"], img_size=spec.image_size, nc=spec.channels, nl=spec.num_classes, label_emb=embeddings,
            le_emb_size=p["le_emb_size"], le_size=embeddings.shape[1], sbz=p["synth_batch_size"])
        return datafree.synthesis.NAYER(
            teacher, student, generator, num_classes=spec.num_classes, img_size=img_size, init_dataset=None,
            save_dir=str(pool_dir), device=DEVICE, transform=transform, normalizer=normalizer,
            synthesis_batch_size=p["synth_batch_size"], sample_batch_size=p["batch_size"], g_steps=p["g_steps"],
            warmup=p["warmup"], lr_g=p["lr_g"], adv=p["adv"], bn=p["bn"], oh=p["oh"], bn_mmt=p["bn_mmt"],
            g_life=p["g_life"], g_loops=p["g_loops"], gwp_loops=p["gwp_loops"])
    if method == "cpnet":  # CPNet: 369-390, the generator planned from the teacher's nodes by their get_cfg
        embeddings = label_embeddings(p["label_embeddings"], spec.num_classes)
        cfg_list, init_size, bn_nodes = datafree.models.generator.get_cfg(teacher, img_size=img_size,
                                                                          net_name=shims.ZOO_WRN_NODES)
        generator = datafree.models.generator.CoupledGenerator(
            cfg_list, init_size=init_size, n_classes=spec.num_classes, le_emb_size=p["le_emb_size"],
            label_emb=embeddings, le_size=embeddings.shape[1], sbz=p["synth_batch_size"])
        return datafree.synthesis.CoupledSynthesizer(
            teacher, student, generator, num_classes=spec.num_classes, img_size=img_size, bn_nodes=bn_nodes,
            save_dir=str(pool_dir), device=DEVICE, transform=transform, normalizer=normalizer,
            synthesis_batch_size=p["synth_batch_size"], sample_batch_size=p["batch_size"], g_steps=p["g_steps"],
            warmup=p["warmup"], lr_g=p["lr_g"], adv=p["adv"], bn=p["bn"], oh=p["oh"], dist=0.0,
            bn_mmt=p["bn_mmt"], dataset=spec.name, g_life=p["g_life"], g_loops=p["g_loops"],
            gwp_loops=p["gwp_loops"])
    # CSD: 294, Fast: 293/306, CMI: 268
    generator = datafree.models.generator.Generator(nz=p["nz"], ngf=p["ngf"], img_size=spec.image_size,
                                                    nc=spec.channels)
    if method == "cmi":  # CMI: 273-281 (Fast: 282-290 adds feature_reuse=False, its default)
        return datafree.synthesis.CMISynthesizer(
            teacher, student, generator, nz=p["nz"], feature_layers=None, bank_size=p["bank_size"],
            n_neg=p["n_neg"], head_dim=p["head_dim"], init_dataset=None, iterations=p["g_steps"],
            lr_g=p["lr_g"], progressive_scale=False, adv=p["adv"], bn=p["bn"], oh=p["oh"], cr=p["cr"],
            cr_T=p["cr_T"], **common)
    if method in ("fast", "fast_meta"):  # Fast: 295-303 and 308-316
        cls = datafree.synthesis.FastSynthesizer if method == "fast" else datafree.synthesis.FastMetaSynthesizer
        return cls(teacher, student, generator, nz=p["nz"], init_dataset=None, iterations=p["g_steps"],
                   warmup=p["warmup"], lr_g=p["lr_g"], lr_z=p["lr_z"], adv=p["adv"], bn=p["bn"], oh=p["oh"],
                   reset_l0=0, reset_bn=0, bn_mmt=p["bn_mmt"], is_maml=p.get("is_maml", 1), **common)
    if method == "csd":  # CSD: 302-306
        return datafree.synthesis.CSDSynthesizer(
            teacher=teacher, student=student, generator=generator, nz=p["nz"], init_dataset=None,
            iterations=p["g_steps"], lr_g=p["lr_g"], lr=p["lr"], epochs=p["rounds"], adv=p["adv"], csd=p["csd"],
            bn=p["bn"], oh=p["oh"], dataset=spec.name, **common)
    raise DfkdError(f"the reference runner does not know method '{method}'")


def label_embeddings(source: str, num_classes: int) -> torch.Tensor:
    """The matrix NAYER's generator embeds the targets with: one-hot (our fallback, the identity) or a
    file read by dfkd-bench's loader (their datafree_kd.py unpickles ``label_embedding/<dataset>_le.pickle``),
    so both sides start from the same tensor."""
    if source == "onehot":
        return torch.eye(num_classes)
    from dfkd_bench.methods.nayer import load_label_embeddings

    return load_label_embeddings(source, num_classes)


def make_scheduler(optimizer: torch.optim.Optimizer, p: dict[str, Any]):
    """Their cosine schedule, from the protocol. CSD: 320 and CMI: 290 anneal over --epochs to 0.
    Fast: 324 hard-codes T_max=200 and eta_min=2e-4; 200 is --epochs minus --warmup in all its
    scripts (220 - 20), so T_max is rounds minus warm-up (the protocol's lr_min holds the 2e-4).
    NAYER: 338 anneals over epochs minus warm-up to --eta_min (2e-4)."""
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, p["rounds"] - p["warmup"]),
                                                      eta_min=p["lr_min"])


def train(synthesizer, student, teacher, criterion, optimizer, kd_steps: int, alignhead=None, fea: float = 0.0):
    """Their ``train()``: CSD: 415-452, Fast: 408-437, CMI: 369-393 (metrics and printing left out)."""
    student.train()
    teacher.eval()
    for _ in range(kd_steps):
        if alignhead is not None:  # CSD: 424-427, the pool's labels come with the images
            images, targets = synthesizer.sample()
        else:
            images = synthesizer.sample()
        with torch.no_grad():
            t_out, t_feat = teacher(images, return_features=True)
        if alignhead is not None:  # CSD: 435-437, feature maps f3 through the align head
            s_out, s_feat = student(images.detach(), return_features=True)
            loss_s = (criterion(s_out, t_out.detach()) + F.cross_entropy(s_out, targets)
                      + fea * F.mse_loss(alignhead(s_feat[-2]), t_feat[-2]))
        else:
            s_out = student(images.detach())
            loss_s = criterion(s_out, t_out.detach())
        optimizer.zero_grad()
        loss_s.backward()
        optimizer.step()
        if alignhead is not None:  # CSD: 451-452, one step of the auxiliary head after every student step
            synthesizer.train_head()


class AdaDFKDEpoch:
    """What AdaDFKD's datafree_kd.py adds to the online loop, with their own functions imported from the checkout
    (``difficulty_mining``, ``get_alpha_adv``, ``curr_v``, ``lambda_scheduler``): the window start passed to every
    ``synthesize`` (l.671-674), their ``train()`` for adadfkd (l.739-816) with its self-paced student loss and the
    step counter ``global_iter`` over the whole run (l.654), and the adversarial weight set after each epoch
    (l.681-682)."""

    def __init__(self, datafree, p: dict[str, Any], applied: list[str]):
        data_utils = importlib.import_module("datafree.datasets.utils")  # datafree/__init__.py does not import it
        self.curr_v, self.lambda_scheduler = data_utils.curr_v, data_utils.lambda_scheduler
        self.difficulty_mining, self.get_alpha_adv = datafree.utils.difficulty_mining, datafree.utils.get_alpha_adv
        self.p = p
        if p["base"] == "l1":  # l.552-557: batch means (the per-sample versions at 545-550 are commented out)
            self.criterion = torch.nn.L1Loss()
        elif p["base"] == "l2":
            self.criterion = torch.nn.MSELoss()
        else:
            self.criterion = datafree.criterions.KLDiv(T=p["T"])
        # the args get_alpha_adv reads (_utils.py:588-604)
        self.args = SimpleNamespace(epochs=p["rounds"], begin_fraction=p["begin_fraction"],
                                    end_fraction=p["end_fraction"], grad_adv=p["grad_adv"],
                                    curr_option=p["curr_option"])
        self.global_iter = 0  # l.654
        # l.672 divides by int(epochs * (end - begin)): 0 for a run too short to span an epoch (a smoke run of 1 or 2
        # epochs at the script's fractions), where theirs raises ZeroDivisionError. 1 then, as our side's hard_factor.
        self.span = int(p["rounds"] * (p["end_fraction"] - p["begin_fraction"]))
        if self.span == 0:
            self.span = 1
            applied.append("hard-factor-span-1")

    def synthesize(self, synthesizer, epoch: int) -> None:
        """l.671-674: the window start this epoch (their formula, inline in datafree_kd.py) and one synthesis call."""
        p = self.p
        begin = int(p["begin_fraction"] * p["rounds"])
        warmup = epoch < begin  # passed and never read (adadfkd.py:111)
        hard_factor = min(max(0, (1 - p["length"]) * (epoch - begin) / self.span), 1 - p["length"])
        synthesizer.synthesize(hard_factor=hard_factor, warmup=warmup)

    def train(self, synthesizer, student, teacher, optimizer, kd_steps: int) -> None:
        """Their ``train()`` for adadfkd (l.739-816; metrics, fidelity and printing left out)."""
        p = self.p
        student.train()  # l.744
        teacher.eval()
        for _ in range(kd_steps):
            images = synthesizer.sample(0)  # l.756-757: new latents through the generator in eval mode
            # l.764-769: lambda after global_iter student steps; alpha is the protocol's (1e-4: their cifar10 value)
            lamda = self.lambda_scheduler(p["lambda_0"], self.global_iter, alpha=p["alpha"])
            images = synthesizer.normalizer(images.detach())  # l.771-772 (no history: never augmented)
            with torch.no_grad():  # l.779-780
                t_out, t_feat = teacher(images, return_features=True)
            s_out, s_feat = student(images.detach(), return_features=True)  # l.782
            loss_s = self.criterion(s_out, t_out.detach())  # l.784
            if p["s_nce"] > 0:  # l.787-788
                _, loss_infonce = self.difficulty_mining(t_feat=t_feat, s_feat=s_feat, tau=p["tau"], device=DEVICE)
            real_loss_s = loss_s  # l.791-801 (curr_option is never 'none' here: check_supported)
            if p["s_nce"] > 0:
                real_loss_s += loss_infonce * p["s_nce"]  # in place, as l.795
            with torch.no_grad():
                _, v = self.curr_v(l=real_loss_s, lamda=lamda, spl_type=p["curr_option"].split("_")[1])
            loss_s = (v * real_loss_s).mean()
            optimizer.zero_grad()  # l.805-813
            loss_s.backward()
            optimizer.step()
            self.global_iter += 1  # l.816

    def end_epoch(self, synthesizer, epoch: int) -> None:
        """l.681-682, after the epoch's rounds and before the evaluation."""
        synthesizer.adv = self.get_alpha_adv(epoch, self.args, self.p["adv"], type="linear")


def round_record(round_: int, rounds: int, acc: float, lr: float, wall: dict[str, float], cpu: dict[str, float],
                 eval_seconds: float, echo: Callable[[str], None]) -> dict[str, Any]:
    """One round of a reference run as the result records it (and echoes it): accuracy, the lr it trained at, and
    the wall and CPU seconds (what a busy machine does not inflate) of synthesis and distillation."""
    echo(f"round {round_}/{rounds}: acc {acc:.2f}%, synthesis {wall['synth']:.1f}s, "
         f"distillation {wall['distill']:.1f}s")
    return {"round": round_, "acc": round(acc, 4), "lr": lr,
            "synth_seconds": round(wall["synth"], 3), "distill_seconds": round(wall["distill"], 3),
            "eval_seconds": round(eval_seconds, 3),
            "synth_cpu_seconds": round(cpu["synth"], 3), "distill_cpu_seconds": round(cpu["distill"], 3)}


def result_record(identity: dict[str, Any], applied: list[str], rounds: list[dict[str, Any]],
                  teacher_meta: dict[str, Any], started: float, **more_versions: str) -> dict[str, Any]:
    """A finished reference run's record: the checkout, the shims that applied, every round, the teacher."""
    return {
        "status": "complete", "reference": identity, "shims": applied, "rounds": rounds,
        "teacher": {k: teacher_meta.get(k) for k in ("arch", "path", "sha256", "test_accuracy")},
        "torch_threads": torch.get_num_threads(), "wall_seconds": round(time.time() - started, 2),
        "versions": {**versions(), "pillow": PIL.__version__, **more_versions},
    }


def run_reference(job: dict[str, Any], echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run ``job`` (method, protocol, seed, checkout, work_dir, teacher_store) and return its result record."""
    if job["method"] == "spaceshipnet":  # its own trainer, options and networks, not a datafree package
        from .spaceship import run_spaceship_reference

        return run_spaceship_reference(job, echo)
    method, p, seed = job["method"], job["protocol"], int(job["seed"])
    checkout = Path(job["checkout"]).resolve()
    identity = checkout_identity(checkout)
    repo = identity["repo"]
    check_supported(method, repo, p)
    pool_dir = Path(job["work_dir"]).resolve() / "pool"
    shutil.rmtree(pool_dir, ignore_errors=True)  # their ImagePool appends to whatever the folder holds
    started = time.time()
    with shims.installed(checkout) as applied:
        datafree = importlib.import_module("datafree")
        importlib.import_module("datafree.models.generator")
        spec = get_dataset(p["dataset"])
        # Their main(): random.seed + torch.manual_seed (CSD: 131-133). Teacher before student, as
        # dfkd-bench's Runner builds them, so a seed gives the same initial student on both sides.
        seed_everything(seed)
        teacher, teacher_meta = load_teacher(spec, p["teacher"], Path(job["teacher_store"]))
        student = create_model(p["student"], spec.num_classes, spec.channels, spec.image_size)
        teacher.requires_grad_(True)  # their teacher is never frozen (CSD: 245), only kept in eval mode
        pooled = repo != "CSD"  # what their WideResNet returns as features (see ClassifierInterface)
        teacher = shims.ClassifierInterface(teacher, pooled).to(DEVICE).eval()
        student = shims.ClassifierInterface(student, pooled).to(DEVICE)
        normalizer = datafree.utils.Normalizer(mean=spec.mean, std=spec.std)  # CSD: 246
        criterion = datafree.criterions.KLDiv(T=p["T"])  # CSD: 250
        alignhead = None
        if method == "csd":  # CSD: 296-301, the align head maps the student's f3 onto the teacher's
            data = torch.randn(2, *spec.image_shape, device=DEVICE)
            teacher.eval()
            student.eval()
            _, fea_t = teacher(data, return_features=True)
            _, fea_s = student(data, return_features=True)
            alignhead = datafree.utils.AlignHead(fea_s[-2].shape, fea_t[-2].shape).to(DEVICE)
        synthesizer = build_synthesizer(datafree, method, teacher, student, spec, p, normalizer,
                                        train_transform(spec), pool_dir)
        if alignhead is not None:  # CSD: 314-317
            params = [{"params": student.parameters()}, {"params": alignhead.parameters()}]
        else:
            params = student.parameters()
        optimizer = torch.optim.SGD(params, p["lr"], weight_decay=p["weight_decay"], momentum=0.9)
        scheduler = make_scheduler(optimizer, p)
        ada = AdaDFKDEpoch(datafree, p, applied) if method == "adadfkd" else None
        test_x, test_y = spec.load("test")
        eval_norm = Normalizer(spec.mean, spec.std)
        rounds = []
        # CMI: 337 runs ep_steps // kd_steps (synthesize, train) cycles per epoch: one for the pool methods'
        # protocols (ep_steps == kd_steps), several for the online ones; the student is evaluated per epoch
        cycles = p.get("ep_steps", p["kd_steps"]) // p["kd_steps"]
        for epoch in range(p["rounds"]):  # CSD: 362, Fast: 366, CMI: 332
            lr = optimizer.param_groups[0]["lr"]
            distill = epoch >= p["warmup"]  # Fast: 373, NAYER: 394 (CSD and CMI have no warm-up)
            wall, cpu = {"synth": 0.0, "distill": 0.0}, {"synth": 0.0, "distill": 0.0}
            for _ in range(cycles):
                t0, c0 = time.time(), time.process_time()
                if ada is not None:  # AdaDFKD: 671-674, the window's start passed to every call
                    ada.synthesize(synthesizer, epoch)
                else:
                    synthesizer.synthesize()  # CSD: 369, Fast: 371 (returns (images, cost)), CMI: 339, NAYER: 382
                if method == "csd":
                    synthesizer.reset_head()  # CSD: 370-371, before the student steps
                t1, c1 = time.time(), time.process_time()
                if distill and ada is not None:  # AdaDFKD: 677, its own train() and student loss
                    ada.train(synthesizer, student, teacher, optimizer, p["kd_steps"])
                elif distill:
                    train(synthesizer, student, teacher, criterion, optimizer, p["kd_steps"], alignhead,
                          p.get("fea", 0.0))
                t2, c2 = time.time(), time.process_time()
                wall["synth"] += t1 - t0
                wall["distill"] += t2 - t1
                cpu["synth"] += c1 - c0
                cpu["distill"] += c2 - c1
            if ada is not None:
                ada.end_epoch(synthesizer, epoch)  # AdaDFKD: 681-682, the next epoch's adversarial weight
            t2 = time.time()
            acc = evaluate(student, test_x, test_y, eval_norm, torch.device(DEVICE))  # CSD: 381-389
            t3 = time.time()
            if distill:  # CSD: 393 and CMI: 351 step every epoch; Fast: 399-400, NAYER: 433-434 after the warm-up
                scheduler.step()
            rounds.append(round_record(epoch + 1, p["rounds"], acc, lr, wall, cpu, t3 - t2, echo))
    shutil.rmtree(pool_dir, ignore_errors=True)
    return result_record(identity, applied, rounds, teacher_meta, started)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m benchmarks.parity.reference JOB.json RESULT.json", file=sys.stderr)
        return 2
    job = json.loads(Path(argv[0]).read_text())
    try:
        result = run_reference(job, echo=lambda line: print(line, flush=True))
    except DfkdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    atomic_write_json(Path(argv[1]), result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
