"""Every plot rendered from known data and read back as a PNG: size, and colours where the
points, cells and bars must be (matplotlib Agg)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

matplotlib.use("Agg")

from diffeat.core.errors import DiffeatError
from diffeat.core.features import FeatureSet
from diffeat.eval.plots import (
    CORRECT,
    WRONG,
    category_bars_figure,
    curve_alphas,
    pck_vs_alpha_figure,
    qualitative_figure,
    save,
    write_plots,
)
from diffeat.viz import REJECTED, match_colors, match_figure, plot_matches, rejection_reasons
from diffeat.viz_features import feature_figure, feature_map, pca_rgb

BACKGROUND = (60, 60, 60)


def rgb(color) -> tuple[int, int, int]:
    """A matplotlib colour as 0-255 RGB."""
    r, g, b, _ = matplotlib.colors.to_rgba(color)
    return round(255 * r), round(255 * g), round(255 * b)


def close(a, b, tol: int = 30) -> bool:
    return all(abs(int(x) - int(y)) <= tol for x, y in zip(a[:3], b[:3]))


def png_of(fig, path: Path) -> Image.Image:
    """Save ``fig`` the way the library does and read it back as RGB."""
    save(fig, path)
    with Image.open(path) as im:
        return im.convert("RGB")


def pixel_of(fig, ax, x: float, y: float) -> tuple[int, int]:
    """The PNG pixel (column, row) where data point (x, y) of ``ax`` lands."""
    fig.canvas.draw()
    dx, dy = ax.transData.transform((x, y))
    height = fig.get_size_inches()[1] * fig.dpi
    return int(dx), int(height - dy)


def colours_in(image: Image.Image, box: tuple[int, int, int, int]) -> np.ndarray:
    return np.asarray(image.crop(box)).reshape(-1, 3)


def has_colour(image: Image.Image, box, colour, tol: int = 25) -> bool:
    pixels = colours_in(image, box).astype(int)
    return bool((np.abs(pixels - np.array(colour)).max(axis=1) <= tol).any())


# -- match plots ------------------------------------------------------------------------------


def test_rejection_reasons_come_from_the_matcher():
    assert rejection_reasons([True, False]) == [None, REJECTED]
    assert rejection_reasons([True, False], {"reason": "not mutual"}) == [None, "not mutual"]
    per_point = {"reason": ["", "ratio 0.93 > 0.8", "low score"]}
    assert rejection_reasons([False, False, True], per_point) == [
        REJECTED,
        "ratio 0.93 > 0.8",
        None,
    ]


def test_mutual_matcher_says_why_it_rejects():
    from diffeat.core.components import View
    from diffeat.core.geometry import ImageTransform
    from diffeat.plugins.matchers import Mutual

    torch.manual_seed(3)

    def view(desc, size):
        return View(Image.new("RGB", size), ImageTransform.resize(size, size), descriptors=desc)

    src, tgt = view(torch.randn(8, 6, 6), (6, 6)), view(torch.randn(8, 6, 6), (6, 6))
    pts = torch.tensor([[x, y] for x in range(6) for y in range(6)], dtype=torch.float32)
    result = Mutual().match(src, tgt, pts)
    reasons = rejection_reasons(result.valid.tolist(), result.extras)
    assert not result.valid.all() and result.valid.any()
    assert {r for r in reasons if r is not None} == {"not mutual"}
    assert [r is None for r in reasons] == result.valid.tolist()


def test_match_plot_points_lines_scores_and_reasons(tmp_path):
    source = Image.new("RGB", (90, 60), BACKGROUND)
    target = Image.new("RGB", (70, 60), BACKGROUND)
    src_pts = [(10, 10), (40, 30), (80, 50)]
    tgt_pts = [(60, 10), (20, 40), (5, 50)]
    valid = [True, False, False]
    reasons = [None, "not mutual", REJECTED]
    fig, layout = match_figure(
        source, target, src_pts, tgt_pts, valid=valid, scores=[0.9, 0.5, 0.25], reasons=reasons
    )
    legends = [*fig.axes[1].artists, fig.axes[1].get_legend()]
    texts = [t.get_text() for legend in legends for t in legend.get_texts()]
    plt_close(fig)
    png = plot_matches(
        source,
        target,
        src_pts,
        tgt_pts,
        tmp_path / "m.png",
        valid=valid,
        scores=[0.9, 0.5, 0.25],
        reasons=reasons,
    )
    with Image.open(png) as im:
        image = im.convert("RGB")
    assert image.size == layout.size and layout.scale >= 3
    colours = [rgb(c) for c in match_colors(3)]
    for i in range(3):
        assert close(image.getpixel(layout.source_pixel(*src_pts[i])), colours[i])
        assert close(image.getpixel(layout.target_pixel(*tgt_pts[i])), colours[i])
        # each match has a legend entry in its colour below the images
        legend = (0, layout.size[1] - layout.legend_height, layout.size[0], layout.size[1])
        assert has_colour(image, legend, colours[i])
    # away from points and lines the images are untouched
    assert image.getpixel(layout.source_pixel(2, 55)) == BACKGROUND
    joined = " | ".join(texts)
    assert "1  score 0.900" in joined and "(not mutual)" not in texts[0]
    assert "2  score 0.500  (not mutual)" in joined and "3  score 0.250  (rejected)" in joined
    assert "rejected by the matcher" in joined


def plt_close(fig) -> None:
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_match_plot_without_scores_and_many_points(tmp_path):
    img = Image.new("RGB", (40, 30), BACKGROUND)
    pts = [(i % 40, i % 30) for i in range(50)]
    fig, layout = match_figure(img, img, pts, pts)
    texts = [t.get_text() for t in fig.axes[1].artists[0].get_texts()]
    plt_close(fig)
    assert texts[0] == "1" and texts[-1] == "... 10 more" and len(texts) == 41
    assert layout.size[0] == 90 * layout.scale


# -- evaluation plots ---------------------------------------------------------------------------


def _evaluation(tmp_path: Path, categories=("cat", "dog"), long_id: str = ""):
    """Two pairs per category on grey images; keypoint 1 predicted exactly, keypoint 2 far
    off: 50 % PCK at every alpha, per image and per point alike."""
    from diffeat.core.datasets import Pair
    from diffeat.eval.protocols import get_protocol
    from diffeat.eval.runner import Evaluation, PairOutcome, RunStats, score

    image = tmp_path / "grey.png"
    Image.new("RGB", (80, 60), BACKGROUND).save(image)
    outcomes = []
    for cat in categories:
        for k in range(2):
            src = np.array([[20.0, 20.0], [60.0, 40.0]])
            gt = np.array([[30.0, 25.0], [50.0, 30.0]])
            pred = np.array([[30.0, 25.0], [5.0, 55.0]])
            pair = Pair(
                long_id or f"{cat}-{k}",
                image,
                image,
                cat,
                src,
                gt,
                source_bbox=(0, 0, 80, 60),
                target_bbox=(0, 0, 80, 60),
            )
            outcomes.append(PairOutcome(pair, pred, np.ones(2), np.ones(2, bool), 0.0))
    protocol = get_protocol("dift")
    kinds, per_pair, summaries = score(outcomes, protocol, "synthetic")
    return Evaluation(
        "synthetic", {}, protocol, protocol.alphas, kinds, outcomes, RunStats(), summaries, per_pair
    )


def test_pck_vs_alpha_equal_curves_stay_visible(tmp_path):
    ev = _evaluation(tmp_path)
    fig = pck_vs_alpha_figure(ev)
    ax = fig.axes[0]
    alphas = curve_alphas(ev)
    legend = ax.get_legend()
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels == ["bbox-target, per image", "bbox-target, per point"]
    assert "T = target box side" in legend.get_title().get_text()
    colours = [rgb(h.get_color()) for h in legend.legend_handles]
    assert colours[0] != colours[1]
    markers = [h.get_marker() for h in legend.legend_handles]
    styles = [h.get_linestyle() for h in legend.legend_handles]
    assert styles == ["-", "--"] and all(m not in (None, "None", "") for m in markers)
    # the two curves are equal (50 % everywhere): per-image markers on even alphas, per-point
    # markers on odd ones, so both colours show on the shared curve
    at = [pixel_of(fig, ax, alphas[i], 50.0) for i in (2, 3, 4, 5)]
    image = png_of(fig, tmp_path / "pck.png")
    assert image.size == (640, 420)
    assert close(image.getpixel(at[0]), colours[0]) and close(image.getpixel(at[2]), colours[0])
    assert close(image.getpixel(at[1]), colours[1]) and close(image.getpixel(at[3]), colours[1])


def test_category_bars_and_one_category_is_skipped(tmp_path):
    ev = _evaluation(tmp_path)
    fig = category_bars_figure(ev)
    ax = fig.axes[0]
    # per image bar of category 0 (x = -0.2), half height (50 %)
    where = pixel_of(fig, ax, -0.2, 25.0)
    image = png_of(fig, tmp_path / "bars.png")
    assert close(image.getpixel(where), rgb("C0"))
    out = tmp_path / "two"
    out.mkdir()
    assert [p.name for p in write_plots(ev, out)] == [
        "pck_vs_alpha.png",
        "categories.png",
        "qualitative.png",
    ]
    single = _evaluation(tmp_path, categories=("cat",))
    # a stale categories.png of an earlier run goes: results.md would not show it
    assert [p.name for p in write_plots(single, out)] == ["pck_vs_alpha.png", "qualitative.png"]
    assert not (out / "categories.png").exists()


def test_qualitative_numbers_colours_legend_and_whole_titles(tmp_path):
    long_id = "a-rather-long-pair-identifier-" * 3 + "end"
    ev = _evaluation(tmp_path, categories=("cat",), long_id=long_id)
    fig = qualitative_figure(ev)
    ax_s, ax_t = fig.axes[0], fig.axes[1]
    # keypoint 1 correct, 2 wrong: in the source at the source points, in the target at the
    # predictions
    spots = [
        (pixel_of(fig, ax_s, 20, 20), CORRECT),
        (pixel_of(fig, ax_s, 60, 40), WRONG),
        (pixel_of(fig, ax_t, 30, 25), CORRECT),
        (pixel_of(fig, ax_t, 5, 55), WRONG),
    ]
    numbers = sorted(t.get_text() for t in ax_s.texts)
    title = ax_s.title
    fig.canvas.draw()
    title_box = title.get_window_extent()
    fig_box = fig.bbox
    legend_texts = [t.get_text() for t in fig.legends[0].get_texts()]
    image = png_of(fig, tmp_path / "q.png")
    for where, colour in spots:
        assert close(image.getpixel(where), rgb(colour)), (where, colour)
    assert numbers == ["1", "2"]
    assert title.get_text().replace("\n", "") == f"cat: {long_id}"  # whole, wrapped
    assert fig_box.x0 <= title_box.x0 and title_box.x1 <= fig_box.x1
    assert legend_texts == ["correct", "wrong", "ground truth"]


# -- mixing weights -----------------------------------------------------------------------------


def _network(weights: list[float] | None):
    from diffeat.plugins.hyperfeatures.network import AggregationNetwork

    net = AggregationNetwork(
        [("a", 4), ("b", 4)], [10, 500], projection_dim=8, norm_groups=2, size=(8, 8)
    )
    if weights is not None:
        with torch.no_grad():
            net.mixing_weights.copy_(torch.tensor(weights))
    return net


def _cell_pixel(fig, ax, row: int, col: int) -> tuple[int, int]:
    return pixel_of(fig, ax, col + 0.35, row + 0.35)  # off centre: the value is written there


def test_mixing_weights_colour_scale_fits_the_weights(tmp_path):
    from diffeat.plugins.hyperfeatures.plot import mixing_weights_figure

    # mixing weights are ordered timestep-major: (t0: a, b), (t1: a, b); grid is [layer, t]
    net = _network([2.0, 0.0, 0.5, 0.1])
    grid = net.mixing_weight_grid().numpy()
    fig = mixing_weights_figure(net)
    ax = fig.axes[0]
    top = np.unravel_index(grid.argmax(), grid.shape)
    low = np.unravel_index(grid.argmin(), grid.shape)
    spots = [_cell_pixel(fig, ax, *top), _cell_pixel(fig, ax, *low)]
    values = sorted(t.get_text() for t in ax.texts)
    image = png_of(fig, tmp_path / "w.png")
    viridis = matplotlib.colormaps["viridis"]
    assert close(image.getpixel(spots[0]), rgb(viridis(1.0)), 12)
    assert close(image.getpixel(spots[1]), rgb(viridis(0.0)), 12)
    assert values == sorted(f"{v:.3f}" for v in grid.ravel())


def test_mixing_weights_of_an_untrained_network_and_tiny_cells(tmp_path):
    from diffeat.plugins.hyperfeatures.network import AggregationNetwork
    from diffeat.plugins.hyperfeatures.plot import mixing_weights_figure

    fig = mixing_weights_figure(_network(None))
    ax = fig.axes[0]
    spot = _cell_pixel(fig, ax, 0, 0)
    assert "all equal (0.25)" in ax.get_title()
    assert [t.get_text() for t in ax.texts] == ["0.250"] * 4
    image = png_of(fig, tmp_path / "flat.png")
    assert close(image.getpixel(spot), rgb(matplotlib.colormaps["viridis"](0.5)), 12)
    many = AggregationNetwork(
        [(f"layer{i}", 4) for i in range(3)],
        list(range(0, 1000, 25)),
        projection_dim=8,
        norm_groups=2,
        size=(8, 8),
    )
    crowded = mixing_weights_figure(many)
    assert len(crowded.axes[0].texts) == 0  # 40 columns: no room for values
    plt_close(crowded)


# -- feature maps -------------------------------------------------------------------------------


def _halves(channels: int = 6, h: int = 4, w: int = 8) -> torch.Tensor:
    """Left half one vector, right half another, plus a small vertical ramp."""
    g = torch.Generator().manual_seed(0)
    a, b, ramp = (torch.randn(channels, generator=g) for _ in range(3))
    x = torch.empty(channels, h, w)
    x[:, :, : w // 2] = a[:, None, None]
    x[:, :, w // 2 :] = b[:, None, None]
    x += 0.1 * ramp[:, None, None] * torch.linspace(0, 1, h)[None, :, None]
    return x


def test_pca_rgb_is_normalised_deterministic_and_separates_regions():
    x = _halves()
    out, explained = pca_rgb(x)
    assert out.shape == (4, 8, 3) and out.min() >= 0 and out.max() <= 1
    assert explained[0] > 0.9 and len(explained) == 2  # two directions of variance only
    # the first component splits left from right; the third colour has nothing to show
    assert abs(out[0, 0, 0] - out[0, -1, 0]) > 0.95
    assert np.all(out[..., 2] == 0)
    # the same cells, scaled, shifted or with channels reordered, give the same picture
    again, _ = pca_rgb(3 * x[torch.randperm(6)] + 1)
    assert np.allclose(out, again)
    flat, none = pca_rgb(torch.ones(3, 2, 2))
    assert np.all(flat == 0) and none == []


def test_feature_map_picks_layer_and_timestep_and_names_the_choices():
    fs = FeatureSet({"up": torch.stack([_halves(), _halves() * 2])}, (100, 500))
    fmap = feature_map(fs, "up", 500)
    assert (fmap.layer, fmap.timestep, fmap.channels, fmap.grid) == ("up", 500, 6, (4, 8))
    assert feature_map(fs).timestep == 100
    with pytest.raises(DiffeatError, match="no layer 'down'; the features have: up"):
        feature_map(fs, "down")
    with pytest.raises(DiffeatError, match="no timestep 7 in layer 'up'; there are: 100, 500"):
        feature_map(fs, "up", 7)


def test_feature_figure_draws_the_pca_colours_beside_the_image(tmp_path):
    fs = FeatureSet({"up": _halves()[None]}, (0,))
    fmap = feature_map(fs)
    image = Image.new("RGB", (64, 32), BACKGROUND)
    fig = feature_figure(image, fmap)
    ax_i, ax_f = fig.axes
    spots = {(r, c): pixel_of(fig, ax_f, c, r) for r, c in ((1, 1), (2, 6))}
    photo = pixel_of(fig, ax_i, 32, 16)
    png = png_of(fig, tmp_path / "f.png")
    for (r, c), where in spots.items():
        assert close(png.getpixel(where), tuple(round(255 * v) for v in fmap.rgb[r, c]), 3)
    assert png.getpixel(photo) == BACKGROUND
    assert spots[(1, 1)][0] > photo[0]  # the map is right of the image


def _color_blur_config(tmp_path: Path) -> Path:
    cfg = tmp_path / "blur.toml"
    cfg.write_text('[extractor]\nplugin = "color-blur"\nimage_size = [32, 32]\nstride = 4\n')
    return cfg


def run_main(*args) -> int:
    from diffeat.cli.main import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    return exit_info.value.code


def test_plot_features_command(manager, tmp_path, capsys):
    from diffeat.testing import smooth_texture

    cfg = _color_blur_config(tmp_path)
    photo = tmp_path / "photo.png"
    smooth_texture((48, 40), seed=1).save(photo)
    png, store = tmp_path / "f.png", tmp_path / "feats.zarr"
    args = ("plot", "features", cfg, photo, "--out", png, "--store", store)
    assert run_main(*args, "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["layer"] == "color" and report["timestep"] == 0
    assert report["extractor"] == "color-blur"
    assert report["channels"] == 9 and report["grid"] == [8, 8] and not report["from_store"]
    with Image.open(png) as im:
        assert im.width > im.height > 100
    assert run_main(*args) == 0  # read back from the store this time
    assert "color @ t=0, 9 channels on 8x8 cells" in capsys.readouterr().out
    assert run_main(*args, "--json") == 0
    assert json.loads(capsys.readouterr().out)["from_store"]
    assert run_main(*args, "--layer", "nope") == 2
    assert "error: no layer 'nope'; the features have: color" in capsys.readouterr().err
    assert run_main(*args, "--extractor", "other") == 2
    assert "has no extractor named 'other'; it has: color-blur" in capsys.readouterr().err
    assert run_main("plot", "features", cfg, photo, "--out", tmp_path / "no" / "f.png") == 2
    assert "the folder" in capsys.readouterr().err


def test_match_command_labels_only_rejections_and_with_the_matchers_reason(
    manager, tmp_path, capsys
):
    from diffeat.testing import smooth_texture

    cfg = _color_blur_config(tmp_path)
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    smooth_texture((40, 40), seed=1).save(a)
    smooth_texture((40, 40), seed=2).save(b)
    points = [arg for p in ("4,4", "20,20", "36,8", "10,30", "30,34", "2,20") for arg in ("-p", p)]
    args = ("match", cfg, a, b, *points, "--set", 'matcher.plugin="mutual"')
    assert run_main(*args, "--json", "--plot", tmp_path / "m.png") == 0
    matches = json.loads(capsys.readouterr().out)["matches"]
    assert any(m["valid"] for m in matches) and not all(m["valid"] for m in matches)
    assert all(m.get("reason") == (None if m["valid"] else "not mutual") for m in matches)
    assert run_main(*args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.endswith("(not mutual)") for line in lines] == [not m["valid"] for m in matches]
    # a matcher that rejects nothing gets no label
    assert run_main("match", cfg, a, b, *points) == 0
    assert all(line.split()[-2] == "score" for line in capsys.readouterr().out.splitlines())


def test_the_docs_show_one_figure_of_each_plot_kind():
    """tools/render_doc_figures.py writes them; each is referenced and stays small."""
    import re

    docs = Path(__file__).resolve().parents[1] / "docs"
    referenced = {
        name
        for page in docs.glob("*.md")
        for name in re.findall(r"\]\(figures/([\w.-]+\.png)\)", page.read_text())
    }
    kinds = {
        "match.png",
        "features.png",
        "pck_vs_alpha.png",
        "categories.png",
        "qualitative.png",
        "mixing_weights.png",
    }
    assert kinds <= referenced
    for name in referenced:
        path = docs / "figures" / name
        assert path.stat().st_size < 200_000, name
        with Image.open(path) as im:
            assert im.format == "PNG" and max(im.size) <= 1000


def test_match_plot_with_an_unmatched_point(tmp_path):
    img = Image.new("RGB", (60, 40), BACKGROUND)
    nan = float("nan")
    fig, layout = match_figure(
        img,
        img,
        [(5, 5), (30, 20)],
        [(nan, nan), (31, 21)],
        valid=[False, True],
        scores=[nan, 0.5],
        reasons=["no match", None],
    )
    texts = [t.get_text() for t in fig.axes[1].artists[0].get_texts()]
    image = png_of(fig, tmp_path / "nan.png")
    assert texts == ["1  (no match)", "2  score 0.500"]
    colours = [rgb(c) for c in match_colors(2)]
    assert close(image.getpixel(layout.source_pixel(5, 5)), colours[0])
    assert close(image.getpixel(layout.target_pixel(31, 21)), colours[1])
    with pytest.raises(ValueError, match="2 points but 1 scores"):
        match_figure(img, img, [(5, 5), (30, 20)], [(5, 5), (31, 21)], scores=[0.5])
