"""The report renders in headless Chromium: the screenshot is a real page (text, the chosen row's highlight, the
plots' colours, the collapsed block's frame), not a blank or error page. Skipped when no Chromium is installed
(``make test`` installs it from Debian's packages where it can)."""
import numpy as np
import pytest
from matplotlib import image

from fxopt.report.html import write_html
from fxopt.report.screenshot import chromium_binary, screenshot
from tests.report.report_models import full_report

pytestmark = pytest.mark.skipif(chromium_binary() is None,
                                reason="no chromium on PATH: install it (apt-get install chromium) to render the "
                                       "HTML report in a browser; `make test` tries that")
WIDTH, HEIGHT = 1300, 3200
CHOSEN_ROW = (0xFE, 0xFC, 0xBF)  # tr.chosen's background in the stylesheet
BLOCK_FRAME = (0x6B, 0x46, 0xC1)  # the collapsed block's dashed frame in the graph SVG
COMPUTE_BAR = (0x2B, 0x6C, 0xB0)  # a linear's bar in the per-layer chart, its box outline in the graph


def pixels_near(rgb: np.ndarray, colour, tolerance: int = 6) -> int:
    return int((np.abs(rgb.astype(int) - np.array(colour)).max(axis=-1) <= tolerance).sum())


def test_report_renders_in_headless_chromium(tmp_path):
    report, quantized = full_report()
    html = write_html(report, tmp_path / "report.html", graph_after=quantized)
    png = screenshot(html, tmp_path / "report.png", WIDTH, HEIGHT)
    rgb = (image.imread(png)[..., :3] * 255).round().astype(np.uint8)
    assert rgb.shape[:2] == (HEIGHT, WIDTH)
    not_white = (rgb < 245).any(axis=-1).mean()
    assert 0.02 < not_white < 0.6, not_white  # ink on a white page, neither blank nor a solid block
    assert rgb.std() > 20 and len(np.unique(rgb.reshape(-1, 3), axis=0)) > 200
    assert pixels_near(rgb, CHOSEN_ROW) > 2000  # the highlighted chosen-candidate row
    assert pixels_near(rgb, BLOCK_FRAME) > 200  # the x3 block of the graph drawings
    assert pixels_near(rgb, COMPUTE_BAR) > 1000  # bars of the per-layer error chart and the Pareto points


def test_screenshot_of_a_missing_page_is_a_clear_error(tmp_path):
    from fxopt.errors import InputError
    with pytest.raises(InputError, match="screenshot: .*nothing.html is not a file; write the report first"):
        screenshot(tmp_path / "nothing.html", tmp_path / "x.png")
