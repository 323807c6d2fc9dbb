"""report.html and table.html rendered in a real headless browser (Debian's chromium).

`.ci/run` installs chromium when it is missing; where it is not installed the test is skipped
with that instruction. The DOM the browser builds must hold every section and the sample rows,
and its screenshot must not be blank.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.common import _fake_result, _stage_cfg

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def _browser() -> str:
    for name in BROWSERS:
        if path := shutil.which(name):
            return path
    pytest.skip("no headless browser: install Debian's chromium (`apt-get install chromium`; .ci/run does)")


def _render(page: Path, shot: Path) -> str:
    """The DOM after the browser loaded ``page``, and a screenshot of it into ``shot``."""
    browser = _browser()
    common = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    dom = subprocess.run([*common, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    p = subprocess.run([*common, "--window-size=1200,1600", f"--screenshot={shot}", page.as_uri()],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and shot.exists(), p.stderr[-2000:]
    return dom.stdout


def _not_blank(shot: Path) -> None:
    import matplotlib.image as mpimg

    img = mpimg.imread(shot)[..., :3]
    ink = (img < 0.9).any(axis=-1).mean()  # share of pixels that are not (near) white
    assert img.std() > 0.05 and ink > 0.02, (img.std(), ink)


def _rows(dom: str, table_id: str) -> int:
    m = re.search(rf'<table id="{table_id}">(.*?)</table>', dom, re.S)
    assert m, f"no table #{table_id}"
    return len(re.findall(r"<tr[ >]", m.group(1).split("</thead>", 1)[1]))


def test_selection_report_in_a_browser(tmp_path):
    from resofilter.commands import select as select_cmd

    cfg, pool = _stage_cfg(tmp_path, "scorer=loss", "selection.keep_ratio=0.5", "selection.report.k=3")
    select_cmd(cfg)
    page = tmp_path / "out" / "report.html"
    assert "data:image/png;base64," in page.read_text()  # self-contained: plots inlined
    dom = _render(page, tmp_path / "report.png")
    for sid in ("summary", "histogram", "noise", "groups", "confounds", "highest", "lowest"):
        assert f'<section id="{sid}">' in dom, sid
    assert _rows(dom, "highest-samples") == 3 and _rows(dom, "lowest-samples") == 3
    # loss puts the noisy samples (s0, s3, s6: loss ≈ 1) first, and they were dropped
    top = re.search(r'<table id="highest-samples">(.*?)</table>', dom, re.S).group(1)
    assert all(f"<td>s{i}</td>" in top for i in (0, 3, 6)) and top.count('class="dropped"') == 3
    assert "r0" in top  # the response excerpt of a dropped sample
    _not_blank(tmp_path / "report.png")


def test_table_report_in_a_browser(tmp_path):
    from resofilter.reporting.table import write_table

    for i, (variant, seed, acc) in enumerate([("full", 0, 0.30), ("full", 1, 0.34), ("resofilter", 0, 0.28),
                                              ("resofilter", 1, 0.31)]):
        _fake_result(tmp_path / "sweep" / str(i), variant, seed, {"math_synth": acc})
    result = write_table(tmp_path / "sweep")
    page = tmp_path / "sweep" / "table.html"
    dom = _render(page, tmp_path / "table.png")
    assert '<section id="table">' in dom and '<section id="plot">' in dom
    assert _rows(dom, "results") == len(result["rows"]) == 2
    assert "data:image/png;base64," in dom
    _not_blank(tmp_path / "table.png")
    full = next(r for r in result["rows"] if r["variant"] == "full")
    assert np.isclose(full["acc/math_synth mean"], 0.32)  # (0.30 + 0.34) / 2, as the page shows it
    assert "0.32" in re.search(r'<table id="results">(.*?)</table>', dom, re.S).group(1)


def test_distinct_digits_by_hand():
    from resofilter.reporting.html import distinct_digits

    assert distinct_digits([1.0, 2.0]) == 4  # never fewer than 4
    assert distinct_digits([9.99912e-06, 9.99897e-06]) == 5  # 9.9991e-06 vs 9.999e-06 (9.9990e-06)
    assert distinct_digits([1.0000001, 1.0000002, 1.0000002]) == 8  # equal values need not differ
    assert distinct_digits([float("nan"), 3.0]) == 4


def test_report_scores_differ_between_neighbouring_rows(tmp_path):
    """ResoFilter scores differ in the 5th-6th digit (relative spread ~1e-4): at 4 significant digits
    every row of the sample tables read 9.999e-06. The rendered rows must differ, and say how far
    each is from the median."""
    from resofilter.commands import select as select_cmd

    scores = 9.999e-06 * (1 + np.arange(9) * 1.3e-6)  # neighbours 1.3e-11 apart: the 7th digit
    cfg, _ = _stage_cfg(tmp_path, "selection.keep_ratio=0.5", "selection.report.k=4", mean_abs=scores)
    select_cmd(cfg)
    dom = _render(tmp_path / "out" / "report.html", tmp_path / "report.png")
    for table_id in ("highest-samples", "lowest-samples"):
        body = re.search(rf'<table id="{table_id}">(.*?)</table>', dom, re.S).group(1)
        header = re.findall(r"<th>(.*?)</th>", body)
        assert header[2:4] == ["score", "score / median − 1"]
        rows = body.split("</thead>", 1)[1].split("<tr")[1:]
        cells = [re.findall(r'<td class="num">(.*?)</td>', row) for row in rows]  # rank, score, relative, …
        shown = [float(c[1]) for c in cells]
        assert len(set(shown)) == 4, shown
        # each printed score rounds to a distinct true score, and its relative offset is exact to 3 digits
        for c in cells:
            true = min(scores, key=lambda v: abs(v - float(c[1])))
            assert abs(float(c[1]) - true) < 1.3e-11 / 2
            assert float(c[2]) == pytest.approx(true / np.median(scores) - 1, rel=2e-3)
