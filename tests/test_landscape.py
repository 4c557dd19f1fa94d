"""Loss landscapes (runner/analysis/landscape.py): filter normalization against its defining invariance, directions
that depend only on the seed, grids against direct evaluations (centre, orientation), the vmap path against the
loop, interpolation endpoints, PCA against a planar trajectory and sklearn, and a model left bitwise untouched."""
import contextlib
import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

from runner import paramspace
from runner.analysis import landscape as L
from runner.analysis.probe import EvalSet, Probe
from runner.data import DeviceBatches
from runner.train import evaluate as train_evaluate
from tasks import ClassificationMetrics


def bn_mlp(seed: int, d_in: int = 6, width: int = 8, classes: int = 3) -> nn.Module:
    """Linear (no bias) -> BatchNorm1d -> ReLU -> Linear, with non-trivial running statistics and BN affine."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d_in, width, bias=False), nn.BatchNorm1d(width), nn.ReLU(),
                          nn.Linear(width, classes))
    with torch.no_grad():
        model[1].running_mean.copy_(torch.randn(width) * 0.5)
        model[1].running_var.copy_(torch.rand(width) + 0.5)
        model[1].num_batches_tracked.fill_(7)
        model[1].weight.copy_(torch.rand(width) + 0.5)
        model[1].bias.copy_(torch.randn(width) * 0.1)
    return model.eval()


def data(seed: int = 0, n: int = 60, d_in: int = 6, classes: int = 3, batch_size: int = 16) -> dict[str, EvalSet]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=generator)
    y = torch.randint(0, classes, (n,), generator=generator)
    return {"train": EvalSet(x, y, batch_size), "test": EvalSet(x[: n // 2] + 0.1, y[: n // 2], batch_size)}


def shifted(params, directions, coeffs):
    """params + c0*d0 + c1*d1, written out independently of the module under test."""
    out = [p.clone() for p in params]
    for c, d in zip(coeffs, directions):
        out = [o + c * di for o, di in zip(out, d)]
    return out


# ------------------------------------------------------------------------------------------------ directions
def test_filter_normalized_slice_is_invariant_to_a_scale_that_batchnorm_divides_out():
    model_a = bn_mlp(0)
    model_a[1].eps = 1e-12  # so that BN divides any per-channel scale out (to float precision)
    model_b = copy.deepcopy(model_a)
    factors = torch.tensor([10.0, 10.0, 0.5, 3.0, 10.0, 0.2, 10.0, 7.0])  # output neuron i of layer 0 times c_i
    with torch.no_grad():  # the same function: BN's eval statistics compensate
        model_b[0].weight.mul_(factors[:, None])
        model_b[1].running_mean.mul_(factors)
        model_b[1].running_var.mul_(factors ** 2)
    sets = data()
    probe_a, probe_b = Probe(model_a), Probe(model_b)
    assert probe_a.evaluate(probe_a.params, sets["train"])["loss"] == pytest.approx(
        probe_b.evaluate(probe_b.params, sets["train"])["loss"], rel=1e-6)
    xs = np.linspace(-1, 1, 9)
    curves = {}
    for norm in L.NORMALIZATIONS:
        for name, probe in (("a", probe_a), ("b", probe_b)):
            d = L.random_direction(probe.params, seed=3, normalization=norm)
            curves[norm, name] = L.landscape_1d(probe, probe.params, d, sets, xs)["train_loss"]
    np.testing.assert_allclose(curves["filter", "a"], curves["filter", "b"], rtol=1e-5, atol=1e-6)
    assert np.ptp(curves["filter", "a"]) > 1e-2  # the filter slice is not flat
    for norm in ("layer", "none"):  # a per-tensor or no normalization sees the scale
        assert np.abs(curves[norm, "a"] - curves[norm, "b"]).max() > 1e-2, norm


def test_filter_normalized_slice_with_a_uniformly_rescaled_layer():
    """The brief's case: layer 0 times 10, running_mean times 10, running_var times 100 (and eps times 100)."""
    model_a = bn_mlp(0)
    model_b = copy.deepcopy(model_a)
    with torch.no_grad():
        model_b[0].weight.mul_(10)
        model_b[1].running_mean.mul_(10)
        model_b[1].running_var.mul_(100)
        model_b[1].eps *= 100
    sets = data()
    curves = {}
    for norm in ("filter", "none"):
        for name, model in (("a", model_a), ("b", model_b)):
            probe = Probe(model)
            d = L.random_direction(probe.params, seed=3, normalization=norm)
            curves[norm, name] = L.landscape_1d(probe, probe.params, d, sets, np.linspace(-1, 1, 9))["train_loss"]
    np.testing.assert_allclose(curves["filter", "a"], curves["filter", "b"], rtol=1e-5, atol=1e-6)
    assert np.abs(curves["none", "a"] - curves["none", "b"]).max() > 1e-2


def test_filter_layer_and_none_normalizations():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.Flatten(), nn.Linear(5 * 4 * 4, 4))
    params = Probe(model).params
    d = L.random_direction(params, seed=1)  # filter, vectors ignored
    for w, di in zip(params, d):
        assert di.shape == w.shape and di.dtype == w.dtype
        if w.dim() > 1:
            torch.testing.assert_close(di.reshape(len(di), -1).norm(dim=1), w.reshape(len(w), -1).norm(dim=1),
                                       rtol=1e-6, atol=0)
        else:
            assert torch.count_nonzero(di) == 0
    for w, di in zip(params, L.random_direction(params, seed=1, normalization="layer")):
        if w.dim() > 1:
            torch.testing.assert_close(di.norm(), w.norm(), rtol=1e-6, atol=0)
    raw = L.random_direction(params, seed=1, normalization="none", ignore_vectors=False)
    generator = torch.Generator().manual_seed(1)
    for w, di in zip(params, raw):
        assert torch.equal(di, torch.randn(w.shape, generator=generator))  # drawn in order of `like`
    kept = L.random_direction(params, seed=1, ignore_vectors=False)
    for w, di, dj in zip(params, kept, d):
        if w.dim() <= 1:
            assert torch.equal(di, w)  # Li's rule for biases and BN when included: d = w
        else:
            assert torch.equal(di, dj)  # the matrices do not depend on whether the vectors are kept
    with pytest.raises(ValueError, match="normalization"):
        L.random_direction(params, seed=1, normalization="weight")


def test_directions_depend_only_on_the_seed():
    params = Probe(bn_mlp(0)).params
    rng = torch.random.get_rng_state()
    a = L.random_direction(params, seed=5)
    b = L.random_direction(params, seed=5)
    assert torch.equal(torch.random.get_rng_state(), rng)  # the global RNG was not drawn from
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    c = L.second_direction(params, seed=5)
    assert all(torch.equal(x, y) for x, y in zip(c, L.random_direction(params, seed=6)))
    assert not torch.equal(a[0], c[0])
    # the dtype of `like` changes only the storage, not the draw
    doubles = L.random_direction([p.double() for p in params], seed=5)
    assert all(x.dtype == torch.float64 for x in doubles)
    torch.testing.assert_close([x.float() for x in doubles], a, rtol=1e-6, atol=0)
    if torch.cuda.is_available():
        on_gpu = L.random_direction([p.cuda() for p in params], seed=5)
        assert all(x.is_cuda and torch.equal(x.cpu(), y) for x, y in zip(on_gpu, a))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_directions_identical_on_cpu_and_gpu():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 30 * 30, 10))
    params = Probe(model).params
    cpu = L.random_direction(params, seed=11)
    gpu = L.random_direction([p.cuda() for p in params], seed=11)
    assert all(torch.equal(x, y.cpu()) for x, y in zip(cpu, gpu))


# ------------------------------------------------------------------------------------------------ grids
def test_grid_centre_is_a_plain_evaluation():
    model = bn_mlp(1)
    sets = data(batch_size=7)
    probe = Probe(model)
    d1, d2 = L.random_direction(probe.params, 0), L.second_direction(probe.params, 0)
    for per in (1, None):
        grid = L.landscape_2d(probe, probe.params, d1, d2, sets, [-0.5, 0.0, 0.5], [-1.0, 0.0, 1.0],
                              points_per_batch=per)
        for split, data_ in sets.items():
            plain = probe.evaluate(probe.params, data_)
            loop = DeviceBatches(data_.x, data_.y, data_.batch_size, shuffle=False)
            trained = train_evaluate(model, loop, ClassificationMetrics(), contextlib.nullcontext())
            for reference in (plain, trained):
                assert grid[f"{split}_loss"][1, 1] == pytest.approx(reference["loss"], rel=1e-6, abs=0)
                assert grid[f"{split}_acc"][1, 1] == reference["acc"]
            if per == 1:  # the loop evaluates exactly the model's point
                assert grid[f"{split}_loss"][1, 1] == plain["loss"]


def test_non_square_grid_has_x_along_columns_and_y_along_rows():
    probe = Probe(bn_mlp(2))
    sets = data()
    d1, d2 = L.random_direction(probe.params, 0), L.random_direction(probe.params, 1)
    xs, ys = np.linspace(-1, 1, 5), np.array([-0.7, 0.1, 0.9])
    grid = L.landscape_2d(probe, probe.params, d1, d2, sets, xs, ys)
    assert grid["train_loss"].shape == grid["test_acc"].shape == (3, 5)
    np.testing.assert_array_equal(grid["x"], xs)
    np.testing.assert_array_equal(grid["y"], ys)
    for iy, y in enumerate(ys):
        for ix, x in enumerate(xs):
            point = shifted(probe.params, [d1, d2], [float(x), float(y)])
            for split in sets:
                direct = probe.evaluate(point, sets[split])
                assert grid[f"{split}_loss"][iy, ix] == pytest.approx(direct["loss"], rel=1e-5)
                assert grid[f"{split}_acc"][iy, ix] == pytest.approx(direct["acc"], abs=1 / len(sets[split]))
    line = L.landscape_1d(probe, probe.params, d1, sets, torch.tensor(xs))
    direct = [probe.evaluate(shifted(probe.params, [d1], [float(x)]), sets["train"])["loss"] for x in xs]
    np.testing.assert_allclose(line["train_loss"], direct, rtol=1e-5)


def test_vmap_path_matches_point_by_point_loop():
    probe = Probe(bn_mlp(3))
    sets = data(batch_size=13)  # batches of unequal size
    d1, d2 = L.random_direction(probe.params, 0), L.random_direction(probe.params, 1)
    xs, ys = np.linspace(-1, 1, 7), np.linspace(-0.5, 1, 4)
    loop = L.landscape_2d(probe, probe.params, d1, d2, sets, xs, ys, points_per_batch=1)
    for per in (5, 28, None):  # chunks that do not divide the grid, one chunk, automatic
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback happened
            fast = L.landscape_2d(probe, probe.params, d1, d2, sets, xs, ys, points_per_batch=per)
        for key in loop:
            np.testing.assert_allclose(fast[key], loop[key], rtol=1e-5, atol=1e-6)
    line_loop = L.landscape_1d(probe, probe.params, d1, sets, xs, points_per_batch=1)
    line_fast = L.landscape_1d(probe, probe.params, d1, sets, xs, points_per_batch=4, progress=True)
    for key in line_loop:
        np.testing.assert_allclose(line_fast[key], line_loop[key], rtol=1e-5, atol=1e-6)


class Branchy(nn.Module):
    """Data-dependent control flow: vmap cannot run it, so the landscape falls back to the loop."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = self.a(x)
        if h.mean() > -1e9:
            h = h.relu()
        return self.b(h)


def test_vmap_failure_falls_back_to_the_loop():
    torch.manual_seed(0)
    probe = Probe(Branchy())
    sets = data()
    d = L.random_direction(probe.params, 0)
    loop = L.landscape_1d(probe, probe.params, d, sets, np.linspace(-1, 1, 6), points_per_batch=1)
    with pytest.warns(RuntimeWarning, match="point by point"):
        fast = L.landscape_1d(probe, probe.params, d, sets, np.linspace(-1, 1, 6), points_per_batch=4)
    for key in loop:
        np.testing.assert_array_equal(fast[key], loop[key])


def test_recalibrated_batchnorm_at_each_point():
    probe = Probe(bn_mlp(4))
    sets = data()
    d = L.random_direction(probe.params, 0, ignore_vectors=False)
    xs = [-0.5, 0.0, 0.5]
    out = L.landscape_1d(probe, probe.params, d, sets, xs, bn="recalibrate", points_per_batch=8)
    for i, x in enumerate(xs):
        point = shifted(probe.params, [d], [x])
        buffers = probe.recalibrated_buffers(point, sets["train"])
        assert out["test_loss"][i] == pytest.approx(probe.evaluate(point, sets["test"], buffers)["loss"], rel=1e-6)
    assert out["test_loss"][1] != pytest.approx(probe.evaluate(probe.params, sets["test"])["loss"], rel=1e-3)
    with pytest.raises(ValueError, match="train"):
        L.landscape_1d(probe, probe.params, d, {"test": sets["test"]}, xs, bn="recalibrate")
    with pytest.raises(ValueError, match="BN mode"):
        L.landscape_1d(probe, probe.params, d, sets, xs, bn="train")


# ------------------------------------------------------------------------------------------------ interpolation
def test_interpolation_endpoints_are_each_models_own_evaluation():
    probe_a, probe_b = Probe(bn_mlp(5)), Probe(bn_mlp(6))
    assert not torch.equal(probe_a.buffers["1.running_mean"], probe_b.buffers["1.running_mean"])
    sets = data()
    alphas = np.linspace(0, 1, 5)
    loop = L.interpolate(probe_a, probe_a.params, probe_b.params, sets, alphas, probe_b=probe_b, points_per_batch=1)
    fast = L.interpolate(probe_a, probe_a.params, probe_b.params, sets, alphas, probe_b=probe_b)
    np.testing.assert_array_equal(loop["alpha"], alphas)
    for split, data_ in sets.items():
        own_a, own_b = probe_a.evaluate(probe_a.params, data_), probe_b.evaluate(probe_b.params, data_)
        assert loop[f"{split}_loss"][0] == own_a["loss"] and loop[f"{split}_acc"][0] == own_a["acc"]
        assert loop[f"{split}_loss"][-1] == own_b["loss"] and loop[f"{split}_acc"][-1] == own_b["acc"]
        np.testing.assert_allclose(fast[f"{split}_loss"], loop[f"{split}_loss"], rtol=1e-5)
        np.testing.assert_allclose(fast[f"{split}_acc"], loop[f"{split}_acc"], atol=1e-12)
    # the midpoint: parameters and floating-point buffers averaged, num_batches_tracked from a
    mid = [(a + b) / 2 for a, b in zip(probe_a.params, probe_b.params)]
    buffers = {k: ((v + probe_b.buffers[k]) / 2 if v.is_floating_point() else v) for k, v in probe_a.buffers.items()}
    assert loop["test_loss"][2] == pytest.approx(probe_a.evaluate(mid, sets["test"], buffers)["loss"], rel=1e-6)
    # without model b's buffers only the parameters move: alpha 1 is b's parameters with a's statistics
    params_only = L.interpolate(probe_a, probe_a.params, probe_b.params, sets, [1.0], points_per_batch=1)
    assert params_only["test_loss"][0] == probe_a.evaluate(probe_b.params, sets["test"])["loss"]
    recal = L.interpolate(probe_a, probe_a.params, probe_b.params, sets, [0.0, 1.0], bn="recalibrate",
                          probe_b=probe_b)
    for i, probe in enumerate((probe_a, probe_b)):
        buffers = probe.recalibrated_buffers(probe.params, sets["train"])
        assert recal["test_loss"][i] == pytest.approx(probe.evaluate(probe.params, sets["test"], buffers)["loss"],
                                                      rel=1e-6)


# ------------------------------------------------------------------------------------------------ PCA
def planar_trajectory(m: int = 7, noise: float = 0.0, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(4, 5), (5,), (3, 2, 2), ()]
    final = [torch.randn(s, generator=generator) for s in shapes]
    size = sum(t.numel() for t in final)
    basis, _ = torch.linalg.qr(torch.randn(size, 2, generator=generator))
    u, v = basis[:, 0], basis[:, 1]
    a = torch.randn(m, generator=generator) * 3 + 1  # not centred: the plane passes through w_final
    b = torch.randn(m, generator=generator)
    points = []
    for i in range(m):
        offset = a[i] * u + b[i] * v + noise * torch.randn(size, generator=generator)
        points.append(paramspace.unflatten(paramspace.flatten(final) + offset, final))
    return final, points, u, v


def test_pca_recovers_a_planar_trajectory():
    final, trajectory, u, v = planar_trajectory()
    out = L.pca_directions(trajectory, final)
    d1, d2 = paramspace.flatten(out["d1"]), paramspace.flatten(out["d2"])
    assert [t.shape for t in out["d1"]] == [t.shape for t in final]
    torch.testing.assert_close(torch.stack([d1.norm(), d2.norm()]), torch.ones(2), rtol=1e-6, atol=1e-6)
    assert abs(torch.dot(d1, d2)) < 1e-5
    span = torch.stack([d1, d2], 1)
    for w in (u, v):  # u and v lie in span(d1, d2)
        torch.testing.assert_close(span @ (span.T @ w), w, rtol=0, atol=1e-5)
    ratio = out["explained_variance_ratio"]
    assert ratio.shape == (2,) and ratio.sum() == pytest.approx(1.0, abs=1e-6) and ratio[0] >= ratio[1]
    coords = out["trajectory"]
    assert coords.shape == (len(trajectory), 2)
    for point, (x, y) in zip(trajectory, coords):
        offset = paramspace.flatten(point) - paramspace.flatten(final)
        assert x == pytest.approx(torch.dot(offset, d1).item(), abs=1e-5)
        assert y == pytest.approx(torch.dot(offset, d2).item(), abs=1e-5)
        torch.testing.assert_close(x * d1 + y * d2, offset, rtol=0, atol=1e-5)  # the plane holds the whole path


def test_pca_matches_sklearn_on_a_noisy_trajectory():
    from sklearn.decomposition import PCA
    final, trajectory, _, _ = planar_trajectory(m=9, noise=0.3, seed=1)
    offsets = np.stack([(paramspace.flatten(p) - paramspace.flatten(final)).double().numpy() for p in trajectory])
    reference = PCA(n_components=2).fit(offsets)
    out = L.pca_directions(trajectory, final)
    np.testing.assert_allclose(out["explained_variance_ratio"], reference.explained_variance_ratio_, rtol=1e-5)
    for k, name in enumerate(("d1", "d2")):
        mine = paramspace.flatten(out[name]).double().numpy()
        theirs = reference.components_[k]
        np.testing.assert_allclose(mine * np.sign(mine @ theirs), theirs, atol=1e-5)
        np.testing.assert_allclose(out["trajectory"][:, k], offsets @ mine, rtol=1e-5, atol=1e-5)
    uncentred = L.pca_directions(trajectory, final, center=False)
    s = np.linalg.svd(offsets, compute_uv=False)
    np.testing.assert_allclose(uncentred["explained_variance_ratio"], s[:2] ** 2 / (s ** 2).sum(), rtol=1e-6)


def test_pca_needs_three_checkpoints_and_a_plane():
    final, trajectory, u, _ = planar_trajectory()
    with pytest.raises(ValueError, match="at least 3"):
        L.pca_directions(trajectory[:2], final)
    line = [paramspace.unflatten(paramspace.flatten(final) + t * u, final) for t in (1.0, 2.0, 3.0, 4.0)]
    with pytest.raises(ValueError, match="two dimensions"):
        L.pca_directions(line, final)
    ignored = L.pca_directions(trajectory, final, ignore_vectors=True)
    assert all(torch.count_nonzero(t) == 0 for t in ignored["d1"] if t.dim() <= 1)


# ------------------------------------------------------------------------------------------------ side effects
def test_model_and_global_rng_untouched():
    model_a, model_b = bn_mlp(7), bn_mlp(8)
    model_a.train()  # flags must come back as they were too
    before = {k: v.clone() for k, v in model_a.state_dict().items()}
    flags = [m.training for m in model_a.modules()]
    rng = torch.random.get_rng_state()
    probe_a, probe_b = Probe(model_a), Probe(model_b)
    sets = data()
    d1, d2 = L.random_direction(probe_a.params, 0), L.second_direction(probe_a.params, 0)
    L.landscape_2d(probe_a, probe_a.params, d1, d2, sets, [-1, 0, 1], [0, 1])
    L.landscape_2d(probe_a, probe_a.params, d1, d2, sets, [-1, 0, 1], [0, 1], points_per_batch=1)
    L.landscape_1d(probe_a, probe_a.params, d1, sets, [-1, 0, 1], bn="recalibrate")
    L.interpolate(probe_a, probe_a.params, probe_b.params, sets, [0, 0.5, 1], probe_b=probe_b)
    L.interpolate(probe_a, probe_a.params, probe_b.params, sets, [0, 0.5, 1], bn="recalibrate", probe_b=probe_b)
    after = model_a.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [m.training for m in model_a.modules()] == flags
    assert [m.momentum for m in model_a.modules() if isinstance(m, nn.BatchNorm1d)] == [0.1]
    assert torch.equal(torch.random.get_rng_state(), rng)
