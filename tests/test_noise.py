"""Noise bank: reproducible per vector, unit norm, shaping as the seed describes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from residlab.errors import UsageError
from residlab.noising.covariance import CovarianceFitter, psd_sqrt
from residlab.noising.noise import (
    ESTIMATE_FILE,
    EstimateKey,
    find_cov_sqrt,
    load_cov_sqrt,
    noise_vector,
    noise_vectors,
)


def test_vector_i_does_not_depend_on_bank_size():
    small, large = noise_vectors(3, 2, 32), noise_vectors(3, 9, 32)
    np.testing.assert_array_equal(small, large[:2])
    np.testing.assert_array_equal(large[5], noise_vector(3, 5, 32))
    assert not np.allclose(noise_vectors(4, 2, 32), small)
    np.testing.assert_allclose(np.linalg.norm(large, axis=1), 1.0, atol=1e-12)


def test_shaping_follows_the_recipe():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((16, 16))
    cov_sqrt = psd_sqrt(a @ a.T)
    shaped = noise_vector(7, 2, 16, cov_sqrt)
    u = np.random.default_rng([7, 2]).standard_normal(16)
    u /= np.linalg.norm(u)
    v = cov_sqrt @ u
    np.testing.assert_allclose(shaped, v / np.linalg.norm(v), atol=1e-12)
    # Shaped directions lean towards high-variance axes.
    top = np.linalg.eigh(a @ a.T)[1][:, -1]
    plain_bank, shaped_bank = noise_vectors(0, 200, 16), noise_vectors(0, 200, 16, cov_sqrt)
    assert np.mean((shaped_bank @ top) ** 2) > 2 * np.mean((plain_bank @ top) ** 2)


def test_fitter_equals_numpy_cov_and_sqrt_squares_back():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((500, 12)) @ rng.standard_normal((12, 12)) + 3.0
    fitter = CovarianceFitter(12)
    for chunk in np.array_split(x, [7, 8, 100, 333]):
        fitter.update(chunk)
    result = fitter.result()
    np.testing.assert_allclose(result.cov, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(result.mean, x.mean(axis=0), rtol=1e-12)
    root = psd_sqrt(result.cov)
    np.testing.assert_allclose(root, root.T, atol=1e-12)
    np.testing.assert_allclose(root @ root, result.cov, rtol=1e-8, atol=1e-8)


def test_psd_sqrt_clamps_negative_eigenvalues():
    cov = np.diag([4.0, 1.0, -1e-9])
    np.testing.assert_allclose(psd_sqrt(cov), np.diag([2.0, 1.0, 0.0]), atol=1e-12)


def test_cov_sqrt_checks(tmp_path):
    np.save(tmp_path / "wrong.npy", np.eye(3))
    with pytest.raises(ValueError, match=r"shape \(3, 3\).*hidden size is 4"):
        load_cov_sqrt(tmp_path / "wrong.npy", 4)
    bad = np.eye(4)
    bad[0, 1] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(ValueError, match="NaN"):
        load_cov_sqrt(tmp_path / "nan.npy", 4)


def test_malformed_npy_is_named_as_such(tmp_path):
    text = tmp_path / "cov_sqrt.npy"
    text.write_text("0.1 0.2\n0.3 0.4\n")
    with pytest.raises(UsageError, match=r"is not a NumPy array file \(\.npy\)") as error:
        load_cov_sqrt(text, 2)
    assert "pickle" not in str(error.value)
    np.savez(tmp_path / "archive.npz", a=np.eye(2))
    with pytest.raises(UsageError, match="not a NumPy array file"):
        load_cov_sqrt(tmp_path / "archive.npz", 2)
    np.save(tmp_path / "words.npy", np.array([["a", "b"], ["c", "d"]]))
    with pytest.raises(UsageError, match="non-real"):
        load_cov_sqrt(tmp_path / "words.npy", 2)


def _estimate(root, stamp: str, layer: int | None) -> None:
    """A fake estimate directory; ``layer=None`` leaves out its provenance record."""
    folder = root / "cov" / stamp
    folder.mkdir(parents=True)
    np.save(folder / "cov_sqrt.npy", np.eye(2))
    if layer is not None:
        record = {"model": {"source": "hub", "model": "org/m"}, "layer_index": layer,
                  "site": "resid_pre"}
        (folder / ESTIMATE_FILE).write_text(json.dumps(record))


def test_find_cov_sqrt_takes_the_newest_matching_estimate(tmp_path):
    want = EstimateKey({"source": "hub", "model": "org/m"}, 3, "resid_pre")
    assert find_cov_sqrt(tmp_path, None, want=want) is None
    np.save(tmp_path / "cov_sqrt.npy", np.eye(2))  # legacy, unknown provenance
    with pytest.raises(UsageError, match=r"newest, .*cov_sqrt.npy, has no estimate.json"):
        find_cov_sqrt(tmp_path, None, want=want)
    for stamp, layer in [("20260101-000000", 3), ("20260201-000000", 3), ("20260301-000000", 5),
                         ("20260401-000000", None), (".staging-x", 3)]:
        _estimate(tmp_path, stamp, layer)
    assert find_cov_sqrt(tmp_path, None, want=want) == (
        tmp_path / "cov" / "20260201-000000" / "cov_sqrt.npy")
    assert find_cov_sqrt(tmp_path, None) == tmp_path / "cov" / "20260301-000000" / "cov_sqrt.npy"
    other = EstimateKey({"source": "hub", "model": "org/m", "revision": "abc"}, 3, "resid_pre")
    with pytest.raises(UsageError, match=r"none of the 5 .*newest, .*20260401-000000"):
        find_cov_sqrt(tmp_path, None, want=other)
    (tmp_path / "cov" / "20260401-000000").rename(tmp_path / "cov" / ".old")
    with pytest.raises(UsageError, match=r"was made for model org/m \(this run: org/m revision "
                                         r"abc\), layer_index 5 \(this run: 3\)"):
        find_cov_sqrt(tmp_path, None, want=other)
    explicit = str(tmp_path / "cov_sqrt.npy")
    assert find_cov_sqrt(tmp_path, explicit, want=other) == tmp_path / "cov_sqrt.npy"
    with pytest.raises(UsageError, match="not found"):
        find_cov_sqrt(tmp_path, str(tmp_path / "missing.npy"))
