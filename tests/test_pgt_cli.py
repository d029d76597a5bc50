"""``reparam pgt`` writes a PNG, prints the table and exits 0; bad alphas exit non-zero."""
from __future__ import annotations

import pytest

from reparam.cli import main


def test_pgt_cli_writes_png(tmp_path, capsys):
    out = tmp_path / "fig2.png"
    assert main(["pgt", "--alpha", "0.25", "--plot", str(out)]) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    text = capsys.readouterr().out
    assert "threshold" in text and "0.25" in text


def test_pgt_cli_several_alphas_and_table_values(capsys):
    assert main(["pgt", "--alpha", "0", "0.5", "1", "--probs", "0.5", "0.3", "0.2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {float(line.split()[0]): line.split()[1:] for line in lines if line.strip()[:1].isdigit()}
    assert set(rows) == {0.0, 0.5, 1.0}
    # alpha = 0: threshold 1/C and uniform; alpha = 1: the distribution itself
    assert abs(float(rows[0.0][0]) - 1 / 3) < 1e-4 and abs(float(rows[0.0][1]) - 1 / 3) < 1e-4
    assert abs(float(rows[1.0][1]) - 0.5) < 1e-4 and abs(float(rows[1.0][2]) - 0.2) < 1e-4
    # threshold of alpha=0.5: (sum sqrt p)^-2
    expected = (0.5**0.5 + 0.3**0.5 + 0.2**0.5) ** -2
    assert abs(float(rows[0.5][0]) - expected) < 1e-4


def test_pgt_cli_default_alphas(tmp_path):
    out = tmp_path / "default.png"
    assert main(["pgt", "--plot", str(out)]) == 0
    assert out.exists()


def test_pgt_cli_rejects_bad_alpha(capsys):
    assert main(["pgt", "--alpha", "1.5"]) != 0
    assert "alpha" in capsys.readouterr().err
    assert main(["pgt", "--probs", "1", "-1"]) != 0


def _rows(text: str) -> set[float]:
    return {float(line.split()[0]) for line in text.splitlines() if line.strip()[:1].isdigit()}


def test_pgt_cli_single_alpha_is_shown_with_reference_alphas(tmp_path, capsys, monkeypatch):
    """Like the paper's Figure 2: a single --alpha is drawn next to 1, 0.5 and 0, in colours
    visible on white; several alphas are shown as given (plus alpha = 1)."""
    import matplotlib.colors as mcolors
    import matplotlib.pyplot as plt

    from reparam.cli import pgt as pgt_cli

    figures, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig: figures.append(fig))
    assert main(["pgt", "--alpha", "0.25", "--plot", str(tmp_path / "one.png")]) == 0
    assert _rows(capsys.readouterr().out) == {1.0, 0.5, 0.25, 0.0}
    labels = [line.get_label() for line in figures[0].axes[1].get_lines() if line.get_label().startswith("α")]
    assert len(labels) == 4 and "α = 0.25" in labels
    for line in figures[0].axes[0].get_lines():
        if line.get_label().startswith("α"):
            r, g, b = mcolors.to_rgb(line.get_color())
            assert 0.299 * r + 0.587 * g + 0.114 * b < 0.75, line.get_color()  # not too light on white
    assert set(pgt_cli.REFERENCE_ALPHAS) == {1.0, 0.5, 0.0}
    assert main(["pgt", "--alpha", "0.3", "0.05"]) == 0
    assert _rows(capsys.readouterr().out) == {1.0, 0.3, 0.05}
    for fig in figures:
        close(fig)


def test_pgt_cli_says_what_it_really_wrote(tmp_path, capsys):
    """A name without extension gets ``.png`` and the message names that file (it used to name
    the path it did not write)."""
    assert main(["pgt", "--plot", str(tmp_path / "figure")]) == 0
    assert (tmp_path / "figure.png").exists() and not (tmp_path / "figure").exists()
    assert f"wrote {tmp_path / 'figure.png'}" in capsys.readouterr().out
    assert main(["pgt", "--plot", str(tmp_path / "figure.svg")]) == 0
    assert (tmp_path / "figure.svg").read_text().lstrip().startswith("<?xml")



@pytest.mark.parametrize("name, words", [
    ("x.xyz", "'.xyz' is not a figure format"),
    ("", "is a folder; give a file name"),
    ("missing/fig.png", "does not exist"),
])
def test_pgt_cli_bad_plot_path_is_a_one_line_error(name, words, tmp_path, capsys):
    assert main(["pgt", "--plot", str(tmp_path / name)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("reparam pgt: error: --plot") and words in lines[0]
    assert "Traceback" not in captured.err and "threshold" not in captured.out  # checked before any output
    assert sorted(p.name for p in tmp_path.iterdir()) == []
