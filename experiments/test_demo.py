"""The offline demo (--task demo): its synthetic world, a reduced run, and verdicts that follow the numbers."""
import importlib.util
import json
import math
import os
import sys

import pytest

import reproduce
import tartan
from experiments import demo as demo_module
from experiments.common import compare, mean_std, min_seeds



from experiments.demo import (DemoSettings, build_demo, demo_claims, demo_harmful_tie, demo_helpful_tie,
                       demo_meta_weights, demo_prepare, demo_summarize,
                       quick_settings)

# ----------------------------------------------------------------------------------------------------------------------
# The synthetic world: cheap checks that it is built as the docstring says (no training).


@pytest.fixture(scope="module")
def prepared():
    return demo_prepare(DemoSettings())


def _concept_words(text):
    return [w for w in text.split() if w.startswith("c")]


def test_train_shows_only_seen_synonyms_dev_and_test_all(prepared):
    s, data = DemoSettings(), prepared["data"]
    synonym = lambda text: int(_concept_words(text)[0].split("w")[1])  # noqa: E731
    assert {synonym(t) for t in data["train"][0]} == set(range(s.n_seen))
    assert {synonym(t) for t in data["dev"][0]} == set(range(s.n_synonyms))
    assert {synonym(t) for t in data["test_unseen"][0]} == set(range(s.n_seen, s.n_synonyms))
    assert len(data["test"][0]) == len(data["test_seen"][0]) + len(data["test_unseen"][0])
    for text, label in zip(*data["train"]):  # one concept word per sentence, and it names the label; no cue
        (word,) = _concept_words(text)
        assert word.startswith(f"c{label}w") and not any(w.startswith("k") for w in text.split())


def test_corpora_tie_words_to_the_intended_cues(prepared):
    s, data = DemoSettings(), prepared["data"]
    for name, tie in (("helpful", demo_helpful_tie), ("harmful", demo_harmful_tie)):
        for text in data[name]:
            (word,) = _concept_words(text)
            k, j = map(int, word[1:].split("w"))
            cues = [w for w in text.split() if w.startswith("k")]
            assert len(cues) == s.cues_per_sentence and all(c.startswith(f"k{tie(k, j, s)}q") for c in cues)
    # the harmful tie never groups an unseen synonym with a seen synonym of its own concept, and it groups seen
    # synonyms of different concepts together
    for k in range(s.n_concepts):
        own_seen = {demo_harmful_tie(k, j, s) for j in range(s.n_seen)}
        assert all(demo_harmful_tie(k, j, s) not in own_seen for j in range(s.n_seen, s.n_synonyms))
    groups = {}
    for k in range(s.n_concepts):
        for j in range(s.n_seen):
            groups.setdefault(demo_harmful_tie(k, j, s), set()).add(k)
    assert all(len(concepts) > 1 for concepts in groups.values())


def test_tokenizer_knows_every_word(prepared):
    tok, ids = prepared["tokenizer"], prepared["ids"]
    for split in ("train", "dev", "test", "helpful", "harmful"):
        assert all(tok.unk_token_id not in row for row in ids[split].ids)
    assert len(ids["mixed"]) == len(ids["helpful"]) + len(ids["harmful"])


def test_build_demo_is_seeded_and_runs(prepared):
    a, b, c = (build_demo(seed, DemoSettings(), prepared) for seed in (0, 0, 1))
    pa, pb, pc = (dict(x["body"].named_parameters()) for x in (a, b, c))
    assert all((pa[n] == pb[n]).all() for n in pa)
    assert any((pa[n] != pc[n]).any() for n in pa)
    inputs, labels = a["end"].train.batch([0, 1, 2])
    logits, loss = a["end"].head(a["body"](**inputs), labels)
    assert logits.shape == (3, DemoSettings().n_concepts) and math.isfinite(loss.item())
    # separate MLM heads per corpus, sharing the body's (tied) input embedding
    emb = a["body"].encoder.get_input_embeddings().weight
    heads = [t.head for t in a["aux"].values()]
    assert len({id(h) for h in heads}) == 3
    assert all(any(p is emb for p in h.parameters()) for h in heads)


# ----------------------------------------------------------------------------------------------------------------------
# The reduced demo, run once for the module: the claims' plumbing and the META-TARTAN weights.


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    result = demo_module.run_demo([0], str(out), quick=True, progress=False)
    return result, out


def test_reduced_demo_meta_downweights_harmful_corpus(demo):
    """Sec. 3.2/5.3 on the demo. Robustness checked before relying on it: with the quick settings, seeds 0-9 all
    ended with harmful < helpful (helpful/harmful ratio 1.08 to 2.93); the full settings, seeds 0-2, likewise."""
    result, _ = demo
    final = result["meta_final_alpha"]["per_seed"]["0"]
    assert set(final) == {"end-task", "helpful", "harmful"}
    assert abs(sum(final.values()) - 1) < 1e-5
    assert final["harmful"] < final["helpful"]
    assert result["claims"]["claim2_meta_downweights_harmful"]["harmful_below_helpful_per_seed"] == [True]


def test_reduced_demo_world_behaves(demo):
    """Fine-tuning alone learns the seen synonyms but cannot know the unseen ones (the premise of claim 1)."""
    result, _ = demo
    ft = result["methods"]["finetune"]
    assert ft["test_seen"][0] > 0.9
    assert ft["test_unseen"][0] < 0.5


def test_reduced_demo_json(demo):
    result, out = demo
    path = out / "demo_quick_summary.json"  # --quick never replaces the full demo's files
    assert not (out / "demo_summary.json").exists() and not (out / "demo_weights.png").exists()
    on_disk = json.loads(path.read_text())
    assert on_disk["seeds"] == [0] and on_disk["quick"] is True
    for m in ("finetune", "pretrain", "mt", "meta"):
        entry = on_disk["methods"][m]
        assert entry["seeds"] == [0] and len(entry["test"]) == 1 and 0 <= entry["test"][0] <= 1
        assert entry["mean"] == pytest.approx(entry["test"][0])
    assert on_disk["meta_final_alpha"] == result["meta_final_alpha"]
    traj = on_disk["meta_alpha_trajectories"]["0"]
    assert traj[0]["step"] == 0 and traj[0]["harmful"] == pytest.approx(1 / 3)
    assert traj[-1]["step"] == quick_settings().steps
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]  # atomic write left nothing behind


def test_reduced_demo_figure_when_matplotlib(demo):
    result, out = demo
    if importlib.util.find_spec("matplotlib") is None:
        assert result["figure"] is None and not (out / "demo_quick_weights.png").exists()
    else:
        assert (out / "demo_quick_weights.png").read_bytes()[:4] == b"\x89PNG"


def test_reduced_demo_prints_table(demo, capsys):
    # the table was printed when the fixture ran; check its rows through a second, cheap rendering instead
    result, _ = demo
    from experiments.demo import demo_report
    weights = {"seeds": [0], "by_task": {n: [v] for n, v in result["meta_final_alpha"]["per_seed"]["0"].items()},
               "mean": result["meta_final_alpha"]["mean"]}
    summary = {m: result["methods"][m] for m in ("finetune", "pretrain", "mt", "meta")}
    text = demo_report(summary, weights, result["claims"], [0], 1.0)
    for row in ("fine-tune only", "pretrain->finetune", "MT-TARTAN", "META-TARTAN", "p vs pretrain", "ddof=1"):
        assert row in text
    assert "cannot be reached" in text  # one seed: no p-value can be below 0.05


# ----------------------------------------------------------------------------------------------------------------------
# The verdicts follow the numbers (nothing is hard-coded): synthetic records in, claims out.


def _records(scores: dict, weights: list[tuple[float, float, float]]):
    recs = []
    for m, per_seed in scores.items():
        for seed, x in enumerate(per_seed):
            r = {"method": m, "seed": seed, "test": x, "test_unseen": x / 2, "test_seen": 1.0, "dev": x}
            if m == "meta":
                e, h, b = weights[seed]
                r["final_alpha"] = {"end-task": e, "helpful": h, "harmful": b}
                r["best_alpha"] = None
                r["trajectory"] = [{"step": 0, "end-task": 1 / 3, "helpful": 1 / 3, "harmful": 1 / 3},
                                   {"step": 10, **r["final_alpha"]}]
            recs.append(r)
    return recs


def _claims(scores, weights):
    recs = _records(scores, weights)
    summary = demo_summarize(recs)
    return demo_claims(summary, demo_meta_weights(recs))


def test_claims_follow_the_numbers():
    good = {"finetune": [.5, .5, .5, .5], "pretrain": [.6, .61, .62, .6], "mt": [.7, .71, .72, .7],
            "meta": [.8, .81, .82, .8]}
    c = _claims(good, [(.2, .6, .2)] * 4)
    assert c["claim1_end_task_aware_beats_pretraining"]["meta"]["verdict"].startswith("shown")
    assert c["claim2_meta_downweights_harmful"]["verdict"] == "shown in all 4 seeds"
    assert c["aux_carries_information"]["shown"]

    bad = {"finetune": [.9, .9, .9, .9], "pretrain": [.8, .81, .82, .8], "mt": [.7, .71, .72, .7],
           "meta": [.6, .61, .62, .6]}
    c = _claims(bad, [(.2, .2, .6)] * 3 + [(.2, .6, .2)])
    assert c["claim1_end_task_aware_beats_pretraining"]["mt"]["verdict"].startswith("NOT shown")
    assert c["claim1_end_task_aware_beats_pretraining"]["meta"]["verdict"].startswith("NOT shown")
    assert c["claim1_end_task_aware_beats_pretraining"]["meta"]["p_one_sided"] > 0.9  # worse: p near 1, not near 0
    assert c["claim1_end_task_aware_beats_pretraining"]["meta"]["p_two_sided"] < 0.05
    assert c["claim2_meta_downweights_harmful"]["verdict"].startswith("NOT shown")
    assert c["claim2_meta_downweights_harmful"]["meta_vs_mt"]["verdict"].startswith("NOT shown")
    assert not c["aux_carries_information"]["shown"]

    three = {m: v[:3] for m, v in good.items()}
    c = _claims(three, [(.2, .6, .2)] * 3)
    assert "out of reach" in c["claim1_end_task_aware_beats_pretraining"]["meta"]["verdict"]


def test_mean_std_uses_sample_std():
    assert mean_std([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))
    assert mean_std([1.0, 2.0, 3.0], ddof=0)[1] == pytest.approx(math.sqrt(2 / 3))


def test_min_seeds_matches_permutation_test():
    n = min_seeds()
    assert tartan.permutation_test(range(n, 2 * n), range(n))["p_greater"] < 0.05  # the best split, one-sided
    assert tartan.permutation_test(range(n - 1, 2 * n - 2), range(n - 1))["p_greater"] >= 0.05
    assert compare(range(n - 1), range(n - 1))["min_p_greater"] >= 0.05


def test_the_default_demo_has_seeds_enough_for_p_below_005(monkeypatch, tmp_path):
    called = []
    monkeypatch.setattr(reproduce, "run_demo", lambda seeds, *a, **k: called.append(list(seeds)))
    assert reproduce.main(["--task", "demo", "--no-progress", "--out", str(tmp_path)]) == 0
    assert called == [list(demo_module.DEMO_SEEDS)] == [[0, 1, 2, 3]]
    assert compare(demo_module.DEMO_SEEDS, demo_module.DEMO_SEEDS)["min_p_greater"] < 0.05
    assert demo_module.run_demo.__defaults__[0] == demo_module.DEMO_SEEDS


def test_no_matplotlib_no_figure(tmp_path, monkeypatch, capsys):
    from experiments.demo import demo_plot_weights
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import fail as if not installed
    recs = [{"method": "meta", "seed": 0, "final_alpha": {"helpful": .5, "harmful": .5},
             "trajectory": [{"step": 0, "helpful": .5, "harmful": .5}]}]
    assert demo_plot_weights(recs, str(tmp_path / "w.png")) is None
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert not (tmp_path / "w.png").exists()
