import pytest

from culturemert.plotting import pyplot, save_figure


def test_save_figure_writes_a_png_and_leaves_no_temp_file(tmp_path):
    plt = pyplot()
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    path = save_figure(fig, tmp_path / "curve.png", dpi=50)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curve.png"]
    assert not plt.get_fignums()  # closed


def test_a_failing_save_keeps_the_previous_figure(tmp_path):
    plt = pyplot()
    target = tmp_path / "curve.png"
    fig, _ = plt.subplots()
    save_figure(fig, target, dpi=50)
    before = target.read_bytes()
    fig, _ = plt.subplots()
    with pytest.raises(AttributeError):  # matplotlib raises while saving
        save_figure(fig, target, dpi=50, bbox_inches="no-such-mode")
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curve.png"]
