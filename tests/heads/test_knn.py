"""The kNN head: scikit-learn's cosine kNN (uniform votes), the closed form of DINOv2's weighted vote, blockwise
search equal to one block, k chosen on val, and the saved head reloaded for scoring."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.core.heads.knn import PROB_FLOOR, KnnHead, fit_knn, nearest, normalise, vote, vote_logits
from pipeline.infra.config import ConfigError, KnnConfig, build
from pipeline.infra.errors import PipelineError


def _data(seed: int = 0, n_train: int = 150, n_val: int = 60, d: int = 16, classes: int = 4):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, d))
    y_train, y_val = rng.integers(0, classes, n_train), rng.integers(0, classes, n_val)
    x_train = (centres[y_train] + 1.5 * rng.normal(size=(n_train, d))).astype(np.float32)
    x_val = (centres[y_val] + 1.5 * rng.normal(size=(n_val, d))).astype(np.float32)
    return x_train, y_train, x_val, y_val


def _probs(x_train, y_train, x_query, k, temperature, classes, **blocks) -> tuple[np.ndarray, np.ndarray]:
    train, query = normalise(torch.from_numpy(x_train)), normalise(torch.from_numpy(x_query))
    sims, idx = nearest(query, train, k, **blocks)
    return vote(sims, torch.from_numpy(y_train)[idx], k, temperature, classes).numpy(), idx.numpy()


@pytest.mark.parametrize("k", [1, 5, 8])
def test_equals_sklearn_cosine_knn_when_votes_are_uniform(k):
    """T very large: every neighbour's weight exp(sim/T) is ~1, so the vote is scikit-learn's uniform kNN with the
    cosine metric: the same neighbours, the same probabilities (within the ~sim/T spread), the same predictions
    wherever the count has one winner (with tied counts scikit-learn takes the lower class, a weighted vote the
    class whose neighbours are more similar)."""
    from sklearn.neighbors import KNeighborsClassifier

    x_train, y_train, x_val, y_val = _data()
    ref = KNeighborsClassifier(n_neighbors=k, metric="cosine", weights="uniform", algorithm="brute")
    ref.fit(x_train, y_train)
    probs, idx = _probs(x_train, y_train, x_val, k, 1e6, 4, query_rows=7, train_rows=16)
    _, ref_idx = ref.kneighbors(x_val)
    np.testing.assert_array_equal(idx, ref_idx)
    expected = ref.predict_proba(x_val)
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    top = np.sort(expected, axis=1)
    unique_winner = top[:, -1] > top[:, -2]
    assert unique_winner.sum() >= len(y_val) // 2
    np.testing.assert_array_equal(probs.argmax(1)[unique_winner], ref.predict(x_val)[unique_winner])
    assert (probs.argmax(1) == y_val).mean() > 0.5  # the data are learnable: chance is 1/4


def test_weighted_vote_closed_form():
    """By hand: query (1, 0); train (1,0) class 0, (0,1) class 1, (1,1) class 1, (-1,0) class 0, (3,4) class 2.
    Cosine similarities 1, 0, 1/sqrt(2), -1, 0.6; k = 3 keeps rows 0, 2, 4; T = 0.5:
    p = [e^2, e^(sqrt 2), e^1.2] / (e^2 + e^(sqrt 2) + e^1.2) = [0.49851, 0.27750, 0.22399]."""
    x_train = np.array([[1, 0], [0, 1], [1, 1], [-1, 0], [3, 4]], np.float32)
    y_train = np.array([0, 1, 1, 0, 2])
    probs, idx = _probs(x_train, y_train, np.array([[2.0, 0.0]], np.float32), 3, 0.5, 3)
    assert idx.tolist() == [[0, 2, 4]]
    w = np.exp(np.array([1.0, 1 / np.sqrt(2), 0.6]) / 0.5)
    np.testing.assert_allclose(probs[0], w / w.sum(), rtol=1e-6)
    np.testing.assert_allclose(probs[0], [0.49851, 0.27750, 0.22399], atol=5e-6)
    # two neighbours of one class add their weights: k = 4 adds row 1 (sim 0, class 1)
    probs4, _ = _probs(x_train, y_train, np.array([[2.0, 0.0]], np.float32), 4, 0.5, 3)
    w4 = np.exp(np.array([1.0, 1 / np.sqrt(2), 0.6, 0.0]) / 0.5)
    np.testing.assert_allclose(probs4[0], [w4[0], w4[1] + w4[3], w4[2]] / w4.sum(), rtol=1e-6)
    # the head's output is log(vote + floor): its softmax is the vote, and a class with no vote costs -log(floor)
    logits = vote_logits(torch.tensor([[1.0, 0.9]]), torch.tensor([[0, 0]]), 2, 0.07, 3)
    np.testing.assert_allclose(torch.softmax(logits, 1).numpy(), [[1.0, 0.0, 0.0]], atol=3e-6)
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor([2])).item()
    assert loss == pytest.approx(-np.log(PROB_FLOOR / (1 + 3 * PROB_FLOOR)), rel=1e-5)
    # a small T cannot overflow: exp(1 / 0.001) is inf in float32, the normalised vote is not
    tiny = vote(torch.tensor([[1.0, 0.99]]), torch.tensor([[1, 0]]), 2, 0.001, 2)
    np.testing.assert_allclose(tiny.numpy(), [[1 / (1 + np.exp(-10)), 1 - 1 / (1 + np.exp(-10))][::-1]], rtol=1e-5)


def _exact_rows(rng: np.random.Generator, n: int, d: int = 16) -> np.ndarray:
    """Rows with four entries of +-0.5 and zeros elsewhere: unit norm exactly, and every dot product (a sum of
    +-0.25 terms) exact in float32 whatever the order of the sum, so any blocking gives the same similarities;
    they take few values, so the top-k has many ties to break."""
    x = np.zeros((n, d), np.float32)
    for row in x:
        row[rng.choice(d, 4, replace=False)] = rng.choice([-0.5, 0.5], 4)
    return x


def test_blockwise_equals_one_block_exactly_ties_to_the_lower_train_row():
    rng = np.random.default_rng(3)
    x_train, x_query = _exact_rows(rng, 97), _exact_rows(rng, 23)
    y_train = rng.integers(0, 5, 97)
    one_p, one_i = _probs(x_train, y_train, x_query, 10, 0.07, 5, query_rows=10**6, train_rows=10**6)
    # the reference ordering: similarity descending, ties by the lower train row
    sims = x_query @ x_train.T
    order = np.lexsort((np.broadcast_to(np.arange(97), sims.shape), -sims), axis=1)[:, :10]
    np.testing.assert_array_equal(one_i, order)
    assert (np.diff(np.take_along_axis(sims, order, 1), axis=1) == 0).any()  # there were ties to break
    for query_rows, train_rows in ((1, 1), (3, 2), (5, 7), (23, 9), (4, 96)):
        p, i = _probs(x_train, y_train, x_query, 10, 0.07, 5, query_rows=query_rows, train_rows=train_rows)
        np.testing.assert_array_equal(i, one_i)
        np.testing.assert_array_equal(p, one_p)  # bit for bit


def test_blockwise_neighbours_equal_one_block_on_real_valued_features():
    """Ordinary floats: the neighbours are the same for any blocking; the similarities may differ in the last bit
    (BLAS rounds a dot product differently for other block shapes), so the votes agree to float32 rounding."""
    x_train, y_train, x_val, _ = _data(seed=1)
    one_p, one_i = _probs(x_train, y_train, x_val, 20, 0.07, 4, query_rows=10**6, train_rows=10**6)
    for query_rows, train_rows in ((1, 1), (7, 13), (60, 32)):
        p, i = _probs(x_train, y_train, x_val, 20, 0.07, 4, query_rows=query_rows, train_rows=train_rows)
        np.testing.assert_array_equal(i, one_i)
        np.testing.assert_allclose(p, one_p, rtol=1e-5, atol=1e-6)


def test_k_is_chosen_on_val_ties_to_the_smaller_k():
    x_train, y_train, x_val, y_val = _data(seed=2)
    module, info = fit_knn(x_train, y_train, x_val, y_val, KnnConfig(k=[20, 1, 5], T=0.07, device="cpu"), 4)
    accs = {r["k"]: r["val_accuracy"] for r in info["search"]}
    assert [r["k"] for r in info["search"]] == [1, 5, 20]
    best = max(accs.values())
    assert info["k"] == min(k for k, a in accs.items() if a == best) and module.k == info["k"]
    for k, acc in accs.items():  # each k's accuracy is the head's own with that k
        probs, _ = _probs(x_train, y_train, x_val, k, 0.07, 4)
        assert acc == pytest.approx((probs.argmax(1) == y_val).mean())
    # separable data: every k is perfect on val, and the smallest wins the tie
    sep_x = np.repeat(np.eye(4, 8, dtype=np.float32), 10, axis=0) + 0.01
    sep_y = np.repeat(np.arange(4), 10)
    _, info = fit_knn(sep_x, sep_y, sep_x, sep_y, KnnConfig(k=[9, 3, 5], device="cpu"), 4)
    assert [r["val_accuracy"] for r in info["search"]] == [1.0, 1.0, 1.0] and info["k"] == 3
    # k above the 40 train rows: every row votes (k = 40), once however many such k are listed
    _, info = fit_knn(sep_x, sep_y, sep_x, sep_y, KnnConfig(k=[3, 41, 200], device="cpu"), 4)
    assert [r["k"] for r in info["search"]] == [3, 40]
    with pytest.raises(PipelineError, match="no rows to vote"):
        fit_knn(sep_x[:0], sep_y[:0], sep_x, sep_y, KnnConfig(device="cpu"), 4)


def test_config_rejects_bad_k_and_t():
    assert build(KnnConfig, {"k": [10, 20, 100, 200]}, "heads.knn").k == [10, 20, 100, 200]
    for raw, message in (({"k": []}, "heads.knn.k must list"), ({"k": [0]}, "heads.knn.k = 0 is out of range"),
                         ({"k": 20}, "heads.knn.k must be a list"), ({"T": 0.0}, "heads.knn.T = 0.0 is out of range"),
                         ({"temperature": 0.1}, "unknown key 'heads.knn.temperature'")):
        with pytest.raises(ConfigError, match=message):
            build(KnnConfig, raw, "heads.knn")


def test_fit_save_load_round_trip(tiny_cache, tmp_path):
    """heads@knn on the tiny cache: saved as safetensors (the normalised train rows and labels) + head.json, loaded
    back it scores val with the same bytes, and its metrics are the fitted module's."""
    from safetensors.torch import load_file

    from pipeline.core.features.cache import read_split
    from pipeline.core.heads.fitting import fit_head, head_logits, load_head, save_head
    from pipeline.core.heads.metrics import split_metrics
    from pipeline.infra.config import load_section

    cfg = load_section("heads", tiny_cache["params"]).knn
    module, spec, metrics = fit_head("knn", tiny_cache["features"], cfg)
    train, val = read_split(tiny_cache["features"], "train"), read_split(tiny_cache["features"], "val")
    assert spec.pooling == "avg" and spec.fit["k"] == 20 and spec.fit["train_rows"] == len(train.labels)
    save_head(tmp_path / "knn", module, spec)
    state = load_file(str(tmp_path / "knn" / "head.safetensors"))
    assert set(state) == {"train_features", "train_labels"}
    np.testing.assert_array_equal(state["train_labels"].numpy(), train.labels)
    np.testing.assert_allclose(np.linalg.norm(state["train_features"].numpy(), axis=1), 1.0, rtol=1e-6)
    loaded, loaded_spec = load_head(tmp_path / "knn")
    assert loaded_spec == spec and isinstance(loaded, KnnHead) and loaded.k == 20
    logits = head_logits(loaded, spec, val)
    np.testing.assert_array_equal(logits, head_logits(module, spec, val))
    assert split_metrics(logits, val.labels) == metrics["val"]
    probs, _ = _probs(train.avg, train.labels, val.avg, 20, cfg.T, 3)
    np.testing.assert_allclose(torch.softmax(torch.from_numpy(logits), 1).numpy(), probs, atol=1e-5)
    assert metrics["val"]["accuracy"] >= 0.5  # 3 classes: chance is 1/3


def test_predict_with_a_selected_knn_head_reproduces_its_cached_predictions(tiny_cache, tmp_path):
    """`predict --model head` with kNN selected: backbone + pooling + the reloaded kNN on the image files gives the
    classes the head gives on the cached features, and the probabilities are its normalised vote."""
    from pipeline.core.data.index import read_index
    from pipeline.core.evaluate.prediction import load_model, predict
    from pipeline.core.features.cache import read_split
    from pipeline.core.heads.fitting import fit_head, head_logits, save_head
    from pipeline.core.heads.selection import select_head
    from pipeline.infra.artifacts import write_json
    from pipeline.infra.config import load_section

    module, spec, metrics = fit_head("knn", tiny_cache["features"], load_section("heads", tiny_cache["params"]).knn)
    save_head(tmp_path / "heads" / "knn", module, spec)
    write_json(tmp_path / "selected.json", select_head({"knn": metrics}))
    net, pre, classes, what = load_model("head", tmp_path)
    assert what.startswith("head 'knn'")
    rows, meta = read_index(tiny_cache["index"])
    files = [Path(meta["source"]) / r["path"] for r in rows if r["split"] == "val"]
    got = predict(net, pre, classes, files, top_k=3, device="cpu")
    cached = head_logits(module, spec, read_split(tiny_cache["features"], "val"))
    assert [g["predicted"] for g in got] == [classes[i] for i in cached.argmax(1)]
    expected = torch.softmax(torch.from_numpy(cached), 1).max(1).values.numpy()
    # printed to 4 decimals, from features the image route computes again (equal to the cache's to float rounding)
    np.testing.assert_allclose([float(g["probability"]) for g in got], expected, atol=2e-3)
