"""benchmarks/fingerprint.py: what it hashes, what it leaves out, and the verdict of `compare`."""

from __future__ import annotations

import json

import torch

from benchmarks import fingerprint


def test_the_student_hash_sees_every_byte_and_every_name(tmp_path):
    state = {"w": torch.ones(2, 3), "n": torch.tensor(5), "empty": torch.zeros(0)}
    torch.save(state, tmp_path / "a.pt")
    torch.save({**state, "w": torch.ones(2, 3).index_put_((torch.tensor([1]), torch.tensor([2])),
                                                          torch.tensor(1.0 + 2**-20))}, tmp_path / "b.pt")
    torch.save({**state, "n2": state.pop("n")}, tmp_path / "c.pt")
    torch.save({"w": torch.ones(3, 2), "n": torch.tensor(5), "empty": torch.zeros(0)}, tmp_path / "d.pt")
    hashes = [fingerprint.tensors_sha256(tmp_path / f"{k}.pt") for k in "abcd"]
    assert len(set(hashes)) == 4  # one ulp, a renamed key, a reshaped tensor: each another hash
    assert fingerprint.tensors_sha256(tmp_path / "a.pt") == hashes[0]


def test_the_metrics_hash_leaves_out_the_clock_only(tmp_path):
    rows = [{"epoch": 0, "test_acc": 12.5, "synth_seconds": 1.0, "elapsed_seconds": 3.0},
            {"epoch": 1, "test_acc": 20.0, "synth_seconds": 2.0, "elapsed_seconds": 6.0}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    slower = [{**r, "synth_seconds": r["synth_seconds"] * 3, "elapsed_seconds": 99.0} for r in rows]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in slower) + "\n")
    moved = [rows[0], {**rows[1], "test_acc": 20.01}]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in moved) + "\n")
    a, b, c = (fingerprint.metrics_sha256(tmp_path / f"{k}.jsonl") for k in "abc")
    assert a == b and a[1] == 2 and a != c


def test_compare_passes_identical_runs_and_fails_a_difference_or_a_missing_run(tmp_path, capsys):
    def write(name, runs):
        (tmp_path / name).write_text(json.dumps({"commit": name, "runs": runs}))

    same = {"method": "fast", "student_sha256": "aa", "metrics_sha256": "bb", "test_acc": 10.0}
    write("one", [same, {"method": "cmi", "student_sha256": "cc", "metrics_sha256": "dd"}])
    write("two", [same, {"method": "cmi", "student_sha256": "cc", "metrics_sha256": "dd"}])
    write("three", [same, {"method": "cmi", "student_sha256": "cX", "metrics_sha256": "dd"}])
    write("four", [same, {"method": "cmi", "error": "boom"}])
    assert fingerprint.main(["compare", str(tmp_path / "one"), str(tmp_path / "two")]) == 0
    assert fingerprint.main(["compare", str(tmp_path / "one"), str(tmp_path / "three")]) == 1
    assert "cmi            DIFFERENT" in capsys.readouterr().out
    assert fingerprint.main(["compare", str(tmp_path / "one"), str(tmp_path / "four")]) == 1
    assert "MISSING (boom)" in capsys.readouterr().out
