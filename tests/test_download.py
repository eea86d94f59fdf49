import pytest

from models.checkpoints import download


def test_unreachable_network_is_one_clear_line(monkeypatch, tmp_path, capsys):
    import gdown

    def offline(**kw):
        raise OSError("Failed to resolve 'drive.google.com'")
    monkeypatch.setattr(gdown, "download", offline)
    assert download.main(["gpt2", "--output_dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: could not download gpt2") and "\n" not in err
    assert not any(tmp_path.rglob("*.bin")) and not any(tmp_path.rglob("*.part"))


def test_download_lands_atomically_under_the_released_name(monkeypatch, tmp_path):
    import gdown

    def fake(id, output, quiet):
        assert id == download.RELEASED["gemma_2b"][0]
        with open(output, "wb") as f:
            f.write(b"weights")
        return output
    monkeypatch.setattr(gdown, "download", fake)
    path = download.download("gemma_2b", str(tmp_path))
    assert path == tmp_path / "gemma_2b" / "ft_wiki_laion_220_2.bin" and path.read_bytes() == b"weights"


def test_unknown_name():
    with pytest.raises(ValueError, match="unknown released checkpoint"):
        download.download("gpt5")
