"""``reparam pgt`` writes a PNG, prints the table and exits 0; bad alphas exit non-zero."""
from __future__ import annotations

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
