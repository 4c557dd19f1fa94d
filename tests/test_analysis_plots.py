"""Landscape and curvature figures: each function writes a valid PNG (headless, no pyplot), non-finite values are
masked rather than fatal, and contour levels are log-spaced over the finite range."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from runner.analysis import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SETTINGS = "filter-normalized, BN eval, 2000 samples, seed 0"
NX, NY = 7, 5


def bowl() -> dict:
    """Z = x^2 + 2 y^2 + 0.1 on a non-square grid: Z has shape (ny, nx), rows follow y."""
    x = np.linspace(-1.0, 1.0, NX)
    y = np.linspace(-1.0, 1.0, NY)
    X, Y = np.meshgrid(x, y)
    Z = X**2 + 2 * Y**2 + 0.1
    return {"x": x, "y": y, "train_loss": Z, "test_loss": 1.2 * Z, "train_acc": 1 - Z / 4, "test_acc": 0.9 - Z / 4}


@pytest.fixture
def figures(monkeypatch) -> list:
    """The figures the plot functions save, in order (captured just before they are written)."""
    saved = []
    original = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: saved.append(fig) or original(fig, path))
    return saved


def suptitle(fig) -> str:
    return fig.get_suptitle() if hasattr(fig, "get_suptitle") else fig._suptitle.get_text()


def assert_png(path, written) -> np.ndarray:
    from matplotlib.image import imread

    assert written == path and path.is_file()
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    image = imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    assert image.shape[0] > 200 and image.shape[1] > 200
    assert image[..., :3].std() > 0.01  # something was drawn, not a blank canvas
    return image


# -------------------------------------------------------------------------------------------------- log_levels
def test_log_levels_are_geometric_and_cover_the_finite_range():
    z = bowl()["train_loss"].copy()
    z[0, 0], z[-1, -1], z[2, 1] = np.nan, np.inf, -np.inf
    finite = z[np.isfinite(z)]
    levels = plots.log_levels(z, 12)
    assert levels.shape == (12,)
    assert levels[0] == pytest.approx(finite.min()) and levels[-1] == pytest.approx(finite.max())
    ratios = levels[1:] / levels[:-1]
    np.testing.assert_allclose(ratios, ratios[0], rtol=1e-9)  # geometric: a constant ratio
    assert ratios[0] > 1


def test_log_levels_handle_a_zero_minimum_and_degenerate_inputs():
    z = np.array([[0.0, 0.5], [1.0, 3.0]])
    levels = plots.log_levels(z, 10)
    assert levels[0] == 0.0 and levels[-1] == 3.0 and np.all(np.diff(levels) > 0)
    assert np.all(np.diff(np.diff(levels)) > 0)  # still crowded toward the minimum
    np.testing.assert_array_equal(plots.log_levels(np.full(3, 2.0), 5), [2.0])
    with pytest.raises(ValueError):
        plots.log_levels(np.array([np.nan, np.inf]), 5)
    with pytest.raises(ValueError):
        plots.log_levels(z, 1)


# -------------------------------------------------------------------------------------------------- 2-D
def test_contour_writes_a_png_with_trajectory_into_a_new_folder(tmp_path):
    path = tmp_path / "new" / "dir" / "contour.png"
    trajectory = np.array([[0.8, 0.6], [0.5, 0.3], [0.2, 0.1], [0.05, 0.0]])
    assert_png(path, plots.plot_contour(bowl(), path, SETTINGS, trajectory=trajectory))
    other = tmp_path / "contour_test.png"
    assert_png(other, plots.plot_contour(bowl(), str(other), SETTINGS, split="test", levels=8))


def test_contour_survives_nan_and_inf(tmp_path):
    arrays = bowl()
    arrays["train_loss"][0, 0] = np.nan
    arrays["train_loss"][4, 6] = np.inf
    arrays["train_loss"][2, 0] = -np.inf
    path = tmp_path / "contour_nan.png"
    assert_png(path, plots.plot_contour(arrays, path, SETTINGS))
    # wholly diverged or constant planes still give a figure, with nothing to contour
    arrays["train_loss"][:] = np.nan
    assert_png(path, plots.plot_contour(arrays, path, SETTINGS))
    arrays["train_loss"][:] = 1.0
    assert_png(path, plots.plot_contour(arrays, path, SETTINGS))


def test_masked_count_goes_into_the_title(figures, tmp_path):
    arrays = bowl()
    arrays["train_loss"][0, 0], arrays["train_loss"][1, 1] = np.nan, np.inf
    plots.plot_contour(arrays, tmp_path / "c.png", SETTINGS)
    plots.plot_contour(bowl(), tmp_path / "c.png", SETTINGS)
    masked, clean = (suptitle(fig) for fig in figures)
    assert masked.startswith(SETTINGS) and "2 non-finite values masked" in masked
    assert clean == SETTINGS


def test_contour_rejects_a_transposed_grid(tmp_path):
    arrays = bowl()
    arrays["train_loss"] = arrays["train_loss"].T  # (nx, ny): x and y swapped
    with pytest.raises(ValueError, match="len\\(y\\), len\\(x\\)"):
        plots.plot_contour(arrays, tmp_path / "c.png", SETTINGS)
    with pytest.raises(KeyError, match="val_loss"):
        plots.plot_contour(bowl(), tmp_path / "c.png", SETTINGS, split="val")


def test_contour_is_oriented_x_along_columns(figures, tmp_path):
    """The bowl is wider along x (its y coefficient is larger): every closed level spans more x than y, and
    the x axis is d1."""
    from matplotlib.contour import ContourSet

    plots.plot_contour(bowl(), tmp_path / "c.png", SETTINGS, levels=12)
    (ax,) = [a for a in figures[0].axes if a.get_xlabel() == "d1"]
    assert ax.get_ylabel() == "d2"
    (cs,) = [c for c in ax.get_children() if isinstance(c, ContourSet)]
    ratios = []
    for segments in cs.allsegs[1:6]:  # low levels: closed ellipses inside the grid
        vertices = np.concatenate(segments)
        width, height = np.ptp(vertices, axis=0)
        ratios.append(width / height)
    assert min(ratios) > 1.2  # sqrt(2) for the exact ellipses; a coarse grid blurs it a little


def test_a_long_thin_plane_is_not_a_strip_and_the_legend_is_off_the_trajectory(figures, tmp_path):
    """A PCA plane: the first direction spans 20x the second. Equal units would draw a thin strip; the panel
    keeps a sensible shape (the title says the axes are scaled differently) and the legend is outside the panel,
    so it never covers the trajectory's start. A round bowl keeps equal units."""
    x, y = np.linspace(-10.0, 2.0, 21), np.linspace(-0.3, 0.3, 11)
    X, Y = np.meshgrid(x, y)
    arrays = {"x": x, "y": y, "train_loss": 0.01 * X**2 + 10 * Y**2 + 0.1}
    trajectory = np.array([[-9.0, 0.25], [-6.0, 0.1], [-3.0, -0.1], [-1.0, 0.05], [0.0, 0.0]])
    plots.plot_contour(arrays, tmp_path / "pca.png", SETTINGS, trajectory=trajectory)
    plots.plot_contour(bowl(), tmp_path / "bowl.png", SETTINGS)
    for fig, scaled in zip(figures, (True, False)):
        (ax,) = [a for a in fig.axes if a.get_xlabel() == "d1"]
        box = ax.get_window_extent()
        assert 0.4 < box.height / box.width < 2.5, (box.height, box.width)
        assert ax.get_legend() is None and len(fig.legends) == 1
        legend = fig.legends[0].get_window_extent()
        assert not legend.overlaps(box)  # below the panel, not over the data
        assert ("axes scaled differently" in suptitle(fig)) == scaled
    assert figures[1].axes[0].get_aspect() == 1.0  # equal units where the ranges are alike


def test_plot_curve_labels_the_threshold_with_its_formula(figures, tmp_path):
    steps = np.arange(5)
    label = "2(1+β)/η, heavy-ball momentum β=0.9"
    plots.plot_curve(steps, {"lambda_max": [1, 2, 3, 4, 5], label: 3.8 / 0.05}, tmp_path / "k.png", SETTINGS, "y",
                     threshold=label)
    (dashed,) = [line for line in figures[0].axes[0].get_lines() if line.get_linestyle() == "--"]
    assert dashed.get_label() == f"{label} (stability threshold)"
    assert np.allclose(dashed.get_ydata(), 76.0)


def test_surface_writes_a_png_even_with_holes(tmp_path):
    path = tmp_path / "surface.png"
    assert_png(path, plots.plot_surface(bowl(), path, SETTINGS))
    arrays = bowl()
    arrays["train_loss"][0, 0], arrays["train_loss"][3, 3] = np.nan, np.inf
    assert_png(path, plots.plot_surface(arrays, path, SETTINGS))


# -------------------------------------------------------------------------------------------------- 1-D
def test_plot_1d_slice_with_all_splits_and_a_diverged_point(tmp_path):
    x = np.linspace(-1, 1, 21)
    arrays = {"x": x}
    for split, offset in (("train", 0.05), ("val", 0.2), ("test", 0.25)):
        arrays[f"{split}_loss"] = x**2 + offset
        arrays[f"{split}_acc"] = 1 - x**2 / 2 - offset
    arrays["train_loss"][3] = np.inf
    arrays["test_acc"][4] = np.nan
    path = tmp_path / "slice.png"
    image = assert_png(path, plots.plot_1d(arrays, path, SETTINGS))
    assert image.shape[1] > image.shape[0]  # two panels side by side


def test_plot_1d_interpolation(tmp_path, monkeypatch):
    alpha = np.linspace(-0.5, 1.5, 21)
    barrier = (alpha * (alpha - 1)) ** 2
    arrays = {"alpha": alpha, "train_loss": barrier + 0.05, "test_loss": barrier + 0.3,
              "train_acc": 1 - barrier, "test_acc": 0.9 - barrier}
    xlabels = []
    from matplotlib.axes import Axes
    original = Axes.set_xlabel
    monkeypatch.setattr(Axes, "set_xlabel", lambda self, label, *a, **k: xlabels.append(label) or
                        original(self, label, *a, **k))
    path = tmp_path / "interp.png"
    assert_png(path, plots.plot_1d(arrays, path, "sgd seed 0 -> sam seed 0"))
    assert xlabels and set(xlabels) == {"alpha (0 = a, 1 = b)"}


def test_plot_1d_with_loss_only_and_nonpositive_values(tmp_path):
    x = np.linspace(-1, 1, 9)
    path = tmp_path / "loss_only.png"
    image = assert_png(path, plots.plot_1d({"x": x, "train_loss": x**2}, path, SETTINGS))  # 0 -> linear axis
    assert image.shape[1] < 1.6 * image.shape[0]  # one panel
    with pytest.raises(ValueError):
        plots.plot_1d({"x": x, "train_loss": x[:-1]}, path, SETTINGS)
    with pytest.raises(KeyError):
        plots.plot_1d({"x": x}, path, SETTINGS)


# -------------------------------------------------------------------------------------------------- curves
def test_plot_curve_with_stability_threshold(tmp_path):
    steps = np.arange(0, 1000, 20)
    lam = np.minimum(steps / 10, 40.0) + np.sin(steps / 30)
    lam[5] = np.nan
    path = tmp_path / "lambda_max.png"
    assert_png(path, plots.plot_curve(steps, {"lambda_max": lam, "2/lr": 2 / 0.05}, path, SETTINGS,
                                      "top Hessian eigenvalue"))
    assert_png(path, plots.plot_curve(steps, {"lambda_max": lam, "2/lr": np.full(len(steps), 40.0)}, path,
                                      SETTINGS, "top Hessian eigenvalue", log=True))
    with pytest.raises(ValueError):
        plots.plot_curve(steps, {"lambda_max": lam[:-1]}, path, SETTINGS, "y")


def test_no_pyplot_needed(monkeypatch, tmp_path):
    """The figures are drawn without pyplot, so a user's backend and pyplot's figure registry are left alone:
    with pyplot made unimportable, every function still works."""
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)  # `import matplotlib.pyplot` now raises
    with pytest.raises(ImportError):
        import matplotlib.pyplot  # noqa: F401
    x = np.linspace(-1, 1, 5)
    plots.plot_contour(bowl(), tmp_path / "c.png", SETTINGS)
    plots.plot_surface(bowl(), tmp_path / "s.png", SETTINGS)
    plots.plot_1d({"x": x, "train_loss": x**2 + 1}, tmp_path / "1d.png", SETTINGS)
    plots.plot_curve([0, 1], {"a": [1, 2], "2/lr": 3}, tmp_path / "k.png", SETTINGS, "y")
    assert len(list(tmp_path.glob("*.png"))) == 4
