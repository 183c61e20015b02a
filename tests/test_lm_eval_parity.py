"""benchmarks/lm_eval_parity.py's own parts, without lm-evaluation-harness: the tasks it writes
(local JSON and lm-eval's YAML) and its request-by-request comparison of two runs' samples, in the
forms lm-eval writes them (strings for numbers and flags). The requests lm-eval sends and its
parse of the answers are in tests/test_serve.py (test_lm_eval_loglikelihood_requests_...)."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from bitnet.bench import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
parity = load_script(os.path.join(ROOT, "benchmarks", "lm_eval_parity.py"), "lm_eval_parity")

CORPUS = "\n".join(f"line {i} of the corpus, with a few more words {i * 7}" for i in range(400))
CORPUS += "\n\n" + "\n\n".join(("paragraph %d " % i) * 30 for i in range(10))


def test_tasks_are_local_json_and_lm_eval_yaml(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(CORPUS)
    counts = parity.write_tasks(str(path), 0.5, 20, 5, 7, str(tmp_path))
    assert counts == {"mc": 20, "ppl": 5, "gen": 7}
    held = CORPUS[int(len(CORPUS) * 0.5):]
    mc = [json.loads(line) for line in (tmp_path / "mc.jsonl").read_text().splitlines()]
    for item in mc:
        assert len(item["choices"]) == 4 and 0 <= item["label"] < 4
        whole = item["context"] + item["choices"][item["label"]]
        assert whole in [line.strip() for line in held.split("\n")], whole  # the true rest of a held-out line
        assert len(set(item["choices"])) == 4
    assert sorted(item["label"] for item in mc) != [0] * 20  # the answer is not always first
    gen = [json.loads(line) for line in (tmp_path / "gen.jsonl").read_text().splitlines()]
    assert gen == [{"context": m["context"], "target": m["choices"][m["label"]]} for m in mc[:7]]
    ppl = [json.loads(line)["text"] for line in (tmp_path / "ppl.jsonl").read_text().splitlines()]
    assert all(p in held and len(p) > 200 for p in ppl)
    for name, kind in (("mc", "multiple_choice"), ("ppl", "loglikelihood_rolling"), ("gen", "generate_until")):
        spec = yaml.safe_load((tmp_path / f"parity_{name}.yaml").read_text())
        assert spec["task"] == f"parity_{name}" and spec["output_type"] == kind
        assert spec["dataset_kwargs"]["data_files"]["test"] == str(tmp_path / f"{name}.jsonl")
    assert yaml.safe_load((tmp_path / "parity_mc.yaml").read_text())["doc_to_choice"] == "{{choices}}"
    with pytest.raises(SystemExit, match="--mc 500 needs 503"):
        parity.write_tasks(str(path), 0.5, 500, 5, 7, str(tmp_path))


def test_compare_counts_request_by_request():
    def mc(*pairs):
        return {"resps": [[[str(ll), str(g)]] for ll, g in pairs]}

    a = {"parity_mc": {0: mc((-1.0, True), (-2.0, False)), 1: mc((-3.0, False), (-4.0, False))},
         "parity_ppl": {0: {"resps": [["-100.0"]]}, 1: {"resps": [["-200.0"]]}},
         "parity_gen": {0: {"resps": [["abc"]]}, 1: {"resps": [["de"]]}}}
    b = {"parity_mc": {0: mc((-1.0, True), (-2.5, False)), 1: mc((-3.0, True), (-4.00001, False))},
         "parity_ppl": {0: {"resps": [["-100.2"]]}, 1: {"resps": [["-200.0"]]}},
         "parity_gen": {0: {"resps": [["abc"]]}, 1: {"resps": [["df"]]}}}
    got = parity.compare(a, b)
    assert got["parity_mc"]["requests"] == 4 and got["parity_mc"]["greedy_flags_equal"] == 3
    assert got["parity_mc"]["max_abs_diff"] == pytest.approx(0.5) and got["parity_mc"]["within_1e_4"] == 3
    assert got["parity_mc"]["max_rel_diff"] == pytest.approx(0.25)
    assert got["parity_ppl"]["max_abs_diff"] == pytest.approx(0.2) and got["parity_ppl"]["within_1e_4"] == 1
    assert got["parity_ppl"]["max_rel_diff"] == pytest.approx(0.002)
    assert got["parity_gen"] == {"requests": 2, "same_text": 1}
