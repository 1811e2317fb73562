"""TCAV: statistics by hand, the mini-batch CAV classifier against sklearn and Captum, Captum's sign count,
the activation store and the CAV cache keys, the runner's outputs."""

from __future__ import annotations

import csv
import math
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from captum.concept import TCAV, Concept, DefaultClassifier
from sklearn.linear_model import SGDClassifier
from torch.utils.data import DataLoader, TensorDataset

from conftest import make_tiny_cnn
from convlens.core.hooks import forward_with_grads
from convlens.tcav.cav import ActivationStore, CAVCache, MiniBatchSGDClassifier, model_digest
from convlens.tcav.concept_sets import ConceptSet, RandomSets, tensor_digest
from convlens.tcav.runner import (
    TCAVReport,
    TCAVRunner,
    detectable_effect,
    layer_sensitivities,
    tcav_magnitude,
    tcav_score,
)
from convlens.tcav.solver import LinearSVM
from convlens.tcav.stats import compare_to_null, holm, pseudo_concept_means

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LAYERS = ["block2", "block3"]


def _images(seed: int, n: int, shift: float = 0.0) -> torch.Tensor:
    x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    x[:, 0] += shift  # a "concept": more red
    return x


# --- statistics, computed by hand ------------------------------------------------------------------------


def test_holm_by_hand() -> None:
    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> running max 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # 0.5 * 2 = 1, then max(1, 0.6)
    assert holm([0.02, float("nan")]) == pytest.approx([0.04, 1.0])  # NaN counts as 1
    assert holm([0.01]) == pytest.approx([0.01])


def test_crawford_howell_t_test_by_hand() -> None:
    null = [0.0, 1.0, 2.0, 3.0, 4.0]  # mean 2, SD sqrt(2.5), N = 5
    result = compare_to_null(6.0, null)
    t = 4.0 / (math.sqrt(2.5) * math.sqrt(1 + 1 / 5))
    # Student t CDF for 4 degrees of freedom in closed form
    cdf = 0.5 + 3 / 8 * (t / math.sqrt(1 + t * t / 4)) * (1 - t * t / (12 * (1 + t * t / 4)))
    assert result.t == pytest.approx(t)
    assert result.p == pytest.approx(2 * (1 - cdf))
    assert result.mean_difference == pytest.approx(4.0)
    assert result.effect_size == pytest.approx(4.0 / math.sqrt(2.5))
    assert result.direction == "positive"
    assert compare_to_null(-6.0, [-x for x in null]).direction == "negative"
    assert math.isnan(compare_to_null(1.0, [0.5, 0.5, 0.5]).p)  # no spread: undecidable, not significant


def test_pseudo_concept_means_skip_the_diagonal() -> None:
    scores = np.array([[9.0, 1.0, 0.0], [0.0, 9.0, 0.5], [1.0, 0.5, 9.0]])
    assert pseudo_concept_means(scores) == pytest.approx([0.5, 0.25, 0.75])
    with pytest.raises(ValueError):
        pseudo_concept_means(np.zeros((2, 2)))


# --- the batched L2-SVM solver ----------------------------------------------------------------------------


def _reference_svm(x: np.ndarray, y: np.ndarray, alpha: float = 0.01) -> tuple[np.ndarray, float]:
    """The L2-SVM objective (1/n) sum max(0, 1 - y (w.x + b))^2 + alpha/2 |w|^2 minimised by scipy's L-BFGS."""
    from scipy.optimize import minimize

    def objective(p: np.ndarray) -> tuple[float, np.ndarray]:
        slack = np.maximum(1 - y * (x @ p[:-1] + p[-1]), 0)
        grad = -2 * y * slack / len(y)
        return (slack**2).mean() + alpha / 2 * p[:-1] @ p[:-1], np.r_[x.T @ grad + alpha * p[:-1], grad.sum()]

    p = minimize(objective, np.zeros(x.shape[1] + 1), jac=True, method="L-BFGS-B",
                 options={"gtol": 1e-13, "ftol": 1e-16, "maxiter": 100000}).x
    return p[:-1], float(p[-1])


def _pairs(seed: int, k: int, s: int, t: int, rows: int = 100, features: int = 20) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, features)) + 0.3
    x[:40, :3] += 0.8  # rows 0-39 lean one way: some pairs separate, some do not
    first = np.stack([rng.choice(rows, s, replace=False) for _ in range(k)])
    second = np.stack([rng.choice(rows, t, replace=False) for _ in range(k)])
    return x, first, second


def test_svm_directions_are_the_minimiser_scipy_and_sklearn_find() -> None:
    """Batched finite Newton in the span == L-BFGS on the primal objective == sklearn's LinearSVC (squared hinge,
    C = 1/(n alpha), its intercept penalty made negligible by intercept_scaling)."""
    from sklearn.svm import LinearSVC

    x, first, second = _pairs(0, 8, 20, 20)
    fit = LinearSVM().fit(torch.from_numpy(x @ x.T), torch.from_numpy(first), torch.from_numpy(second))
    for k in range(8):
        rows = np.r_[first[k], second[k]]
        y = np.r_[np.ones(20), -np.ones(20)]
        w = fit.coef[k].numpy() @ x[rows]
        w_ref, b_ref = _reference_svm(x[rows], y)
        svc = LinearSVC(C=1 / (len(y) * 0.01), intercept_scaling=1e3, tol=1e-12, max_iter=10**6).fit(x[rows], y)
        assert np.linalg.norm(w - w_ref) / np.linalg.norm(w_ref) < 1e-4 and float(fit.intercept[k]) == pytest.approx(
            b_ref, abs=1e-4)
        assert np.linalg.norm(w - svc.coef_[0]) / np.linalg.norm(w) < 1e-4


@pytest.mark.parametrize(("s", "t"), [(10, 10), (11, 13), (2, 5)])
def test_held_out_accuracy_is_the_literal_three_fold_cross_validation(s: int, t: int) -> None:
    """Row i of each set in fold i mod 3; each fold refitted by scipy on the other rows, its rows predicted."""
    x, first, second = _pairs(1, 5, s, t)
    fit = LinearSVM().fit(torch.from_numpy(x @ x.T), torch.from_numpy(first), torch.from_numpy(second))
    for k in range(5):
        right = 0
        for fold in range(3):
            a, b = np.arange(s) % 3, np.arange(t) % 3
            train = np.r_[first[k][a != fold], second[k][b != fold]]
            held = np.r_[first[k][a == fold], second[k][b == fold]]
            if not len(held):
                continue
            w, intercept = _reference_svm(x[train], np.r_[np.ones((a != fold).sum()), -np.ones((b != fold).sum())])
            truth = np.r_[np.ones((a == fold).sum()), -np.ones((b == fold).sum())]
            right += int((np.where(x[held] @ w + intercept > 0, 1, -1) == truth).sum())
        assert float(fit.accuracy[k]) == right / (s + t)


def test_a_pair_solved_in_a_batch_or_alone_gives_the_same_direction() -> None:
    x, first, second = _pairs(2, 12, 15, 15)
    gram = torch.from_numpy(x @ x.T)
    batch = LinearSVM().fit(gram, torch.from_numpy(first), torch.from_numpy(second))
    for k in (0, 5, 11):
        alone = LinearSVM().fit(gram, torch.from_numpy(first[k : k + 1]), torch.from_numpy(second[k : k + 1]))
        rows = np.r_[first[k], second[k]]
        w_batch, w_alone = batch.coef[k].numpy() @ x[rows], alone.coef[0].numpy() @ x[rows]
        assert np.linalg.norm(w_batch - w_alone) <= 1e-10 * np.linalg.norm(w_batch)
        assert float(batch.accuracy[k]) == float(alone.accuracy[0])


def test_cavs_and_verdicts_do_not_depend_on_the_seed(tmp_path: Path) -> None:
    """The solver is deterministic: two runs with other seeds and no shared cache give the same CAVs (bit for bit,
    compared through their files) and the same tests; the seed only ever reached Captum classifiers' SGD."""
    reports = [_tiny_run(tmp_path / f"seed{seed}", seed=seed) for seed in (0, 7)]
    assert [t.row() for t in reports[0].tests] == [t.row() for t in reports[1].tests]
    files = [sorted((tmp_path / f"seed{seed}").rglob("*.pkl")) for seed in (0, 7)]
    assert [f.name for f in files[0]] == [f.name for f in files[1]] and len(files[0]) == 2 * (45 + 2 * 10)
    for a, b in zip(*files, strict=True):
        stats_a = torch.load(a, weights_only=True)["stats"]
        stats_b = torch.load(b, weights_only=True)["stats"]
        assert torch.equal(stats_a["weights"], stats_b["weights"])
        assert stats_a["accs"] == stats_b["accs"] or (math.isnan(stats_a["accs"]) and math.isnan(stats_b["accs"]))


# --- the mini-batch classifier ---------------------------------------------------------------------------


def test_minibatch_training_is_full_batch_sgd() -> None:
    """Three epochs of partial_fit over mini-batches == sklearn's fit over the concatenated rows."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(90, 40)).astype(np.float32)
    y = np.where(rng.random(90) > 0.5, 7, 3)
    x[y == 7, :3] += 1.5
    ours = MiniBatchSGDClassifier(max_epochs=3, n_iter_no_change=10, shuffle=False)
    loader = DataLoader(TensorDataset(torch.from_numpy(x), torch.from_numpy(y)), batch_size=16)
    ours.train_and_eval(loader, classes=[3, 7])
    reference = SGDClassifier(alpha=0.01, max_iter=3, tol=None, shuffle=False, random_state=0).fit(x, y)
    assert ours.epochs == 3
    np.testing.assert_allclose(ours.weights()[1].numpy(), reference.coef_[0], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ours.weights()[0].numpy(), -reference.coef_[0], rtol=1e-4, atol=1e-6)
    assert ours.classes() == [3, 7]


def test_minibatch_classifier_agrees_with_captum_default() -> None:
    """Same model (hinge SGD, alpha 0.01) as Captum's DefaultClassifier: same direction, same decisions."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 20, generator=g)
    y = torch.cat([torch.full((200,), 5), torch.full((200,), 6)])
    truth = torch.zeros(20)
    truth[:2] = 1.0
    x[y == 6] += 3.0 * truth
    train, test = torch.randperm(400, generator=g).split([268, 132])
    random.seed(0)
    np.random.seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        default = DefaultClassifier()
    default.train_and_eval(DataLoader(TensorDataset(x[train], y[train]), batch_size=32))
    ours = MiniBatchSGDClassifier()
    stats = ours.train_and_eval(
        DataLoader(TensorDataset(x[train], y[train]), batch_size=32),
        test_dataloader=DataLoader(TensorDataset(x[test], y[test]), batch_size=32),
        classes=[5, 6],
    )
    w_default = default.weights()[list(default.classes()).index(6)].float()
    w_ours = ours.weights()[ours.classes().index(6)]
    cos = torch.nn.functional.cosine_similarity
    assert float(cos(w_default, w_ours, dim=0)) > 0.85
    assert float(cos(w_ours, truth, dim=0)) > 0.85 and float(cos(w_default, truth, dim=0)) > 0.85
    assert stats["accs"] > 0.95  # held-out accuracy (Captum's own binary "accs" is wrong: captum#1122)
    agree = ((x[test] @ w_default > 0) == (x[test] @ w_ours > 0)).float().mean()
    assert float(agree) > 0.9


# --- Captum agreement: gradients and TCAV sign counts ----------------------------------------------------


def test_sensitivities_are_plain_gradients() -> None:
    model = make_tiny_cnn()
    x = _images(1, 4)
    sens = layer_sensitivities(model, x, LAYERS, target=2, batch_size=3)
    _, _, grads = forward_with_grads(model, x, LAYERS, lambda logits: logits[:, 2])
    for layer in LAYERS:
        np.testing.assert_allclose(sens[layer], grads[layer].reshape(4, -1).numpy(), rtol=1e-5, atol=1e-6)


def test_scores_equal_captum_tcav_from_our_cached_cavs(tmp_path: Path) -> None:
    """Captum's TCAV.interpret loads our CAV files (content-derived ids) and gives the same sign counts."""
    model = make_tiny_cnn()
    concept = ConceptSet("red", _images(2, 12, shift=1.5))
    randoms = RandomSets(_images(3, 40)).runs(12, 3)
    store = ActivationStore(model, LAYERS)
    store.add([concept, *randoms])
    cache = CAVCache(store, model_name="tiny", save_path=tmp_path)
    inputs, target = _images(4, 9), 1
    sens = layer_sensitivities(model, inputs, LAYERS, target)
    ours = {(r.name, layer): cache.direction(concept, r, layer)[0] for r in randoms for layer in LAYERS}
    assert cache.trained == 3 * len(LAYERS)
    captum_concepts = {s.digest: Concept(s.captum_id, s.name, None) for s in (concept, *randoms)}  # one instance each
    sets = [[captum_concepts[s.digest] for s in sorted((concept, r), key=lambda s: s.digest)] for r in randoms]
    tcav = TCAV(model, LAYERS, model_id=cache.model_id, classifier=MiniBatchSGDClassifier(), save_path=str(tmp_path))
    captum = tcav.interpret(inputs, sets, target=target)
    for r, pair in zip(randoms, sets, strict=True):
        position = [c.id for c in pair].index(concept.captum_id)
        key = "-".join(str(c.id) for c in pair)
        for layer in LAYERS:
            v = ours[r.name, layer]
            assert tcav_score(sens[layer], v) == pytest.approx(float(captum[key][layer]["sign_count"][position]))
            magnitude = tcav_magnitude(sens[layer], v) * float(np.linalg.norm(v))  # Captum's uses the raw CAV
            assert magnitude == pytest.approx(float(captum[key][layer]["magnitude"][position]), rel=1e-4)


# --- activation store and CAV cache ----------------------------------------------------------------------


def test_activations_are_computed_once_per_distinct_image(tmp_path: Path) -> None:
    model = make_tiny_cnn()
    pool = _images(5, 10)
    a, b = ConceptSet("a", pool[:6]), ConceptSet("b", pool[3:])  # 3 shared images
    store = ActivationStore(model, LAYERS, batch_size=4)
    store.add([a, b])
    store.add([a])
    assert store.images_forwarded == 10
    direct = store.forward(b.images)
    spilled = ActivationStore(model, LAYERS, directory=tmp_path)
    spilled.add([a, b])
    for layer in LAYERS:
        np.testing.assert_allclose(store.gather(layer, store.rows(b)), direct[layer], rtol=1e-6)
        np.testing.assert_array_equal(spilled.gather(layer, spilled.rows(b)), store.gather(layer, store.rows(b)))
    assert isinstance(spilled.gather(LAYERS[0], np.arange(2)), np.ndarray) and any(tmp_path.glob("*/*.npy"))
    spilled.close()
    assert not any(tmp_path.glob("*/*.npy"))


def _cache(model: torch.nn.Module, sets: list[ConceptSet], path: Path, layer: str = "block3") -> CAVCache:
    store = ActivationStore(model, [layer])
    store.add(sets)
    return CAVCache(store, model_name="tiny", save_path=path)  # the weight hash is part of the id


def test_cav_cache_key_follows_concept_data_model_and_layer(tmp_path: Path) -> None:
    model = make_tiny_cnn()
    concept, other = ConceptSet("c", _images(6, 8, shift=1.0)), ConceptSet("r", _images(7, 8))
    first = _cache(model, [concept, other], tmp_path)
    v1, _ = first.direction(concept, other, "block3")
    assert (first.trained, first.loaded) == (1, 0)
    again = _cache(model, [concept, other], tmp_path)  # a new run: loaded from disk, not retrained
    np.testing.assert_array_equal(again.direction(concept, other, "block3")[0], v1)
    assert (again.trained, again.loaded) == (0, 1)
    np.testing.assert_array_equal(again.direction(other, concept, "block3")[0], -v1)  # the same CAV's other row
    assert again.trained == 0
    changed_images = concept.images.clone()
    changed_images[0, 1, 5, 5] += 0.5  # one pixel of one concept image
    changed = ConceptSet("c", changed_images)  # same name
    assert changed.digest != concept.digest
    stale_check = _cache(model, [changed, other], tmp_path)
    stale_check.direction(changed, other, "block3")
    assert (stale_check.trained, stale_check.loaded) == (1, 0)
    assert stale_check.path(changed, other, "block3") != stale_check.path(concept, other, "block3")
    other_layer = _cache(model, [concept, other], tmp_path, layer="block2")
    other_layer.direction(concept, other, "block2")
    assert other_layer.trained == 1
    retrained = make_tiny_cnn()
    with torch.no_grad():
        retrained.fc.bias[0] += 1e-3  # one weight of the model
    assert model_digest(retrained) != model_digest(model)
    new_model = _cache(retrained, [concept, other], tmp_path)
    new_model.direction(concept, other, "block3")
    assert (new_model.trained, new_model.loaded) == (1, 0)
    assert new_model.model_id != first.model_id and model_digest(retrained)[:16] in new_model.model_id


def test_concept_set_validation_and_digest() -> None:
    x = _images(8, 3)
    assert ConceptSet("a", x).digest == ConceptSet("b", x.clone()).digest == tensor_digest(x)
    with pytest.raises(ValueError, match="at least 2"):
        ConceptSet("one", x[:1])
    with pytest.raises(ValueError, match="NaN"):
        ConceptSet("nan", torch.full((2, 3, 4, 4), float("nan")))
    with pytest.raises(ValueError, match="pool of at least"):
        RandomSets(x).draw(5, 0)
    pool = RandomSets(_images(9, 30), seed=4)
    assert torch.equal(pool.runs(5, 3)[2].images, RandomSets(_images(9, 30), seed=4).draw(5, 2).images)


# --- the runner ------------------------------------------------------------------------------------------


def _tiny_run(
    tmp_path: Path | None = None, runs: int = 10, statistic: str = "magnitude", reuse: bool = True, seed: int = 0
) -> TCAVReport:
    concepts = {1: [ConceptSet("red", _images(10, 10, shift=1.5)), ConceptSet("plain", _images(11, 10))]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # few random runs on purpose
        runner = TCAVRunner(make_tiny_cnn(), LAYERS, model_name="tiny", random_runs=runs, statistic=statistic,
                            cache_dir=tmp_path, reuse_activations=reuse, seed=seed)
    return runner.run({1: _images(12, 8)}, concepts, RandomSets(_images(13, 60)))


def test_runner_report_holm_null_and_csv(tmp_path: Path) -> None:
    report = _tiny_run(tmp_path)
    tests = report.tests
    assert len(tests) == 4 and {t.layer for t in tests} == set(LAYERS)
    assert [t.p_holm for t in tests] == pytest.approx(list(holm([t.magnitude.p for t in tests])))
    for t in tests:
        assert len(t.scores) == len(t.null_scores) == 10
        assert np.mean(t.null_magnitudes) == pytest.approx(0.0, abs=1e-12)  # one CAV per pair, used both ways
        assert t.magnitude.value == pytest.approx(np.mean(t.magnitudes))
        sign = "+" if t.magnitude.mean_difference > 0 else "-"
        assert t.verdict == ("no evidence at this power" if t.p_holm >= 0.05 else f"used ({sign})")
        assert t.cav_accuracies and all(0 <= a <= 1 for a in t.cav_accuracies)
    assert report.counts["cavs_trained"] == 2 * (45 + 2 * 10)  # per layer: 45 random pairs + 2 concepts x 10 runs
    assert all(0 <= seconds < 120 for seconds in report.timings.values()) and report.timings["activations"] > 0
    rows = list(csv.DictReader(report.to_csv(tmp_path / "tcav.csv").open()))
    assert len(rows) == 4 and float(rows[0]["p_holm"]) == pytest.approx(tests[0].p_holm)
    assert rows[0]["verdict"] == tests[0].verdict and len(rows[0]["sign_counts"].split()) == 10
    assert rows[0]["statistic"] == "magnitude" and float(rows[0]["effect_size"]) == pytest.approx(
        tests[0].magnitude.effect_size)
    cached = _tiny_run(tmp_path)  # second run: every CAV comes from the disk cache
    assert cached.counts["cavs_trained"] == 0 and cached.counts["cavs_loaded"] == 2 * (45 + 2 * 10)
    assert cached.counts["images_forwarded"] == 0  # activations are only computed for CAVs to train
    assert [t.p_holm for t in cached.tests] == [t.p_holm for t in tests]


def test_runner_without_activation_cache_gives_the_same_tests() -> None:
    cached = _tiny_run(runs=4, statistic="sign_count")
    uncached = _tiny_run(runs=4, statistic="sign_count", reuse=False)
    assert [t.scores for t in uncached.tests] == [t.scores for t in cached.tests]
    assert [t.p_holm for t in uncached.tests] == [t.p_holm for t in cached.tests]
    used = {d for s in RandomSets(_images(13, 60)).runs(10, 4) for d in s.image_digests}
    assert cached.counts["images_forwarded"] == 10 + 10 + len(used)  # every distinct image once
    assert uncached.counts["images_forwarded"] > cached.counts["images_forwarded"]


def test_runner_rejects_bad_settings() -> None:
    model = make_tiny_cnn()
    with pytest.warns(UserWarning, match="random runs"):
        TCAVRunner(model, LAYERS, random_runs=5)
    with pytest.raises(ValueError, match=">= 3"):
        TCAVRunner(model, LAYERS, random_runs=2)
    with pytest.raises(ValueError, match="statistic"):
        TCAVRunner(model, LAYERS, statistic="median")
    runner = TCAVRunner(model, ["block_3"], random_runs=10)
    with pytest.raises(ValueError, match="did you mean block3"):
        runner.run({0: _images(1, 2)}, {0: [ConceptSet("c", _images(2, 4))]}, RandomSets(_images(3, 10)))
    concepts = {0: [ConceptSet("c", _images(2, 4))]}
    with pytest.raises(ValueError, match="no input images"):
        TCAVRunner(model, LAYERS, random_runs=10).run({}, concepts, RandomSets(_images(3, 10)))


def test_runner_null_is_the_literal_random_vs_random_tcav() -> None:
    """The null of 4 random sets written out: each pair's CAV trained with the project's CAV trainer, then
    per image the directional derivative S = grad h_k(f_l(x)) . v by its own backward pass; the sign count
    and the unit-CAV magnitude of R_j against every other R_i, averaged over i != j."""
    model, target, n_runs = make_tiny_cnn(), 1, 4
    concept, inputs, pool = ConceptSet("red", _images(10, 10, shift=1.5)), _images(12, 5), _images(13, 60)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        runner = TCAVRunner(model, LAYERS, model_name="tiny", random_runs=n_runs)
    report = runner.run({target: inputs}, {target: [concept]}, RandomSets(pool))
    randoms = RandomSets(pool).runs(concept.size, n_runs, exclude=(concept.digest,))
    store = ActivationStore(model, LAYERS)
    trainer = CAVCache(store, model_name="tiny")
    grads = []
    for x in inputs:  # one image at a time
        _, _, g = forward_with_grads(model, x[None], LAYERS, lambda logits: logits[:, target])
        grads.append({layer: g[layer].flatten().double().numpy() for layer in LAYERS})
    for layer in LAYERS:
        signs, magnitudes = [], []
        for j in range(n_runs):
            sign_j, magnitude_j = [], []
            for i in range(n_runs):
                if i == j:
                    continue
                v = trainer.direction(randoms[j], randoms[i], layer)[0].astype(np.float64)
                positive, total = 0, 0.0
                for g in grads:
                    s = float(g[layer] @ v)
                    positive += s > 0
                    total += s / float(np.linalg.norm(v))
                sign_j.append(positive / len(grads))
                magnitude_j.append(total / len(grads))
            signs.append(sum(sign_j) / len(sign_j))
            magnitudes.append(sum(magnitude_j) / len(magnitude_j))
        test = report.find(target, "red", layer)
        assert test.null_scores == pytest.approx(signs)
        assert test.null_magnitudes == pytest.approx(magnitudes, rel=1e-4, abs=1e-7)
    assert trainer.trained == len(LAYERS) * n_runs * (n_runs - 1) // 2  # one CAV per unordered pair


def test_runner_skips_a_class_without_concepts() -> None:
    """A first class with an empty concept list used to raise IndexError; it is simply not tested."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        runner = TCAVRunner(make_tiny_cnn(), ["block3"], random_runs=3)
    report = runner.run({0: _images(1, 3), 2: _images(2, 3)}, {0: [], 2: [ConceptSet("c", _images(3, 4))]},
                        RandomSets(_images(4, 20)))
    assert [(t.class_id, t.concept, t.layer) for t in report.tests] == [(2, "c", "block3")]
    with pytest.raises(ValueError, match="no concept sets"):
        runner.run({0: _images(1, 3)}, {0: []}, RandomSets(_images(4, 20)))


def test_runner_deletes_spilled_activations_when_it_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> dict[str, float]:
        raise RuntimeError("classifier failed")

    monkeypatch.setattr(LinearSVM, "fit", broken)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        runner = TCAVRunner(make_tiny_cnn(), ["block3"], random_runs=3, activation_dir=tmp_path)
    with pytest.raises(RuntimeError, match="classifier failed"):
        runner.run({0: _images(1, 3)}, {0: [ConceptSet("c", _images(3, 4))]}, RandomSets(_images(4, 20)))
    assert not list(tmp_path.rglob("*.npy"))  # activations were spilled before the failure, then deleted


def test_a_constant_or_nan_null_cannot_be_tested(tmp_path: Path) -> None:
    """A class logit that does not depend on the layers gives every direction the same (zero) score: the null
    has no spread. A NaN weight gives NaN gradients. Both are named, left out of Holm, written as untested."""
    constant, broken = make_tiny_cnn(), make_tiny_cnn()
    with torch.no_grad():
        constant.fc.weight[1].zero_()  # class 1's logit is its bias alone
        broken.fc.weight[1, 0] = float("nan")  # its gradient w.r.t. block3 is NaN
    concepts = {1: [ConceptSet("red", _images(10, 10, shift=1.5)), ConceptSet("plain", _images(11, 10))]}
    reports = []
    for model in (constant, broken):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            runner = TCAVRunner(model, ["block3"], random_runs=5)
            reports.append(runner.run({1: _images(12, 4)}, concepts, RandomSets(_images(13, 40))))
    assert [t.verdict for t in reports[0].tests] == [
        "cannot test: the null is constant (every random set scores 0): no spread to judge by"] * 2
    assert [t.verdict for t in reports[1].tests] == [
        "cannot test: NaN in the statistic or its null (gradients not finite, or a CAV of length 0)"] * 2
    for t in reports[0].tests + reports[1].tests:
        assert not t.significant and math.isnan(t.p_holm) and t.row()["significant"] == ""
    rows = list(csv.DictReader(reports[0].to_csv(tmp_path / "tcav.csv").open()))
    assert [r["verdict"] for r in rows] == [t.verdict for t in reports[0].tests] and rows[0]["significant"] == ""


def test_the_detectable_effect_is_where_the_bonferroni_step_rejects() -> None:
    """A concept exactly detectable_effect null SDs from the null mean has p = alpha / m (Holm's first step)."""
    null = np.array([-1.3, -0.4, 0.1, 0.2, 0.6, 0.8, -0.9, 1.1, 0.3, -0.5])
    for tests in (1, 8, 44):
        z = detectable_effect(0.05, tests, len(null))
        result = compare_to_null(null.mean() + z * null.std(ddof=1), null)
        assert result.p == pytest.approx(0.05 / tests, rel=1e-9) and result.effect_size == pytest.approx(z)


def test_cav_accuracy_against_chance() -> None:
    """The chance bar is the 95th percentile of guessing, Binomial(n, 1/2) / n, n the images of both sets (by
    hand for n = 20: P(X >= 14) = 0.058, P(X >= 15) = 0.021, so 14/20); a shifted concept's CAVs clear it."""
    report = _tiny_run(runs=4)
    red, plain = report.find(1, "red", "block3"), report.find(1, "plain", "block3")
    assert red.chance_accuracy == pytest.approx(14 / 20)
    assert sum(math.comb(20, j) for j in range(14, 21)) / 2**20 == pytest.approx(0.0577, abs=1e-4)
    assert red.cav_accuracy > red.chance_accuracy and not red.cav_at_chance
    assert plain.cav_at_chance  # a set of random images is no concept


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_the_solver_on_the_gpu_gives_the_cpu_directions() -> None:
    x, first, second = _pairs(3, 16, 20, 20)
    gram = torch.from_numpy(x @ x.T)
    cpu = LinearSVM().fit(gram, torch.from_numpy(first), torch.from_numpy(second))
    gpu = LinearSVM().fit(gram.cuda(), torch.from_numpy(first).cuda(), torch.from_numpy(second).cuda())
    np.testing.assert_allclose(gpu.coef.cpu().numpy(), cpu.coef.numpy(), rtol=1e-8, atol=1e-12)
    assert torch.equal(gpu.accuracy.cpu(), cpu.accuracy)


def test_the_gram_cache_grows_and_forgets_without_changing_a_value() -> None:
    """Inner products grown block by block (rows added over several solves), and recomputed after eviction,
    equal X X^T of the rows asked for."""
    from convlens.tcav.cav import _Grams

    x = np.random.default_rng(4).normal(size=(30, 7)).astype(np.float32)
    exact = x.astype(np.float64) @ x.astype(np.float64).T
    grams = _Grams(torch.device("cpu"), max_bytes=8 * 21**2)  # 441 inner products at most
    for layer, rows in (("a", [3, 1, 5]), ("a", [5, 9, 12, 1]), ("b", list(range(20))), ("a", [0, 29, 3])):
        matrix, position = grams.over(layer, np.array(rows), lambda r: x[r])
        at = position[np.array(rows)]
        assert (at >= 0).all()
        np.testing.assert_allclose(matrix[at][:, at].numpy(), exact[np.ix_(rows, rows)], rtol=1e-12)
    assert list(grams._matrix) == ["a"]  # "b" (20 rows) was dropped to make room for "a" again
